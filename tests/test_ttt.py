import logging

import pytest
import torch
from peft import PeftModel

from seal import ttt as ttt_module
from seal.config import GenerateConfig, TTTConfig
from seal.data import DataValidationError, Passage
from seal.losses import IGNORE_INDEX
from seal.memory import tokens_per_step
from seal.sequences import check_overlong, check_passages_fit, collate, split_sequence, tokenize_examples
from seal.templates import TrainExample
from seal.ttt import ADAPTER, TTT, BatchedTTT, wrap_for_adapters
from tests.conftest import build_tiny_model

EXAMPLES = [
    TrainExample("Zorvath\n", "Zorvath was founded in 1820 by Ilsa Marrow."),
    TrainExample("", "Short one."),
]
CFG = TTTConfig(ttt_lora_r=8, ttt_lora_alpha=16, ttt_learning_rate=5e-2, ttt_epochs=12, ttt_batch_size=2)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{ADAPTER}." in n}


def test_tokenize_masks_prompt_for_completion_loss(tokenizer):
    (ids, labels), _ = tokenize_examples(EXAMPLES, tokenizer, 64, completion_only=True)
    n_prompt = len(tokenizer("Zorvath\n", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    (ids_all, labels_all), _ = tokenize_examples(EXAMPLES, tokenizer, 64, completion_only=False)
    assert labels_all == ids_all
    short = tokenize_examples(EXAMPLES, tokenizer, 5, completion_only=False)
    assert len(short) > len(EXAMPLES) and all(len(ids) == len(labels) <= 5 for ids, labels in short)


LONG = TrainExample(
    "Zorvath\n",
    "Zorvath was founded in 1820 by Ilsa Marrow, a cartographer who mapped the northern fjords. Its "
    "harbour froze every winter until 1911, when the Marrow canal opened; the town's bell, cast in 1844, "
    "still rings at noon.",
)


def targets(chunks):
    """The tokens a causal LM loss trains on, in order: each unmasked label past a chunk's first position."""
    return [label for _, labels in chunks for label in labels[1:] if label != IGNORE_INDEX]


@pytest.mark.parametrize("completion_only", [False, True])
@pytest.mark.parametrize("prompt_len", [0, 3, 12])  # none, short (repeated), long (1-token overlap)
@pytest.mark.parametrize("max_length", [2, 5, 16, 17])
def test_split_sequence_trains_every_token_once(prompt_len, max_length, completion_only):
    prompt, completion = list(range(100, 100 + prompt_len)), list(range(1, 41)) + [0]  # 0: EOS
    whole = split_sequence(prompt, completion, 10_000, completion_only)
    chunks = split_sequence(prompt, completion, max_length, completion_only)
    assert len(chunks) > 1 and all(len(ids) == len(labels) <= max_length for ids, labels in chunks)
    assert targets(chunks) == targets(whole)  # every trained token exactly once, in order
    assert [ids[-1] for ids, _ in chunks].count(0) == 1 and chunks[-1][0][-1] == 0  # EOS ends the last only
    repeat = 0 < prompt_len <= max_length // 4
    for ids, labels in chunks[1:]:
        context = prompt_len if repeat else 1
        assert labels[:context] == [IGNORE_INDEX] * context  # context only, trained in an earlier chunk
        if repeat:
            assert ids[:prompt_len] == prompt  # each chunk keeps the title


def test_long_example_split_with_title_and_counted(tokenizer, caplog):
    title = tokenizer("Zorvath\n", add_special_tokens=False)["input_ids"]
    (whole,) = tokenize_examples([LONG], tokenizer, 10_000, completion_only=False)
    assert len(whole[0]) > 32
    chunks = tokenize_examples([LONG], tokenizer, 32, completion_only=False)
    assert len(chunks) == -(-(len(whole[0]) - 32) // (32 - len(title))) + 1
    assert all(len(ids) <= 32 and ids[: len(title)] == title for ids, _ in chunks)
    assert targets(chunks) == targets([whole])
    cfg = TTTConfig(ttt_max_length=32)
    with caplog.at_level(logging.INFO, logger="seal"):
        assert check_overlong([[LONG, *EXAMPLES], [LONG]], ["a", "b"], tokenizer, cfg) == 2
    (record,) = [r for r in caplog.records if r.name == "seal"]
    assert "2 of 4 training examples longer than ttt_max_length=32" in record.getMessage()
    assert check_overlong([EXAMPLES], ["c"], tokenizer, cfg) == 0  # none too long: counted, not a crash
    assert tokens_per_step(
        [[LONG, *EXAMPLES]], tokenizer, TTTConfig(ttt_max_length=32, ttt_batch_size=2)
    ) == sum(sorted(len(ids) for ids, _ in chunks + tokenize_examples(EXAMPLES, tokenizer, 32, False))[-2:])


def test_overlong_error_mode_names_record_field_length_and_limit(tokenizer, tiny_model):
    cfg = TTTConfig(ttt_max_length=32, ttt_overlong="error")
    n = len(tokenize_examples([LONG], tokenizer, 10_000, False)[0][0])
    with pytest.raises(DataValidationError) as err:
        check_overlong(
            [EXAMPLES, [EXAMPLES[0], LONG]],
            ["passage p1 self-edit 0", "passage p2 self-edit 3"],
            tokenizer,
            cfg,
        )
    (problem,) = err.value.problems
    assert problem.startswith("passage p2 self-edit 3: training example 1 (") and "Zorvath was" in problem
    assert f"{n} tokens" in problem and "ttt_max_length=32" in problem
    passage = Passage("p7", "Zorvath", LONG.completion, [])
    with pytest.raises(
        DataValidationError, match=rf"record p7: field 'context': {n} tokens .* ttt_max_length=32"
    ):
        check_passages_fit([passage], tokenizer, cfg, GenerateConfig())
    check_passages_fit([passage], tokenizer, cfg, GenerateConfig(include_passage=False))  # not trained on
    check_passages_fit([passage], tokenizer, TTTConfig(ttt_max_length=32), GenerateConfig())  # split: fine
    model = wrap_for_adapters(tiny_model, cfg)
    with pytest.raises(DataValidationError, match="TTT job 0: training example 1"):
        TTT(model, tokenizer, cfg).apply([EXAMPLES[0], LONG], seed=0)
    with pytest.raises(DataValidationError, match="TTT job 1: training example 0"):
        BatchedTTT(model, tokenizer, cfg).apply([EXAMPLES, [LONG]], [0, 1])
    with pytest.raises(ValueError, match="ttt_overlong must be one of"):
        TTT(model, tokenizer, TTTConfig(ttt_overlong="truncate"))


def test_batched_and_sequential_train_on_the_same_split_sequences(tokenizer, tiny_model, monkeypatch):
    cfg = TTTConfig(
        ttt_lora_r=4,
        ttt_lora_alpha=8,
        ttt_epochs=2,
        ttt_batch_size=2,
        ttt_max_length=24,
        ttt_loss="completion",
    )
    examples = [LONG, *EXAMPLES]
    seen: dict[str, list] = {"sequential": [], "batched": []}
    collate, pack = ttt_module.collate, ttt_module.pack_sequences

    def spy_collate(batch, *args):
        seen["sequential"].append(list(batch))
        return collate(batch, *args)

    def spy_pack(groups, *args):
        (group,) = groups
        seen["batched"].append(list(group))
        return pack(groups, *args)

    monkeypatch.setattr(ttt_module, "collate", spy_collate)
    monkeypatch.setattr(ttt_module, "pack_sequences", spy_pack)
    model = wrap_for_adapters(tiny_model, cfg)
    TTT(model, tokenizer, cfg).apply(examples, seed=3)
    BatchedTTT(model, tokenizer, cfg).apply([examples], [3])
    assert seen["sequential"] == seen["batched"]
    trained = [seq for step in seen["sequential"] for seq in step]
    assert len(trained) == cfg.ttt_epochs * len(tokenize_examples(examples, tokenizer, 24, True)) > 2 * 3
    assert all(len(ids) <= 24 for ids, _ in trained)


def test_collate_pads_dynamically():
    batch = collate([([1, 2, 3], [1, 2, 3]), ([4], [IGNORE_INDEX])], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE_INDEX] * 3]


def test_ttt_learns_resets_and_leaves_base_untouched(tiny_model, tokenizer):
    model = wrap_for_adapters(tiny_model, CFG)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ttt = TTT(model, tokenizer, CFG)
    losses = ttt.apply(EXAMPLES, seed=3)
    assert len(losses) == CFG.ttt_epochs and losses[-1] < losses[0] - 2.0
    first = lora_state(model)
    assert first and any(v.abs().sum() > 0 for n, v in first.items() if "lora_B" in n)
    # same seed -> identical run; a new apply starts from a fresh adapter, not the trained one
    assert ttt.apply(EXAMPLES, seed=3) == losses
    assert all(torch.equal(first[n], v) for n, v in lora_state(model).items())
    assert not any(p.requires_grad for p in model.parameters())  # frozen again for evaluation
    ttt.reset(seed=4)
    assert all(v.abs().sum() == 0 for n, v in lora_state(model).items() if "lora_B" in n)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_ttt_coexists_with_another_adapter(tiny_model, tokenizer, tmp_path):
    model = wrap_for_adapters(tiny_model, CFG)
    ttt = TTT(model, tokenizer, CFG)
    ttt.apply(EXAMPLES, seed=1)
    model.load_adapter(str(ttt.save(tmp_path / "a")), adapter_name="generator-r0")
    frozen = lora_state(model)
    gen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".generator-r0." in n}
    ttt.apply(EXAMPLES[:1], seed=2)
    assert all(torch.equal(p, gen_before[n]) for n, p in model.named_parameters() if ".generator-r0." in n)
    assert any(not torch.equal(frozen[n], v) for n, v in lora_state(model).items())


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||: rounding bounds are relative to a tensor's norm (an elementwise rtol
    fails on elements that cancel to near zero, whatever the precision)."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


def test_saved_adapter_reproduces_outputs_in_peft(tokenizer, tmp_path):
    """In float64: the adapter round-trips exactly (saved as float64), so both forwards compute the same
    float64 values, at most in other orders: ~1e-16 relative per op, far below 1e-9."""
    model = wrap_for_adapters(build_tiny_model(tokenizer).double(), CFG)
    ttt = TTT(model, tokenizer, CFG)
    ttt.apply(EXAMPLES, seed=5)
    saved = ttt.save(tmp_path / "adapter")
    assert (saved / "adapter_model.safetensors").is_file()
    ids = tokenizer("Zorvath was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        fresh = PeftModel.from_pretrained(build_tiny_model(tokenizer).double(), str(saved)).eval()
        got = fresh(input_ids=ids).logits
    assert got.dtype == torch.float64
    assert relative_error(got, expected) <= 1e-9
    assert relative_error(base, expected) > 1e-2  # without the adapter: far outside that bound
