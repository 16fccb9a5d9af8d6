"""Many independent LoRA adapters trained and served in one batch over one frozen base model.

Why not PEFT: PEFT refuses batches that mix adapters in training mode, and training K adapters one after
another leaves a small model's matmuls too small to keep the CPU (or a GPU) busy. Here each adapter k has
its own LoRA parameters ``A_k`` (r, in) and ``B_k`` (out, r) per target Linear, and a forward hook adds
``scaling * x A_k^T B_k^T`` to adapter k's tokens: the participating adapters' weights are stacked (once
per forward, for all modules) so the LoRA products of all of them are two batched matmuls. In generation
the batch is equal blocks of rows, block g for the g-th adapter; in training it is packed sorted by adapter
(:func:`seal.ttt.pack_sequences`), so adapter k's tokens are one contiguous run, and each module gathers
the runs into padded blocks with one index op and scatters the result back with another. Because every
adapter owns its parameters (one flat
tensor each), a standard optimizer with one parameter group per adapter gives each its own learning rate
and step count, and an adapter that sits a step out (no gradient) is left untouched, exactly as if it were
trained alone.

The hooks sit on the base ``nn.Linear`` modules (inside PEFT's LoRA layers when the model is a PeftModel),
so PEFT adapters on the same model keep working; outside :meth:`StackedLoRA.route` the hooks add nothing.
Adapters are exported in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), which
PEFT and vLLM load like any other LoRA adapter.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from torch import nn

from seal.utils import compute_dtype

INIT_ADAPTER = "stacked-lora-init"


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The base Linear layers whose last name component is in `target_modules`, keyed by PEFT module path.

    In a PeftModel the Linear is the LoRA layer's ``base_layer``; its key drops that suffix, so keys match
    PEFT's own module paths (``base_model.model.model.layers.0.self_attn.q_proj``).
    """
    wanted = set(target_modules)
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        key = name.removesuffix(".base_layer")
        if key.rsplit(".", 1)[-1] in wanted:
            targets[key] = module
    if not targets:
        raise ValueError(f"No Linear module of the model matches target_modules {sorted(wanted)}")
    return targets


def padded_layout(offsets: Sequence[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """How to lay a packed batch's runs out as equal blocks: (block length, gather index, scatter index).

    Run g holds rows ``offsets[g-1]:offsets[g]`` of a (T, ...) tensor. ``x.index_select(0, gather)``
    is the (G * block, ...) padded layout, block g starting with run g and padded with copies of its last
    row (their results are discarded, so they get no gradient); ``y.index_select(0, scatter)`` takes a
    padded (G * block, ...) result back to the packed (T, ...) order. Both are None when the runs are
    already equal blocks (e.g. one adapter).
    """
    ends = list(offsets)
    starts = [0, *ends[:-1]]
    counts = [e - s for s, e in zip(starts, ends, strict=True)]
    block = max(max(counts), 1)
    if all(c == block for c in counts):
        return block, None, None
    gather = [min(s + t, max(e - 1, 0)) for s, e in zip(starts, ends, strict=True) for t in range(block)]
    scatter = [g * block + t for g, c in enumerate(counts) for t in range(c)]
    return block, torch.tensor(gather), torch.tensor(scatter)


class _CastStack(torch.autograd.Function):
    """The routed adapters' flat weights cast into rows of a reused buffer: (G, P) in the compute dtype.

    Backward writes each row of the (G, P) gradient straight into its adapter's float32 ``.grad`` (the
    buffer :meth:`StackedLoRA.zero_grad` keeps: a converting copy for the first contribution after it was
    zeroed, else an add) and hands autograd nothing to accumulate. Autograd's own route (``torch.stack`` +
    ``.to``, then AccumulateGrad) allocates a float32 stack in forward and a float32 copy of the gradient in
    backward, and its mixed-dtype in-place add ran at 25 ms per SmolLM2 adapter (9.8M parameters) where the
    copy takes 2.7 ms. Tensor hooks on the flat parameters therefore do not fire.
    """

    @staticmethod
    def forward(ctx, stack: StackedLoRA, buffer: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:  # noqa: ANN205
        ctx.stack, ctx.weights = stack, weights
        for row, weight in zip(buffer, weights, strict=False):
            row.copy_(weight)
        return buffer[: len(weights)]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        for row, weight in zip(grad, ctx.weights, strict=True):
            if weight.grad is None:
                weight.grad = row.to(weight.dtype, copy=True)
            elif id(weight) in ctx.stack._zeroed:
                ctx.stack._zeroed.discard(id(weight))
                weight.grad.copy_(row)  # its first contribution since zero_grad: a plain converting copy
            else:
                # converting first: an in-place add of a bf16 into a float32 tensor runs ~10x slower
                weight.grad.add_(row.to(weight.dtype))
        return (None, None) + (None,) * len(ctx.weights)


class _LoRADelta(torch.autograd.Function):
    """``scaling * x A^T B^T`` of G adapters: x (G, T, in), A (G, r, in), B (G, out, r) -> (G, T, out).

    The same two batched matmuls autograd would record, as one node with its backward written out (four
    batched matmuls and a scale): autograd's own graph holds ~10 nodes per module (transposes, views, the
    scale, two matmuls) whose fixed cost dominates the small steps of TTT at batch 1.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:  # noqa: ANN205
        h = torch.bmm(x, a.transpose(1, 2)).mul_(scaling)  # scaled on (G, T, r), the smallest product
        ctx.save_for_backward(x, a, b, h)
        ctx.scaling = scaling
        return torch.bmm(h, b.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        x, a, b, h = ctx.saved_tensors
        grad_h = torch.bmm(grad, b).mul_(ctx.scaling)  # d/d(x A^T)
        grad_x = torch.bmm(grad_h, a) if ctx.needs_input_grad[0] else None
        grad_a = torch.bmm(grad_h.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = torch.bmm(grad.transpose(1, 2), h) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None


class StackedLoRA(nn.Module):
    """K LoRA adapters of rank r on the same target modules of one frozen model.

    ``lora_A[k][i]`` (r, in) and ``lora_B[k][i]`` (out, r) are adapter k's weights on the i-th target
    module; its effective weight there is ``W + scaling * B @ A``, as in PEFT. Each adapter's weights live
    in one flat parameter, ``weights[k]``, of which these matrices are views: the optimizer and gradient
    clipping then handle one tensor per adapter instead of two per module (420 on SmolLM2), which is most
    of their per-step cost when there are many adapters. :meth:`zero_grad` gives the adapters of a step a
    zeroed gradient that lives from step to step.
    """

    def __init__(
        self,
        model: nn.Module,
        num_adapters: int,
        r: int,
        lora_alpha: float,
        target_modules: Sequence[str],
        lora_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
        self.num_adapters, self.r, self.scaling = num_adapters, r, lora_alpha / r
        self.targets = find_targets(model, target_modules)
        self.names = list(self.targets)
        device = next(iter(self.targets.values())).weight.device
        modules = list(self.targets.values())
        self._shapes = [shape for m in modules for shape in ((r, m.in_features), (m.out_features, r))]
        self._sizes = [rows * cols for rows, cols in self._shapes]
        size = sum(self._sizes)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(size, device=device, dtype=dtype)) for _ in range(num_adapters)
        )
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._groups: list[int] | None = None
        self._gather: torch.Tensor | None = None  # packed runs -> padded blocks (see padded_layout)
        self._scatter: torch.Tensor | None = None  # padded blocks -> packed runs
        self._grads: dict[int, torch.Tensor] = {}
        self._zeroed: set[int] = set()  # ids of weights whose .grad is zeroed and not yet written to
        self._cast_buffer: torch.Tensor | None = None  # the routed weights in the compute dtype (training)
        self._cache: dict[tuple, list[torch.Tensor]] = {}
        self._routed: tuple[tuple, list[torch.Tensor]] | None = None  # this forward's matrices
        self._last_input: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._handles = [module.register_forward_hook(self._make_hook(i)) for i, module in enumerate(modules)]

    def views(self, k: int) -> list[torch.Tensor]:
        """Adapter k's matrices ``[A_0, B_0, A_1, B_1, ...]``, views of ``weights[k]`` (one split: in
        backward their gradients are concatenated into the flat gradient at once)."""
        pieces = self.weights[k].split(self._sizes)
        return [piece.view(shape) for piece, shape in zip(pieces, self._shapes, strict=True)]

    @property
    def lora_A(self) -> list[list[torch.Tensor]]:
        return [self.views(k)[0::2] for k in range(self.num_adapters)]

    @property
    def lora_B(self) -> list[list[torch.Tensor]]:
        return [self.views(k)[1::2] for k in range(self.num_adapters)]

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        """Adapter k's parameters (one optimizer parameter group per adapter)."""
        return [self.weights[k]]

    def zero_grad(self, active: Sequence[int]) -> None:
        """Give exactly the adapters in `active` a zeroed gradient and the others none, so that an optimizer
        steps only them. The buffers are allocated once and reused rather than a fresh flat gradient per
        adapter per step (39 MB on SmolLM2 at r=32, page-faulted in anew each time)."""
        active = set(active)
        for k, weight in enumerate(self.weights):
            if k not in active:
                weight.grad = None
                continue
            if k not in self._grads:
                self._grads[k] = torch.zeros_like(weight)
            weight.grad = self._grads[k].zero_()
            self._zeroed.add(id(weight))

    def drop_gradients(self) -> None:
        """Remove every adapter's gradient and free the buffers :meth:`zero_grad` keeps."""
        for weight in self.weights:
            weight.grad = None
        self._grads.clear()
        self._zeroed.clear()
        self._cast_buffer = None

    def invalidate(self) -> None:
        """Forget the stacked copies used without gradients (call after the weights change)."""
        self._cache.clear()

    def _matrices(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every target module's matrices of the routed adapters in `dtype`: ``[A_0, B_0, A_1, B_1, ...]``,
        A_i (G, r, in) and B_i (G, out, r), views of one (G, P) stack of the adapters' flat weights.

        Stacking and casting all modules at once, once per forward, costs a few whole-tensor ops per step
        where one stack and cast per module cost ~5 ops x 210 modules (SmolLM2); in backward autograd
        concatenates the 420 pieces' gradients and :class:`_CastStack` writes each adapter's row into its
        ``.grad``. Without gradients (generation: many forwards per route) the stack is cached until
        :meth:`invalidate`.
        """
        key = (tuple(self._groups), dtype)
        if self._routed is not None and self._routed[0] == key:
            return self._routed[1]
        weights = [self.weights[k] for k in self._groups]
        grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        if not grad and key in self._cache:
            return self._cache[key]
        if grad:
            flat = _CastStack.apply(self, self._buffer(len(weights), dtype), *weights)
        else:
            flat = torch.stack(weights).to(dtype)
        pieces = flat.split(self._sizes, dim=1)
        mats = [piece.unflatten(1, shape) for piece, shape in zip(pieces, self._shapes, strict=True)]
        if not grad:
            self._cache[key] = mats
        self._routed = (key, mats)
        return mats

    def _buffer(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, P) tensor of `dtype` kept from step to step (fresh large tensors are page-faulted)."""
        buffer = self._cast_buffer
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != dtype:
            size = (max(rows, 0 if buffer is None else buffer.shape[0]), self.weights[0].numel())
            buffer = self._cast_buffer = torch.empty(size, dtype=dtype, device=self.weights[0].device)
        return buffer

    def _input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in `dtype` as G equal blocks (G, block, in): packed runs gathered into padded blocks. Made once
        for consecutive modules that read the same input (q/k/v, gate/up)."""
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last_input
        if last is not None and last[0] is x and last[1] == version and last[2].dtype == dtype:
            return last[2]
        flat = x.to(dtype).reshape(-1, x.shape[-1])
        if self._gather is not None:
            flat = flat.index_select(0, self._gather)
        groups = len(self._groups)
        if flat.shape[0] % groups:
            raise RuntimeError(f"{flat.shape[0]} rows cannot be split into {groups} adapter groups")
        blocks = flat.view(groups, -1, flat.shape[-1])
        self._last_input = (x, version, blocks)
        return blocks

    def _make_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._groups is None:
                return output
            dtype = compute_dtype(output)
            mats = self._matrices(dtype)
            a, b = mats[2 * i], mats[2 * i + 1]
            x = self.dropout(self._input(inputs[0], dtype))
            delta = _LoRADelta.apply(x, a, b, self.scaling).flatten(0, 1)  # one batched pair, all adapters
            if self._scatter is not None:  # padded blocks back to the packed order
                delta = delta.index_select(0, self._scatter)
            # in place: a Linear's backward does not need its output
            return output.add_(delta.view(output.shape).to(output.dtype))

        return hook

    @contextlib.contextmanager
    def route(
        self, groups: Sequence[int] | torch.Tensor, offsets: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Apply adapters ``groups[g]`` (g = 0..G-1) to the batch inside this context.

        Without `offsets` the batch is G equal blocks of rows, block g for adapter groups[g] (generation).
        With `offsets`, a (G,) tensor of run ends, the flattened batch (``row * seq_len + col``) is sorted by
        adapter: adapter groups[g] acts on positions ``offsets[g-1]`` (0 for g = 0) to ``offsets[g]``, and
        ``offsets[-1]`` is the number of tokens in the batch (packed training, see
        :func:`seal.ttt.pack_sequences`). Each module gathers the runs into padded blocks (one index per
        step, shared by all modules), multiplies them with two batched matmuls and scatters the result back:
        a constant number of ops per module whatever G is. (``torch._grouped_mm`` needs no padding, but on
        CPU it runs one small GEMM per adapter per module: ~20k GEMMs in a 16-adapter SmolLM2 step.)
        """
        groups = [int(g) for g in groups]
        if not groups or min(groups) < 0 or max(groups) >= self.num_adapters:
            raise IndexError(f"adapter indices must be in [0, {self.num_adapters}), got {groups}")
        if offsets is not None and tuple(offsets.shape) != (len(groups),):
            raise ValueError(f"offsets has shape {tuple(offsets.shape)}, expected ({len(groups)},)")
        device = self.weights[0].device
        self._groups = groups
        if offsets is not None:
            _, gather, scatter = padded_layout([int(e) for e in offsets.tolist()])
            self._gather = None if gather is None else gather.to(device)
            self._scatter = None if scatter is None else scatter.to(device)
        try:
            yield
        finally:
            self._groups, self._gather, self._scatter = None, None, None
            self._last_input, self._routed = None, None

    def remove(self) -> None:
        """Detach the hooks: the model is exactly the base model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- initialisation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_adapter(
        self, k: int, seed: int, peft_model: PeftModel | None = None, config: LoraConfig | None = None
    ) -> None:
        """Initialise adapter k as a fresh PEFT LoRA adapter created after ``torch.manual_seed(seed)``.

        With a PeftModel the weights are exactly those PEFT itself would draw (a throwaway adapter is added
        and deleted), so batched and sequential TTT start from the same point for the same seed. Without
        one, A is drawn the way PEFT draws it (Kaiming-uniform, a=sqrt(5)) and B is zero.
        """
        if peft_model is not None and config is not None:
            torch.manual_seed(seed)
            peft_model.add_adapter(INIT_ADAPTER, config)
            try:
                modules = dict(peft_model.named_modules())
                views = self.views(k)
                for i, name in enumerate(self.names):
                    layer = modules[name]
                    views[2 * i].copy_(layer.lora_A[INIT_ADAPTER].weight)
                    views[2 * i + 1].copy_(layer.lora_B[INIT_ADAPTER].weight)
            finally:
                peft_model.delete_adapter(INIT_ADAPTER)
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            views = self.views(k)
            for a, b in zip(views[0::2], views[1::2], strict=True):
                weight = torch.empty(a.shape, dtype=torch.float32)
                bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
                a.copy_(weight.uniform_(-bound, bound, generator=gen))
                b.zero_()
        self.invalidate()

    # -- export -----------------------------------------------------------------------------------------

    def adapter_weights(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        views = [v.detach() for v in self.views(k)]
        return {name: (views[2 * i], views[2 * i + 1]) for i, name in enumerate(self.names)}

    def peft_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Adapter k with PEFT's saved key names (``base_model.model.<module>.lora_A.weight``)."""
        out = {}
        for name, (a, b) in self.adapter_weights(k).items():
            key = name if name.startswith("base_model.model.") else f"base_model.model.{name}"
            out[f"{key}.lora_A.weight"] = a.float().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = b.float().contiguous().cpu()
        return out

    def save_adapter(self, k: int, path: str | os.PathLike, config: LoraConfig) -> Path:
        """Write adapter k as a PEFT adapter directory (safetensors), loadable by PEFT and vLLM."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        save_file(self.peft_state_dict(k), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        return path
