import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from seal.attention import PACKED_ATTENTION, packed_attention_supported
from seal.utils import attention_implementation
from tests.conftest import build_tiny_model


def packed_inputs(vocab: int, seed: int = 0):
    """Two rows of packed sequences (lengths 5+7+4 and 9+7), position ids restarting per sequence
    (transformers reads them as packed only without a cache: forward with ``use_cache=False``)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 16), generator=gen)
    position_ids = torch.tensor(
        [list(range(5)) + list(range(7)) + list(range(4)), list(range(9)) + list(range(7))]
    )
    return input_ids, position_ids


def logits_and_grads(model, implementation: str, **inputs):
    model.zero_grad(set_to_none=True)
    with attention_implementation(model, implementation):
        logits = model(**inputs).logits
    weights = torch.linspace(-1, 1, logits.shape[-1])
    (logits * weights).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("case", ["packed", "causal", "padded"])
def test_packed_attention_equals_eager_attention(tokenizer, case):
    """Same logits and gradients as transformers' eager attention in float32 (grouped-query heads): packed
    rows (block-diagonal mask), plain causal rows (no mask built) and left-padded rows (2D mask)."""
    model = build_tiny_model(tokenizer).float().train()
    input_ids, position_ids = packed_inputs(model.config.vocab_size)
    if case == "packed":
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    elif case == "causal":
        inputs = {"input_ids": input_ids}
    else:
        mask = torch.ones_like(input_ids)
        mask[0, :6] = 0
        inputs = {"input_ids": input_ids, "attention_mask": mask}
    eager, eager_grads = logits_and_grads(model, "eager", **inputs)
    packed, packed_grads = logits_and_grads(model, PACKED_ATTENTION, **inputs)
    rows = slice(None) if case != "padded" else (slice(None), slice(6, None))  # padded queries: undefined
    torch.testing.assert_close(packed[rows], eager[rows], atol=1e-5, rtol=1e-5)
    if case != "padded":
        assert len(packed_grads) == len(eager_grads) > 0
        for p, e in zip(packed_grads, eager_grads, strict=True):
            assert (p - e).norm() <= 1e-5 * e.norm()


def test_packed_attention_keeps_sequences_apart(tokenizer):
    """A packed sequence's logits do not depend on the sequences packed before it in its row."""
    model = build_tiny_model(tokenizer).float()
    input_ids, position_ids = packed_inputs(model.config.vocab_size)
    alone = input_ids[:1, 5:12]
    with torch.no_grad(), attention_implementation(model, PACKED_ATTENTION):
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0, 5:12]
        single = model(input_ids=alone).logits[0]
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)


def test_packed_attention_under_bf16_autocast_is_close_to_eager(tokenizer):
    model = build_tiny_model(tokenizer).float()
    input_ids, position_ids = packed_inputs(model.config.vocab_size, seed=1)
    out = {}
    for impl in ("eager", PACKED_ATTENTION):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), attention_implementation(model, impl):
            out[impl] = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
    scale = out["eager"].abs().max()
    assert (out[PACKED_ATTENTION] - out["eager"]).abs().max() < 2e-2 * scale


def test_packed_attention_supported_only_for_plain_attention():
    assert packed_attention_supported(LlamaConfig())
    assert not packed_attention_supported(Qwen2Config(use_sliding_window=True, sliding_window=64))
    assert not packed_attention_supported(LlamaConfig(attn_logit_softcapping=50.0))
