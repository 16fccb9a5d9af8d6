"""Many independent LoRA adapters trained and served in one batch over one frozen base model.

Why not PEFT: PEFT refuses batches that mix adapters in training mode, and training K adapters one after
another leaves a small model's matmuls too small to keep the CPU (or a GPU) busy. Here each adapter k has
its own LoRA parameters ``A_k`` (r, in) and ``B_k`` (out, r) per target Linear, and a forward hook adds
``scaling * x A_k^T B_k^T`` to adapter k's tokens: the participating adapters' weights are stacked (once per
forward, for all modules) so the LoRA products of all of them are two batched matmuls. In generation the
batch is equal blocks of rows, block g for the g-th adapter; in training it is packed sorted by adapter
(:func:`seal.sequences.pack_sequences`), and each module lays each adapter's tokens out as a zero-padded block
with one index op and takes the result back with another; with at most four adapters in a step it
multiplies every row with all of them and masks instead (:class:`MaskedRows`). Because every adapter owns
its parameters (one flat tensor each), a standard optimizer with one parameter group per adapter gives each
its own learning rate and step count, and an adapter that sits a step out (no gradient) is left untouched,
exactly as if it were trained alone.

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

from seal.lora_layouts import BUCKET_COST_ROWS, MaskedRows, PaddedLayout
from seal.lora_ops import CastStack, LoRADelta, LoRAMasked, StepGradients
from seal.utils import compute_dtype

INIT_ADAPTER = "stacked-lora-init"
DENSE_FROM = 4  # routed adapters from which each module's stacked matrices are made contiguous (_matrices)
MASKED_UP_TO = 4  # most routed adapters for which a packed step masks rows instead (MaskedRows)


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


class StackedLoRA(nn.Module):
    """K LoRA adapters of rank r on the same target modules of one frozen model.

    ``lora_A[k][i]`` (r, in) and ``lora_B[k][i]`` (out, r) are adapter k's weights on the i-th target
    module; its effective weight there is ``W + scaling * B @ A``, as in PEFT. Each adapter's weights live
    in one flat parameter, ``weights[k]``, of which these matrices are views: the optimizer and gradient
    clipping then handle one tensor per adapter instead of two per module (420 on SmolLM2), which is most
    of their per-step cost when there are many adapters. A backward after ``zero_grad()`` (gradients set to
    None, as by default) writes each routed adapter's gradient into a buffer kept for it from step to step,
    so a tensor taken from ``weights[k].grad`` is overwritten by a later step (copy it to keep it).
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
        self._layout: PaddedLayout | MaskedRows | None = None
        self._row_group: torch.Tensor | None = None  # see route(row_group=...) and _layout_rows
        self._row_length: int | None = None
        self._grads: dict[int, torch.Tensor] = {}  # adapter -> its kept gradient buffer (see CastStack)
        self._cast_buffer: torch.Tensor | None = None  # the routed weights in the compute dtype (training)
        self._grad_buffer: torch.Tensor | None = None  # their gradients, same layout (see CastStack)
        self._dense_buffer: torch.Tensor | None = None  # the routed matrices, each contiguous (_matrices)
        self._grad_cat_buffer: torch.Tensor | None = None  # their gradients for MaskedRows (_matrices)
        self._step: StepGradients | None = None  # where this forward's LoRA gradients go (training)
        self._link: torch.Tensor | None = None  # this forward's CastStack output (ties the graph)
        self._views: dict[tuple, tuple[torch.Tensor, tuple]] = {}  # see _buffer_views
        self._cache: dict[tuple, list[torch.Tensor]] = {}
        self._routed: tuple[tuple, list[torch.Tensor]] | None = None  # this forward's matrices
        self._last_input: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None  # see _input
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

    def drop_gradients(self) -> None:
        """Remove every adapter's gradient and free the buffers kept for them."""
        for weight in self.weights:
            weight.grad = None
        self._grads.clear()
        self._cast_buffer = self._grad_buffer = self._dense_buffer = self._grad_cat_buffer = None
        self._step = None
        self._views.clear()

    def invalidate(self) -> None:
        """Forget the stacked copies used without gradients (call after the weights change)."""
        self._cache.clear()

    def _matrices(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every target module's matrices of the routed adapters in `dtype`: ``[A_0, B_0, A_1, B_1, ...]``,
        A_i (G, r, in) and B_i (G, out, r), or for :class:`MaskedRows` A_i (G * r, in) and B_i (out, G * r)
        (the layouts of :meth:`_laid_out`).

        Stacking and casting all modules at once, once per forward, costs a few whole-tensor ops per step
        instead of a few per module. A batched matmul over a module's pieces of the (G, P) stack (a row
        apart) runs 2-3x slower than over a contiguous (G, r, in) tensor, so without gradients (generation)
        each module's matrices are copied into contiguous tensors, cached until :meth:`invalidate`; with
        gradients, from `DENSE_FROM` adapters on, they are copied once per step into a kept buffer, outside
        autograd (``self._link`` is the stack's autograd output; see :class:`seal.lora_ops.CastStack`).
        """
        masked = isinstance(self._layout, MaskedRows)
        key = (tuple(self._groups), dtype, masked)
        if self._routed is not None and self._routed[0] == key:
            return self._routed[1]
        weights = [self.weights[k] for k in self._groups]
        rows = len(weights)
        grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        if not grad and key in self._cache:
            return self._cache[key]
        layout = "cat" if masked else "dense" if rows >= DENSE_FROM or not grad else "rows"
        if grad:
            _, row_grads = self._buffer_views("_grad_buffer", rows, dtype)
            grad_views, grad_copies = row_grads, None
            if masked:  # gradients in the matrices' layout, copied to the stack's in StepGradients.rows
                in_matrix_layout, grad_views = self._buffer_views("_grad_cat_buffer", rows, dtype, layout)
                grad_copies = (row_grads, in_matrix_layout)
            self._step = StepGradients(
                grad_views, self._grad_buffer[:rows], grad_copies, self._grads, list(self._groups)
            )
            self._link = CastStack.apply(self._step, self._buffer("_cast_buffer", rows, dtype), *weights)
            _, cast = self._buffer_views("_cast_buffer", rows, dtype)
            mats = cast
            if layout != "rows":
                copies, mats = self._buffer_views("_dense_buffer", rows, dtype, layout)
                torch._foreach_copy_(copies, cast)
        else:
            stacked = torch.stack(weights).to(dtype)
            copies, mats = self._laid_out(torch.empty_like(stacked), layout)
            torch._foreach_copy_(copies, self._split(stacked))
            self._cache[key] = mats
        self._routed = (key, mats)
        return mats

    def _laid_out(self, flat: torch.Tensor, layout: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A (G, P) tensor as every module's matrices ``[A_0, B_0, ...]`` in `layout`, and the same memory as
        (G, r, in) and (G, out, r) views, to copy to and from the stack's layout:

        - ``rows``: views of the stack itself, (G, r, in) and (G, out, r), adapters a row (P) apart;
        - ``dense``: the same shapes, each matrix contiguous (for batched matmuls, :class:`PaddedLayout`);
        - ``cat``: A (G * r, in) and B (out, G * r), each contiguous (:class:`MaskedRows`).
        """
        if layout == "rows":
            views = self._split(flat)
            return views, views
        rows = flat.shape[0]
        pieces = flat.reshape(-1).split([rows * size for size in self._sizes])
        copies, mats = [], []
        for j, (piece, (dim0, dim1)) in enumerate(zip(pieces, self._shapes, strict=True)):
            if layout == "dense" or j % 2 == 0:  # dense, or A in cat: (G, r, in) is (G * r, in)
                copies.append(piece.view(rows, dim0, dim1))
                mats.append(copies[-1] if layout == "dense" else piece.view(rows * dim0, dim1))
            else:  # B in cat: (out, G, r), seen as (G, out, r)
                copies.append(piece.view(dim0, rows, dim1).transpose(0, 1))
                mats.append(piece.view(dim0, rows * dim1))
        return copies, mats

    def _buffer_views(
        self, name: str, rows: int, dtype: torch.dtype, layout: str = "rows"
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`_laid_out` of the first `rows` rows of the kept buffer `name`, made once per buffer, row
        count and layout (840 view ops on SmolLM2)."""
        buffer = self._buffer(name, rows, dtype)
        key = (name, rows, layout)
        if key not in self._views or self._views[key][0] is not buffer:
            self._views[key] = (buffer, self._laid_out(buffer[:rows], layout))
        return self._views[key][1]

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(G, P) -> ``[A_0, B_0, ...]`` as (G, rows, cols) views."""
        pieces = flat.split(self._sizes, dim=1)
        return [piece.unflatten(1, shape) for piece, shape in zip(pieces, self._shapes, strict=True)]

    def _buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The (rows, P) tensor of `dtype` kept in attribute `name` from step to step (fresh large tensors are
        page-faulted in anew each time)."""
        buffer = getattr(self, name)
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != dtype:
            size = (max(rows, 0 if buffer is None else buffer.shape[0]), self.weights[0].numel())
            buffer = torch.empty(size, dtype=dtype, device=self.weights[0].device)
            setattr(self, name, buffer)
        return buffer

    def _input(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` in `dtype` as packed rows (T, in) and laid out in zero-padded blocks (G * block, in), outside
        autograd. Made once for consecutive modules that read the same input (q/k/v, gate/up)."""
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last_input
        if last is not None and last[0] is x and last[1] == version and last[2].dtype == dtype:
            return last[2], last[3]
        flat = x.to(dtype).reshape(-1, x.shape[-1])
        blocks = self._layout.blocks(flat.detach()) if isinstance(self._layout, PaddedLayout) else None
        self._last_input = (x, version, flat, blocks)
        return flat, blocks

    def _make_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._groups is None:
                return output
            if self._row_group is not None:
                self._layout_rows(inputs[0])
            dtype = compute_dtype(output)
            mats = self._matrices(dtype)
            a, b = mats[2 * i], mats[2 * i + 1]
            x, padded = self._input(inputs[0], dtype)
            if isinstance(self.dropout, nn.Dropout) and self.dropout.training:
                x, padded = self.dropout(x), None  # a mask of its own per module, as in PEFT
            sink = (self._step, i) if self._link is not None and torch.is_grad_enabled() else None
            if isinstance(self._layout, MaskedRows):
                mask = self._layout.mask(dtype, x.shape[0])
                return LoRAMasked.apply(output, x, a, b, mask, self._link, sink)
            delta = LoRADelta.apply(x, a, b, self.scaling, self._layout, padded, self._link, sink)
            # in place: a Linear's backward does not need its output
            return output.add_(delta.view(output.shape).to(output.dtype))

        return hook

    def _layout_rows(self, x: torch.Tensor) -> None:
        """With `row_group`, the layout of a forward whose input `x` is (rows, length, in): every position of
        row i is of adapter row_group[i]; made again only when the length changes (prefill, then decoding)."""
        rows = self._row_group.numel()
        if x.dim() != 3 or x.shape[0] != rows:
            raise RuntimeError(
                f"row_group routes {rows} rows, but a module got input of shape {tuple(x.shape)}"
            )
        if self._row_length != x.shape[1]:
            self._row_length = x.shape[1]
            self._layout = PaddedLayout(
                len(self._groups), self._row_group.repeat_interleave(x.shape[1]), BUCKET_COST_ROWS
            )

    @contextlib.contextmanager
    def route(
        self,
        groups: Sequence[int] | torch.Tensor,
        token_group: torch.Tensor | None = None,
        row_group: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Apply adapters ``groups[g]`` (g = 0..G-1) to the batch inside this context.

        Without `token_group` or `row_group` the batch is G equal blocks of rows, block g for adapter
        groups[g]. With `token_group`, a flat tensor with one entry per position of the batch (``row *
        seq_len + col``), adapter groups[g] acts on the positions where it is g, and none on those where it
        is -1 (packed training: :class:`seal.sequences.PackedBatch`'s ``token_group``). With `row_group`, one
        entry per row, every forward in the context (generation with a cache: the prompts, then one token
        at a time) routes all positions of row i to adapter groups[row_group[i]], so adapters may have
        different numbers of rows. Each module lays the adapters' positions out as zero-padded blocks
        (indices made once per forward, shared by all modules), multiplies them with two batched matmuls and
        takes the result back: a constant number of ops per module whatever G is (``torch._grouped_mm``
        needs no padding, but on CPU it runs one small GEMM per adapter per module: ~20k GEMMs in a
        16-adapter SmolLM2 step); with few adapters and `token_group`, it masks rows instead
        (:class:`MaskedRows`). Generation keeps the blocks: under bf16 autocast their rounding (the LoRA
        product rounded, then added) is PEFT's, and greedy answers then match PEFT's on a tiny random
        model, where the masked product (accumulated into the output in one matmul) flips tokens.
        """
        groups = [int(g) for g in groups]
        if not groups or min(groups) < 0 or max(groups) >= self.num_adapters:
            raise IndexError(f"adapter indices must be in [0, {self.num_adapters}), got {groups}")
        if token_group is not None and row_group is not None:
            raise ValueError("route() takes token_group or row_group, not both")
        for name, value in (("token_group", token_group), ("row_group", row_group)):
            if value is not None and value.dim() != 1:
                raise ValueError(
                    f"{name} must be flat (one entry per position or row), got {tuple(value.shape)}"
                )
        if row_group is not None and row_group.numel() and int(row_group.min()) < 0:
            raise IndexError("row_group must name an adapter (0..G-1) for every row")
        self._groups = groups
        self._row_group, self._row_length = row_group, None
        if row_group is not None:
            self._layout = None  # made per forward (_layout_rows)
        elif token_group is not None and len(groups) <= MASKED_UP_TO:
            self._layout = MaskedRows(len(groups), token_group, self.r, self.scaling)
        else:
            self._layout = PaddedLayout(len(groups), token_group, BUCKET_COST_ROWS)
        try:
            yield
        finally:
            self._groups, self._layout, self._row_group = None, None, None
            self._last_input, self._routed, self._link = None, None, None

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
