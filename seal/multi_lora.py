"""Many independent LoRA adapters trained and served in one batch over one frozen base model.

Why not PEFT: PEFT refuses batches that mix adapters in training mode, and training K adapters one after
another leaves a small model's matmuls too small to keep the CPU (or a GPU) busy. Here each adapter k has
its own LoRA parameters ``A_k`` (r, in) and ``B_k`` (out, r) per target Linear, and a forward hook adds
``scaling * x A_k^T B_k^T`` to adapter k's tokens: the participating adapters' weights are stacked so the
LoRA products of all of them are two grouped matmuls. In training the batch is packed sorted by adapter
(:func:`seal.ttt.pack_sequences`), so adapter k's tokens are one contiguous run and ``torch._grouped_mm``
multiplies each run by its own weights with no gathering, scattering or padding; in generation the batch is
equal blocks of rows and a batched matmul does it. Because every adapter owns its parameters (one flat
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


def grouped_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[s:e] @ a[g].T @ b[g].T`` for each run ``s:e`` of rows ending at ``offsets[g]``: (T, out).

    `x` (T, in) lists each group's rows in one contiguous run, `a` (G, r, in), `b` (G, out, r),
    `offsets` (G,) int32 run ends with ``offsets[-1] == T``. ``torch._grouped_mm`` does every group's
    product in one kernel, with neither gathering the rows nor padding them to a common length; where it
    cannot run (strides not 16-byte multiples, GPUs before sm90) one matmul pair per group does the same.
    """
    size = x.element_size()
    aligned = all(n * size % 16 == 0 for n in (x.shape[-1], a.shape[1], b.shape[1]))
    on_gpu = x.device.type == "cuda" and x.dtype == torch.bfloat16
    fast = hasattr(torch, "_grouped_mm") and (  # a private op (PyTorch >= 2.8): checked, not assumed
        x.device.type == "cpu" or (on_gpu and torch.cuda.get_device_capability() >= (9, 0))
    )
    if aligned and fast:
        xa = torch._grouped_mm(x, a.transpose(1, 2), offs=offsets)
        return torch._grouped_mm(xa, b.transpose(1, 2), offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ a[g].T @ b[g].T for g, (s, e) in enumerate(zip(starts, ends, strict=True))])


class _RoutedWeights(torch.autograd.Function):
    """Module i's LoRA matrices of the routed adapters, stacked and cast: A (G, r, in), scaled B (G, out, r).

    Backward adds each adapter's slice of the two gradients straight into the matching span of its flat
    parameter's ``.grad`` (a buffer kept from step to step, :meth:`StackedLoRA.zero_grad`) and hands
    autograd nothing to accumulate. Autograd's own route (views of the flat parameter, ``torch.stack``)
    ends in one ``cat`` per adapter per step that gathers the adapter's 840 (SmolLM2) gradient pieces into
    a freshly allocated 39 MB flat gradient: ~0.7 s of a ~4.5 s step of 16 adapters at batch 1 in a CPU
    profile. (End to end the difference is within this VM's run-to-run noise: 292 vs 297 s for the bench's
    batch-1 training.) Autograd never accumulates into the flat parameters, so tensor hooks registered on
    them do not fire.
    """

    @staticmethod
    def forward(ctx, stack: StackedLoRA, i: int, dtype: torch.dtype, *weights: torch.Tensor):  # noqa: ANN205
        # `weights` (the routed adapters' flat parameters) are inputs only so that autograd calls backward
        ctx.stack, ctx.i = stack, i
        views = [stack._views[k] for k in stack._groups]
        a = torch.stack([v[2 * i] for v in views]).to(dtype)
        b = (torch.stack([v[2 * i + 1] for v in views]) * stack.scaling).to(dtype)
        ctx.groups = list(stack._groups)
        return a, b

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor):  # noqa: ANN205
        stack, i = ctx.stack, ctx.i
        (rows_a, cols_a), (rows_b, cols_b) = stack._shapes[2 * i], stack._shapes[2 * i + 1]
        start_a, start_b = stack._starts[2 * i], stack._starts[2 * i + 1]
        for g, k in enumerate(ctx.groups):
            weight = stack.weights[k]
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            flat = weight.grad
            if grad_a is not None:
                flat[start_a : start_a + rows_a * cols_a].view(rows_a, cols_a).add_(grad_a[g])
            if grad_b is not None:
                span = flat[start_b : start_b + rows_b * cols_b].view(rows_b, cols_b)
                span.add_(grad_b[g], alpha=stack.scaling)
        return (None, None, None) + (None,) * len(ctx.groups)


class StackedLoRA(nn.Module):
    """K LoRA adapters of rank r on the same target modules of one frozen model.

    ``lora_A[k][i]`` (r, in) and ``lora_B[k][i]`` (out, r) are adapter k's weights on the i-th target
    module; its effective weight there is ``W + scaling * B @ A``, as in PEFT. Each adapter's weights live
    in one flat parameter, ``weights[k]``, of which these matrices are views: the optimizer and gradient
    clipping then handle one tensor per adapter instead of two per module (420 on SmolLM2), which is most
    of their per-step cost when there are many adapters. In training the gradients of adapter k's matrices
    are added straight into ``weights[k].grad`` (see :class:`_RoutedWeights`); :meth:`zero_grad` gives the
    adapters of a step a zeroed gradient that lives from step to step.
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
        self._starts = [sum(self._sizes[:j]) for j in range(len(self._sizes))]
        size = sum(self._sizes)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(size, device=device, dtype=dtype)) for _ in range(num_adapters)
        )
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._groups: list[int] | None = None
        self._offsets: torch.Tensor | None = None
        self._views: dict[int, list[torch.Tensor]] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
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

    def drop_gradients(self) -> None:
        """Remove every adapter's gradient and free the buffers :meth:`zero_grad` keeps."""
        for weight in self.weights:
            weight.grad = None
        self._grads.clear()

    def invalidate(self) -> None:
        """Forget the stacked copies used without gradients (call after the weights change)."""
        self._cache.clear()

    def _stacked(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Module i's weights of the routed adapters, stacked and cast to `dtype`: (G, r, in) and
        (G, out, r), the latter already multiplied by ``scaling`` (cheaper than scaling every token).

        With gradients they are stacked anew and each slice's gradient goes to its adapter's flat
        ``.grad`` (:class:`_RoutedWeights`). Without (generation, many forward calls per batch) the stack is
        cached.
        """
        groups = self._groups
        if torch.is_grad_enabled() and any(self.weights[k].requires_grad for k in groups):
            return _RoutedWeights.apply(self, i, dtype, *(self.weights[k] for k in groups))
        key = (i, tuple(groups), dtype)
        if torch.is_grad_enabled() or key not in self._cache:
            views = [self._views[k] for k in groups]
            a = torch.stack([v[2 * i] for v in views]).to(dtype)
            b = (torch.stack([v[2 * i + 1] for v in views]) * self.scaling).to(dtype)
            if not torch.is_grad_enabled():
                self._cache[key] = (a, b)
            return a, b
        return self._cache[key]

    def _cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in `dtype`, cast once for consecutive modules that read the same input (q/k/v, gate/up)."""
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last_input
        if last is not None and last[0] is x and last[1] == version and last[2].dtype == dtype:
            return last[2]
        cast = x.to(dtype)
        self._last_input = (x, version, cast)
        return cast

    def _make_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._groups is None:
                return output
            x = inputs[0]
            dtype = compute_dtype(output)
            a, b = self._stacked(i, dtype)
            x = self.dropout(self._cast(x, dtype))
            if self._offsets is None:  # equal blocks of rows, block g for adapter g
                groups = len(self._groups)
                if x.shape[0] % groups:
                    raise RuntimeError(f"{x.shape[0]} rows cannot be split into {groups} adapter groups")
                xg = x.reshape(groups, -1, x.shape[-1])
                delta = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2))
            else:  # packed, tokens sorted by adapter: adapter g owns one contiguous run of rows
                delta = grouped_lora(x.reshape(-1, x.shape[-1]), a, b, self._offsets)
            # in place: a Linear's backward does not need its output
            return output.add_(delta.reshape(output.shape).to(output.dtype))

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
        :func:`seal.ttt.pack_sequences`).
        """
        groups = [int(g) for g in groups]
        if not groups or min(groups) < 0 or max(groups) >= self.num_adapters:
            raise IndexError(f"adapter indices must be in [0, {self.num_adapters}), got {groups}")
        if offsets is not None and offsets.shape != (len(groups),):
            raise ValueError(f"offsets has shape {tuple(offsets.shape)}, expected ({len(groups)},)")
        device = self.weights[0].device
        self._groups = groups
        self._offsets = None if offsets is None else offsets.to(device=device, dtype=torch.int32)
        self._views = {k: self.views(k) for k in set(groups)}
        try:
            yield
        finally:
            self._groups, self._offsets, self._last_input, self._views = None, None, None, {}

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
