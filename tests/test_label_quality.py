"""scripts/label_quality.py: the curves per confidence measure, the support rule's own answers, the bound
every selection rule meets, and the rerun that reuses the answers."""

from __future__ import annotations

import sys

import pytest

from seal.utils import read_json, read_jsonl
from tests.conftest import load_script


@pytest.fixture(scope="module")
def quality():
    return load_script("label_quality")


def row(selection, agreement, f1, supported=True, answer="x"):
    return {
        "selection": selection, "answer": answer, "agreement": agreement, "token_prob": 1.0,
        "supported": supported, "f1": f1, "contains": float(f1 >= 0.5),
    }  # fmt: skip


def test_curves_threshold_each_measure_and_the_support_rule_uses_its_own_answers(quality):
    rows = [
        row("consensus", 0.8, 1.0, supported=False),
        row("consensus", 0.8, 0.0),
        row("consensus", 0.2, 0.0),
        row("consensus", 0.4, 1.0),
        row("grounded", 0.8, 1.0),  # the support rule picked another (supported) sample here
        row("grounded", 0.8, 0.0),
        row("grounded", 0.2, 1.0),
        row("grounded", 0.4, 0.0, supported=False),  # no supported sample: rejected whatever its agreement
    ]
    plain = {p["threshold"]: p for p in quality.curve(rows, "agreement", support=False)}
    assert (plain[0.0]["kept"], plain[0.0]["precision"]) == (4, 0.5)
    assert (plain[0.5]["kept"], plain[0.5]["coverage"], plain[0.5]["precision"]) == (2, 0.5, 0.5)
    assert plain[1.0]["kept"] == 0 and plain[1.0]["precision"] is None
    grounded = {p["threshold"]: p for p in quality.curve(rows, "agreement", support=True)}
    assert (grounded[0.0]["kept"], grounded[0.0]["coverage"], grounded[0.0]["precision"]) == (3, 0.75, 0.6667)
    assert (grounded[0.3]["kept"], grounded[0.3]["precision"]) == (2, 0.5)
    best = quality.best_point(quality.curve(rows, "agreement", support=True))
    assert best == grounded[0.0]  # thresholds 0..0.2 keep the same rows: the first wins


def test_label_quality_end_to_end_on_a_tiny_model_and_rerun_from_its_answers(
    quality, tiny_model_path, tmp_path, monkeypatch
):
    out = tmp_path / "quality"
    argv = [
        "label_quality.py", "--data", "sample", "--split", "eval", "--num_passages", "2",
        "--model", tiny_model_path, "--backend", "hf", "--samples", "3", "--max_new_tokens", "6",
        "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    results = read_json(out / "results.json")
    assert (results["questions"], results["passages"]) == (8, 2)
    rows = read_jsonl(out / "labels.jsonl")
    by = {s: [r for r in rows if r["selection"] == s] for s in ("consensus", "grounded")}
    assert [r["question"] for r in by["consensus"]] == [r["question"] for r in by["grounded"]]
    assert [r["samples"] for r in by["consensus"]] == [r["samples"] for r in by["grounded"]]  # judged twice
    for plain, grounded in zip(by["consensus"], by["grounded"], strict=True):
        assert grounded["answer"] in [*plain["samples"], ""]
        if plain["supported"]:  # a supported plain consensus is also the support rule's choice
            assert grounded["answer"] == plain["answer"]
    assert results["any_sample_correct"] == pytest.approx(
        sum(r["any_sample_correct"] for r in by["consensus"]) / 8, abs=1e-4
    )
    assert results["precision_bound_at_goal_coverage"] == pytest.approx(
        min(1.0, results["any_sample_correct"] / 0.5), abs=1e-4
    )
    assert set(results["curves"]) == {f"{m}{s}" for m in quality.MEASURES for s in ("", " + support")}
    assert (out / "precision_coverage.png").stat().st_size > 0
    assert "at least one correct sample" in (out / "results.md").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun with the same arguments reuses labels.jsonl")

    monkeypatch.setattr(quality, "build_labeller", no_model)
    quality.main()
    assert read_json(out / "results.json") == results
