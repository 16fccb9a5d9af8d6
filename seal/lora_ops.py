"""The autograd nodes of :mod:`seal.multi_lora`'s LoRA products, with their backward written out, and the
buffers one training step writes its gradients to (:class:`StepGradients`)."""

from __future__ import annotations

import torch

from seal.lora_layouts import PaddedLayout


class StepGradients:
    """Where one training step's LoRA gradients go, handed to the LoRA nodes (their ``sink``) and to
    :class:`CastStack`: per module matrix a view (`views`, in the compute dtype) of a kept buffer whose
    (G, P) rows (`buffer`) are the cast stack's gradient, and each routed adapter's kept float32 gradient
    (`kept`, adapter -> tensor, reused from step to step). With :class:`MaskedRows` the views are in the
    matrices' layout and `copies` (stack-layout views, matrix-layout views) maps them back."""

    def __init__(
        self,
        views: list[torch.Tensor],
        buffer: torch.Tensor,
        copies: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
        kept: dict[int, torch.Tensor],
        groups: list[int],
    ):
        self.views, self.buffer, self.copies, self.kept, self.groups = views, buffer, copies, kept, groups
        self.written: set[int] = set()  # matrices whose view holds this backward's gradient

    def slices(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Module i's (G, r, in) and (G, out, r) gradient slices, and whether they already hold a gradient
        of this backward (then add to them, else overwrite)."""
        written = 2 * i in self.written
        self.written.update((2 * i, 2 * i + 1))
        return self.views[2 * i], self.views[2 * i + 1], written

    def rows(self) -> torch.Tensor:
        """The (G, P) gradient of the cast stack once backward has passed every module (slices of modules
        that did not run are zeroed)."""
        for j, view in enumerate(self.views):
            if j not in self.written:
                view.zero_()
        self.written = set()  # the next backward starts afresh
        if self.copies is not None:  # MaskedRows: from its matrices' layout to the stack's
            torch._foreach_copy_(*self.copies)
        return self.buffer


class CastStack(torch.autograd.Function):
    """The routed adapters' flat weights cast into rows of a reused buffer: (G, P) in the compute dtype.

    Every module's A and B are read from this buffer outside autograd (views of it, or from `DENSE_FROM`
    adapters on contiguous copies: :meth:`StackedLoRA._matrices`); :class:`LoRADelta` writes their
    gradients into the same slices of a second reused buffer (:class:`StepGradients`) and hands
    autograd none, so this node's backward gets no gradient (``None``) and runs after all of theirs: it
    copies each row of that buffer into its adapter's float32 ``.grad``, a converting copy into a buffer
    kept for the adapter from step to step when the gradient was cleared (``zero_grad()``), else an add.
    Autograd's own route (views of the output, then split-backward) would concatenate every module's pieces
    into a fresh (G, P) tensor each step (312 MB for 16 SmolLM2 adapters), page-faulted in anew each time.
    """

    @staticmethod
    def forward(ctx, step: StepGradients, buffer: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:  # noqa: ANN205
        ctx.set_materialize_grads(False)
        ctx.step, ctx.weights = step, weights
        for row, weight in zip(buffer, weights, strict=False):
            row.copy_(weight)
        return buffer[: len(weights)]

    @staticmethod
    def backward(ctx, grad: None):  # noqa: ANN205
        # `grad` is None: the output's only consumers, the LoRADelta nodes, return no gradient for it
        step = ctx.step
        for k, row, weight in zip(step.groups, step.rows(), ctx.weights, strict=True):
            if weight.grad is None:  # a plain converting copy into the adapter's kept buffer
                if k not in step.kept:
                    step.kept[k] = torch.empty_like(weight)
                weight.grad = step.kept[k].copy_(row)
            else:
                # converting first: an in-place add of a bf16 into a float32 tensor runs ~10x slower
                weight.grad.add_(row.to(weight.dtype))
        return (None, None) + (None,) * len(ctx.weights)


class LoRADelta(torch.autograd.Function):
    """``scaling * x A_g^T B_g^T`` for the packed rows x (T, in), each with its adapter g's A (r, in) and
    B (out, r): the rows laid out as G equal blocks (`layout`), two batched matmuls over A (G, r, in) and
    B (G, out, r), and the result back in packed order: (T, out).

    One node with its backward written out (four batched matmuls and a scale): autograd's own graph holds
    ~10 nodes per module (transposes, views, the scale, two matmuls, the gathers) whose fixed cost dominates
    the small steps of TTT at batch 1. `padded` is ``layout.blocks(x)`` when the caller has it already
    (modules reading the same input share it). With `sink` ``(stack, i)``, A and B were read from the (G, P)
    tensor `link` outside autograd and their gradients go to the slices ``step.slices(i)`` of the step's
    :class:`StepGradients` instead (see :class:`CastStack`); `link` only ties this node to the graph.
    """

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        layout: PaddedLayout,
        padded: torch.Tensor | None = None,
        link: torch.Tensor | None = None,
        sink: tuple[StepGradients, int] | None = None,
    ):
        padded = layout.blocks(x) if padded is None else padded
        h = _blocks_times(layout, padded, a.transpose(1, 2)).mul_(scaling)  # scaled on (rows, r): smallest
        ctx.save_for_backward(padded, a, b, h)
        ctx.scaling, ctx.layout, ctx.sink = scaling, layout, sink
        return layout.packed(_blocks_times(layout, h, b.transpose(1, 2), tail=True))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        padded, a, b, h = ctx.saved_tensors
        layout = ctx.layout
        grad = layout.spread(grad)
        grad_h = _blocks_times(layout, grad, b).mul_(ctx.scaling)  # d/d(x A^T)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = layout.packed(_blocks_times(layout, grad_h, a, tail=True))
        targets = _gradient_targets(ctx, a, b, ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        if targets is None:
            return grad_x, None, None, None, None, None, None, None
        grad_a, grad_b, add = targets
        # exact despite the padding rows' copied gradients: their inputs, and so their h, are zero
        _blocks_outer(layout, grad_h, padded, grad_a, add)
        _blocks_outer(layout, grad, h, grad_b, add)
        if ctx.sink is not None:
            grad_a = grad_b = None
        return grad_x, grad_a, grad_b, None, None, None, None, None


class LoRAMasked(torch.autograd.Function):
    """``output += x [A_0; ...]^T * mask [B_0, ...]^T`` in place (:class:`MaskedRows`): x (T, in), A (G * r,
    in), B (out, G * r), mask (T, G * r) with the scaling in it. `link` and `sink` as for :class:`LoRADelta`
    (A's and B's gradients then go to the slices ``step.slices(i)``, in these shapes)."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,
        output: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        mask: torch.Tensor,
        link: torch.Tensor | None = None,
        sink: tuple[StepGradients, int] | None = None,
    ):
        h = torch.mm(x, a.t()).mul_(mask)
        output.view(-1, output.shape[-1]).addmm_(h, b.t())
        ctx.mark_dirty(output)
        ctx.save_for_backward(x, a, b, mask, h)
        ctx.sink = sink
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        x, a, b, mask, h = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_h = torch.mm(flat, b).mul_(mask)
        grad_x = torch.mm(grad_h, a) if ctx.needs_input_grad[1] else None
        targets = _gradient_targets(ctx, a, b, ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        if targets is None:
            return grad, grad_x, None, None, None, None, None
        grad_a, grad_b, add = targets
        beta = 1 if add else 0  # 0: the slices' old contents are ignored
        grad_a.addmm_(grad_h.t(), x, beta=beta)
        grad_b.addmm_(flat.t(), h, beta=beta)
        if ctx.sink is not None:
            grad_a = grad_b = None
        return grad, grad_x, grad_a, grad_b, None, None, None


def _gradient_targets(
    ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor, wanted: bool
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Where a LoRA node's backward writes A's and B's gradients: with ``ctx.sink`` the step's slices for
    them (and whether they already hold a gradient of this backward: then add), else fresh tensors for
    autograd; None when autograd wants neither."""
    if ctx.sink is not None:
        step, i = ctx.sink
        return step.slices(i)
    if wanted:
        return torch.empty_like(a), torch.empty_like(b), False
    return None


def _blocks_times(layout: PaddedLayout, x: torch.Tensor, w: torch.Tensor, tail: bool = False) -> torch.Tensor:
    """Rows x (padded rows, k) in `layout`'s blocks times their adapter's w (G, k, n): (padded rows, n), with
    `tail` followed by the zero row :meth:`PaddedLayout.packed` reads for rows of no adapter."""
    pieces = layout.pieces(x)
    if len(pieces) == 1 and not (tail and layout.take is not None):
        return torch.bmm(pieces[0][2], w).flatten(0, 1)
    out = x.new_empty(x.shape[0] + (1 if tail else 0), w.shape[-1])
    if tail:
        out[x.shape[0]].zero_()
    for adapters, rows, piece in pieces:
        torch.bmm(piece, w[adapters], out=out[rows].view(piece.shape[0], -1, w.shape[-1]))
    return out


def _blocks_outer(
    layout: PaddedLayout, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, add: bool
) -> None:
    """Per adapter g, its block's ``left^T right`` (left (padded rows, m), right (padded rows, n)) written
    (or added) to out[g]."""
    for (adapters, _, lhs), (_, _, rhs) in zip(layout.pieces(left), layout.pieces(right), strict=True):
        product = torch.bmm(lhs.transpose(1, 2), rhs, out=None if add else out[adapters])
        if add:  # the module ran more than once in this forward
            out[adapters].add_(product)
