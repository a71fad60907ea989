"""models/packed.py: float Linears on packed weights (oneDNN's layout, or models/native.cpp's panels) compute
F.linear's function, each row alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import load, native, packed
from models.loader import cache_root
from tests.helpers import require_native

DTYPES = [torch.float32, torch.bfloat16]
KINDS = [(kind, dtype) for kind in ("onednn", "panels") for dtype in DTYPES]  # (module, dtype)


def _module(kind: str, linear: nn.Linear) -> nn.Module:
    if kind == "onednn":
        if not packed.onednn_packs(linear.weight.dtype):
            pytest.skip(f"oneDNN packs no {linear.weight.dtype} weight on this CPU: pack() leaves it to F.linear")
        return packed.PackedLinear(linear)
    require_native()
    return packed.PanelLinear(linear)


def _linear(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.05)
    return linear.to(dtype)


@pytest.mark.parametrize(
    ("kind", "dtype", "bias"), [(kind, dtype, bias) for kind, dtype in KINDS for bias in (False, True) if not (kind == "panels" and bias)]
)
def test_a_packed_linear_computes_what_f_linear_does(kind: str, dtype: torch.dtype, bias: bool) -> None:
    linear = _linear(96, 576, dtype, bias)
    module = _module(kind, linear)
    x = torch.randn(5, 3, 576).to(dtype)  # [batch, seq, in]: any leading shape
    with torch.inference_mode():
        got, expected = module(x), linear(x)
    assert got.shape == expected.shape == (5, 3, 96) and got.dtype == dtype
    # Another summation order, nothing else: float32 to a few ulps of the output's scale, bfloat16 to its rounding.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


@pytest.mark.parametrize(("kind", "dtype"), KINDS)
def test_every_row_is_computed_alone_bit_for_bit_whatever_the_row_count(kind: str, dtype: torch.dtype) -> None:
    """Batch invariance rests on this: the rows of one call equal the rows of any other call that holds them,
    from one row (a stream alone) to many (a full batch)."""
    module = _module(kind, _linear(3088, 576, dtype, bias=kind == "onednn"))  # 193 panels of 16: edges of every tile
    x = torch.randn(70, 576).to(dtype)  # [rows, in]
    with torch.inference_mode():
        alone = torch.cat([module(x[i : i + 1]) for i in range(70)])
        for rows in (2, 3, 4, 5, 8, 16, 17, 32, 33, 64, 70):
            assert torch.equal(module(x[:rows]), alone[:rows]), f"{rows} rows"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_tiny_model_loads_fused_and_packed_and_its_embedding_keeps_its_table(dtype: str) -> None:
    loaded = load("tiny", dtype=dtype)
    # On the panels wherever the library loaded, else on oneDNN where it packs the dtype, else F.linear.
    if native.load(cache_root()):
        kind = packed.PanelLinear
    else:
        kind = packed.PackedLinear if packed.onednn_packs(getattr(torch, dtype)) else nn.Linear
    assert all(type(m) is kind for m in loaded.model.modules() if isinstance(m, nn.Linear))
    assert isinstance(loaded.model.model.layers[0].self_attn.qkv_proj, kind)
    assert isinstance(loaded.model.lm_head, kind)
    reference = load("tiny", dtype=dtype, fuse=False).model  # transformers' own modules
    assert torch.equal(loaded.model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        hidden = reference.model(ids).last_hidden_state
        got, expected = loaded.model.lm_head(hidden), reference.lm_head(hidden)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


def test_a_linear_the_panels_cannot_take_goes_to_onednn_where_it_packs_the_dtype() -> None:
    require_native()
    model = nn.Sequential(_linear(96, 64, torch.float32, bias=True), _linear(5, 96, torch.float32, bias=False))
    model.append(_linear(32, 5, torch.float32, bias=False))
    assert packed.pack(model, panels=True) == 3  # a bias; 5 outputs, no whole panel; fits
    assert [type(m) for m in model] == [packed.PackedLinear, packed.PackedLinear, packed.PanelLinear]
    model = nn.Sequential(_linear(32, 5, torch.bfloat16, bias=False), _linear(32, 6, torch.bfloat16, bias=False))
    # bfloat16 reads inputs in pairs: 5 cannot, 6 can. The other goes to oneDNN where it packs bfloat16 (AVX-512),
    # else stays an nn.Linear (AVX2: oneDNN's reorder would raise).
    onednn = packed.onednn_packs(torch.bfloat16)
    assert packed.pack(model, panels=True) == 1 + onednn
    assert [type(m) for m in model] == [packed.PackedLinear if onednn else nn.Linear, packed.PanelLinear]
    with torch.inference_mode():  # both run on this CPU
        assert model[0](torch.randn(3, 5, dtype=torch.bfloat16)).shape == model[1](torch.randn(3, 6, dtype=torch.bfloat16)).shape == (3, 32)


def test_a_float32_linear_on_bfloat16_panels_computes_with_rounded_inputs_and_weights() -> None:
    """int4 mode's LM head (models/loader.py): float32 in and out, bfloat16 panels and products in between."""
    require_native()
    linear = _linear(96, 576, torch.float32, bias=False)
    module = packed.Bfloat16PanelLinear(linear)
    assert packed.panels_fit(linear, torch.bfloat16) and not packed.panels_fit(_linear(96, 5, torch.float32, bias=False), torch.bfloat16)
    x = torch.randn(70, 576)  # [rows, in]
    with torch.inference_mode():
        got = module(x)
        alone = torch.cat([module(x[i : i + 1]) for i in range(70)])
    assert got.dtype == torch.float32 and torch.equal(got, alone)
    # The rounded values' product, to the output's bfloat16 rounding (the panels store bfloat16).
    expected = x.bfloat16().double() @ linear.weight.bfloat16().double().T
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
