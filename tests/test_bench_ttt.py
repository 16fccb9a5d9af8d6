"""scripts/bench_ttt.py pairs seal's adapters with the reference's: same data order as its SFTTrainer."""

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from seal.generate import SelfEdit
from tests.conftest import build_tiny_model, load_script


def load_bench():
    return load_script("bench_ttt")


def test_trainer_schedule_is_the_order_sft_trainer_feeds(tokenizer, tmp_path):
    n, epochs, seed = 7, 3, 12345
    data = Dataset.from_list([{"prompt": f"p{i} ", "completion": f"item {i}"} for i in range(n)])
    model = get_peft_model(build_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj"]))
    digit = {tokenizer(f"p{i}", add_special_tokens=False)["input_ids"][1]: i for i in range(n)}  # "p", "i"
    seen: list[int] = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append(digit[int(kwargs["input_ids"][0, 1])])
        return forward(*args, **kwargs)

    model.forward = recording_forward
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        num_train_epochs=epochs,
        max_length=32,
        completion_only_loss=False,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    torch.manual_seed(0)
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    expected = [idx[0] for _, idx in load_bench().trainer_schedule(n, 1, epochs, seed)]
    assert len(seen) == n * epochs and sorted(seen[:n]) == list(range(n))
    assert seen == expected


def test_ttt_settings_change_only_what_they_name():
    bench = load_bench()
    cfg = bench.ttt_settings("bs=2,epochs=5,lr=3e-3,sched=constant")
    assert (cfg.ttt_batch_size, cfg.ttt_epochs, cfg.ttt_learning_rate, cfg.ttt_lr_scheduler) == (
        2,
        5,
        3e-3,
        "constant",
    )
    ref = bench.REFERENCE
    assert (cfg.ttt_lora_r, cfg.ttt_max_length) == (ref.ttt_lora_r, ref.ttt_max_length)
    with pytest.raises(ValueError, match="unknown TTT setting 'rank'"):
        bench.ttt_settings("rank=8")


def test_bracketing_times_seal_around_each_reference_seed_set():
    """The reference's seed set runs between two runs of seal's, and seal's seed set is their mean; seed sets
    the reference did not run now (reused, or more of seal's) are run once."""
    bench = load_bench()
    calls = []

    def fake(name: str, seconds: list[float]):
        def run(tag: str) -> dict:
            calls.append((name, tag))
            return {"seconds": seconds.pop(0), "train_seconds": 1.0, "accuracies": [0.5, 0.25], "answers": []}

        return run

    done: dict = {}
    tags = {bench.seed_tag(0), bench.seed_tag(1)}  # seal's seed sets: 0 and 1
    reference = bench.bracketing(fake("reference", [100.0, 90.0]), fake("seal", [10.0, 30.0]), done, tags)
    assert reference(bench.seed_tag(0))["seconds"] == 100.0
    assert calls == [("seal", "bench"), ("reference", "bench"), ("seal", "bench")]
    assert reference(bench.seed_tag(2))["seconds"] == 90.0  # a seed set seal does not run: alone
    assert calls[3:] == [("reference", "bench-2")]
    seal = bench.run_seed_sets("seal", range(2), fake("seal", [50.0]), done=done)
    assert calls[4:] == [("seal", "bench-1")]
    assert seal["seed_seconds"] == [20.0, 50.0] and seal["seconds"] == 35.0
    assert seal["accuracies"] == [0.5, 0.25]


def test_reference_runs_of_later_seed_sets_alone(tmp_path):
    """`--first_seed 1`: only seed set 1 runs (tag "bench-1"), stored beside the seed sets already there."""
    bench = load_bench()
    path = tmp_path / "reference.json"
    bench.write_json(path, {"runs": {"bench": {"seconds": 1.0}}})
    tags = []

    def run(tag: str) -> dict:
        tags.append(tag)
        return {"seconds": 2.0}

    assert bench.reference_runs(path, range(1, 2), True, run) == [{"seconds": 2.0}]
    assert tags == ["bench-1"]
    assert set(json.loads(path.read_text())["runs"]) == {"bench", "bench-1"}


def test_cached_self_edits_must_match_the_passages_and_count(tmp_path):
    """The cache is reused only for the same passages and self-edits per passage; another is a clear error
    naming the file (before any model is loaded)."""
    bench = load_bench()
    passages = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    path = tmp_path / "self_edits.jsonl"
    edits = [SelfEdit(p.id, i, "prompt", "completion", [], "ok") for p in passages for i in range(2)]
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in edits))
    assert bench.self_edits(path, "unused", None, passages, 2) == edits
    with pytest.raises(ValueError, match="self_edits.jsonl holds 4 self-edits .* not 4 for each of the 2"):
        bench.self_edits(path, "unused", None, passages, 4)
    with pytest.raises(ValueError, match="not 2 for each of the 1 passages"):
        bench.self_edits(path, "unused", None, passages[:1], 2)
