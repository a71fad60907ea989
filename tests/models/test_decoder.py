"""models/decoder.py, the Llama forward written out for every mode, computes what transformers' forward
computes over the same weights, bit for bit: at prefill, at decode, in a decode step reading prompts (a chunk, a whole one), and
in a draft's verification (every position's logits)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from models import LoadedModel, decoder, load, loader
from models.loader import default_gguf
from models.runner import ModelRunner
from models.types import Part
from tests.helpers import Row, require_native


def every_forwards_logits(loaded: LoadedModel) -> list[torch.Tensor]:
    """The logits of each forward of one fixed scenario. Inputs are forced (token 40 + step), not sampled, so
    that both forwards see the same inputs even where a near-tie would make them choose apart."""
    logits: list[torch.Tensor] = []

    def runner(rows: int) -> ModelRunner[Row]:
        made: ModelRunner[Row] = ModelRunner(loaded.model, max_rows=rows)
        forward = made._forward
        made._forward = lambda inputs, every_position: logits.append(forward(inputs, every_position)) or logits[-1]
        return made

    def feed(rows: list[Row]) -> None:
        for row in rows:
            row.output_ids.append(40 + len(row.output_ids))

    running = runner(8)
    rows = [Row([5, 6, 7, 8, 9]), Row([10, 11]), Row([12, 13, 14])]  # three lengths: left padding
    running.prefill(rows)
    feed(rows)
    for _ in range(3):
        running.decode()
        feed(rows)
    long = Row([20 + i % 50 for i in range(30)])
    short = Row([30, 31, 32])
    # Flattened forwards: the decode step and the parts' tokens in one sequence; the short prompt is read whole.
    running.decode_with([Part(long, 10), Part(short, 3)])
    feed([*rows, short])
    rows.append(short)
    for _ in range(2):
        running.decode_with([Part(long, 10)])
        feed(rows)
    feed([long])
    for _ in range(2):
        running.decode()
        feed([*rows, long])
    alone = runner(1)
    row = Row([7, 8, 9, 10])
    alone.prefill([row])
    feed([row])
    alone.verify([50, 51, 52])
    return logits


@pytest.mark.parametrize(
    ("model", "mode", "dtype"),
    [
        ("tiny", "none", "float32"),
        ("tiny", "none", "bfloat16"),
        ("tiny", "int8", "float32"),
        ("tiny", "int4", "float32"),
        ("tiny", "int4", "bfloat16"),
        pytest.param("default", "none", "float32", marks=pytest.mark.slow),
        pytest.param("default", "none", "bfloat16", marks=pytest.mark.slow),
        pytest.param("default", "int4", "float32", marks=pytest.mark.slow),
    ],
)
def test_the_written_out_forward_computes_what_transformers_forward_does(model: str, mode: str, dtype: str) -> None:
    """On the same kernels: quantized ones, or for float weights PyTorch's own Linear (fused here, not packed), and
    PyTorch's attention, norms and activation (not models/native.cpp's)."""
    apart = load(model, dtype=dtype, quantization=mode, fuse=False)
    written = load(model, dtype=dtype, fuse=False)
    if mode == "none":
        decoder.fuse(written.model)
    else:  # fused as the loader fuses, on PyTorch's kernels as `apart` (the GGUF's own blocks in int4)
        gguf = default_gguf() if model == "default" else None
        loader._quantize(written.model, mode, gguf, None, model, fuse=True)
    assert decoder.fused(written.model) and not decoder.fused(apart.model)
    got, expected = every_forwards_logits(written), every_forwards_logits(apart)
    assert [t.shape for t in got] == [t.shape for t in expected] and len(got) == 1 + 3 + 1 + 2 + 2 + 2
    for step, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(mine, theirs), f"forward {step}"  # the same operations on the same values: bit for bit


@pytest.mark.parametrize(
    ("model", "dtype"),
    [
        ("tiny", "float32"),
        ("tiny", "bfloat16"),
        pytest.param("default", "float32", marks=pytest.mark.slow),
        pytest.param("default", "bfloat16", marks=pytest.mark.slow),
    ],
)
def test_served_logits_differ_from_transformers_by_rounding_only(model: str, dtype: str) -> None:
    """As served (fused, on packed weights or models/native.cpp's kernels) against transformers' forward: another
    summation order in every matmul, norm and attention. float32 agrees to its own rounding. bfloat16's rounding
    moves logits by percents either way, so there the served logits must be as close to float32's as
    transformers' bfloat16 ones are (measured: 7.9% against 8.0% of the largest logit on tiny, 6.6% against
    5.3% on SmolLM2)."""
    served = every_forwards_logits(load(model, dtype=dtype))
    theirs = every_forwards_logits(load(model, dtype=dtype, fuse=False))
    if dtype == "float32":
        for step, (mine, other) in enumerate(zip(served, theirs, strict=True)):
            assert (mine - other).abs().max() <= 1e-4 * other.abs().max(), f"forward {step}"  # measured: 7.7e-6 on SmolLM2
        return
    truth = every_forwards_logits(load(model, fuse=False))  # float32

    def error(logits: list[torch.Tensor]) -> float:
        return max(((got.float() - true).abs().max() / true.abs().max()).item() for got, true in zip(logits, truth, strict=True))

    assert error(served) <= 1.5 * error(theirs)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "mode"), [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "int4")])
def test_a_layer_in_one_native_call_computes_what_its_operations_one_by_one_do(
    dtype: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A served decode step runs each layer as one call of models/native.cpp's `decoder_layer`; the same forwards
    with it turned off run the layer's operations one by one. The same kernels in the same order: the same bits,
    and the store holds the same keys and values (the steps after each read them)."""
    require_native()
    loaded = load("default", dtype=dtype, quantization=mode)
    one_call_a_layer, calls = decoder._layers_natively, []
    monkeypatch.setattr(decoder, "_layers_natively", lambda *args: calls.append(args[1].shape[0]) or one_call_a_layer(*args))
    got = every_forwards_logits(loaded)
    assert calls == [3, 3, 3, 5, 5]  # the plain decode steps; prefills, flattened steps and the draft's check are not
    monkeypatch.setattr(decoder, "_one_call_a_layer", lambda layers, inputs: False)
    expected = every_forwards_logits(loaded)
    for step, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(mine, theirs), f"forward {step}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_rounds_as_transformers_does(dtype: torch.dtype) -> None:
    """In bfloat16 PyTorch's fused rms_norm rounds otherwise than LlamaRMSNorm (the tiny model's values happen
    not to show it; SmolLM2's do), so the written-out forward keeps the module there."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    hidden = (torch.randn(4, 3, 576) * 3).to(dtype)  # [rows, q, hidden]
    assert torch.equal(decoder._norm(hidden, norm), norm(hidden).reshape(12, 576))


def test_only_a_plain_llama_is_fused() -> None:
    """Biases are not in the written-out forward: such a model keeps transformers' forward."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    assert decoder.fusions(LlamaForCausalLM(config)) == {}
    assert len(decoder.fusions(LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "attention_bias": False})))) == 4
