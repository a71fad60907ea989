"""models/packed.py: float Linears on oneDNN's packed weights compute F.linear's function, each row alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import load, packed

pytestmark = pytest.mark.skipif(not packed.available(torch.device("cpu"), torch.float32), reason="no oneDNN in this PyTorch")

DTYPES = [torch.float32, torch.bfloat16]


def _linear(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.05)
    return linear.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_what_f_linear_does(dtype: torch.dtype, bias: bool) -> None:
    linear = _linear(96, 576, dtype, bias)
    module = packed.PackedLinear(linear)
    x = torch.randn(5, 3, 576).to(dtype)  # [batch, seq, in]: any leading shape
    with torch.inference_mode():
        got, expected = module(x), linear(x)
    assert got.shape == expected.shape == (5, 3, 96) and got.dtype == dtype
    # Another summation order, nothing else: float32 to a few ulps of the output's scale, bfloat16 to its rounding.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_row_is_computed_alone_bit_for_bit_whatever_the_row_count(dtype: torch.dtype) -> None:
    """Batch invariance rests on this: the rows of one call equal the rows of any other call that holds them,
    from one row (a stream alone) to many (a full batch)."""
    module = packed.PackedLinear(_linear(3072, 576, dtype))
    x = torch.randn(70, 576).to(dtype)  # [rows, in]
    with torch.inference_mode():
        alone = torch.cat([module(x[i : i + 1]) for i in range(70)])
        for rows in (2, 3, 4, 5, 8, 16, 17, 32, 33, 64, 70):
            assert torch.equal(module(x[:rows]), alone[:rows]), f"{rows} rows"


def test_the_tiny_model_loads_fused_and_packed_and_its_embedding_keeps_its_table() -> None:
    loaded = load("tiny")
    assert not any(type(m) is nn.Linear for m in loaded.model.modules())
    assert isinstance(loaded.model.model.layers[0].self_attn.qkv_proj, packed.PackedLinear)
    assert isinstance(loaded.model.lm_head, packed.PackedLinear)
    reference = load("tiny", fuse=False).model  # transformers' own modules
    assert torch.equal(loaded.model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        hidden = reference.model(ids).last_hidden_state
        got, expected = loaded.model.lm_head(hidden), reference.lm_head(hidden)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
