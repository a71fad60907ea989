"""tokenferry's own CPU kernels (models/native.cpp), built once per machine and loaded as `torch.ops.tokenferry`.

The library is compiled with the system's C++ compiler against the installed PyTorch, for the widest level in
LEVELS this CPU has: AVX-512 with its bfloat16 dot product, AVX-512 (x86-64-v4), or AVX2 and FMA (x86-64-v3).
It is cached under the model cache (`kernels/`), named by the source, the compiler flags, the PyTorch version
and the level, so later starts load it in milliseconds; the image builds every level ahead (`python -m
models.native --all-levels`, Dockerfile). With no compiler, another CPU, or a failed build, `load` says why
once and the callers keep PyTorch's kernels.

    python -m models.native [--all-levels]     build (and load) the library for this machine, or every level
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.cpp_extension

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
_V3 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Level:
    """An instruction set the library is built for: the /proc/cpuinfo flags it needs, the compiler's flags."""

    needs: frozenset[str]
    flags: tuple[str, ...]


# Widest first. The first two are GCC's x86-64 micro-architecture levels v4 and v3.
LEVELS = {
    "x86-64-v4-bf16": Level(_V4 | {"avx512_bf16"}, ("-march=x86-64-v4", "-mavx512bf16")),
    "x86-64-v4": Level(_V4, ("-march=x86-64-v4",)),
    "x86-64-v3": Level(_V3, ("-march=x86-64-v3",)),
}
_BUILD_SECONDS = 300

_lock = threading.Lock()
_loaded: bool | None = None  # None until `load` has run: a TORCH_LIBRARY registers once per process


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them; empty where /proc/cpuinfo does not list them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def level(flags: frozenset[str] | None = None) -> str | None:
    """The widest level in LEVELS this CPU runs, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name, chosen in LEVELS.items() if chosen.needs <= flags), None)


def _command(level: str, output: Path) -> list[str]:
    include = torch.utils.cpp_extension.include_paths()
    libraries = torch.utils.cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        os.environ.get("CXX") or "c++",
        "-O3",
        *LEVELS[level].flags,
        "-std=gnu++17",
        "-shared",
        "-fPIC",
        "-ffp-contract=off",  # products and sums round as written: the rotary embedding matches PyTorch's bit for bit
        "-fopenmp",  # ATen's parallel_for is OpenMP in its header; at load it binds to PyTorch's own libgomp
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in include),
        str(SOURCE),
        "-o",
        str(output),
        *(f"-L{path}" for path in libraries),
        *(f"-Wl,-rpath,{path}" for path in libraries),
        "-lc10",
        "-ltorch_cpu",
    ]


def library_path(root: Path, level: str) -> Path:
    """Where the library for `level` is cached: the name changes with the source, flags and PyTorch."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_command(level, Path("out"))).encode())  # the compiler, flags and PyTorch's paths
    key.update(torch.__version__.encode())
    return root / "kernels" / f"native-{level}-{key.hexdigest()[:16]}.so"


def build(root: Path, level: str) -> Path:
    """The cached library for `level`, compiled first if missing; raises RuntimeError naming what failed."""
    path = library_path(root, level)
    if path.exists():
        return path
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        raise RuntimeError("no C++ compiler (c++ or $CXX) to build models/native.cpp")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        try:
            done = subprocess.run(_command(level, built), capture_output=True, text=True, timeout=_BUILD_SECONDS)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"building models/native.cpp took over {_BUILD_SECONDS} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"building models/native.cpp failed: {last}")
        os.replace(built, path)  # atomic: processes building at once each install a whole file
    log.info("native kernels built", extra={"level": level, "seconds": round(time.perf_counter() - started, 1)})
    return path


def load(root: Path) -> bool:
    """Load the library for this CPU, building it first if need be; True if `torch.ops.tokenferry` is there.
    Once per process: later calls return the first answer."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load(root)
        return _loaded


def _load(root: Path) -> bool:
    chosen = level()
    if chosen is None:
        log.info("native kernels off: this CPU has neither AVX-512 nor AVX2 with FMA")
        return False
    try:
        torch.ops.load_library(str(build(root, chosen)))
    except (RuntimeError, OSError) as exc:
        log.warning("native kernels off, PyTorch's kernels serve", extra={"reason": str(exc)})
        return False
    return True


def loaded() -> bool:
    """Whether `load` has loaded the library in this process (torch.ops.tokenferry is there)."""
    return bool(_loaded)


def computes_bfloat16() -> bool:
    """Whether the loaded library has a native bfloat16 dot product (the x86-64-v4-bf16 level: AVX512-BF16), where
    bfloat16 weights are read at half float32's bytes and multiplied at twice its rate."""
    return loaded() and level() == "x86-64-v4-bf16"


def int4_quantizes_inputs() -> bool:
    """Whether the loaded library's int4 kernel multiplies its inputs quantized to 16 bits, a scale per group of 32
    (the AVX2 level), rather than rounded to bfloat16 (the AVX-512 levels)."""
    return loaded() and width() == 8  # the AVX2 build's vectors


def width() -> int:
    """float32 lanes per vector in the loaded library: the panel width of `panel_linear`'s weights."""
    return int(torch.ops.tokenferry.panel_width())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all-levels", action="store_true", help="build every level, not only this CPU's")
    args = parser.parse_args()
    from models.loader import cache_root

    root = cache_root()
    for name in LEVELS if args.all_levels else [level()]:
        if name is None:
            sys.exit("this CPU has neither AVX-512 nor AVX2 with FMA")
        print(build(root, name))


if __name__ == "__main__":
    main()
