"""Apply a self-edit: a short LoRA fine-tune (test-time training) of the already-loaded base model.

Every self-edit gets a fresh adapter named `ttt`, created and deleted explicitly on the one PeftModel, so the
base weights are loaded once per run. The training loop is a plain AdamW loop rather than `SFTTrainer`
because a Trainer per self-edit costs more to build than the few dozen steps it runs (SEAL applies
hundreds of self-edits per round); the ReST-EM update, a single long run, does use `SFTTrainer`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seal.config import TTTConfig
from seal.templates import TrainExample
from seal.utils import autocast, model_device

ADAPTER = "ttt"
IGNORE_INDEX = -100


def ttt_lora_config(cfg: TTTConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.ttt_lora_r,
        lora_alpha=cfg.ttt_lora_alpha,
        lora_dropout=cfg.ttt_lora_dropout,
        target_modules=list(cfg.ttt_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_for_adapters(model: PreTrainedModel | PeftModel, cfg: TTTConfig) -> PeftModel:
    """Make `model` a PeftModel (once) so TTT and generator adapters can be added beside each other."""
    if isinstance(model, PeftModel):
        return model
    peft_model = get_peft_model(model, ttt_lora_config(cfg), adapter_name=ADAPTER)
    peft_model.eval()
    return peft_model


def tokenize_examples(
    examples: Sequence[TrainExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    completion_only: bool,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, EOS appended; prompt tokens masked when `completion_only`."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        completion_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only else prompt_ids) + completion_ids
        out.append((ids, labels[:max_length]))
    return out


def collate(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in this batch only (dynamic padding)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class TTT:
    """Fine-tunes a fresh `ttt` LoRA adapter on one self-edit's examples, leaving it active for evaluation."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: TTTConfig):
        if cfg.ttt_loss not in ("all", "completion"):
            raise ValueError(f"ttt_loss must be 'all' or 'completion', got '{cfg.ttt_loss}'")
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.lora_config = ttt_lora_config(cfg)

    def reset(self, seed: int) -> None:
        """Delete the previous `ttt` adapter and create a new one, initialised from `seed`."""
        if ADAPTER in self.model.peft_config:
            self.model.delete_adapter(ADAPTER)
        torch.manual_seed(seed)
        self.model.add_adapter(ADAPTER, self.lora_config)
        self.model.set_adapter(ADAPTER)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(f".{ADAPTER}." in name)
            if p.requires_grad:
                params.append(p)
        return params

    def apply(self, examples: Sequence[TrainExample], seed: int) -> list[float]:
        """Train a fresh adapter on `examples`; return the mean loss of each epoch."""
        self.reset(seed)
        if not examples:
            return []
        device = model_device(self.model)
        data = tokenize_examples(
            examples,
            self.tokenizer,
            self.cfg.ttt_max_length,
            completion_only=self.cfg.ttt_loss == "completion",
        )
        params = self.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=self.cfg.ttt_learning_rate, weight_decay=0.0)
        shuffle = torch.Generator().manual_seed(seed)
        batch_size = self.cfg.ttt_batch_size
        epoch_losses = []
        self.model.train()
        for _ in range(self.cfg.ttt_epochs):
            order = torch.randperm(len(data), generator=shuffle).tolist()
            total, steps = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = collate([data[i] for i in order[start : start + batch_size]], self.pad_id, device)
                with autocast(device, self.cfg.ttt_autocast):
                    loss = self.model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total, steps = total + loss.item(), steps + 1
            epoch_losses.append(total / max(steps, 1))
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        if not all(math.isfinite(x) for x in epoch_losses):
            raise FloatingPointError(f"TTT loss diverged: {epoch_losses}")
        return epoch_losses

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def save(self, path: str | os.PathLike) -> Path:
        """Write the current `ttt` adapter in PEFT format (safetensors) directly into `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            # PEFT writes a non-default adapter into a sub-folder named after it; move that into place.
            self.model.save_pretrained(tmp, selected_adapters=[ADAPTER], safe_serialization=True)
            if path.exists():
                shutil.rmtree(path)
            os.replace(Path(tmp) / ADAPTER, path)
        return path
