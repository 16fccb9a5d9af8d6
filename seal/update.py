"""The update stage (ReST-EM's M-step): supervised fine-tuning of the generator on its kept self-edits.

This is one ordinary `trl.SFTTrainer` run on (prompt, self-edit) pairs. As in ReST-EM, every round trains
from the base model, not from the previous round's generator, which limits drift and overfitting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from seal.models import load_model, load_tokenizer, quantization_config
from seal.utils import write_json

logger = logging.getLogger(__name__)

DONE = "seal_update.json"  # in update/: the update finished (its record)
GENERATOR = "generator"  # in update/: the new generator (PEFT adapter or full weights)


def sft_dataset(
    kept: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool
) -> Dataset:
    """Prompt-completion rows: conversational for chat models, plain text otherwise (TRL's two formats)."""
    if use_chat_template and tokenizer.chat_template is not None:
        rows = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"].strip()}],
            }
            for r in kept
        ]
    else:
        rows = [{"prompt": r["prompt"] + "\n", "completion": r["completion"].strip()} for r in kept]
    return Dataset.from_list(rows)


def update_lora_config(model_args: ModelConfig):
    """TRL's LoRA config from ModelConfig, keeping a one-module list a list.

    `ModelConfig` turns `lora_target_modules: [q_proj]` into the string "q_proj", which PEFT reads as a regex
    that must match the full module path (so it matches nothing); `all-linear` and real regexes pass through.
    """
    config = get_peft_config(model_args)
    if config is not None and isinstance(config.target_modules, str) and config.target_modules.isidentifier():
        config.target_modules = {config.target_modules}
    return config


@dataclass(frozen=True)
class Update:
    """A finished ReST-EM update: the new generator at `path`, a PEFT adapter or full weights (`kind`)."""

    kind: Literal["adapter", "model"]
    path: str
    train_loss: float | None = None
    num_examples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Update:
        return cls(d["kind"], d["path"], d.get("train_loss"), d.get("num_examples"))


def finished_update(out_dir: str | Path) -> Update | None:
    """The record of a completed update in `out_dir`, or None if it did not finish."""
    marker = Path(out_dir) / DONE
    return Update.from_dict(json.loads(marker.read_text())) if marker.is_file() else None


def report_truncation(trainer: SFTTrainer, rows: int) -> tuple[int, int]:
    """(cut, dropped): of the `rows` pairs given to `trainer`, how many TRL cut to `max_length` tokens and how
    many it dropped (their prompt alone fills it), as it prepared them; logged at WARNING, once.

    TTT never cuts an example silently (it splits it, or refuses it with ttt_overlong=error); a (prompt,
    self-edit) pair cannot be split without losing its prompt, so the update trains on what TRL keeps, and
    says so. Counted on TRL's own tokenization; a sequence of exactly `max_length` tokens counts as cut.
    """
    args = trainer.args
    if args.max_length is None or args.packing:  # packing: sequences are chunked, not one per pair
        return 0, 0
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    cut, dropped = sum(n >= args.max_length for n in lengths), rows - len(lengths)
    if (cut or dropped) and trainer.accelerator.is_main_process:
        logger.warning(
            "update: %d of %d (prompt, self-edit) pairs are longer than max_length=%d tokens: %d cut to it, "
            "%d dropped (the prompt alone fills it); raise max_length (or null) to train on them whole",
            *(cut + dropped, rows, args.max_length, cut, dropped),
        )
    return cut, dropped


def update_generator(
    base_path: str,
    kept: Sequence[dict[str, Any]],
    model_args: ModelConfig,
    sft_args: SFTConfig,
    out_dir: str | Path,
    merge: bool = False,
    use_chat_template: bool = True,
) -> Update:
    """Fine-tune a fresh copy of the base on `kept`; return the new generator (its marker file, read back
    by :func:`finished_update`, is written last, so a crash mid-update reruns it).

    With `model_args.use_peft` the result is a PEFT adapter (or, with `merge`, full merged weights);
    without it, full fine-tuned weights.
    """
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base_path)
    tokenizer.padding_side = "right"
    model = load_model(
        base_path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config(model_args),  # QLoRA: the adapter trains on a 4-bit base
    )
    # seal pushes the finished run itself (seal.hub): the trainer never pushes, nor sees a token.
    args = dataclasses.replace(
        sft_args, output_dir=str(out_dir / "trainer"), push_to_hub=False, hub_token=None
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(kept, tokenizer, use_chat_template),
        processing_class=tokenizer,
        peft_config=update_lora_config(model_args),
    )
    report_truncation(trainer, len(kept))
    result = trainer.train()  # under accelerate launch: TRL's distributed SFT (DDP / FSDP / DeepSpeed)
    weights = out_dir / GENERATOR
    kind = "adapter" if model_args.use_peft and not merge else "model"
    record = Update(kind, str(weights), result.training_loss, len(kept))
    accelerator = trainer.accelerator
    # Gathers the full state dict on the main process (sharded FSDP / ZeRO-3 parameters included).
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(trainer.model_wrapped)
        if model_args.use_peft and merge:
            trained = trained.merge_and_unload()
            state_dict = None
        trained.save_pretrained(weights, state_dict=state_dict, safe_serialization=True)
        if kind == "model":
            tokenizer.padding_side = "left"
            tokenizer.save_pretrained(weights)
        write_json(out_dir / DONE, record.to_dict())
    accelerator.wait_for_everyone()  # every process reads the new generator next
    logger.info(
        "update: %s trained on %d self-edits (loss %.4f) -> %s",
        kind,
        len(kept),
        result.training_loss,
        weights,
    )
    return record
