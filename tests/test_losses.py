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

    torch.testing.assert_close(fused, full.float())
    torch.testing.assert_close(fused_h.grad, full_h.grad)
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
        expected = token_loss[keep].mean() if keep.any() else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(losses[g], expected.float())


def test_bf16_logits_stay_close_to_float32():
    h, head, targets, token_group = packed_batch(tokens=40, vocab=300)
    h, head = h.float(), head.float()
    exact = grouped_linear_cross_entropy(h, head, targets, token_group, 4)
    bf16 = grouped_linear_cross_entropy(h, head, targets, token_group, 4, dtype=torch.bfloat16)
    torch.testing.assert_close(bf16, exact, rtol=2e-2, atol=2e-2)


def test_a_trainable_output_layer_is_refused():
    h, head, targets, token_group = packed_batch()
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze"):
        grouped_linear_cross_entropy(h, head, targets, token_group, 4)
