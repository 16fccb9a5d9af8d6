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


# Float64 bound for two computations of the same values whose ops sum in other orders: ~1e-16 relative per
# op (2^-53), far below it even over thousands of ops. (Transformers' float64 Llama still rounds its
# RMSNorm input and its rotary cos/sin to float32, but identically in both computations.)
FLOAT64_BOUND = 1e-9
# A mask mix-up (a sequence attending to another) moves logits by O(1) relative: far outside any bound here.
MIX_UP = 1e-2
# bf16 unit roundoff: a rounding to bf16's 8 significant bits is off by at most 2^-8 = 3.9e-3 relative.
BF16_ROUNDING = 2**-8


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||: rounding bounds are relative to a tensor's norm (an elementwise rtol
    fails on elements that cancel to near zero, whatever the precision)."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


def logits_and_grads(model, implementation: str, rows=slice(None), **inputs):
    """Logits and every parameter's gradient of a fixed linear function of the logits at `rows`."""
    model.zero_grad(set_to_none=True)
    with attention_implementation(model, implementation):
        logits = model(**inputs).logits
    weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
    (logits[rows] * weights).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("case", ["packed", "causal", "padded"])
def test_packed_attention_equals_sdpa_attention(tokenizer, case):
    """Same logits and gradients as PyTorch's scaled_dot_product_attention (transformers' "sdpa") in float64
    (grouped-query heads): packed rows (block-diagonal mask), plain causal rows (no mask built) and
    left-padded rows (2D mask). The reference is SDPA, not transformers' eager attention: eager computes its
    softmax in float32 even in a float64 model (~1e-7 off), and gives NaN for fully padded rows in float64."""
    model = build_tiny_model(tokenizer).double().train()
    input_ids, position_ids = packed_inputs(model.config.vocab_size)
    if case == "packed":
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    elif case == "causal":
        inputs = {"input_ids": input_ids}
    else:
        mask = torch.ones_like(input_ids)
        mask[0, :6] = 0
        inputs = {"input_ids": input_ids, "attention_mask": mask}
    # padded queries attend to nothing: undefined, so neither compared nor in the loss the gradients are of
    rows = slice(None) if case != "padded" else (slice(None), slice(6, None))
    sdpa, sdpa_grads = logits_and_grads(model, "sdpa", rows, **inputs)
    packed, packed_grads = logits_and_grads(model, PACKED_ATTENTION, rows, **inputs)
    assert relative_error(packed[rows], sdpa[rows]) <= FLOAT64_BOUND
    assert len(packed_grads) == len(sdpa_grads) > 0
    for p, e in zip(packed_grads, sdpa_grads, strict=True):
        assert relative_error(p, e) <= FLOAT64_BOUND
    if case == "packed":  # the same rows attended as one sequence each: far outside that bound
        leaky, _ = logits_and_grads(model, PACKED_ATTENTION, input_ids=input_ids, use_cache=False)
        assert relative_error(leaky, sdpa) > MIX_UP


def test_packed_attention_keeps_sequences_apart(tokenizer):
    """A packed sequence's logits do not depend on the sequences packed before it in its row (float64: the
    two forwards differ in op order only)."""
    model = build_tiny_model(tokenizer).double()
    input_ids, position_ids = packed_inputs(model.config.vocab_size)
    alone = input_ids[:1, 5:12]
    with torch.no_grad(), attention_implementation(model, PACKED_ATTENTION):
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0, 5:12]
        single = model(input_ids=alone).logits[0]
        leaky = model(input_ids=input_ids, use_cache=False).logits[0, 5:12]  # sees the sequence before it
    assert relative_error(packed, single) <= FLOAT64_BOUND
    assert relative_error(leaky, single) > MIX_UP


def test_packed_attention_under_bf16_autocast_is_as_accurate_as_eager(tokenizer):
    """Under bf16 autocast the packed kernel's logits are no further from the exact (float64) ones than
    eager attention's, give or take one bf16 rounding. Both round q, k and v to bf16 for their matmuls and
    the softmax output to bf16 for the one with v; eager also rounds the scores once more (scaled after the
    matmul) and adds the mask and takes the softmax in float32, packed rounds the scaled scores once and takes
    a bf16 softmax (accumulated in float32): the same error budget, up to where single roundings fall."""
    model = build_tiny_model(tokenizer).float()
    input_ids, position_ids = packed_inputs(model.config.vocab_size, seed=1)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    exact = build_tiny_model(tokenizer).double()
    with torch.no_grad(), attention_implementation(exact, "sdpa"):
        reference = exact(**inputs).logits
    error = {}
    for impl in ("eager", PACKED_ATTENTION):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), attention_implementation(model, impl):
            error[impl] = relative_error(model(**inputs).logits, reference)
    assert error["eager"] > 2**-16  # really computed in bf16 (float32 would be ~2^-22 off here)
    assert error[PACKED_ATTENTION] <= error["eager"] + BF16_ROUNDING


def test_packed_attention_supported_only_for_plain_attention():
    assert packed_attention_supported(LlamaConfig())
    assert not packed_attention_supported(Qwen2Config(use_sliding_window=True, sliding_window=64))
    assert not packed_attention_supported(LlamaConfig(attn_logit_softcapping=50.0))
