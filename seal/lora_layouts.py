"""How a packed batch's rows are laid out per adapter for the LoRA products of :mod:`seal.multi_lora`:
zero-padded blocks in buckets of similar length (:class:`PaddedLayout`), or all rows masked to their own
adapter (:class:`MaskedRows`, for a few adapters)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# What one more block length costs in PaddedLayout, in padded rows (six more batched matmuls per module):
# 30 SmolLM2 adapters at batch 1, steady steps, alternated in one process: one length 6.54 s per step,
# 1024: 6.21, 512: 6.23, 256: 6.05; in an earlier round one length 9.34, 256: 8.11, 128: 8.98, 64: 9.29
BUCKET_COST_ROWS = 256


def _checked_groups(token_group: torch.Tensor, groups: int) -> torch.Tensor:
    """`token_group` as long integers, after checking that it names only the `groups` routed adapters."""
    group = token_group.to(torch.long)
    if group.numel() and int(group.max()) >= groups:
        raise IndexError(f"token_group holds adapter {int(group.max())}, but only {groups} are routed")
    return group


def _buckets(counts: Sequence[int], cost: int) -> list[tuple[int, int, int]]:
    """Consecutive adapters grouped so that each group's blocks are as long as its largest share: (first,
    end, block) per group, minimising the padded rows plus `cost` per group (an O(G^2) dynamic program).
    Adapters ordered by share, largest first (as batched TTT routes them), make any grouping reachable."""
    best = [0] + [math.inf] * len(counts)
    last = [(0, 0)] * (len(counts) + 1)  # per end, the best last group's first adapter and block
    for end in range(1, len(counts) + 1):
        block = 1
        for first in range(end - 1, -1, -1):
            block = max(block, counts[first])
            value = best[first] + (end - first) * block + cost
            if value < best[end]:
                best[end], last[end] = value, (first, block)
    out, end = [], len(counts)
    while end:
        first, block = last[end]
        out.append((first, end, block))
        end = first
    return out[::-1]


class PaddedLayout:
    """How the T rows of a batch, each of one of G adapters or of none, are laid out as zero-padded blocks,
    one per adapter, for batched matmuls, and back.

    ``token_group[t]`` is the adapter (0..G-1) of row t, or -1 for a row no adapter acts on (the padding at
    the end of a packed row: it keeps the base model's output). Adapter g's rows, in order, fill the start of
    block g. Consecutive adapters form buckets whose blocks are as long as the bucket's largest share
    (:func:`_buckets`, weighing the padding saved against `bucket_cost` rows per extra bucket: with a few long
    sequences among many short ones one block length for all nearly doubled the rows of batched TTT's steps);
    each bucket is one batched matmul. :meth:`blocks` lays rows out so (the rest of each block zero),
    :meth:`packed` takes a blocked result back to the T rows (zero for rows of no adapter), and :meth:`spread`
    lays a (T, d) gradient out in blocks with copies of arbitrary rows in the padding: exact in
    :class:`seal.lora_ops.LoRADelta`, where the padding rows' inputs are zero and so are their contributions
    to the weight gradients. Each direction is one row copy or gather, where autograd's own backward of a
    gather zero-fills the padded shape and scatter-adds into it. The rows of no adapter are parked past the
    blocks (one row each, so no index repeats), and a result to be :meth:`packed` carries one zero row after
    its blocks for them to read (:func:`_blocks_times` with ``tail``). Without `token_group`, or when the rows
    already are G equal blocks in order, every method returns its input.
    """

    def __init__(self, groups: int, token_group: torch.Tensor | None = None, bucket_cost: int | None = None):
        self.groups = groups
        self.slot = self.take = self.source = None
        self.rows = self.parked = 0  # rows of the padded layout (when not the identity), rows of no adapter
        self.buckets: list[tuple[slice, slice, int]] | None = None  # adapters, rows, block; None: identity
        if token_group is None:
            return
        group = _checked_groups(token_group, groups)
        real = group >= 0
        counts = torch.bincount(group[real], minlength=groups)
        position = torch.arange(group.numel(), device=group.device)
        top = max(int(counts.max()), 1)
        if bool(real.all()) and bool((counts == top).all()) and bool((group == position // top).all()):
            return  # already G equal blocks in order
        cost = BUCKET_COST_ROWS if bucket_cost is None else bucket_cost
        start = torch.zeros(groups, dtype=torch.long)  # each adapter's first row in the layout
        self.buckets = []
        for first, end, block in _buckets(counts.tolist(), cost):
            start[first:end] = self.rows + block * torch.arange(end - first)
            self.buckets.append(
                (slice(first, end), slice(self.rows, self.rows + (end - first) * block), block)
            )
            self.rows += (end - first) * block
        start = start.to(group.device)
        # each real row's rank among its adapter's rows: a stable sort by adapter, minus the run's start
        order = torch.sort(group.masked_fill(~real, groups), stable=True).indices[: int(real.sum())]
        in_order = group[order]
        rank = position[: order.numel()] - (torch.cumsum(counts, 0) - counts)[in_order]
        self.take = torch.full_like(group, self.rows)  # rows of no adapter read the zero row
        self.take[order] = start[in_order] + rank
        self.parked = int((~real).sum())
        self.slot = self.take.clone()
        self.slot[~real] = self.rows + position[: self.parked]
        self.source = torch.zeros(self.rows, dtype=torch.long, device=group.device)
        self.source[self.take[order]] = order

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (padded rows, d), padding rows zero."""
        if self.slot is not None:
            if x.shape[0] != self.slot.numel():
                raise RuntimeError(f"{x.shape[0]} rows routed, but token_group has {self.slot.numel()}")
            out = x.new_zeros(self.rows + self.parked, x.shape[-1]).index_copy_(0, self.slot, x)
            return out[: self.rows]
        if x.shape[0] % self.groups:
            raise RuntimeError(f"{x.shape[0]} rows cannot be split into {self.groups} adapter groups")
        return x

    def packed(self, y: torch.Tensor) -> torch.Tensor:
        """(padded rows + 1, d), the last row zero -> (T, d): the real rows in packed order, zero rows for
        rows of no adapter."""
        return y if self.take is None else y.index_select(0, self.take)

    def spread(self, grad: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (padded rows, d), padding rows copies of arbitrary rows (see the class docstring)."""
        return grad if self.source is None else grad.index_select(0, self.source)

    def pieces(self, x: torch.Tensor) -> list[tuple[slice, slice, torch.Tensor]]:
        """(padded rows, d) -> per bucket, its adapters, its rows and those rows as (adapters, block, d)."""
        if self.buckets is None:  # the identity: one bucket of G equal blocks
            block = x.shape[0] // self.groups
            return [(slice(0, self.groups), slice(0, x.shape[0]), x.view(self.groups, block, x.shape[-1]))]
        return [(a, r, x[r].view(a.stop - a.start, block, x.shape[-1])) for a, r, block in self.buckets]


class MaskedRows:
    """Rows routed to a few adapters by a mask instead of a layout (:class:`seal.lora_ops.LoRAMasked`): each
    module multiplies all T rows with all G adapters' A at once, ``x [A_0; ...; A_{G-1}]^T`` (T, G * r), keeps
    in each row only the r columns of its own adapter (none for a row of no adapter), scaled, and multiplies
    with ``[B_0, ..., B_{G-1}]`` (out, G * r), adding into the module's output: two matmuls and a multiply per
    module, four and a multiply in backward, where :class:`PaddedLayout` takes as many batched matmuls plus
    five or six index and fill ops. On a CPU each op has a fixed cost however small, which dominates the
    small steps at the end of batched TTT, where few adapters are left; the work grows with G, so it is used
    up to `seal.multi_lora.MASKED_UP_TO` adapters (measurements: docs/inner_loop.md).
    """

    def __init__(self, groups: int, token_group: torch.Tensor, r: int, scaling: float):
        group = _checked_groups(token_group, groups)
        self.groups, self.rows = groups, group.numel()
        columns = torch.arange(groups, device=group.device).repeat_interleave(r)
        self._mask = (group.unsqueeze(1) == columns) * scaling  # (T, G * r): scaling or 0
        self._masks: dict[torch.dtype, torch.Tensor] = {}

    def mask(self, dtype: torch.dtype, rows: int) -> torch.Tensor:
        """The (T, G * r) mask in `dtype` for a module input of `rows` rows (checked against T)."""
        if rows != self.rows:
            raise RuntimeError(f"{rows} rows routed, but token_group has {self.rows}")
        if dtype not in self._masks:
            self._masks[dtype] = self._mask.to(dtype)
        return self._masks[dtype]
