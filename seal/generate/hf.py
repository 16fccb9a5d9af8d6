"""The engine on `transformers` `generate`: batched, left-padded, adapters switched in place."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from seal.generate.base import Engine, Sampling, per_prompt_adapters
from seal.multi_lora import StackedLoRA
from seal.paths import adapter_label
from seal.utils import autocast, autocast_dtype, frozen_linears_in, model_device

STACK_PREFIX = "stack:"


def stack_adapter(k: int) -> str:
    """The adapter name under which HFEngine serves adapter k of its attached StackedLoRA."""
    return f"{STACK_PREFIX}{k}"


class DecodeSteps(BaseStreamer):
    """A `generate` streamer that moves `bar` by `rows` tokens per decoding step (the first `put` is the
    prompt, not a step); `steps` counts the steps, so the caller can settle a batch that stopped early."""

    def __init__(self, bar: tqdm, rows: int):
        self.bar, self.rows, self.steps, self._prompt = bar, rows, 0, True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.steps += 1
        self.bar.update(self.rows)

    def end(self) -> None:
        pass


class HFEngine(Engine):
    """Samples with an in-memory model; `adapter` names one of its PEFT adapters (None = the bare base).

    `progress`: every `generate` call shows a tqdm bar of its token budget (rows x max_new_tokens), moved at
    each decoding step, so a long batch shows progress while it runs. It is shown by whichever process
    generates, as the inner loop's bars are: the ReST-EM loop samples on the main process only; in the inner
    loop each rank answers its own share under its own "TTT + reward" bar.
    """

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        autocast_setting: str = "auto",
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_setting = autocast_setting
        self.progress = progress
        self._loaded = 0  # adapters loaded from disk so far (for fresh names)
        self._stack: StackedLoRA | None = None  # stacked TTT adapters, addressed as `stack:<k>`

    def add_adapter(self, path: str, name: str | None = None) -> str:
        """Load a PEFT adapter directory beside the others; returns its (fresh) name, `name` (default: the
        directory's) made a valid PEFT adapter name by :func:`seal.paths.adapter_label`."""
        if not isinstance(self.model, PeftModel):
            raise ValueError("add_adapter needs a PeftModel (see seal.ttt.wrap_for_adapters)")
        self._loaded += 1
        name = f"{adapter_label(path, name)}-{self._loaded}"
        self.model.load_adapter(path, adapter_name=name)
        return name

    def remove_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    def serves_live(self, model: PreTrainedModel | PeftModel) -> bool:
        return self.model is model

    def serve_stack(self, stack: StackedLoRA) -> None:
        self._stack = stack

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

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: str | None | Sequence[str | None] = None
    ) -> list[list[str]]:
        """`adapter`: one name for all prompts or one per prompt; ``stack:<k>`` names a stacked adapter."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        adapters = per_prompt_adapters(adapter, len(prompts))
        results: dict[int, list[str]] = {}
        stacked = [i for i, a in enumerate(adapters) if a is not None and a.startswith(STACK_PREFIX)]
        with tqdm(
            total=len(prompts) * sampling.n * sampling.max_new_tokens,
            desc="generate",
            unit="tok",
            disable=not self.progress,
            leave=False,
        ) as bar:
            if stacked:
                outs = self._generate_stacked(
                    [prompts[i] for i in stacked], [adapters[i] for i in stacked], sampling, bar
                )
                results.update(zip(stacked, outs, strict=True))
            # PEFT adapters: one pass per distinct adapter (the base model is adapter None)
            for name in dict.fromkeys(a for i, a in enumerate(adapters) if i not in results):
                group = [i for i, a in enumerate(adapters) if a == name and i not in results]
                with self._adapter_context(name):
                    outs = self._generate_rows([prompts[i] for i in group], sampling, bar)
                results.update(zip(group, outs, strict=True))
        return [results[i] for i in range(len(prompts))]

    def _generate_stacked(
        self, prompts: list[str], adapters: list[str], sampling: Sampling, bar: tqdm
    ) -> list[list[str]]:
        """Prompts of stacked adapters, grouped per adapter and generated together, each row routed to its
        adapter (``route(row_group=...)``): as many rows as prompts, however unevenly they are shared."""
        if self._stack is None:
            raise ValueError(f"Adapter '{adapters[0]}' requested but no stacked adapters are attached")
        slots = [int(a.removeprefix(STACK_PREFIX)) for a in adapters]
        by_slot = {s: [i for i, x in enumerate(slots) if x == s] for s in dict.fromkeys(slots)}
        # whole adapters per generate call, at most batch_size rows (unless one adapter alone has more)
        calls: list[list[tuple[int, list[int]]]] = [[]]
        for slot, idx in by_slot.items():
            if calls[-1] and sum(len(i) for _, i in calls[-1]) + len(idx) > self.batch_size // sampling.n:
                calls.append([])
            calls[-1].append((slot, idx))
        results: dict[int, list[str]] = {}
        device = model_device(self.model)
        peft_off = isinstance(self.model, PeftModel)  # stacked adapters act on the bare base model
        with self.model.disable_adapter() if peft_off else contextlib.nullcontext():
            for chunk in calls:
                order = [i for _, idx in chunk for i in idx]
                rows = [prompts[i] for i in order for _ in range(sampling.n)]
                row_group = torch.tensor(
                    [g for g, (_, idx) in enumerate(chunk) for _ in idx for _ in range(sampling.n)],
                    device=device,
                )
                with self._stack.route([s for s, _ in chunk], row_group=row_group):
                    outs = self._generate_batches(rows, sampling, len(rows), bar)
                for j, i in enumerate(order):
                    results[i] = outs[j * sampling.n : (j + 1) * sampling.n]
        return [results[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def mean_logprobs(
        self, prompts: Sequence[str], completions: Sequence[str], adapter: str | None = None
    ) -> list[float]:
        """Mean log-probability per token of each completion after its prompt (teacher-forced, no sampling).

        Prompt and completion are tokenised apart and concatenated, so the scored tokens are exactly the
        completion's; an empty completion scores 0.0. Batches of `batch_size` are left-padded so that every
        completion ends at the right edge, and the vocabulary projection runs on the last positions only
        (`logits_to_keep`): memory grows with the completions, not the prompts.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        device = model_device(self.model)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def encode(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        out: list[float] = []
        was_training = self.model.training
        self.model.eval()
        dtype = autocast_dtype(device, self.autocast_setting)
        with (
            self._adapter_context(adapter),
            autocast(device, self.autocast_setting),
            frozen_linears_in(self.model, dtype),
        ):
            starts = range(0, len(prompts), self.batch_size)
            for start in tqdm(starts, desc="score", unit="batch", leave=False, disable=not self.progress):
                end = start + self.batch_size
                batch = zip(prompts[start:end], completions[start:end], strict=True)
                pairs = [(encode(p), encode(c)) for p, c in batch]
                width = max(len(p) + len(c) for p, c in pairs)
                keep = max(len(c) for _, c in pairs) + 1  # positions whose logits predict completion tokens
                ids = torch.full((len(pairs), width), pad, dtype=torch.long)
                mask = torch.zeros((len(pairs), width), dtype=torch.long)
                for row, (p, c) in enumerate(pairs):
                    ids[row, width - len(p) - len(c) :] = torch.tensor(p + c, dtype=torch.long)
                    mask[row, width - len(p) - len(c) :] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    logits_to_keep=keep,
                ).logits  # [rows, keep, vocab]: position width - keep + j
                for row, (_, c) in enumerate(pairs):
                    if not c:
                        out.append(0.0)
                        continue
                    predicting = logits[row, keep - len(c) - 1 : keep - 1].float().log_softmax(-1)
                    target = torch.tensor(c, device=device)
                    out.append(predicting.gather(1, target[:, None]).mean().item())
        self.model.train(was_training)
        return out

    def _generate_rows(self, prompts: list[str], sampling: Sampling, bar: tqdm) -> list[list[str]]:
        expanded = [p for p in prompts for _ in range(sampling.n)]
        outputs = self._generate_batches(expanded, sampling, self.batch_size, bar)
        return [outputs[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    @torch.inference_mode()
    def _generate_batches(self, rows: list[str], sampling: Sampling, batch_size: int, bar: tqdm) -> list[str]:
        """One completion per row, `batch_size` rows per `generate` call (left-padded); `bar` gains each
        batch's rows x max_new_tokens, step by step while it decodes."""
        device = model_device(self.model)
        outputs: list[str] = []
        was_training = self.model.training
        self.model.eval()
        batches = range(0, len(rows), batch_size)
        dtype = autocast_dtype(device, self.autocast_setting)
        with autocast(device, self.autocast_setting), frozen_linears_in(self.model, dtype):
            for b, start in enumerate(batches):
                batch = rows[start : start + batch_size]
                streamer = None if bar.disable else DecodeSteps(bar, len(batch))
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
                    streamer=streamer,
                    **kwargs,
                )
                if streamer is not None:  # a batch whose rows all ended early: its unused budget
                    bar.update(len(batch) * max(0, sampling.max_new_tokens - streamer.steps))
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        self.model.train(was_training)
        return outputs
