"""Loading: clear one-line errors, the GGUF conversion cache, and models the engine cannot serve."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MistralConfig

from models import LoadedModel, ModelLoadError, load, loader, native
from models.kv_cache import check_supported
from models.loader import converted_gguf, default_gguf, resolve_device, resolve_dtype
from models.types import model_name


def test_a_missing_model_is_a_one_line_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_an_unreadable_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a model folder or .gguf file"):
        load(str(weights))


def test_a_corrupt_gguf_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFERRY_CACHE", str(tmp_path / "cache"))
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError) as info:
        load(str(bogus))
    assert str(bogus) in str(info.value) and "\n" not in str(info.value)
    assert not any((tmp_path / "cache").glob("broken-*")), "no half-written cache is left behind"


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert str(resolve_dtype("auto", resolve_device("cpu"))) == "torch.float32"
    assert str(resolve_dtype("auto", resolve_device("cpu"), native_bfloat16=True)) == "torch.bfloat16"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", resolve_device("cpu"))
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu")


def test_auto_is_bfloat16_exactly_where_the_native_kernels_compute_all_of_it() -> None:
    """On a CPU with AVX512-BF16, where models/native.cpp runs the whole forward and keeps batched == alone exact
    in bfloat16 too, `auto` serves bfloat16; anywhere else (another CPU, transformers' own forward) float32."""
    served = load("tiny")
    expected = "bfloat16" if native.computes_bfloat16() else "float32"
    assert served.info.dtype == expected and next(served.model.parameters()).dtype == getattr(torch, expected)
    assert load("tiny", fuse=False).info.dtype == "float32", "transformers' forward: only float32 is batch invariant"
    assert load("tiny", dtype="float32").info.dtype == "float32"
    assert load("tiny", quantization="int4").info.dtype == expected


def test_sliding_window_models_are_refused_with_a_clear_message() -> None:
    check_supported(LlamaConfig(num_hidden_layers=2))
    with pytest.raises(ValueError, match="SlidingWindow"):
        check_supported(MistralConfig(num_hidden_layers=2, sliding_window=128))


@pytest.mark.slow
def test_the_default_gguf_is_converted_once_and_cached(smol: LoadedModel) -> None:
    folder = converted_gguf(default_gguf())  # smol already converted it: this only hashes and finds it
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert smol.info.name == "SmolLM2-135M-Instruct"
    assert smol.info.context_length == 8192 and smol.info.vocab_size == 49152
    assert smol.info.eos_token_ids == (2,)
    assert smol.info.dtype == "float32" and smol.info.device == "cpu"
    # What a gateway reads: the tokenizer's folder, and the model's kind.
    assert smol.info.tokenizer_source == str(folder) and smol.info.model_type == "llama"
    assert smol.info.architectures == ("LlamaForCausalLM",)


def test_a_spec_names_its_model_before_it_loads(tmp_path: Path) -> None:
    assert model_name("default") == "SmolLM2-135M-Instruct" and model_name("tiny") == "tiny"
    (tmp_path / "my-model").mkdir()
    assert model_name(str(tmp_path / "my-model")) == "my-model"
    assert model_name(str(tmp_path / "my-model" / ".." / "my-model" / ".")) == "my-model"
    assert model_name(str(tmp_path / "q4.gguf")) == "q4"


def test_loading_runs_on_a_thread_that_has_ended_when_load_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP keeps worker threads for every thread that ran torch in parallel until it ends; a loader
    thread that lived on would slow every parallel region of the engine thread (see `load`)."""
    seen: list[threading.Thread] = []
    real = loader._load

    def spy(*args: object) -> object:
        seen.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(loader, "_load", spy)
    loaded = loader.load("tiny")
    assert loaded.info.name == "tiny"
    assert seen and seen[0] is not threading.current_thread() and not seen[0].is_alive()
