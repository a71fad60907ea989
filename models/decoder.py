"""The Llama decoder written out: a batch's inputs in, its kept positions' logits out, in every mode.

transformers' forward spends as much time around the matrix products as in them: at batch 1 on 2 cores,
SmolLM2-135M's int4 kernels took about 14 ms of a 40 ms decode step, and in float32 the matmuls read 540 MB
of weights in about 30 ms of a 54 ms step. The rest is small operations, each a few microseconds: casts,
rotary embeddings turned for q and k apart, modules called through hooks and keyword plumbing. This forward
computes the same function over the same weights and the same KV store, bit for bit, with fewer, larger
operations:
- q, k and v are one matmul, and gate and up another (`fuse` for float weights, `quant.quantize` for
  quantized ones, as `fusions` says): one read of the input and one kernel call each;
- rotary embeddings turn q and k in one go;
- the final norm and the head run on the kept positions alone.

Only Llama-family models take it (`fusions` is empty for others); computing what transformers' forward
computes, it keeps its row independence too (tests/models/test_decoder.py).

Served on CPU, the loader puts the model on models/native.cpp (attention.NATIVE): the same function, with
attention, RMSNorm and the gated activation each one call of tokenferry's own kernels, which sum in their own
orders (the logits move by rounding only, tested) and compute every row alone by construction. There a decode
step's layer is one call (`decoder_layer`) of the same kernels in the same order: its 15 operations called
through Python took a fifth of a one-row float32 step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models import attention, native
from models.forward import Forward
from models.kv_cache import WindowLayer
from models.quant import LAYERS_READ, set_module

QKV = "qkv_proj"  # a fused module's name in each layer's self_attn: q, k and v side by side
GATE_UP = "gate_up_proj"  # in each layer's mlp: gate and up side by side


def fusions(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """For `quant.quantize`: fused module name -> the Linears it replaces; empty when this forward does not
    compute the model (not a Llama, or one with biases, another activation or tensor-parallel slices)."""
    config = model.config
    plain = not (config.attention_bias or config.mlp_bias) and config.hidden_act == "silu"
    if not isinstance(model, LlamaForCausalLM) or not plain or getattr(config, "pretraining_tp", 1) != 1:
        return {}
    fused = {}
    for i in range(config.num_hidden_layers):
        attention, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        fused[f"{attention}.{QKV}"] = (f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj")
        fused[f"{mlp}.{GATE_UP}"] = (f"{mlp}.gate_proj", f"{mlp}.up_proj")
    return fused


def fuse(model: nn.Module) -> bool:
    """Float weights: replace each group of `fusions` by one bias-free Linear whose weight is theirs, stacked by
    output row; True if the model was fused. (Quantized weights are fused by `quant.quantize`.)"""
    groups = fusions(model)
    for name, parts in groups.items():
        weight = torch.cat([model.get_submodule(part).weight.detach() for part in parts])  # [sum of outs, in]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        for part in parts:
            set_module(model, part, None)
        set_module(model, name, linear)
    return bool(groups)


def native_fits(model: nn.Module, width: int) -> bool:
    """Whether models/native.cpp's attention, norm and activation take this model's shapes (`width`: the
    library's vector width, `native.width()`)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    return (
        heads % kv_heads == 0
        and heads // kv_heads <= attention.MAX_GROUP
        and head_dim % width == 0
        and head_dim <= attention.MAX_HEAD_DIM
        and config.hidden_size % width == 0
        and config.intermediate_size % width == 0
    )


def fused(model: nn.Module) -> bool:
    """Whether the model's projections were fused: then `forward` is the only way to run it."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and hasattr(layers[0].self_attn, QKV)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's modules and sizes as the forward uses them, read once per model: reading them through
    nn.Module's and transformers' config's attribute lookups every layer of every step cost 0.2 ms of an 8.6 ms
    one-row int4 step (measured in one process, alternating)."""

    attention: nn.Module  # self_attn, as the attention functions take it
    input_norm: nn.Module
    qkv: nn.Module
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: nn.Module
    down: nn.Module
    heads: int
    kv_heads: int
    dim: int
    scaling: float
    # models/native.cpp's `decoder_layer` arguments that stay the same every step: the norms' weights and epsilons,
    # and qkv, o, gate_up and down as it takes them; None where a projection is not on the library's kernels.
    native_arguments: tuple[object, ...] | None


def _layers(model: LlamaForCausalLM) -> list[_Layer]:
    layers = model.__dict__.get(LAYERS_READ)
    if layers is None:
        config = model.config
        layers = [
            _Layer(
                attention=layer.self_attn,
                input_norm=layer.input_layernorm,
                qkv=getattr(layer.self_attn, QKV),
                o_proj=layer.self_attn.o_proj,
                post_norm=layer.post_attention_layernorm,
                gate_up=getattr(layer.mlp, GATE_UP),
                down=layer.mlp.down_proj,
                heads=config.num_attention_heads,
                kv_heads=config.num_key_value_heads,
                dim=layer.self_attn.head_dim,
                scaling=layer.self_attn.scaling,
                native_arguments=_native_arguments(layer),
            )
            for layer in model.model.layers
        ]
        model.__dict__[LAYERS_READ] = layers  # `set_module` drops them
    return layers


def _native_arguments(layer: nn.Module) -> tuple[object, ...] | None:
    projections = (getattr(layer.self_attn, QKV), layer.self_attn.o_proj, getattr(layer.mlp, GATE_UP), layer.mlp.down_proj)
    weights = tuple(getattr(projection, "native_weights", lambda: None)() for projection in projections)
    if None in weights:
        return None
    norms = layer.input_layernorm, layer.post_attention_layernorm
    return (norms[0].weight, norms[0].variance_epsilon, norms[1].weight, norms[1].variance_epsilon, *weights)


def forward(model: LlamaForCausalLM, inputs: Forward, every_position: bool) -> torch.Tensor:
    """Logits [rows, q or 1, vocab] as `ModelRunner._forward` gives them: every position's, the last one's,
    or for a flattened forward each row's last token's ([rows, 1, vocab])."""
    decoder = model.model
    # The loader puts a model on models/native.cpp as a whole: matmuls, attention, norms and the MLP's activation.
    implementation = model.config._attn_implementation
    native = implementation == attention.NATIVE
    # The model's attention (each part apart in a flattened forward), as transformers' forward would look it up:
    # SDPA as it calls it, so that the two agree bit for bit, or the native one.
    attend = ALL_ATTENTION_FUNCTIONS[implementation]
    rows, q = inputs.input_ids.shape
    hidden = decoder.embed_tokens(inputs.input_ids)  # [rows, q, hidden]
    rotary = Rotary(*decoder.rotary_emb(hidden, inputs.position_ids), native and _turns_natively(model))
    layers = _layers(model)
    if rotary.native and _one_call_a_layer(layers, inputs):
        hidden = _layers_natively(layers, hidden, rotary, inputs)
    else:
        for i, layer in enumerate(layers):
            attended = _attention(layer, attend, _norm(hidden, layer.input_norm, native), rotary, inputs, i)
            hidden = hidden + attended.view(rows, q, -1)
            hidden = hidden + _mlp(layer, _norm(hidden, layer.post_norm, native), native).view(rows, q, -1)
    if inputs.last is not None:
        hidden = hidden[0, inputs.last][:, None]  # [rows, 1, hidden]
    elif not every_position:
        hidden = hidden[:, -1:]
    logits = model.lm_head(_norm(hidden, decoder.norm, native))  # [kept rows * kept q, vocab]
    return logits.view(*hidden.shape[:2], -1)


def _one_call_a_layer(layers: list[_Layer], inputs: Forward) -> bool:
    """Whether models/native.cpp's `decoder_layer` computes this forward's layers: one token a row (a decode step)
    written into a window of one KV store, a boolean mask, and every projection on the library's kernels."""
    return (
        inputs.input_ids.shape[1] == 1
        and inputs.last is None
        and isinstance(inputs.cache.layers[0], WindowLayer)
        and inputs.attention_mask.dtype == torch.bool
        and all(layer.native_arguments is not None for layer in layers)
    )


def _layers_natively(layers: list[_Layer], hidden: torch.Tensor, rotary: Rotary, inputs: Forward) -> torch.Tensor:
    """hidden [rows, 1, H] through every layer, one `decoder_layer` call each: what the loop in `forward` computes,
    on the same kernels in the same order, without a Python call per operation."""
    rows = hidden.shape[0]
    mask = inputs.attention_mask[:, 0].contiguous()  # [rows, 1, cols]
    hidden = hidden.view(rows, -1)
    for layer, window in zip(layers, inputs.cache.layers, strict=True):
        keys, values, first_row, start, write_at = window.claim(1)
        hidden = torch.ops.tokenferry.decoder_layer(
            hidden, *layer.native_arguments, keys, values, first_row, start, write_at, mask, rotary.cos, rotary.sin,
            layer.heads, layer.scaling,
        )  # fmt: skip
    return hidden.view(rows, 1, -1)


def _norm(hidden: torch.Tensor, norm: nn.Module, native: bool = False) -> torch.Tensor:
    """RMSNorm, bit for bit as transformers' LlamaRMSNorm: [tokens, hidden]; `native`: the same function on
    models/native.cpp, summing the squares in another order.

    In float32 PyTorch's fused rms_norm computes exactly that in one operation; in other dtypes LlamaRMSNorm
    rounds to the dtype before it scales, which only the module itself does."""
    if native:
        rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # a prefill keeps only its last positions: a strided view
        return torch.ops.tokenferry.rms_norm(rows, norm.weight, norm.variance_epsilon)
    if hidden.dtype == torch.float32:
        normed = F.rms_norm(hidden, hidden.shape[-1:], norm.weight, norm.variance_epsilon)
    else:
        normed = norm(hidden)
    return normed.reshape(-1, hidden.shape[-1])


@dataclass(frozen=True)
class Rotary:
    """A forward's rotary embedding: cos and sin [rows, q, head_dim] (the same for every head and layer)."""

    cos: torch.Tensor
    sin: torch.Tensor
    native: bool  # turned by models/native.cpp's `rotary`, which computes PyTorch's three operations bit for bit

    def turn(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        """The first `heads` heads of qkv [rows, q, all heads, dim], turned: [rows, q, heads, dim]."""
        if self.native:
            return torch.ops.tokenferry.rotary(qkv, self.cos, self.sin, heads)
        # As transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin.
        x, cos, sin = qkv[:, :, :heads], self.cos[:, :, None], self.sin[:, :, None]
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin


def _turns_natively(model: LlamaForCausalLM) -> bool:
    """Whether the native `rotary` takes this model's head size: whole vectors in each half of a head."""
    return model.model.layers[0].self_attn.head_dim % (2 * native.width()) == 0


def _attention(
    layer: _Layer, attend: Callable[..., tuple[torch.Tensor, None]], x: torch.Tensor, rotary: Rotary, inputs: Forward,
    index: int,
) -> torch.Tensor:
    """x [tokens, hidden] -> the attention block's output [tokens, hidden]."""
    rows, q = inputs.input_ids.shape
    heads, kv_heads = layer.heads, layer.kv_heads
    qkv = layer.qkv(x).view(rows, q, heads + 2 * kv_heads, layer.dim)
    turned = rotary.turn(qkv, heads + kv_heads)  # [rows, q, heads + kv_heads, dim]
    query = turned[:, :, :heads].transpose(1, 2)  # [rows, heads, q, dim]
    new_keys = turned[:, :, heads:].transpose(1, 2)  # [rows, kv_heads, q, dim]
    keys, values = inputs.cache.layers[index].update(new_keys, qkv[:, :, heads + kv_heads :].transpose(1, 2))
    out, _ = attend(layer.attention, query, keys, values, inputs.attention_mask, dropout=0.0, scaling=layer.scaling)
    return layer.o_proj(out.reshape(rows * q, heads * layer.dim))  # from [rows, q, heads, dim]


def _mlp(layer: _Layer, x: torch.Tensor, native: bool) -> torch.Tensor:
    """x [tokens, hidden] -> down(silu(gate x) * up x) [tokens, hidden]."""
    gate_up = layer.gate_up(x)  # [tokens, 2 intermediate]
    if native:
        return layer.down(torch.ops.tokenferry.silu_mul(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return layer.down(F.silu(gate) * up)
