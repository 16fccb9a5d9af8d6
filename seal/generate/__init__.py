"""The generate stage and its backends: sample self-edits, answer questions, with or without LoRA adapters."""

from seal.generate.base import Generator, Sampling
from seal.generate.hf import HFGenerator
from seal.generate.self_edits import SelfEdit, generate_self_edits, make_self_edits

__all__ = ["Generator", "HFGenerator", "Sampling", "SelfEdit", "generate_self_edits", "make_self_edits"]
