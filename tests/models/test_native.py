"""models/native.py and native.cpp: the library is built once per machine, loads, checks what it is given on
every CPU, and computes the same function on both x86-64 levels; without a compiler the server keeps PyTorch's kernels."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import native
from models.loader import cache_root

AVX2 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "sse4_2"})


def test_the_level_is_the_widest_this_cpu_runs() -> None:
    assert native.level(AVX2) == "x86-64-v3"
    assert native.level(AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}) == "x86-64-v4"
    assert native.level(AVX2 | {"avx512f"}) == "x86-64-v3"  # AVX-512 without its v4 companions
    assert native.level(AVX2 - {"fma"}) is None
    assert native.level(frozenset()) is None  # another architecture, or no /proc/cpuinfo


@pytest.fixture(scope="module")
def loaded() -> None:
    if not native.load(cache_root()):
        pytest.skip("models/native.cpp did not build or load here (the log says why)")


def test_a_built_library_is_reused_not_rebuilt(loaded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    level = native.level()
    assert level is not None
    path = native.library_path(cache_root(), level)
    assert path.exists()

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build(cache_root(), level) == path


def test_without_a_compiler_the_build_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native.build(tmp_path, "x86-64-v3")
    assert not native._load(tmp_path)  # the server then keeps PyTorch's kernels
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_a_compile_error_is_reported_not_raised_at_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "native.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="building models/native.cpp failed"):
        native.build(tmp_path, "x86-64-v3")
    assert not native._load(tmp_path)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda width: (torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(4, 64, width)), "float32 only"),
        (lambda width: (torch.zeros(2, 64), torch.zeros(4, 64, width + 1)), "must be"),  # another vector width
        (lambda width: (torch.zeros(2, 64), torch.zeros(64, 4, width).transpose(0, 1)), "must be"),  # not contiguous
        (lambda width: (torch.zeros(2, 32), torch.zeros(4, 64, width)), "features"),
    ],
)
def test_the_kernel_refuses_what_it_cannot_compute_on_every_cpu(
    loaded: None, inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]], message: str
) -> None:
    x, panels = inputs(native.width())
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tokenferry.panel_linear(x, panels)


# Run in a fresh interpreter: one process registers one library under torch.ops.tokenferry.
_CHECK = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    torch.ops.load_library(sys.argv[1])
    from models import native, packed
    torch.manual_seed(0)
    linear = nn.Linear(576, 960, bias=False)
    x = torch.randn(37, 576)
    module = packed.PanelLinear(linear)
    with torch.inference_mode():
        got, expected = module(x), linear(x)
        alone = torch.cat([module(x[i : i + 1]) for i in range(37)])
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), "not F.linear's function"
    assert torch.equal(got, alone), "a row differs between a call of 37 rows and a call of its own"
    print(native.width())
    """
)


@pytest.mark.parametrize("level", list(native.LEVELS))
def test_every_level_this_cpu_runs_computes_the_same_function(level: str, tmp_path: Path) -> None:
    """On an AVX-512 machine this also builds and runs the AVX2 library: both code paths, one CPU."""
    if not native.LEVELS[level] <= native.cpu_flags():
        pytest.skip(f"this CPU does not run {level}")
    try:
        path = native.build(tmp_path, level)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    done = subprocess.run([sys.executable, "-c", _CHECK, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == {"x86-64-v4": 16, "x86-64-v3": 8}[level]
