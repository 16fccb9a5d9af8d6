"""SEAL's setting in the loop: TTT on the generator that wrote the self-edits; held-out eval per round."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seal.data import DataValidationError
from seal.inner_loop import InnerLoop
from seal.journal import Journal
from seal.loop import run
from seal.ttt import BatchedTTT
from seal.utils import read_jsonl
from seal.weights import base_parameters
from tests.test_loop import tiny_args

PROBE = "model.layers.0.self_attn.q_proj.weight"  # a base weight the update's LoRA targets
HELDOUT = dict(
    heldout_datasets=["sample"],
    heldout_split="train",  # the loop trains on the sample eval split (tiny_args)
    heldout_num_passages=2,
    heldout_max_questions=2,
    heldout_num_self_edits=2,
)


def ttt_weights(monkeypatch) -> list[torch.Tensor]:
    """The probed base weight of the model TTT trains on, recorded at every inner-loop run."""
    seen, original = [], InnerLoop.run

    def spy(self, jobs, *args, **kwargs):
        seen.append(base_parameters(self.model)[PROBE].detach().clone())
        return original(self, jobs, *args, **kwargs)

    monkeypatch.setattr(InnerLoop, "run", spy)
    return seen


def test_round_1_trains_ttt_on_the_updated_generator(tiny_model_path, tmp_path, monkeypatch):
    seen = ttt_weights(monkeypatch)
    out = tmp_path / "run"
    summaries = run(tiny_args(tiny_model_path, out))
    base = load_file(Path(tiny_model_path) / "model.safetensors")[PROBE]
    merged = load_file(out / "round_0" / "update" / "merged" / "model.safetensors")[PROBE]
    # the merged weights are the base plus the update's LoRA product, scaled by alpha / r
    lora = load_file(out / "round_0" / "update" / "generator" / "adapter_model.safetensors")
    a = lora["base_model.model." + PROBE.replace(".weight", ".lora_A.weight")]
    b = lora["base_model.model." + PROBE.replace(".weight", ".lora_B.weight")]
    assert not torch.equal(merged, base)
    torch.testing.assert_close(merged, base + (b @ a) * (8 / 4), rtol=0, atol=1e-6)  # float32: a few ulps
    assert torch.equal(seen[0], base) and torch.equal(seen[1], merged)  # round 0 on θ_0, round 1 on θ_1
    journal = Journal(out / "journal.jsonl")
    assert journal.get("baseline") is not None and journal.get("baseline", 1) is not None
    rows = read_jsonl(out / "round_1" / "self_edits.jsonl")
    own = journal.get("baseline", 1)["scores"]
    assert all(r["base_accuracy"] == own[r["passage_id"]]["accuracy"] for r in rows)  # θ_1's own baseline
    assert [s["ttt_model"] for s in summaries] == ["generator", "generator"]
    assert all("no_kept" in s for s in summaries)


def test_teacher_variant_keeps_ttt_on_the_base(tiny_model_path, tmp_path, monkeypatch):
    seen = ttt_weights(monkeypatch)
    out = tmp_path / "run"
    run(tiny_args(tiny_model_path, out, ttt_model="base"))
    base = load_file(Path(tiny_model_path) / "model.safetensors")[PROBE]
    assert len(seen) == 2 and all(torch.equal(w, base) for w in seen)
    assert not (out / "round_0" / "update" / "merged").exists()
    assert Journal(out / "journal.jsonl").get("baseline", 1) is None


def test_ttt_model_is_validated():
    from seal.config import TTTConfig

    with pytest.raises(ValueError, match="ttt_model"):
        TTTConfig(ttt_model="teacher")


def test_heldout_evaluation_every_round_and_resume(tiny_model_path, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    summaries = run(tiny_args(tiny_model_path, clean, **HELDOUT))
    results = json.loads((clean / "heldout" / "results.json").read_text())
    rows = results["tables"]["sample"]
    assert [r["key"] for r in rows] == [
        "base",
        "passage",
        "generator_0",
        "generator_1",
        "nocontext_1",
        "generator_2",
        "nocontext_2",
    ]
    assert rows[2]["delta_vs_base_generator"] is None and rows[3]["delta_vs_base_generator"] is not None
    assert all(r["passages"] == 2 for r in rows)
    assert "heldout_sample_acc_before" in summaries[0]
    assert all("heldout_sample_acc" in s and "heldout_sample_vs_base_gen" in s for s in summaries)
    assert "Passage + self-edits (generator after round 1)" in (clean / "heldout" / "results.md").read_text()
    assert (clean / "rounds.png").stat().st_size > 0
    described = results["self_edits"]["sample"]  # what each point's generator wrote (seal.describe)
    assert list(described) == ["generator_0", "generator_1", "generator_2"]
    for q, d in enumerate(described.values()):
        (saved,) = (clean / "heldout").glob(f"*/generations_{q}.jsonl")
        assert d["described"] == sum(
            e["status"] == "ok" and bool(e["completion"].strip()) for e in read_jsonl(saved)
        )
    assert "content words not in it" in (clean / "heldout" / "results.md").read_text()
    assert all({"edit_words", "edit_copied", "edit_novel"} <= s.keys() for s in summaries)

    # A crash in the middle of the evaluation after round 0's update; the rerun redoes none of its TTTs.
    crashed, original, appended = tmp_path / "crashed", Journal.append, []

    def crash(self, key, **fields):
        record = original(self, key, **fields)
        if key[0] == "heldout" and key[2] == "generator" and key[3] == 1:
            appended.append(key)
            if len(appended) == 2:
                raise KeyboardInterrupt("simulated crash")
        return record

    monkeypatch.setattr(Journal, "append", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_args(tiny_model_path, crashed, **HELDOUT))
    monkeypatch.setattr(Journal, "append", original)
    trained = []
    batched = BatchedTTT.apply
    monkeypatch.setattr(
        BatchedTTT, "apply", lambda self, jobs, seeds: trained.extend(seeds) or batched(self, jobs, seeds)
    )
    resumed = run(tiny_args(tiny_model_path, crashed, **HELDOUT))
    heldout_runs = 2 * 2 * 2  # points 1 and 2, 2 passages x 2 self-edits (round 1's own TTT runs besides)
    round_1 = len([r for r in read_jsonl(clean / "round_1" / "self_edits.jsonl") if r["status"] == "ok"])
    assert len(trained) == heldout_runs - 2 + round_1  # the 2 journaled held-out TTTs were not redone
    got = json.loads((crashed / "heldout" / "results.json").read_text())["tables"]["sample"]
    assert [r["per_passage"] for r in got] == [r["per_passage"] for r in rows]
    assert [s["heldout_sample_acc"] for s in resumed] == [s["heldout_sample_acc"] for s in summaries]


def test_heldout_passages_that_are_trained_on_are_refused_before_models_load(
    tiny_model_path, tmp_path, monkeypatch
):
    monkeypatch.setattr("seal.runtime.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = tiny_args(tiny_model_path, tmp_path / "run", **{**HELDOUT, "heldout_split": "eval"})
    with pytest.raises(DataValidationError, match="held-out passages must never be trained on"):
        run(args)
