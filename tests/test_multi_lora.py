"""Batched multi-adapter TTT (seal.multi_lora + seal.ttt.BatchedTTT) against PEFT, on tiny random models.

Numerical comparisons run in float64 where the code allows it, with bounds that follow from the dtypes and
the order of the ops, not from one CPU's float32 kernels (see `relative_error`).
"""

import functools

import pytest
import torch
from peft import PeftModel

from seal import multi_lora
from seal import ttt as ttt_module
from seal.config import RewardConfig, TTTConfig
from seal.data import QA, Passage
from seal.generate import HFEngine, Sampling
from seal.generate.hf import stack_adapter
from seal.graders import make_grader
from seal.lora_layouts import MaskedRows, PaddedLayout, _buckets
from seal.lora_ops import LoRADelta, LoRAMasked
from seal.losses import IGNORE_INDEX
from seal.memory import parallel_adapters
from seal.multi_lora import StackedLoRA, find_targets
from seal.reward import Rewarder
from seal.sequences import balanced_rows, pack_sequences
from seal.templates import TrainExample
from seal.ttt import ADAPTER, TTT, BatchedTTT, wrap_for_adapters
from seal.utils import frozen_linears_in
from tests.conftest import build_tiny_model

JOBS = [
    [
        TrainExample("Zorvath\n", "Zorvath was founded in 1820 by Ilsa Marrow."),
        TrainExample("", "Short one."),
        TrainExample("", "The river Quell runs north of the old mill."),
    ],
    [TrainExample("", "Mirelda Fosk invented the glass harp in 1911.")],  # fewer steps: sits out the rest
    [TrainExample("Q\n", "The capital of Brennmoor is Tal Asha."), TrainExample("", "x y z")],
]
SEEDS = [11, 22, 33]


def config(**kw) -> TTTConfig:
    base = dict(
        ttt_lora_r=8,
        ttt_lora_alpha=16,
        ttt_learning_rate=5e-2,
        ttt_epochs=4,
        ttt_batch_size=2,
        ttt_autocast="none",  # in the model's dtype on every CPU (auto: bf16 on CPUs with bf16 kernels)
    )
    return TTTConfig(**{**base, **kw})


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||: rounding bounds are relative to a tensor's norm (an elementwise rtol
    fails on elements that cancel to near zero, whatever the precision)."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """All matrices of an adapter state dict as one vector, in key order."""
    return torch.cat([weights[name].flatten() for name in sorted(weights)])


def stacked_lora(stack: StackedLoRA, k: int) -> dict[str, torch.Tensor]:
    """Adapter k of `stack` in its own dtype (peft_state_dict exports float32), keyed like peft_lora()."""
    out = {}
    for name, (a, b) in stack.adapter_weights(k).items():
        key = name if name.startswith("base_model.model.") else f"base_model.model.{name}"
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
    return out


# Float64 bound for two computations of the same float64 values whose ops sum in other orders: rounding is
# ~1e-16 relative per op (2^-53), so even thousands of ops in a row stay well below it.
FLOAT64_BOUND = 1e-9
# Bound for "this is a different computation": a routing mix-up (another adapter's weights or data) moves
# outputs and weights by O(1) relative; anything beyond 1e-2 is far outside every rounding bound here.
MIX_UP = 1e-2


def float64_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchedTTT makes its StackedLoRA in float32 (it has no dtype setting): make it float64."""
    monkeypatch.setattr(ttt_module, "StackedLoRA", functools.partial(StackedLoRA, dtype=torch.float64))


def peft_lora(model) -> dict[str, torch.Tensor]:
    """The live `ttt` adapter, keyed like an exported PEFT state dict."""
    return {
        n.replace(f".{ADAPTER}", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if f".{ADAPTER}." in n
    }


# Bound for batched TTT against sequential TTT (PEFT) after training, where float64 cannot be tight: both
# compute the loss in float32 even on a float64 model (transformers calls .float() on the logits, seal's
# fused loss reduces in float32), so the first step's gradients differ by float32 rounding, ~2^-24 (measured
# 7e-8), and the 8 AdamW steps of the longest job compound it. Allowed: a growth of 2^10 over the 8 steps
# (2.4x per step; the gradients' difference grows ~2.2x per step here): 2^-14 = 6.1e-5, norm-wise on the
# weights and on each loss. Measured 1.1e-6 (AVX2) and 8e-7 (SSE4.1, ATen default). The tight check is the
# float64 one against BatchedTTT training each adapter alone (the same loss code on both sides).
PEFT_AFTER_TRAINING = 2**-14
# A float32 loss value of a float64 computation: identical float32 sums of the same tokens in the same order,
# unless a float64 logit rounds to float32 the other way, which moves the loss by an ulp or so (2^-23).
FLOAT32_LOSS = 2**-22


@pytest.fixture(scope="module")
def trained_alone(tokenizer):
    """Per scheduler, once: each job of JOBS trained alone, in float64, by sequential TTT (PEFT) and by
    BatchedTTT (a stack of one adapter, under the module's default layout constants): per job its epoch
    losses and weights, [(peft losses, peft weights), (stacked losses, stacked weights)]."""
    cache: dict[str, list] = {}

    def get(scheduler: str) -> list:
        if scheduler not in cache:
            cfg = config(ttt_lr_scheduler=scheduler)
            model = wrap_for_adapters(build_tiny_model(tokenizer).double(), cfg)
            sequential = TTT(model, tokenizer, cfg)
            peft = [(sequential.apply(j, s), peft_lora(model)) for j, s in zip(JOBS, SEEDS, strict=True)]
            with pytest.MonkeyPatch.context() as mp:
                float64_stacks(mp)
                alone = BatchedTTT(model, tokenizer, cfg, exact_peft_init=True)
                stacked = []
                for job, seed in zip(JOBS, SEEDS, strict=True):
                    losses = alone.apply([job], [seed])[0]
                    stacked.append((losses, {n: w.clone() for n, w in stacked_lora(alone.stack, 0).items()}))
                alone.stack.remove()
            cache[scheduler] = list(zip(peft, stacked, strict=True))
        return cache[scheduler]

    return get


@pytest.mark.parametrize(
    ("scheduler", "dense_from", "masked_up_to", "bucket_cost"),
    [
        ("constant", 100, 2, multi_lora.BUCKET_COST_ROWS),
        ("linear", 100, 0, multi_lora.BUCKET_COST_ROWS),
        ("linear", 1, 0, multi_lora.BUCKET_COST_ROWS),
        ("linear", 100, 100, multi_lora.BUCKET_COST_ROWS),
        ("linear", 100, 0, 0),
        ("linear", 1, 0, 0),
    ],
)
def test_batched_training_equals_training_each_adapter_alone(
    tokenizer, trained_alone, scheduler, dense_from, masked_up_to, bucket_cost, monkeypatch
):
    """Losses and trained weights match each adapter's trained alone, by BatchedTTT and by PEFT, whichever
    way the steps compute the LoRA products: rows laid out in blocks of one length or (bucket_cost 0) of a
    length per adapter, the stacked matrices read from the (G, P) stack or copied contiguous (dense_from:
    from how many routed adapters on, see StackedLoRA._matrices), or masked rows (masked_up_to: up to how
    many routed adapters; JOBS train three adapters for 4 steps, then one for 4). In float64 throughout."""
    alone = trained_alone(scheduler)  # first: trained alone under the default layout constants
    monkeypatch.setattr(multi_lora, "DENSE_FROM", dense_from)
    monkeypatch.setattr(multi_lora, "MASKED_UP_TO", masked_up_to)
    monkeypatch.setattr(multi_lora, "BUCKET_COST_ROWS", bucket_cost)
    float64_stacks(monkeypatch)
    cfg = config(ttt_lr_scheduler=scheduler)
    model = wrap_for_adapters(build_tiny_model(tokenizer).double(), cfg)
    batched = BatchedTTT(model, tokenizer, cfg, exact_peft_init=True)
    got = batched.apply(JOBS, SEEDS)
    for k, ((peft_losses, peft_weights), (stacked_losses, stacked_weights)) in enumerate(alone):
        weights = stacked_lora(batched.stack, k)
        assert weights.keys() == peft_weights.keys() == batched.stack.peft_state_dict(k).keys()
        # trained alone by BatchedTTT: the same float64 ops, summed in other orders (FLOAT64_BOUND)
        assert got[k] == pytest.approx(stacked_losses, rel=FLOAT32_LOSS, abs=0)
        assert relative_error(flat(weights), flat(stacked_weights)) <= FLOAT64_BOUND
        # a routing mix-up (adapter k's weights trained on another job, or read for another) is far outside
        other = alone[(k + 1) % len(alone)][1][1]
        assert relative_error(flat(weights), flat(other)) > MIX_UP
        # trained alone by sequential TTT on the PeftModel: float32 losses on both sides, compounded
        assert got[k] == pytest.approx(peft_losses, rel=PEFT_AFTER_TRAINING, abs=0)
        assert relative_error(flat(weights), flat(peft_weights)) <= PEFT_AFTER_TRAINING
    assert peft_losses[-1] < peft_losses[0]  # it did learn
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in batched.stack.parameters())


def test_exported_adapters_load_in_peft_and_reproduce_the_batched_outputs(tokenizer, tmp_path):
    """On a float64 base the float32 stack (BatchedTTT's own) is exported exactly, so PEFT and the stack
    hold the very same weights and their float64 forwards differ in op order only (FLOAT64_BOUND)."""
    cfg = config()
    base = build_tiny_model(tokenizer).double()
    batched = BatchedTTT(base, tokenizer, cfg)  # a plain model works too (no PEFT wrapper needed)
    batched.apply(JOBS, SEEDS)
    assert batched.stack.weights[0].dtype == torch.float32
    ids = tokenizer(["The capital of Brennmoor is", "Zorvath was"], return_tensors="pt", padding=True)
    ours, theirs = [], []
    for k in range(len(JOBS)):
        with torch.no_grad(), batched.stack.route([k, k]):  # two rows, each its own block of adapter k
            ours.append(base(**ids).logits)
        path = batched.save(k, tmp_path / f"adapter-{k}")
        assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
        peft = PeftModel.from_pretrained(build_tiny_model(tokenizer).double(), str(path)).eval()
        with torch.no_grad():  # same base weights
            theirs.append(peft(**ids).logits)
        assert theirs[-1].dtype == torch.float64
        assert relative_error(ours[k], theirs[k]) <= FLOAT64_BOUND
    for k in range(len(JOBS)):  # routed to another adapter: far outside that bound
        assert relative_error(ours[k], theirs[(k + 1) % len(JOBS)]) > MIX_UP
    with torch.no_grad():
        plain = base(**ids).logits  # outside route() the hooks add nothing
    assert relative_error(plain, ours[-1]) > MIX_UP


def test_stacked_generation_matches_each_adapter_loaded_in_peft(tokenizer, tmp_path):
    """Prompts of several stacked adapters, unevenly shared (each row routed to its adapter), generate what
    each adapter loaded in PEFT generates alone. In float64 without autocast on every CPU (the generator's
    "auto" would take bf16 on CPUs with bf16 kernels only): logits agree to FLOAT64_BOUND, so a greedy
    token could only differ where two logits tie that closely."""
    cfg = config()
    model = wrap_for_adapters(build_tiny_model(tokenizer).double(), cfg)
    batched = BatchedTTT(model, tokenizer, cfg)
    batched.apply(JOBS, SEEDS)
    generator = HFEngine(model, tokenizer, batch_size=3, autocast_setting="none")
    generator.serve_stack(batched.stack)
    prompts = ["Zorvath was", "The capital of", "Mirelda", "x"]
    adapters = [stack_adapter(0), stack_adapter(2), stack_adapter(1), stack_adapter(0)]
    greedy = Sampling(max_new_tokens=6)
    mixed = generator.generate(prompts, greedy, adapter=adapters)  # calls of 2 + 1 rows, then 1 row
    for k in range(len(JOBS)):
        name = generator.add_adapter(str(batched.save(k, tmp_path / f"a{k}")))
        for prompt, adapter, out in zip(prompts, adapters, mixed, strict=True):
            if adapter == stack_adapter(k):
                assert generator.generate([prompt], greedy, adapter=name) == [out]
    base_only = generator.generate(prompts, greedy, adapter=None)
    assert base_only != mixed


def test_rewarder_scores_each_passage_with_its_own_adapter(tokenizer):
    cfg = config()
    # float64, no autocast: greedy answers of two routings agree unless logits tie to FLOAT64_BOUND (above)
    model = wrap_for_adapters(build_tiny_model(tokenizer).double(), cfg)
    batched = BatchedTTT(model, tokenizer, cfg)
    batched.apply(JOBS[:2], SEEDS[:2])
    generator = HFEngine(model, tokenizer, autocast_setting="none")
    generator.serve_stack(batched.stack)
    rewarder = Rewarder(generator, tokenizer, make_grader("contains"), RewardConfig(answer_max_new_tokens=4))
    passages = [
        Passage("a", "A", "ctx", [QA("Who founded Zorvath?", ["Ilsa Marrow"])]),
        Passage(
            "b", "B", "ctx", [QA("Who invented the glass harp?", ["Mirelda Fosk"]), QA("When?", ["1911"])]
        ),
    ]
    together = rewarder.score(passages, [stack_adapter(0), stack_adapter(1)])
    alone = [rewarder.score([p], stack_adapter(k))[0] for k, p in enumerate(passages)]
    assert [s.answers for s in together] == [s.answers for s in alone]
    with pytest.raises(ValueError, match="2 passages"):
        rewarder.score(passages, [stack_adapter(0)])


def test_packing_keeps_sequences_apart_and_matches_padded_forward(tokenizer):
    model = build_tiny_model(tokenizer).double()  # float64: packed and lone forwards differ in op order only
    seqs = [
        [([5, 6, 7, 8], [5, 6, 7, 8]), ([9, 10], [IGNORE_INDEX, 10])],
        [([11, 12, 13], [11, 12, 13])],
    ]
    batch = pack_sequences(seqs, pad_id=0, capacity=6, device=torch.device("cpu"))
    rows, length = batch.input_ids.shape
    assert rows == 2 and length <= 6
    flat_ids = batch.input_ids.reshape(-1)
    for g, group in enumerate(seqs):  # each group's positions hold exactly its sequences' tokens
        listed = [int(t) for t in flat_ids[batch.token_group == g]]
        assert sorted(listed) == sorted(t for ids, _ in group for t in ids)
    assert bool((flat_ids[batch.token_group == -1] == 0).all())  # the rest is padding
    assert int((batch.targets != IGNORE_INDEX).sum()) == 3 + 1 + 2  # shifted within sequences only
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        leaky = model(input_ids=batch.input_ids, use_cache=False).logits  # one sequence per row: no packing
        packed, leaky = (x.reshape(-1, x.shape[-1]) for x in (packed, leaky))
        for ids, _ in [s for group in seqs for s in group]:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            start = next(
                r * length + c
                for r in range(rows)
                for c in range(length - len(ids) + 1)
                if batch.input_ids[r, c : c + len(ids)].tolist() == ids and batch.position_ids[r, c] == 0
            )
            assert relative_error(packed[start : start + len(ids)], alone) <= FLOAT64_BOUND
            if start % length:  # not first in its row: attending to the sequences before it is far outside
                assert relative_error(leaky[start : start + len(ids)], alone) > MIX_UP


def test_adapters_are_independent_parameter_groups(tokenizer):
    cfg = config(ttt_epochs=2)
    model = build_tiny_model(tokenizer)
    batched = BatchedTTT(model, tokenizer, cfg)
    batched.apply([JOBS[0], []], [1, 2])  # adapter 1 has nothing to learn: it must stay at its init
    stack = batched.stack
    assert all(b.abs().sum() == 0 for b in stack.lora_B[1]) and any(
        b.abs().sum() > 0 for b in stack.lora_B[0]
    )
    fresh = StackedLoRA(
        build_tiny_model(tokenizer), 1, cfg.ttt_lora_r, cfg.ttt_lora_alpha, cfg.ttt_target_modules
    )
    fresh.init_adapter(0, seed=2)
    for a, b in zip(stack.lora_A[1], fresh.lora_A[0], strict=True):
        assert torch.equal(a, b)  # same seed, same init, untouched by the other adapter's steps


def test_training_state_kept_between_applies_trains_as_a_fresh_one(tokenizer):
    """A second apply() on the stack and optimizer kept from the first (moments and gradient buffers
    reused, in place) trains exactly as a new BatchedTTT: with fewer jobs than the stack holds (the extra
    adapters sit out) and with more (a new, larger stack), and after release() (the stack kept, a new
    optimizer)."""
    cfg = config(ttt_epochs=3)
    model = build_tiny_model(tokenizer)
    kept = BatchedTTT(model, tokenizer, cfg)

    def trains_as_fresh(jobs: list, seeds: list[int]) -> None:
        got = kept.apply(jobs, seeds)
        fresh = BatchedTTT(model, tokenizer, cfg)
        assert got == fresh.apply(jobs, seeds)
        for k in range(len(jobs)):
            expected = fresh.stack.peft_state_dict(k)
            for name, w in kept.stack.peft_state_dict(k).items():
                assert torch.equal(w, expected[name]), name
        fresh.stack.remove()

    kept.apply(JOBS, SEEDS)
    stack, optimizer = kept.stack, kept._optimizer
    for jobs, seeds in (([JOBS[2], JOBS[0]], [5, 6]), (JOBS + [JOBS[1]], [7, 8, 9, 10])):
        trains_as_fresh(jobs, seeds)
        assert (kept.stack is stack) == (len(jobs) <= 3)  # reused while it has room
        assert (kept._optimizer is optimizer) == (len(jobs) <= 3)
        assert not any(p.requires_grad for p in kept.stack.parameters())
    kept.release()
    assert kept._optimizer is None and not kept.stack._grads
    assert kept.stack.peft_state_dict(3)  # the trained adapters stay
    stack = kept.stack  # after release(): the stack is kept when it has room, the optimizer is new
    trains_as_fresh(JOBS[:2], [11, 12])
    assert kept.stack is stack and kept._optimizer is not None


def test_schedule_decides_what_each_adapter_trains_on(tokenizer):
    """A custom schedule that feeds only example 0 trains the same adapter as a job of example 0 alone."""
    cfg = config(ttt_epochs=3)
    model = build_tiny_model(tokenizer)
    calls = []

    def first_only(n: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
        calls.append((n, batch_size, epochs, seed))
        return [(epoch, [0]) for epoch in range(epochs)]

    custom = BatchedTTT(model, tokenizer, cfg, schedule=first_only)
    custom_losses = custom.apply([JOBS[0]], [7])
    custom_weights = custom.stack.peft_state_dict(0)
    assert calls == [(len(JOBS[0]), cfg.ttt_batch_size, cfg.ttt_epochs, 7)]
    alone = BatchedTTT(model, tokenizer, cfg)
    # the very same steps (same packed batches, same ops on the same shapes): bitwise the same results
    assert alone.apply([JOBS[0][:1]], [7])[0] == custom_losses[0]
    for name, w in alone.stack.peft_state_dict(0).items():
        assert torch.equal(custom_weights[name], w), name


def test_route_validates_groups(tokenizer, monkeypatch):
    model = build_tiny_model(tokenizer)
    stack = StackedLoRA(model, 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert len(stack.names) == 2 * model.config.num_hidden_layers
    with pytest.raises(IndexError):
        with stack.route([2]):
            pass
    ids = torch.tensor([[5, 6, 7]] * 3)
    with pytest.raises(RuntimeError, match="cannot be split"), stack.route([0, 1]):
        model(input_ids=ids)
    for masked_up_to in (0, 2):  # laid out in blocks, or masked rows
        monkeypatch.setattr(multi_lora, "MASKED_UP_TO", masked_up_to)
        with pytest.raises(RuntimeError, match="9 rows routed, but token_group has 8"):
            with stack.route([0, 1], torch.tensor([0, 0, 0, 0, 1, 1, 1, -1])):
                model(input_ids=ids, use_cache=False)
        with pytest.raises(IndexError, match="adapter 2"), stack.route([0, 1], torch.tensor([0, 2])):
            pass
    with pytest.raises(ValueError, match="No Linear module"):
        find_targets(model, ["nonexistent"])
    with pytest.raises(ValueError, match="not both"), stack.route([0], torch.zeros(3), torch.zeros(1)):
        pass
    with pytest.raises(RuntimeError, match="row_group routes 2 rows"):
        with stack.route([0, 1], row_group=torch.tensor([0, 1])):
            model(input_ids=ids)


def test_parallel_adapters_from_memory(tokenizer):
    model = build_tiny_model(tokenizer)
    cfg = config()
    assert parallel_adapters(model, config(ttt_parallel_adapters=3), 100) == 3
    roomy = parallel_adapters(model, cfg, 100, available_bytes=2**34)
    tight = parallel_adapters(model, cfg, 100, available_bytes=2**26)
    assert 1 <= tight < roomy <= 64
    assert parallel_adapters(model, cfg, 10**6, available_bytes=1) == 1


@pytest.mark.parametrize(
    ("token_group", "bucket_cost"),
    [(None, None), ([0, 0, 2, 2, 2, -1, 2, 2, 3, -1, -1], None), ([0, 0, 2, 2, 2, -1, 2, 2, 3, -1, -1], 0)],
)
def test_lora_delta_backward_is_exact(token_group, bucket_cost):
    """The hand-written backward of the batched LoRA product passes autograd's numerical gradient check, on
    equal blocks and on packed rows of unequal shares (one adapter with none, rows of no adapter among
    them) laid out in zero-padded blocks of one length or, in buckets, of several."""
    gen = torch.Generator().manual_seed(0)
    group = torch.tensor(token_group or [0, 0, 1, 1, 2, 2, 3, 3])
    layout = PaddedLayout(4, None if token_group is None else group, bucket_cost)
    assert bucket_cost != 0 or len(layout.buckets) > 1
    x = torch.randn(group.numel(), 6, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    # float64 finite differences (step 1e-6): truncation ~1e-12, rounding ~2^-53 / 1e-6 ~ 1e-10, far below
    # gradcheck's atol 1e-5 / rtol 1e-3, which a wrong backward (an O(1) error) exceeds on any CPU
    assert torch.autograd.gradcheck(lambda x, a, b: LoRADelta.apply(x, a, b, 2.5, layout), (x, a, b))
    expected = torch.stack(
        [2.5 * x[t] @ a[g].T @ b[g].T if g >= 0 else x.new_zeros(5) for t, g in enumerate(group.tolist())]
    )
    # dot products of 6 and 2 terms in float64: a few roundings of 2^-53 each
    assert relative_error(LoRADelta.apply(x, a, b, 2.5, layout), expected) <= 1e-12


def test_masked_lora_backward_is_exact():
    """The masked LoRA product (a few adapters: every row times every adapter's A, masked to its own) adds
    to the output in place exactly what the blocked one computes, rows of no adapter and an adapter with no
    rows included, and its hand-written backward passes autograd's numerical gradient check."""
    gen = torch.Generator().manual_seed(0)
    group = torch.tensor([1, 1, -1, 0, 0, 0, -1])  # adapter 2 has no rows
    x = torch.randn(group.numel(), 6, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(group.numel(), 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = MaskedRows(3, group, r=2, scaling=2.5).mask(torch.float64, group.numel())

    def masked(base, x, a, b):  # A (G * r, in), B (out, G * r)
        return LoRAMasked.apply(base.clone(), x, a.flatten(0, 1), b.transpose(0, 1).flatten(1), mask)

    assert torch.autograd.gradcheck(masked, (base, x, a, b))  # float64: see test_lora_delta_backward_is_exact
    blocked = base + LoRADelta.apply(x, a, b, 2.5, PaddedLayout(3, group))
    # the same float64 products (dot products of 6 and 6 terms) in another order: a few roundings of 2^-53
    assert relative_error(masked(base, x, a, b), blocked) <= 1e-12
    assert torch.equal(masked(base, x, a, b)[group < 0], base[group < 0])  # rows of no adapter: untouched


def test_padded_layout_round_trips_packed_rows():
    """Each adapter's rows start its block, in order, zero-padded, and come back in their places; rows of no
    adapter come back zero; a gradient spread into blocks carries every real row to its place; rows already
    in equal blocks need no index."""
    rows = torch.arange(1.0, 11.0).unsqueeze(1)
    group = torch.tensor([0, 0, -1, 2, 2, 2, 2, 3, 3, 3])  # shares of 2, 0, 4 and 3 rows; row 3 of none
    layout = PaddedLayout(4, group)
    blocks = layout.blocks(rows)
    ((adapters, block_rows, piece),) = layout.pieces(blocks)  # one block length: padding is cheap here
    assert (adapters, block_rows, piece.shape) == (slice(0, 4), slice(0, 16), (4, 4, 1))
    assert blocks.flatten().tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 4, 5, 6, 7, 8, 9, 10, 0]
    with_zero_row = torch.cat([blocks, blocks.new_zeros(1, 1)])  # as _blocks_times(..., tail=True) gives
    assert layout.packed(with_zero_row).flatten().tolist() == [1, 2, 0, 4, 5, 6, 7, 8, 9, 10]
    spread = layout.spread(rows)
    assert spread[:2].flatten().tolist() == [1, 2]
    assert spread[8:15].flatten().tolist() == [4, 5, 6, 7, 8, 9, 10]
    equal = PaddedLayout(3, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert equal.take is None and torch.equal(equal.blocks(rows[:9]), rows[:9])
    with pytest.raises(RuntimeError, match="10 rows routed, but token_group has 9"):
        equal_but_wrong = PaddedLayout(3, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, -1]))
        equal_but_wrong.blocks(rows)
    with pytest.raises(IndexError, match="adapter 4"):
        PaddedLayout(3, torch.tensor([0, 4]))


def test_buckets_give_neighbours_of_like_shares_their_own_block_length():
    """Adapters in buckets of consecutive ones, each padded to its bucket's longest share: a bucket more
    wherever it saves more padded rows than it costs; the packed rows round-trip through the buckets."""
    assert _buckets([128, 120, 40, 30, 30, 6], cost=10**9) == [(0, 6, 128)]  # one block length
    assert _buckets([128, 120, 40, 30, 30, 6], cost=50) == [(0, 2, 128), (2, 6, 40)]
    assert _buckets([128, 120, 40, 30, 30, 6], cost=1) == [
        (0, 1, 128),
        (1, 2, 120),
        (2, 3, 40),
        (3, 5, 30),
        (5, 6, 6),
    ]
    assert _buckets([0, 0], cost=5) == [(0, 2, 1)]
    group = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, -1, 2, 3])  # shares 5, 3, 1, 1
    layout = PaddedLayout(4, group, bucket_cost=1)
    assert [(a, r, block) for a, r, block in layout.buckets] == [
        (slice(0, 1), slice(0, 5), 5),
        (slice(1, 2), slice(5, 8), 3),
        (slice(2, 4), slice(8, 10), 1),
    ]
    rows = torch.arange(1.0, 12.0).unsqueeze(1)
    blocks = layout.blocks(rows)
    assert blocks.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]
    assert [piece.shape for _, _, piece in layout.pieces(blocks)] == [(1, 5, 1), (1, 3, 1), (2, 1, 1)]
    with_zero_row = torch.cat([blocks, blocks.new_zeros(1, 1)])
    assert layout.packed(with_zero_row).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 10, 11]


def test_balanced_rows_are_consecutive_few_and_even():
    lengths = [5, 3, 8, 2, 2, 7, 1, 4, 6]
    rows = balanced_rows(lengths, capacity=12)
    assert [i for row in rows for i in row] == list(range(len(lengths)))  # order kept, nothing lost
    assert len(rows) == 4  # next-fit at 12: [5,3] [8,2] [2,7,1] [4,6] -- the fewest for this order
    assert max(sum(lengths[i] for i in row) for row in rows) == 10  # evened out below the capacity
    assert balanced_rows([20, 3], capacity=8) == [[0], [1]]  # a sequence longer than a row: its own row


def test_frozen_linears_in_autocast_dtype_is_bit_identical_and_restored(tokenizer):
    """Holding frozen Linears in bf16 changes no bit under bf16 autocast; the tied embedding stays float32."""
    model = build_tiny_model(tokenizer).requires_grad_(False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = {n: p for n, p in model.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
        with frozen_linears_in(model, torch.bfloat16):
            assert model.lm_head.weight.dtype == torch.bfloat16
            assert model.model.embed_tokens.weight.dtype == torch.float32  # tied, yet not cast
            assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())  # the very same Parameters are back
    with frozen_linears_in(model, None):
        assert model.lm_head.weight.dtype == torch.float32


def stack_with_nonzero_b(model, num_adapters: int, b_seed_offset: int = 0, **kwargs) -> StackedLoRA:
    """Rank-4 adapters on q_proj and up_proj, adapter k initialised with seed k and its B drawn from seed
    k + b_seed_offset: nonzero, so A gets a gradient too."""
    targets = ["q_proj", "up_proj"]
    stack = StackedLoRA(model, num_adapters, r=4, lora_alpha=8, target_modules=targets, **kwargs)
    for k in range(num_adapters):
        stack.init_adapter(k, seed=k)
        for b in stack.lora_B[k]:
            b.detach().normal_(generator=torch.Generator().manual_seed(k + b_seed_offset))
    return stack


@pytest.mark.parametrize("masked_up_to", [0, 2])
def test_stacked_gradients_land_in_persistent_buffers(tokenizer, masked_up_to, monkeypatch):
    """Each routed adapter's gradient in a mixed packed batch equals its gradient when it is routed alone
    on its own rows and lands in a buffer reused from step to step; adapters not routed get none. The two
    adapters' rows laid out in blocks, or masked (masked_up_to)."""
    monkeypatch.setattr(multi_lora, "MASKED_UP_TO", masked_up_to)
    # float64 throughout: the packed and the lone pass sum the same terms in other orders, so they differ by
    # rounding alone, ~1e-16 relative per op; in float32 that was ~1e-4 and varied with the CPU's kernels
    model = build_tiny_model(tokenizer).double()
    stack = stack_with_nonzero_b(model, 3, dtype=torch.float64)
    # adapter 2 owns the first 3 tokens of the packed row, adapter 0 the other 5 (unequal shares: padded)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])

    def mixed_step() -> None:
        stack.zero_grad()
        with stack.route([2, 0], torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])):
            # transformers keeps packed sequences apart (position ids restarting) only without a cache
            model(input_ids=ids, position_ids=positions, use_cache=False).logits.square().sum().backward()

    mixed_step()
    buffers = {k: stack.weights[k].grad for k in (0, 2)}
    mixed = {k: g.clone() for k, g in buffers.items()}
    assert stack.weights[1].grad is None

    for k, span in ((2, slice(0, 3)), (0, slice(3, 8))):  # each adapter alone on its own sequence
        stack.weights[k].grad = None
        with stack.route([k]):
            model(input_ids=ids[:, span]).logits.square().sum().backward()
        alone = stack.weights[k].grad
        assert (mixed[k] - alone).norm() <= 1e-9 * alone.norm()  # float64 summation order only
    for wrong, span in ((0, slice(0, 3)), (2, slice(3, 8))):  # a routing mix-up is far outside that bound
        stack.weights[wrong].grad = None
        with stack.route([wrong]):
            model(input_ids=ids[:, span]).logits.square().sum().backward()
        assert (mixed[wrong] - stack.weights[wrong].grad).norm() > 1e-2 * mixed[wrong].norm()
    stack.zero_grad()
    assert all(w.grad is None for w in stack.weights)
    mixed_step()
    for k in (0, 2):  # the same buffers again, holding the same gradients
        assert stack.weights[k].grad is buffers[k] and torch.equal(buffers[k], mixed[k])
    assert stack.weights[1].grad is None
    stack.drop_gradients()
    assert all(w.grad is None for w in stack.weights)


@pytest.mark.parametrize("token_group", [None, [0, 0, 0, 0, 1, 1, 1, 1]])
def test_two_forwards_in_one_route_add_their_gradients(tokenizer, token_group):
    """Modules that run twice before one backward (two forwards in one route) give each adapter the sum of
    both forwards' gradients, as autograd accumulates them: rows of the two adapters as two equal blocks,
    or routed by token_group (masked rows, as for two adapters in a packed step)."""
    route = ([0, 1],) if token_group is None else ([0, 1], torch.tensor(token_group))
    # float64: one backward of two forwards and two backwards add the same terms in other orders
    model = build_tiny_model(tokenizer).double()
    stack = stack_with_nonzero_b(model, 2, dtype=torch.float64)
    batches = [
        torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]),
        torch.tensor([[13, 14, 15, 16], [17, 18, 19, 20]]),
    ]

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits.square().sum()

    expected = [torch.zeros_like(w) for w in stack.weights]
    for ids in batches:  # one backward per forward
        stack.zero_grad()
        with stack.route(*route):
            loss(ids).backward()
        for total, w in zip(expected, stack.weights, strict=True):
            total += w.grad
    last = [w.grad.clone() for w in stack.weights]  # the second forward's gradients alone
    stack.zero_grad()
    with stack.route(*route):
        (loss(batches[0]) + loss(batches[1])).backward()
    for total, w, one in zip(expected, stack.weights, last, strict=True):
        assert relative_error(w.grad, total) <= FLOAT64_BOUND
        assert relative_error(one, total) > MIX_UP  # one forward's gradient only: far outside


def test_lora_dropout_masks_each_module_input_in_training_only(tokenizer):
    """With lora_dropout, training forwards drop LoRA inputs (the output and gradients change) and an
    evaluation-mode stack computes exactly what a dropout-free one does."""
    model = build_tiny_model(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    outputs, grads = {}, {}
    for p in (0.0, 0.5):
        stack = stack_with_nonzero_b(model, 1, b_seed_offset=1, lora_dropout=p)
        for mode in ("train", "eval"):
            getattr(stack, mode)()
            torch.manual_seed(0)
            stack.zero_grad()
            with stack.route([0]):
                logits = model(input_ids=ids).logits
            logits.square().sum().backward()
            outputs[p, mode], grads[p, mode] = logits.detach(), stack.weights[0].grad.clone()
        stack.remove()
    # evaluation mode skips the dropout: the very same ops as without one, bitwise the same results
    assert torch.equal(outputs[0.5, "eval"], outputs[0.0, "eval"])
    assert torch.equal(grads[0.5, "eval"], grads[0.0, "eval"])
    assert relative_error(outputs[0.5, "train"], outputs[0.0, "train"]) > MIX_UP
    assert torch.isfinite(grads[0.5, "train"]).all()
    assert relative_error(grads[0.5, "train"], grads[0.0, "train"]) > MIX_UP
