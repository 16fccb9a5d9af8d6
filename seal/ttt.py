"""Apply a self-edit: a short LoRA fine-tune (test-time training) of the already-loaded base model.

Every self-edit gets a fresh adapter named `ttt`, created and deleted explicitly on the one PeftModel, so the
base weights are loaded once per run. The training loop is a plain AdamW loop rather than `SFTTrainer`
because a Trainer per self-edit costs more to build than the few dozen steps it runs (SEAL applies
hundreds of self-edits per round); the ReST-EM update, a single long run, does use `SFTTrainer`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seal.attention import PACKED_ATTENTION, packed_attention_supported
from seal.config import GenerateConfig, TTTConfig
from seal.data import DataValidationError, Passage
from seal.losses import IGNORE_INDEX, grouped_linear_cross_entropy, grouped_loss
from seal.multi_lora import StackedLoRA, find_targets
from seal.templates import TrainExample, passage_examples
from seal.utils import (
    attention_implementation,
    autocast,
    autocast_dtype,
    compute_dtype,
    frozen_linears_in,
    model_device,
)

ADAPTER = "ttt"
# Logit transforms some architectures apply after their output layer (the fused loss then does not apply).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
PACK_LENGTH = 256  # tokens per packed training row (batched TTT); attention cost grows with its square
PROMPT_SHARE = 4  # a prompt of at most ttt_max_length // 4 tokens is repeated before every chunk
Sequences = list[tuple[list[int], list[int]]]  # (input_ids, labels) training sequences

logger = logging.getLogger("seal")


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


def encode_example(ex: TrainExample, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS) of one example, without other special tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
    return prompt_ids, tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos


def split_sequence(
    prompt_ids: list[int], completion_ids: list[int], max_length: int, completion_only: bool
) -> Sequences:
    """`prompt + completion` as (input_ids, labels) chunks of at most `max_length` tokens, nothing cut.

    One chunk when it fits. Else the first chunk is its first `max_length` tokens and every further chunk
    starts with masked context: the prompt (e.g. the title line) when it is at most max_length //
    PROMPT_SHARE tokens, else the previous chunk's last token. Invariant: every position of the sequence is
    a label (masked or not exactly as unsplit) in exactly one chunk, and each chunk's first label position
    is preceded by context, so every token the unsplit sequence predicts is predicted once (the EOS only at
    the end of the last chunk). Prompt labels are masked when `completion_only`.
    """
    ids = prompt_ids + completion_ids
    labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)) + completion_ids
    if len(ids) <= max_length:
        return [(ids, labels)]
    if max_length < 2:
        raise ValueError(f"cannot split a sequence into chunks of at most {max_length} token")
    repeat = 0 < len(prompt_ids) <= max_length // PROMPT_SHARE
    chunks = [(ids[:max_length], labels[:max_length])]
    start = max_length
    while start < len(ids):
        context = list(prompt_ids) if repeat else ids[start - 1 : start]
        end = start + max_length - len(context)
        chunks.append((context + ids[start:end], [IGNORE_INDEX] * len(context) + labels[start:end]))
        start = end
    return chunks


def tokenize_examples(
    examples: Sequence[TrainExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    completion_only: bool,
) -> Sequences:
    """(input_ids, labels) training sequences of `examples`, in order, EOS appended, prompt tokens masked
    when `completion_only`; an example longer than `max_length` gives several (:func:`split_sequence`)."""
    return [
        chunk
        for ex in examples
        for chunk in split_sequence(*encode_example(ex, tokenizer), max_length, completion_only)
    ]


def overlong(
    examples: Sequence[TrainExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[int, int]]:
    """(index, tokens) of every example whose prompt + completion + EOS is longer than `max_length`."""
    lengths = ((i, sum(map(len, encode_example(ex, tokenizer)))) for i, ex in enumerate(examples))
    return [(i, n) for i, n in lengths if n > max_length]


def check_overlong(
    jobs: Sequence[Sequence[TrainExample]],
    names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TTTConfig,
    log: bool = True,
) -> int:
    """How many examples of `jobs` are longer than ttt_max_length (TTT splits them; logged once, INFO, on
    `seal`). With ttt_overlong=error a DataValidationError instead, naming each one's job (`names[k]`),
    example, length and the limit: call it before any training."""
    limit = cfg.ttt_max_length
    found = [
        (name, i, n, job[i])
        for job, name in zip(jobs, names, strict=True)
        for i, n in overlong(job, tokenizer, limit)
    ]
    if cfg.ttt_overlong == "error" and found:
        raise DataValidationError(
            [
                f"{name}: training example {i} ({ex.text!r:.50}): {n} tokens (prompt + completion + EOS), "
                f"longer than ttt_max_length={limit} (ttt_overlong: error)"
                for name, i, n, ex in found
            ]
        )
    if log:
        longest = f" (longest {max(n for _, _, n, _ in found)}): split into chunks, all trained on"
        logger.info(
            "TTT: %d of %d training examples longer than ttt_max_length=%d tokens%s",
            *(len(found), sum(map(len, jobs)), limit, longest if found else ""),
        )
    return len(found)


def check_passages_fit(
    passages: Sequence[Passage],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TTTConfig,
    gen: GenerateConfig,
    trained: bool | None = None,
) -> None:
    """With ttt_overlong=error, refuse (before any model loads) a passage whose own TTT sequence (title
    prefix + context + EOS) is longer than ttt_max_length; `trained`: is the passage trained on (default
    `gen.include_passage`)."""
    if cfg.ttt_overlong != "error" or not (gen.include_passage if trained is None else trained):
        return
    problems = [
        f"record {p.id}: field 'context': {n} tokens as a TTT sequence (title + context + EOS), longer than "
        f"ttt_max_length={cfg.ttt_max_length} (ttt_overlong: error)"
        for p in passages
        for _, n in overlong(passage_examples(p, gen), tokenizer, cfg.ttt_max_length)
    ]
    if problems:
        raise DataValidationError(problems)


def training_sequences(
    jobs: Sequence[Sequence[TrainExample]], tokenizer: PreTrainedTokenizerBase, cfg: TTTConfig
) -> list[Sequences]:
    """Each job's (input_ids, labels) sequences exactly as sequential and batched TTT train on them: long
    examples split, or (ttt_overlong=error) refused before any training."""
    if cfg.ttt_overlong == "error":
        check_overlong(jobs, [f"TTT job {k}" for k in range(len(jobs))], tokenizer, cfg, log=False)
    completion_only = cfg.ttt_loss == "completion"
    return [tokenize_examples(job, tokenizer, cfg.ttt_max_length, completion_only) for job in jobs]


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


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) of every optimizer step: a fresh seeded shuffle per epoch."""
    shuffle = torch.Generator().manual_seed(seed)
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=shuffle).tolist()
        steps.extend((epoch, order[s : s + batch_size]) for s in range(0, n, batch_size))
    return steps


def lr_factor(scheduler: str, step: int, total: int) -> float:
    """Learning-rate multiplier before optimizer step `step` (0-based) of `total`."""
    if scheduler == "constant":
        return 1.0
    if scheduler == "linear":  # transformers' linear schedule without warm-up
        return max(0.0, (total - step) / max(total, 1))
    raise ValueError(f"ttt_lr_scheduler must be 'constant' or 'linear', got '{scheduler}'")


def epoch_means(losses: Sequence[tuple[int, float]], epochs: int) -> list[float]:
    """Mean step loss of each epoch, from (epoch, loss) pairs."""
    out = []
    for e in range(epochs):
        values = [loss for epoch, loss in losses if epoch == e]
        out.append(sum(values) / max(len(values), 1))
    return out


class TTT:
    """Fine-tunes a fresh `ttt` LoRA adapter on one self-edit's examples, leaving it active for evaluation."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: TTTConfig):
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
        (data,) = training_sequences([examples], self.tokenizer, self.cfg)
        params = self.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=self.cfg.ttt_learning_rate, weight_decay=0.0)
        batches = batch_schedule(len(data), self.cfg.ttt_batch_size, self.cfg.ttt_epochs, seed)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(self.cfg.ttt_lr_scheduler, step, len(batches))
        )
        losses: list[tuple[int, float]] = []
        self.model.train()
        with frozen_linears_in(self.model, autocast_dtype(device, self.cfg.ttt_autocast)):
            for epoch, indices in batches:
                batch = collate([data[i] for i in indices], self.pad_id, device)
                with autocast(device, self.cfg.ttt_autocast):
                    loss = self.model(**batch).loss
                loss.backward()
                if self.cfg.ttt_max_grad_norm > 0:
                    clip_grad_norm_(params, self.cfg.ttt_max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append((epoch, loss.item()))
        epoch_losses = epoch_means(losses, self.cfg.ttt_epochs)
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


class BatchedTTT:
    """Fine-tunes K fresh LoRA adapters, one per self-edit, together: one forward/backward per step.

    Adapter k sees exactly the batches sequential :class:`TTT` would give it for the same seed (same
    shuffles, same batch size, and with `exact_peft_init` the same initial weights), its loss is the mean
    over its own tokens, and it is its own parameter group of one AdamW (own learning rate, step count and
    moments; skipped in steps it sits out), so training K together is training each alone, only faster.
    After :meth:`apply` the adapters stay in ``self.stack`` for batched evaluation (``HFEngine.stack``)
    or export (:meth:`save`). Sequences are packed (:func:`pack_sequences`), never padded to a fixed length.

    The training state - the stack, the optimizer's moments and the gradient buffers, ~26 bytes per LoRA
    parameter (6.4 GB for 30 SmolLM2 adapters at r=32) - is kept from one :meth:`apply` to the next (the
    next chunk of an inner loop) and reset in place: fresh tensors this large are page-faulted in anew on
    every call, which took 5-10 s per chunk of 30 adapters here. :meth:`release` frees it.
    """

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: TTTConfig,
        exact_peft_init: bool = False,
        schedule: Callable[[int, int, int, int], list[tuple[int, list[int]]]] = batch_schedule,
    ):
        """`exact_peft_init`: start each adapter from the very weights PEFT (and so sequential TTT) would
        draw for its seed, at ~0.25 s per adapter on a 135M model; otherwise from the same distribution.
        `schedule(examples, batch_size, epochs, seed)` gives each adapter's (epoch, example indices) per
        step (default :func:`batch_schedule`, as sequential TTT)."""
        self.exact_peft_init = exact_peft_init
        self.schedule = schedule
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.lora_config = ttt_lora_config(cfg)
        self.stack: StackedLoRA | None = None
        self._optimizer: torch.optim.Optimizer | None = None  # one parameter group per adapter of the stack

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _training_state(self, num_adapters: int) -> tuple[StackedLoRA, torch.optim.Optimizer]:
        """A stack of at least `num_adapters` adapters and its AdamW with the first `num_adapters` groups'
        state as new: the ones kept from the last :meth:`apply` when they have room (the moments zeroed in
        place, which is how AdamW starts them), else new ones; after :meth:`release` a stack with room is
        kept (its weights' memory is reused) and only the optimizer is new. Adapters past `num_adapters`
        sit this :meth:`apply` out: they are never routed, get no gradient, and AdamW skips them."""
        if self.stack is None or self.stack.num_adapters < num_adapters:
            self.release()
            if self.stack is not None:
                self.stack.remove()
            self.stack = StackedLoRA(
                self.model,
                num_adapters,
                self.cfg.ttt_lora_r,
                self.cfg.ttt_lora_alpha,
                self.cfg.ttt_target_modules,
                self.cfg.ttt_lora_dropout,
            )
        if self._optimizer is None:
            device = self.stack.weights[0].device
            self._optimizer = torch.optim.AdamW(
                [{"params": self.stack.adapter_parameters(k)} for k in range(self.stack.num_adapters)],
                lr=self.cfg.ttt_learning_rate,
                weight_decay=0.0,
                fused=device.type in ("cpu", "cuda"),
            )
        for k in range(self.stack.num_adapters):
            for p in self.stack.adapter_parameters(k):
                p.requires_grad_(k < num_adapters)
                for value in self._optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value):  # exp_avg, exp_avg_sq and step all start at zero
                        value.zero_()
        return self.stack, self._optimizer

    def release(self) -> None:
        """Free the training state kept between :meth:`apply` calls (optimizer moments, gradient buffers);
        the trained adapters stay in ``self.stack``."""
        self._optimizer = None
        if self.stack is not None:
            self.stack.drop_gradients()

    def apply(self, jobs: Sequence[Sequence[TrainExample]], seeds: Sequence[int]) -> list[list[float]]:
        """Train one fresh adapter per job (adapter k on ``jobs[k]``, seeded by ``seeds[k]``).

        Returns each adapter's mean loss per epoch. Jobs may differ in size: an adapter whose job has run
        out of batches simply sits out the remaining steps.
        """
        if len(jobs) != len(seeds):
            raise ValueError(f"{len(jobs)} jobs but {len(seeds)} seeds")
        data = training_sequences(jobs, self.tokenizer, self.cfg)  # first: ttt_overlong=error refuses here
        stack, optimizer = self._training_state(max(len(jobs), 1))
        peft_model = self.model if isinstance(self.model, PeftModel) else None
        for k, seed in enumerate(seeds):
            stack.init_adapter(k, seed, peft_model if self.exact_peft_init else None, self.lora_config)
        device = model_device(self.model)
        plans = [
            self.schedule(len(d), self.cfg.ttt_batch_size, self.cfg.ttt_epochs, s) if d else []
            for d, s in zip(data, seeds, strict=True)
        ]
        losses: list[list[tuple[int, float]]] = [[] for _ in jobs]
        lr = self.cfg.ttt_learning_rate
        for p in self.model.parameters():  # only the stacked adapters train
            p.requires_grad_(False)
        was_training = self.model.training
        self.model.train()
        peft_off = self.model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
        split = decoder_and_head(self.model)  # None: logits need more than a Linear; compute them whole
        with (
            peft_off,
            attention_implementation(self.model, training_attention(self.model, device)),
            frozen_linears_in(self.model, autocast_dtype(device, self.cfg.ttt_autocast)),
        ):
            for step in tqdm(range(max(map(len, plans), default=0)), desc="batched TTT", leave=False):
                active = [k for k, plan in enumerate(plans) if step < len(plan)]
                # most tokens first, so that adapters of like shares are neighbours: PaddedLayout pads each
                # adapter's block to the longest of its bucket of neighbours instead of the step's longest
                active.sort(key=lambda k: -sum(len(data[k][i][0]) for i in plans[k][step][1]))
                batch = pack_sequences(
                    [[data[k][i] for i in plans[k][step][1]] for k in active],
                    self.pad_id,
                    PACK_LENGTH,
                    device,
                )
                stack.zero_grad()  # set to None: adapters sitting this step out get none, AdamW skips them
                with stack.route(active, batch.token_group), autocast(device, self.cfg.ttt_autocast):
                    per_adapter = self._losses(batch, len(active), split)
                per_adapter.sum().backward()  # no shared parameters: each adapter gets its own gradient
                for k in active:
                    factor = lr_factor(self.cfg.ttt_lr_scheduler, step, len(plans[k]))
                    optimizer.param_groups[k]["lr"] = lr * factor
                if self.cfg.ttt_max_grad_norm > 0:  # each adapter's own gradient norm, as if alone
                    clip_per_adapter(
                        [stack.adapter_parameters(k) for k in active], self.cfg.ttt_max_grad_norm
                    )
                optimizer.step()
                for k, value in zip(active, per_adapter.tolist(), strict=True):
                    losses[k].append((plans[k][step][0], value))
        stack.zero_grad()  # the gradient buffers themselves are kept for the next apply()
        stack.invalidate()
        self.model.train(was_training)
        for p in [*self.model.parameters(), *stack.parameters()]:  # PEFT re-enables its active adapter
            p.requires_grad_(False)
        out = [epoch_means(loss, self.cfg.ttt_epochs) if loss else [] for loss in losses]
        bad = [k for k, ls in enumerate(out) if not all(math.isfinite(x) for x in ls)]
        if bad:
            raise FloatingPointError(f"batched TTT loss diverged for adapters {bad}: {[out[k] for k in bad]}")
        return out

    def _losses(self, batch: PackedBatch, groups: int, split: tuple | None) -> torch.Tensor:
        """Each adapter's mean loss on its tokens of `batch`: with `split` (decoder, output layer) straight
        from the last hidden states, never holding the (tokens, vocabulary) logits; else from the logits."""
        inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
        if split is None:
            logits = self.model(**inputs).logits
            return grouped_loss(logits, batch.targets, batch.token_group, groups)
        decoder, head = split
        hidden = decoder(**inputs).last_hidden_state
        return grouped_linear_cross_entropy(
            hidden, head, batch.targets, batch.token_group, groups, compute_dtype(hidden)
        )

    def save(self, k: int, path: str | os.PathLike) -> Path:
        """Write adapter k in PEFT format (safetensors) directly into `path`."""
        if self.stack is None:
            raise RuntimeError("No adapters trained yet: call apply() first")
        config = ttt_lora_config(self.cfg)
        config.base_model_name_or_path = getattr(self.model.config, "_name_or_path", None)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            self.stack.save_adapter(k, tmp, config)
            if path.exists():
                shutil.rmtree(path)
            shutil.copytree(tmp, path)
        return path


@dataclass
class PackedBatch:
    """Sequences of several adapters packed into rows without padding between them.

    Each row holds whole sequences back to back; ``position_ids`` restart at 0 for every sequence, which is
    how transformers recognises packed sequences and keeps attention within each one (no attention mask
    is passed). Read row after row, the batch lists group 0's sequences, then group 1's, and so on; the
    padding at a row's end is its own sequence, of no group and with no target. ``targets`` are next-token
    labels already shifted within each sequence; ``token_group`` routes each position to its group's
    adapter (:meth:`seal.multi_lora.StackedLoRA.route`).
    """

    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length)
    targets: torch.Tensor  # (rows * length,), IGNORE_INDEX where there is nothing to predict
    token_group: torch.Tensor  # (rows * length,), the group of each position, -1 for padding


def pack_sequences(
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    capacity: int,
    device: torch.device,
) -> PackedBatch:
    """Pack every group's (input_ids, labels) sequences, in group order, into rows of at most `capacity`.

    A sequence is never split across rows. The rows are as few as `capacity` allows in this order and as
    even as possible, so padding (only at row ends) is small; a sequence longer than `capacity` gets a row
    of its own length.
    """
    items = [(g, ids, labels) for g, seqs in enumerate(groups) for ids, labels in seqs]
    if not items:
        raise ValueError("nothing to pack: every group is empty")
    lengths = [len(ids) for _, ids, _ in items]
    rows = balanced_rows(lengths, capacity)
    length = max(sum(lengths[i] for i in row) for row in rows)
    total = len(rows) * length
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    token_group = torch.full((total,), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            g, ids, labels = items[i]
            n, start = len(ids), r * length + col
            input_ids[r, col : col + n] = torch.tensor(ids)
            position_ids[r, col : col + n] = torch.arange(n)
            targets[start : start + n - 1] = torch.tensor(labels[1:], dtype=torch.long)
            token_group[start : start + n] = g
            col += n
        position_ids[r, col:] = torch.arange(length - col)  # padding: its own "sequence", no loss
    return PackedBatch(
        input_ids.to(device),
        position_ids.to(device),
        targets.to(device),
        token_group.to(device),
    )


def balanced_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Split items 0..n-1, in order, into consecutive rows: as few as `capacity` allows, then the smallest
    longest row with that count (binary search on the row limit; next-fit is optimal for a fixed order)."""

    def next_fit(limit: int) -> list[list[int]]:
        rows: list[list[int]] = []
        fill = 0
        for i, n in enumerate(lengths):
            if not rows or fill + n > limit:
                rows.append([])
                fill = 0
            rows[-1].append(i)
            fill += n
        return rows

    capacity = max(capacity, max(lengths))
    count = len(next_fit(capacity))
    low, high = max(max(lengths), math.ceil(sum(lengths) / count)), capacity
    while low < high:
        mid = (low + high) // 2
        if len(next_fit(mid)) <= count:
            high = mid
        else:
            low = mid + 1
    return next_fit(low)


@torch.no_grad()
def clip_per_adapter(groups: Sequence[Sequence[torch.Tensor]], max_norm: float) -> None:
    """`clip_grad_norm_` applied to each group of parameters separately, in a few vectorised calls."""
    grads = [p.grad for group in groups for p in group]
    norms = torch.stack(torch._foreach_norm(grads)).view(len(groups), -1)
    coefs = (max_norm / (norms.pow(2).sum(1).sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [c for c, group in zip(coefs, groups, strict=True) for _ in group])


def decoder_and_head(model: PreTrainedModel | PeftModel) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The decoder stack and output Linear of a causal LM whose logits are ``head(decoder(...))``, or None
    when the architecture transforms its logits further (soft-capping, scaling) or has no such split."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = base.get_output_embeddings()
    decoder = base.get_decoder()
    if not isinstance(head, torch.nn.Linear) or decoder is base:
        return None
    if any(getattr(base.config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return decoder, head


def training_attention(model: PreTrainedModel | PeftModel, device: torch.device) -> str | None:
    """The attention kernel for packed training: on CPU seal's packed kernel where the architecture allows
    (:mod:`seal.attention`), else eager (~10% faster than SDPA's flash kernel on short sequences, measured on
    SmolLM2-135M, 16 x 36 tokens: its backward dominates); GPUs keep the model's own choice."""
    if device.type != "cpu":
        return None
    return PACKED_ATTENTION if packed_attention_supported(model.config) else "eager"


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
