"""models/native.py and native.cpp: the library is built once per machine, loads, checks what it is given on
every CPU, and computes the same functions as PyTorch's on both x86-64 levels, each row the same bits in any
batch; without a compiler the server keeps PyTorch's kernels."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models import attention, load, native, sampler
from models.loader import cache_root
from models.packed import PanelLinear
from tests.helpers import require_native

AVX2 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "sse4_2"})


def test_the_level_is_the_widest_this_cpu_runs() -> None:
    avx512 = AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert native.level(AVX2) == "x86-64-v3"
    assert native.level(avx512) == "x86-64-v4"
    assert native.level(avx512 | {"avx512_bf16"}) == "x86-64-v4-bf16"
    assert native.level(AVX2 | {"avx512_bf16"}) == "x86-64-v3"
    assert native.level(AVX2 | {"avx512f"}) == "x86-64-v3"  # AVX-512 without its v4 companions
    assert native.level(AVX2 - {"fma"}) is None
    assert native.level(frozenset()) is None  # another architecture, or no /proc/cpuinfo


@pytest.fixture(scope="module")
def loaded() -> None:
    require_native()


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
        (lambda width: (torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(4, 64, width)), "float32 or bfloat16"),
        (lambda width: (torch.zeros(2, 64).half(), torch.zeros(4, 64, width).half()), "float32 or bfloat16"),
        (lambda width: (torch.zeros(2, 63).bfloat16(), torch.zeros(4, 63, width).bfloat16()), "even number"),
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


def sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """PyTorch's attention on the native attention's arguments: query [rows, heads, q, dim] -> [rows, q, heads, dim]."""
    group = query.shape[1] // keys.shape[1]
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731  [rows, heads, cols, dim]
    out = F.scaled_dot_product_attention(query, expand(keys), expand(values), attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


def attention_case(
    rows: int, cols: int, q: int = 1, heads: int = 9, kv_heads: int = 3, dim: int = 64, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Keys and values as the runner hands them: a window of a larger store (strided); each row's mask keeps
    a left-padded run of columns with a hole in every other row, as a row that joined a batch mid-flight has,
    and its q queries (the row's last q columns) are causal."""
    torch.manual_seed(rows * 1000 + cols + q)
    store = torch.randn(2, rows + 3, kv_heads, cols + 40, dim).to(dtype)
    keys, values = store[0, 2 : rows + 2, :, 7 : cols + 7], store[1, 2 : rows + 2, :, 7 : cols + 7]
    query = torch.randn(rows, heads + 5, q, dim).to(dtype)[:, 2 : heads + 2]  # [rows, heads, q, dim], strided
    mask = torch.zeros(rows, q, cols, dtype=torch.bool)
    for row in range(rows):
        start = (row * 7) % (cols - q + 1)
        mask[row, :, start:] = True
        if row % 2 == 0 and cols - q - start > 2:
            mask[row, :, start + (cols - q - start) // 2] = False
        for t in range(q):  # query t sits at column cols - q + t
            mask[row, t, cols - q + t + 1 :] = False
    return query, keys, values, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "cols", "q"), [(1, 1, 1), (1, 40, 1), (3, 17, 1), (32, 150, 1), (5, 700, 1), (1, 30, 30), (3, 90, 12)])
def test_attention_computes_sdpas_function(loaded: None, rows: int, cols: int, q: int, dtype: torch.dtype) -> None:
    query, keys, values, mask = attention_case(rows, cols, q, dtype=dtype)
    got = torch.ops.tokenferry.attention(query, keys, values, mask, 0.125)
    expected = sdpa(query.float(), keys.float(), values.float(), mask, 0.125)  # in float32, from the same values
    assert got.shape == (rows, q, 9, 64) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's own rounding
    assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [1, 7])
def test_a_querys_attention_is_the_same_bits_whatever_its_batch_and_chunks(loaded: None, q: int, dtype: torch.dtype) -> None:
    """A query's kept columns alone, packed to the left, give its output bit for bit: whatever padding its
    batch holds and whichever other queries (a prompt's chunk) share its call."""
    query, keys, values, mask = attention_case(6, 90, q, dtype=dtype)
    batched = torch.ops.tokenferry.attention(query, keys, values, mask, 0.125)  # [rows, q, heads, dim]
    for row in range(6):
        for t in range(q):
            kept = mask[row, t].nonzero()[:, 0]
            alone = torch.ops.tokenferry.attention(
                query[row : row + 1, :, t : t + 1], keys[row : row + 1, :, kept], values[row : row + 1, :, kept],
                torch.ones(1, 1, len(kept), dtype=torch.bool), 0.125,
            )  # fmt: skip
            assert torch.equal(alone[0, 0], batched[row, t]), f"row {row}, query {t}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v, m: (q.half(), k.half(), v.half(), m), "float32 or bfloat16"),
        (lambda q, k, v, m: (q.bfloat16(), k, v, m), "float32 or bfloat16"),
        (lambda q, k, v, m: (q, k, v, m.transpose(1, 2).contiguous().transpose(1, 2)), "mask must be"),
        (lambda q, k, v, m: (q, k, v, m[:, :, :-1]), "mask must be"),
        (lambda q, k, v, m: (q, k, v, m[:, 0]), "mask must be"),
        (lambda q, k, v, m: (q[..., :60], k[..., :60], v[..., :60], m), "head size"),  # no multiple of 8 nor 16
        (lambda q, k, v, m: (q[:, :8], k, v, m), "heads over"),
        (lambda q, k, v, m: (q[..., ::2], k[..., ::2], v[..., ::2], m), "contiguous"),
    ],
)
def test_attention_refuses_what_it_cannot_compute_on_every_cpu(
    loaded: None, change: Callable[..., tuple[torch.Tensor, ...]], message: str
) -> None:
    query, keys, values, mask = change(*attention_case(4, 30, 2))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tokenferry.attention(query, keys, values, mask, 0.125)


def rotary_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [rows, q, heads, dim] of 9 query, 3 key and 3 value heads of 64; cos and sin [rows, q, dim]; and
    transformers' own rotary embedding of the first 12 heads."""
    torch.manual_seed(3)
    qkv = torch.randn(5, 3, 15, 64).to(dtype)
    cos, sin = torch.randn(5, 3, 64).to(dtype), torch.randn(5, 3, 64).to(dtype)
    expected = apply_rotary_pos_emb(qkv[:, :, :12], qkv[:, :, :12], cos, sin, unsqueeze_dim=2)[0]
    return qkv, cos, sin, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_embedding_is_transformers_bit_for_bit(loaded: None, dtype: torch.dtype) -> None:
    qkv, cos, sin, expected = rotary_case(dtype)
    assert torch.equal(torch.ops.tokenferry.rotary(qkv, cos, sin, 12), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, c, s: (x.half(), c.half(), s.half(), 12), "float32 or bfloat16"),
        (lambda x, c, s: (x, c.bfloat16(), s, 12), "float32 or bfloat16"),
        (lambda x, c, s: (x.transpose(1, 2), c, s, 12), "contiguous"),
        (lambda x, c, s: (x, c[:, :2].contiguous(), s[:, :2].contiguous(), 12), "cos and sin must be"),
        # 24: a multiple of the vector width on AVX2 (8) but of no pair of vectors (16, or 32 on AVX-512)
        (lambda x, c, s: (x[..., :24].contiguous(), c[..., :24].contiguous(), s[..., :24].contiguous(), 12), "head size"),
        (lambda x, c, s: (x, c, s, 16), "heads to turn"),
    ],
)
def test_rotary_refuses_what_it_cannot_compute_on_every_cpu(
    loaded: None, change: Callable[..., tuple[object, ...]], message: str
) -> None:
    qkv, cos, sin, _ = rotary_case(torch.float32)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tokenferry.rotary(*change(qkv, cos, sin))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_served_model_attends_natively_when_the_library_loaded(loaded: None, dtype: str) -> None:
    assert load("tiny", dtype=dtype).model.config._attn_implementation == attention.NATIVE
    assert load("tiny", dtype=dtype, fuse=False).model.config._attn_implementation == attention.NAME  # transformers' own


# Run in a fresh interpreter: one process registers one library under torch.ops.tokenferry.
def argmax_cases() -> list[torch.Tensor]:
    """Rows [rows, n] whose argmax a vectorized kernel could get wrong: ties across vectors and in the tail (n not a
    multiple of the vector), a NaN (torch counts it as the largest), every value -inf, -0 against +0."""
    torch.manual_seed(0)
    cases = [torch.randn(rows, n) for rows, n in ((1, 1), (3, 7), (5, 16), (32, 49152), (4, 49157))]
    ties = torch.randn(6, 100)
    for row, places in enumerate(([3, 40], [40, 3], [17, 99], [98, 99], [0, 16, 32], [96, 97])):
        ties[row, places] = 9.0
    nan = torch.randn(3, 100)
    nan[0, 50], nan[1, [20, 98]], nan[2, 99] = float("nan"), float("nan"), float("nan")
    nan[0, 10] = float("inf")
    zeros = torch.full((2, 20), -1.0)
    zeros[0, [4, 9]] = torch.tensor([-0.0, 0.0])
    zeros[1, [4, 9]] = torch.tensor([0.0, -0.0])
    return [*cases, ties, nan, torch.full((2, 33), float("-inf")), zeros]


def test_argmax_is_torchs(loaded: None) -> None:
    for logits in argmax_cases():
        assert torch.equal(torch.ops.tokenferry.argmax(logits), logits.argmax(dim=-1)), logits.shape
    assert torch.equal(sampler.argmax(argmax_cases()[3]), argmax_cases()[3].argmax(dim=-1))
    with pytest.raises(RuntimeError, match="argmax: x must be"):
        torch.ops.tokenferry.argmax(torch.randn(4, 64).t())  # not contiguous: every CPU refuses it


_CHECK = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    torch.ops.load_library(sys.argv[1])
    from models import native, packed
    from tests.models.test_native import argmax_cases, attention_case, rotary_case, sdpa
    for logits in argmax_cases():
        assert torch.equal(torch.ops.tokenferry.argmax(logits), logits.argmax(dim=-1)), logits.shape
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        torch.manual_seed(0)
        linear = nn.Linear(576, 960, bias=False).to(dtype)
        x = torch.randn(37, 576).to(dtype)
        module = packed.PanelLinear(linear)
        with torch.inference_mode():
            got, expected = module(x).float(), (x.float() @ linear.weight.float().T)
            alone = torch.cat([module(x[i : i + 1]) for i in range(37)]).float()
        assert (got - expected).abs().max() <= tolerance * expected.abs().max(), f"not F.linear's function in {dtype}"
        assert torch.equal(got, alone), f"a row differs between a call of 37 rows and a call of its own in {dtype}"
        query, keys, values, mask = attention_case(3, 90, 12, dtype=dtype)
        got = torch.ops.tokenferry.attention(query, keys, values, mask, 0.125).float()
        expected = sdpa(query.float(), keys.float(), values.float(), mask, 0.125)
        assert (got - expected).abs().max() <= tolerance * expected.abs().max(), f"not SDPA's function in {dtype}"
        qkv, cos, sin, expected = rotary_case(dtype)
        assert torch.equal(torch.ops.tokenferry.rotary(qkv, cos, sin, 12), expected), f"not transformers' rotary in {dtype}"
    from models import quant
    from models.quant_weights import quantize_int4, quantize_int8
    weight, x = torch.randn(112, 576) * 0.05, torch.randn(37, 576)  # 7 panels of 16: an edge of one panel past 8 rows
    int4, int8 = quantize_int4(weight), quantize_int8(weight)
    # int4 reads bfloat16 rows (AVX-512), or rows quantized to 16 bits (AVX2: 8 lanes)
    from tests.helpers import int4_of_quantized_inputs
    int4_of = (lambda x: int4_of_quantized_inputs(x, int4)) if native.width() == 8 else (lambda x: x.bfloat16().double() @ int4.dequantize().double().T)
    for module, product in (
        (quant.Int4PanelLinear(int4, None), int4_of),
        (quant.Int8PanelLinear(int8, None), lambda x: x.double() @ (int8.codes.double() * int8.scales.double()[:, None]).T),
    ):
        with torch.inference_mode():
            got, alone = module(x), torch.cat([module(x[i : i + 1]) for i in range(37)])
        expected = product(x).float()
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), f"not {module.kind}'s function"
        assert torch.equal(got, alone), f"{module.kind}: a row differs between a call of 37 rows and one of its own"
    print(native.width())
    """
)


@pytest.mark.parametrize("level", list(native.LEVELS))
def test_every_level_this_cpu_runs_computes_the_same_function(level: str, tmp_path: Path) -> None:
    """On an AVX-512 machine this also builds and runs the AVX2 library: both code paths, one CPU."""
    if not native.LEVELS[level].needs <= native.cpu_flags():
        pytest.skip(f"this CPU does not run {level}")
    try:
        path = native.build(tmp_path, level)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _CHECK, str(path)], capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == (8 if level == "x86-64-v3" else 16)


def decoder_layer_case() -> dict[str, object]:
    """`decoder_layer`'s arguments for 2 rows of a layer of 2 query heads and 1 key-value head of 64, hidden 128, in a
    store of 4 rows and 10 columns: rows 1 and 2 write column 6 and attend to columns 3 to 6."""
    torch.manual_seed(4)

    def weights(n: int, k: int) -> list[torch.Tensor]:
        return list(PanelLinear(torch.nn.Linear(k, n, bias=False)).native_weights() or ())

    return {
        "hidden": torch.randn(2, 128), "input_norm": torch.rand(128), "input_eps": 1e-5, "post_norm": torch.rand(128),
        "post_eps": 1e-5, "qkv": weights(256, 128), "o": weights(128, 128), "gate_up": weights(512, 128),
        "down": weights(128, 256), "keys": torch.randn(4, 1, 10, 64), "values": torch.randn(4, 1, 10, 64),
        "first_row": 1, "start": 3, "write_at": 6, "mask": torch.ones(2, 1, 4, dtype=torch.bool),
        "cos": torch.randn(2, 1, 64), "sin": torch.randn(2, 1, 64), "heads": 2, "scaling": 0.125,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"first_row": 3}, "outside the store"),
        ({"write_at": 10, "mask": torch.ones(2, 1, 8, dtype=torch.bool)}, "outside the store"),
        ({"start": 7}, "outside the store"),
        ({"mask": torch.ones(2, 1, 5, dtype=torch.bool)}, "mask must be"),
        ({"hidden": torch.randn(2, 1, 128)}, "hidden must be"),
        ({"o": [torch.randn(8, 128, 16)] * 3}, "a projection is"),
        ({"keys": torch.randn(4, 1, 10, 64).bfloat16(), "values": torch.randn(4, 1, 10, 64).bfloat16()}, "the store's dtype"),
        ({"keys": torch.randn(4, 1, 10, 128)[..., ::2], "values": torch.randn(4, 1, 10, 128)[..., ::2]}, "contiguous"),
    ],
)
def test_a_decoder_layer_refuses_what_it_cannot_compute_on_every_cpu(
    loaded: None, change: dict[str, object], message: str
) -> None:
    arguments = decoder_layer_case()
    assert torch.ops.tokenferry.decoder_layer(**arguments).shape == (2, 128)  # as given, it computes
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tokenferry.decoder_layer(**{**arguments, **change})
