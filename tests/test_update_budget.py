"""scripts/update_budget.py: a round's update redone from its kept.jsonl with overridden SFT settings."""

import json
import sys
from pathlib import Path

import pytest

from seal.update import Update
from seal.utils import write_jsonl
from tests.conftest import load_script
from tests.test_update import KEPT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def budget():
    return load_script("update_budget")


def run(budget, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["update_budget.py", *map(str, argv)])
    budget.main()


def test_the_update_uses_the_overrides_and_is_read_back(
    budget, tiny_model_path, tmp_path, monkeypatch, capsys
):
    kept = tmp_path / "kept.jsonl"
    write_jsonl(kept, KEPT)
    recipe = ROOT / "recipes" / "knowledge" / "smollm2-135m-cpu.yaml"
    argv = ["--config", recipe, "--kept", kept, "--out", tmp_path / "b"]
    overrides = ["--model_name_or_path", tiny_model_path, "--num_train_epochs", "3", "--report_to", "none"]
    seen = []

    def spy(*args, **kwargs):  # the real update, recording the SFT settings it was given
        seen.append(args[3])
        return real(*args, **kwargs)

    real = budget.update_generator
    monkeypatch.setattr(budget, "update_generator", spy)
    run(budget, monkeypatch, *argv, *overrides)
    assert [a.num_train_epochs for a in seen] == [3.0]  # the override, not the recipe's 2 epochs
    record = json.loads((tmp_path / "b" / "update" / "seal_update.json").read_text())
    assert record["kind"] == "adapter" and record["num_examples"] == 2
    assert (tmp_path / "b" / "update" / "generator" / "adapter_model.safetensors").is_file()
    assert "3 epochs" in capsys.readouterr().out

    weights = tmp_path / "b" / "update" / "generator" / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    run(budget, monkeypatch, *argv, *overrides)  # finished: read back, not retrained
    assert weights.stat().st_mtime_ns == before and len(seen) == 1


def test_a_kept_row_without_completion_is_named(budget, tmp_path, monkeypatch):
    kept = tmp_path / "kept.jsonl"
    write_jsonl(kept, [KEPT[0], {"prompt": "p"}])
    recipe = ROOT / "recipes" / "knowledge" / "smollm2-135m-cpu.yaml"
    with pytest.raises(SystemExit, match=r"kept.jsonl: record 1: field 'completion' missing"):
        run(budget, monkeypatch, "--config", recipe, "--kept", kept, "--out", tmp_path / "b")
    assert not (tmp_path / "b").exists()  # refused before any model is loaded


def round_rows():
    """A round's self_edits.jsonl: passage a's best beats passage-only TTT (0.5), passage b's does not."""
    row = {"status": "ok", "base_accuracy": 0.0}
    return [
        {**row, **KEPT[0], "passage_id": "a", "index": 0, "adapted_accuracy": 0.75, "reward": 0.75},
        {**row, **KEPT[1], "passage_id": "a", "index": 1, "adapted_accuracy": 0.25, "reward": 0.25},
        {**row, **KEPT[1], "passage_id": "b", "index": 0, "adapted_accuracy": 0.5, "reward": 0.5},
        {**row, **KEPT[0], "passage_id": "b", "index": 1, "adapted_accuracy": 0.0, "reward": 0.0},
    ]


def harness_passage_run(path, accuracy):
    """An evaluation harness run with the passage condition (answers.jsonl, one question per passage)."""
    path.mkdir()
    write_jsonl(
        path / "answers.jsonl",
        [
            {"setting": "single", "condition": "passage", "passage_id": pid, "self_edit": 0, "contains": v}
            for pid, v in accuracy.items()
        ],
    )
    return path


def test_self_edits_are_filtered_again_with_the_overridden_filter(budget, tmp_path, monkeypatch):
    rows = tmp_path / "self_edits.jsonl"
    write_jsonl(rows, round_rows())
    alone = harness_passage_run(tmp_path / "passage", {"a": 0.5, "b": 0.5})
    recipe = ROOT / "recipes" / "knowledge" / "smollm2-135m-cpu.yaml"
    seen = []

    def fake_update(base, kept, *args, **kwargs):  # training itself is the first test's
        seen.append(kept)
        return Update("adapter", "g", 1.0, len(kept))

    monkeypatch.setattr(budget, "update_generator", fake_update)
    monkeypatch.setattr(budget, "resolve_model_path", lambda *a: "base")
    argv = ["--config", recipe, "--self_edits", rows, "--out", tmp_path / "top1"]
    run(budget, monkeypatch, *argv)  # the recipe's filter: top-1 among rewards above 0
    assert [(r["passage_id"], r["index"]) for r in seen[0]] == [("a", 0), ("b", 0)]
    argv = ["--config", recipe, "--self_edits", rows, "--out", tmp_path / "beat", "--passage_only", alone]
    run(budget, monkeypatch, *argv, "--filter_beat_passage", "true")
    assert [(r["passage_id"], r["index"]) for r in seen[1]] == [("a", 0)]  # b's best only ties the passage
    written = [json.loads(line) for line in (tmp_path / "beat" / "kept.jsonl").read_text().splitlines()]
    assert written == seen[1] and written[0]["passage_accuracy"] == 0.5


def test_the_beat_passage_filter_needs_passage_only_ttt(budget, tmp_path):
    rows = tmp_path / "self_edits.jsonl"
    write_jsonl(rows, round_rows())
    cfg = budget.FilterConfig(filter_beat_passage=True)
    with pytest.raises(SystemExit, match="needs --passage_only"):
        budget.refiltered(str(rows), cfg, None)
    partial = harness_passage_run(tmp_path / "passage", {"a": 0.5})
    with pytest.raises(SystemExit, match=r"no passage-only answers for passages \['b'\]"):
        budget.refiltered(str(rows), cfg, str(partial))


def test_a_self_edit_row_without_a_reward_is_named(budget, tmp_path):
    rows = tmp_path / "self_edits.jsonl"
    broken = round_rows()
    del broken[2]["reward"]
    write_jsonl(rows, broken)
    with pytest.raises(SystemExit, match=r"self_edits.jsonl: record 2: field 'reward' missing"):
        budget.refiltered(str(rows), budget.FilterConfig(), None)
