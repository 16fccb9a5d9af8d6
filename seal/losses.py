"""Per-adapter cross-entropy for packed multi-adapter training (batched TTT).

Each adapter's loss is the mean over its own labelled tokens, as transformers computes it for that adapter's
sequences alone, so each adapter's gradient is what training it alone would give.

:func:`grouped_linear_cross_entropy` computes it from the last hidden states without ever holding the
(tokens, vocabulary) logits: chunk by chunk it forms the logits, their log-sum-exp and their gradient, and
keeps only the gradient with respect to the hidden states (the output layer is frozen). On a CPU the logits'
elementwise passes are memory-bound and, with SmolLM2's 49k vocabulary against a 576-wide model, cost as
much as all of its matmuls when materialised whole; chunks small enough to stay in cache avoid most of that
traffic, and positions without a target (padding, prompts under ``ttt_loss: completion``) cost nothing.
Liger-Kernel's fused linear cross-entropy does the same on GPUs, but it needs Triton, so this one is plain
PyTorch and runs anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_TOKENS = 64  # logits of 64 tokens x 49k vocabulary in float32: 12.6 MB, cache-resident on our CPUs


def _token_weights(targets: torch.Tensor, token_group: torch.Tensor, groups: int) -> torch.Tensor:
    """1 / (labelled tokens of its group) for each labelled token, 0 elsewhere: (tokens,) float32."""
    counted = (targets != IGNORE_INDEX) & (token_group >= 0)
    index = token_group.clamp(min=0)
    counts = torch.zeros(groups, device=targets.device).index_add(0, index, counted.float())
    return counted.float() / counts.clamp(min=1)[index]


def grouped_loss(
    logits: torch.Tensor, targets: torch.Tensor, token_group: torch.Tensor, groups: int
) -> torch.Tensor:
    """Cross-entropy averaged over each group's own labelled tokens, from full logits: a (groups,) tensor.

    `targets` are flat next-token labels (IGNORE_INDEX where none), `token_group` the flat group of each
    position (-1 for padding).
    """
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    weights = _token_weights(targets, token_group, groups)
    return token_loss.new_zeros(groups).index_add(0, token_group.clamp(min=0), token_loss * weights)


class _GroupedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the per-group losses and, on the way, d(sum of losses)/d(hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_group, groups, dtype, chunk):  # noqa: ANN001
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights = _token_weights(targets, token_group, groups)
        rows = weights.nonzero().squeeze(1)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        losses = torch.zeros(groups, dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            h = flat[idx].to(dtype)
            # one pass from the `dtype` logits to float32 log-probabilities (no float32 copy of the logits)
            logp = torch.log_softmax(F.linear(h, w, b), dim=-1, dtype=torch.float32)
            target = targets[idx]
            token_loss = -logp.gather(1, target[:, None]).squeeze(1)
            losses.index_add_(0, token_group[idx], token_loss * weights[idx])
            if grad is not None:  # d loss / d logits = (softmax - one_hot) * token weight
                probs = logp.exp_()
                probs[torch.arange(idx.numel(), device=idx.device), target] -= 1
                # the token weight scales the (chunk, hidden) product rather than the (chunk, vocab) probs
                grad[idx] = ((probs.to(dtype) @ w) * weights[idx, None]).to(grad.dtype)
        ctx.save_for_backward(grad, token_group)
        ctx.shape = hidden.shape
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # noqa: ANN001
        grad, token_group = ctx.saved_tensors
        if grad is None:
            return (None,) * 8
        scale = grad_losses[token_group.clamp(min=0)].to(grad.dtype)[:, None]
        return (grad * scale).reshape(ctx.shape), None, None, None, None, None, None, None


def grouped_linear_cross_entropy(
    hidden: torch.Tensor,
    output_layer: torch.nn.Linear,
    targets: torch.Tensor,
    token_group: torch.Tensor,
    groups: int,
    dtype: torch.dtype | None = None,
    chunk: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """:func:`grouped_loss` of ``output_layer(hidden)`` without materialising the logits: (groups,).

    `hidden` (..., d) are the last hidden states (final norm applied), flattened in the order of `targets`
    and `token_group`; the output layer's weights get no gradient (they are frozen in TTT). The logits are
    computed in `dtype` (default: `hidden`'s) and reduced in float32, as autocast does.
    """
    if output_layer.weight.requires_grad:
        raise ValueError("grouped_linear_cross_entropy does not train the output layer; freeze it")
    return _GroupedLinearCrossEntropy.apply(
        hidden,
        output_layer.weight,
        output_layer.bias,
        targets,
        token_group,
        groups,
        dtype or hidden.dtype,
        chunk,
    )
