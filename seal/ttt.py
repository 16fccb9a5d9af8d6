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
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from seal.attention import PACKED_ATTENTION, packed_attention_supported
from seal.config import TTTConfig
from seal.losses import grouped_linear_cross_entropy, grouped_loss
from seal.multi_lora import StackedLoRA
from seal.sequences import PackedBatch, collate, pack_sequences, training_sequences
from seal.templates import TrainExample
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


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) of every optimizer step: a fresh seeded shuffle per epoch."""
    shuffle = torch.Generator().manual_seed(seed)
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=shuffle).tolist()
        steps.extend((epoch, order[s : s + batch_size]) for s in range(0, n, batch_size))
    return steps


def lr_factor(scheduler: str, step: int, total: int) -> float:
    """Learning-rate multiplier before optimizer step `step` (0-based) of `total`: transformers' schedule of
    that name without warm-up. Batched TTT needs its own: each adapter (a param group) has its own number
    of steps, which transformers' schedulers (one length per optimizer) cannot express."""
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
        scheduler = get_scheduler(self.cfg.ttt_lr_scheduler, optimizer, 0, len(batches))  # as the Trainer
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
