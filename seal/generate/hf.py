"""Generator backend on `transformers` `generate`: batched, left-padded, adapters switched in place."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seal.generate.base import Sampling
from seal.utils import autocast, model_device


class HFGenerator:
    """Samples with an in-memory model; `adapter` names one of its PEFT adapters (None = the bare base)."""

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        autocast_setting: str = "auto",
        progress: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_setting = autocast_setting
        self.progress = progress
        self._loaded = 0  # adapters loaded from disk so far (for fresh names)

    def add_adapter(self, path: str, name: str | None = None) -> str:
        """Load a PEFT adapter directory beside the others; returns its (fresh) name."""
        if not isinstance(self.model, PeftModel):
            raise ValueError("add_adapter needs a PeftModel (see seal.ttt.wrap_for_adapters)")
        self._loaded += 1
        name = f"{name or os.path.basename(os.path.normpath(path))}-{self._loaded}"
        self.model.load_adapter(path, adapter_name=name)
        return name

    def remove_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    def _adapter_context(self, adapter: str | None) -> contextlib.AbstractContextManager:
        if not isinstance(self.model, PeftModel):
            if adapter is not None:
                raise ValueError(f"Adapter '{adapter}' requested but the model has no PEFT adapters")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.model.peft_config:
            raise KeyError(f"Unknown adapter '{adapter}'; loaded: {sorted(self.model.peft_config)}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: str | None = None
    ) -> list[list[str]]:
        expanded = [p for p in prompts for _ in range(sampling.n)]
        device = model_device(self.model)
        outputs: list[str] = []
        was_training = self.model.training
        self.model.eval()
        batches = range(0, len(expanded), self.batch_size)
        with self._adapter_context(adapter), autocast(device, self.autocast_setting):
            for b, start in enumerate(tqdm(batches, desc="generate", disable=not self.progress, leave=False)):
                batch = expanded[start : start + self.batch_size]
                enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(
                    device
                )
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed + b)
                kwargs = (
                    {"do_sample": False}
                    if sampling.greedy
                    else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
                )
                out = self.model.generate(
                    **enc,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    top_k=None,
                    **kwargs,
                )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        self.model.train(was_training)
        return [outputs[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]
