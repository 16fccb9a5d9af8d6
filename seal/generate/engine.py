"""The engine factory: which backend serves a run, and the engine that samples and answers.

The ReST-EM loop and the evaluation harness both build their engine here, so they apply the same rules: a
bitsandbytes-quantized base is served by HF transformers (vLLM cannot serve the 4-bit weights TTT trains on),
and a vLLM engine's LoRA limit fits every adapter it will be asked to serve.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase
from trl import ModelConfig

from seal.config import VLLMConfig
from seal.generate import select_backend
from seal.generate.hf import HFEngine
from seal.generate.server import ServerEngine
from seal.generate.vllm_backend import EngineSettings, VLLMEngine


def engine_backend(requested: str, model: ModelConfig) -> str:
    """hf or vllm for `generator_backend: requested`. A quantized (QLoRA) base is served by HF, which runs
    the 4-bit weights TTT trains on (an explicit `vllm` with it is refused by `seal.config.check_backend`)."""
    if model.load_in_4bit or model.load_in_8bit:
        return "hf"
    return select_backend(requested)


def adapter_rank(path: str | Path) -> int:
    """The LoRA rank `r` of a PEFT adapter directory (its adapter_config.json)."""
    config = Path(path) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config}: cannot read the adapter's LoRA rank (field 'r'): {e}") from None


def vllm_engine(
    vllm: VLLMConfig, model_path: str, tokenizer: PreTrainedTokenizerBase, max_lora_rank: int, seed: int
):
    """A vLLM engine for `model_path` whose LoRA limit fits adapters up to `max_lora_rank`.

    With `vllm_server_url` it is a running `vllm serve` instead, which must serve the same base model, have
    LoRA enabled with a large enough --max-lora-rank, and read adapters from this machine's file system.
    """
    if vllm.vllm_server_url:
        return ServerEngine(vllm.vllm_server_url)

    settings = EngineSettings(
        model=model_path,
        max_lora_rank=max_lora_rank,
        max_loras=vllm.vllm_max_loras,
        max_model_len=vllm.vllm_max_model_len,
        gpu_memory_utilization=vllm.vllm_gpu_memory_utilization,
        dtype=vllm.vllm_dtype,
        seed=seed,
        enable_sleep_mode=vllm.vllm_enable_sleep_mode,
    )
    return VLLMEngine(settings, tokenizer)


def build_engine(
    requested: str,
    model: ModelConfig,
    hf: HFEngine,
    vllm: VLLMConfig,
    model_path: str,
    max_lora_rank: int,
    seed: int,
):
    """The run's engine: `hf` itself (the HF generator on the TTT model), or vLLM for `model_path`."""
    if engine_backend(requested, model) == "hf":
        return hf
    return vllm_engine(vllm, model_path, hf.tokenizer, max_lora_rank, seed)
