"""How many TTT adapters fit in memory together: sized from the model and the longest training step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seal.config import TTTConfig
from seal.multi_lora import find_targets
from seal.sequences import tokenize_examples
from seal.templates import TrainExample
from seal.utils import model_device


def tokens_per_step(
    jobs: Sequence[Sequence[TrainExample]], tokenizer: PreTrainedTokenizerBase, cfg: TTTConfig
) -> int:
    """The most tokens one adapter contributes to a packed training step (its batch's total length), counted
    on the sequences TTT trains on (long examples split into chunks of at most ttt_max_length)."""
    most = 1
    for job in jobs:
        lengths = sorted(
            (len(ids) for ids, _ in tokenize_examples(job, tokenizer, cfg.ttt_max_length, False))
        )
        most = max(most, sum(lengths[-cfg.ttt_batch_size :]))
    return most


def parallel_adapters(
    model: PreTrainedModel | PeftModel,
    cfg: TTTConfig,
    tokens_per_adapter_step: int,
    available_bytes: int | None = None,
) -> int:
    """How many adapters to train at once: `ttt_parallel_adapters`, or what half the free memory holds.

    Per adapter: its stacked LoRA state (weights, gradients, two AdamW moments: 16 bytes per parameter; the
    bf16 cast, contiguous and gradient stacks of a step: 6 more) and the activations a packed training step
    keeps for its tokens. Per token that is ~10 bytes per hidden unit per layer, ~4 per MLP unit per layer
    (bf16, eager attention on short sequences) and ~10 per vocab entry (bf16 logits, their float32 copy
    for the loss, its gradient): calibrated on SmolLM2-135M on CPU with whole logits. The fused loss
    (:mod:`seal.losses`) holds no per-token logits, so for the models it serves the vocabulary term only
    errs on the safe side (fewer adapters than memory would allow).
    """
    if cfg.ttt_parallel_adapters > 0:
        return cfg.ttt_parallel_adapters
    c = model.config
    hidden, layers = c.hidden_size, c.num_hidden_layers
    inter = getattr(c, "intermediate_size", 4 * hidden)
    per_token = layers * (10 * hidden + 4 * inter) + 10 * c.vocab_size
    targets = find_targets(model, cfg.ttt_target_modules).values()
    lora_params = sum(cfg.ttt_lora_r * (m.in_features + m.out_features) for m in targets)
    per_adapter = 22 * lora_params + per_token * tokens_per_adapter_step
    if available_bytes is None:
        available_bytes = free_memory(model_device(model))
    return max(1, min(64, int(0.5 * available_bytes // per_adapter)))


def free_memory(device: torch.device) -> int:
    """Free bytes on `device` (CUDA: the driver's count; CPU: MemAvailable from /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown: assume a modest machine
