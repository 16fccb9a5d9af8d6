"""scripts/update_budget.py: a round's update redone from its kept.jsonl with overridden SFT settings."""

import json
import sys
from pathlib import Path

import pytest

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
