"""Model loading: local directories, clear offline errors, and the real SmolLM2 GGUF → safetensors cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from hyft.errors import HyftError
from hyft.models import PACKAGED_GGUF, load_model, packaged_gguf_path, read_gguf, write_converted
from tests.conftest import tiny_model


def test_local_directory_round_trip(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    ids = torch.tensor([tokenizer("it was great").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok.pad_token is not None


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(HyftError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path / "nothing-here"))


def test_unknown_hub_model_offline_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HyftError, match=r"model 'no-such-org/no-such-model' is not packaged.*local directory"):
        load_model("no-such-org/no-such-model")


def test_unknown_dtype(tmp_path):
    with pytest.raises(HyftError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="int3")


@pytest.mark.real_model
def test_smollm2_cache_matches_fresh_conversion(tmp_path, monkeypatch):
    """The cached safetensors model gives the same logits as the GGUF conversion, ties kept, loads fast."""
    monkeypatch.setenv("HYFT_CACHE", str(tmp_path))
    fresh, tokenizer = read_gguf(packaged_gguf_path("smollm2-135m"))  # what convert_gguf reads
    ids = torch.tensor([tokenizer("the movie was wonderful . It was great").input_ids])
    with torch.no_grad():
        expected = fresh(ids).logits
    cached_dir = write_converted(fresh, tokenizer, tmp_path / "smollm2-135m")  # ... and writes
    assert (cached_dir / "model.safetensors").stat().st_size < 600e6  # tied embedding stored once
    del fresh

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    seconds = time.perf_counter() - start
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer("the movie was wonderful . It was great").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(expected, model(ids).logits)
    print(f"cached load: {seconds:.2f}s")  # reported, not asserted: timing belongs in benchmarks


def test_packaged_names():
    assert "smollm2-135m" in PACKAGED_GGUF


@pytest.mark.parametrize("name,message", [
    ("smollm2-999m", "did you mean smollm2-135m"),
    ("someorg/not-a-model", "not in the Hugging Face cache"),
])
def test_unknown_model_fails_fast_in_one_line(name, message):
    """No hub retries: with no network (tests run with HF_HUB_OFFLINE) an unknown name fails at once."""
    start = time.perf_counter()
    with pytest.raises(HyftError, match=message) as err:
        load_model(name)
    assert time.perf_counter() - start < 5 and "\n" not in str(err.value)


def test_importing_hyft_turns_hub_kernels_off_unless_the_user_asked():
    """A hub kernel is a download at run time and arithmetic a replay may not load (it failed offline on CUDA)."""
    code = ("import hyft; from transformers.integrations.hub_kernels import _kernels_enabled; "
            "print(_kernels_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    asked = subprocess.run([sys.executable, "-c", code], env={**env, "USE_HUB_KERNELS": "YES"}, capture_output=True,
                           text=True, check=True)
    assert (off.stdout.split()[-1], asked.stdout.split()[-1]) == ("False", "True")
