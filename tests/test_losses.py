import pytest
import torch

from seal.losses import IGNORE_INDEX, grouped_linear_cross_entropy, grouped_loss


def packed_batch(seed: int = 0, tokens: int = 23, vocab: int = 50, hidden: int = 16):
    """Hidden states, a frozen output layer, targets (some ignored) and groups (padding, an empty group)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    head = torch.nn.Linear(hidden, vocab, bias=True, dtype=torch.float64).requires_grad_(False)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[[3, 9, 22]] = IGNORE_INDEX
    token_group = torch.tensor([0] * 7 + [1] * 10 + [-1] * 2 + [3] * (tokens - 19))  # group 2: no tokens
    return h, head, targets, token_group


# float32 unit roundoff. Both losses take the float32 log-softmax of the float64 logits (seal's fused loss and
# grouped_loss reduce in float32, as autocast does), so a loss or logit gradient carries a few float32
# roundings: the log-softmax over 50 (or 300) entries, one product with the token weight, a sum over a
# group's 10 tokens. 64 roundings' worth is far more than that and far less than any real bug.
FLOAT32_ROUNDING = 2**-24
FLOAT32_BOUND = 64 * FLOAT32_ROUNDING  # 3.8e-6
# bf16 unit roundoff: a rounding to bf16's 8 significant bits is off by at most 2^-8 = 3.9e-3 relative.
BF16_ROUNDING = 2**-8


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||: rounding bounds are relative to a tensor's norm (an elementwise rtol
    fails on elements that cancel to near zero, whatever the precision)."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_fused_loss_and_gradient_equal_the_full_logits(chunk):
    h, head, targets, token_group = packed_batch()
    upstream = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)

    full_h = h.clone().requires_grad_()
    full = grouped_loss(head(full_h), targets, token_group, groups=4)
    (full * upstream).sum().backward()

    fused_h = h.clone().requires_grad_()
    fused = grouped_linear_cross_entropy(fused_h, head, targets, token_group, 4, chunk=chunk)
    (fused * upstream).sum().backward()

    assert fused.dtype == full.dtype == torch.float32
    assert relative_error(fused, full) <= FLOAT32_BOUND
    assert relative_error(fused_h.grad, full_h.grad) <= FLOAT32_BOUND
    assert fused[2] == 0 and fused_h.grad[17:19].abs().sum() == 0  # empty group, padding
    assert fused_h.grad[3].abs().sum() == 0  # an ignored target: no loss through its logits


def test_each_group_loss_is_its_own_mean():
    h, head, targets, token_group = packed_batch()
    losses = grouped_linear_cross_entropy(h, head, targets, token_group, 4)
    token_loss = torch.nn.functional.cross_entropy(
        head(h), targets, reduction="none", ignore_index=IGNORE_INDEX
    )
    for g in range(4):
        keep = (token_group == g) & (targets != IGNORE_INDEX)
        if not keep.any():
            assert losses[g] == 0
            continue
        # the float64 reference's mean against the float32 one (FLOAT32_BOUND)
        assert abs(float(losses[g]) - float(token_loss[keep].mean())) <= FLOAT32_BOUND * float(
            token_loss[keep].mean()
        )


def test_bf16_logits_stay_close_to_float32():
    """A loss from bf16 logits is off by at most what the rounding of its logits allows: the matmul rounds
    h, W and b to bf16 and its (float32-accumulated) result to bf16, 3 roundings of 2^-8 each, so a logit is
    off by at most 3 * 2^-8 * (|h| @ |W|^T + |b|); a token loss (log-sum-exp minus the target's logit) moves
    by at most twice its largest logit error, and a group's mean by at most the largest of its tokens'."""
    h, head, targets, token_group = packed_batch(tokens=40, vocab=300)
    h, head = h.float(), head.float()
    exact = grouped_linear_cross_entropy(h, head, targets, token_group, 4)
    bf16 = grouped_linear_cross_entropy(h, head, targets, token_group, 4, dtype=torch.bfloat16)
    logit_error = 3 * BF16_ROUNDING * (h.abs() @ head.weight.abs().T + head.bias.abs())  # (tokens, vocab)
    token_bound = 2 * logit_error.max(dim=1).values
    for g in range(4):
        keep = (token_group == g) & (targets != IGNORE_INDEX)
        bound = float(token_bound[keep].max()) if keep.any() else 0.0
        # plus the float32 loss's own rounding, as in the float32 tests above
        assert abs(float(bf16[g]) - float(exact[g])) <= bound + FLOAT32_BOUND * abs(float(exact[g]))
    assert not torch.equal(bf16, exact)  # really computed in bf16


def test_a_trainable_output_layer_is_refused():
    h, head, targets, token_group = packed_batch()
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze"):
        grouped_linear_cross_entropy(h, head, targets, token_group, 4)
