"""Bootstrap statistics (seal.stats) and the results table / chart (seal.report); no torch needed."""

from __future__ import annotations

import numpy as np
import pytest

from seal.report import bar_chart, markdown_results
from seal.stats import Interval, PairedDifference, bootstrap_ci, paired_difference


def _scores(n: int, seed: int = 1) -> list[float]:
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=n).tolist()


def test_ci_contains_mean_and_narrows_with_more_data():
    small = bootstrap_ci(_scores(20), n_resamples=2000)
    large = bootstrap_ci(_scores(500), n_resamples=2000)
    for ci in (small, large):
        assert ci.low <= ci.mean <= ci.high
        assert ci.low < ci.high
    assert small.n == 20 and large.n == 500
    assert large.high - large.low < small.high - small.low


def test_bootstrap_is_deterministic_given_seed():
    values = _scores(40)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)
    assert paired_difference(values, values[::-1], seed=3) == paired_difference(values, values[::-1], seed=3)


def test_constant_and_single_value_give_zero_width():
    ci = bootstrap_ci([0.25] * 30)
    assert ci.low == ci.mean == ci.high == pytest.approx(0.25)
    one = bootstrap_ci([0.6])
    assert (one.mean, one.low, one.high, one.n) == (0.6, 0.6, 0.6, 1)


def test_interval_to_dict_and_str():
    ci = Interval(mean=0.347, low=0.301, high=0.392, n=50)
    assert str(ci) == "0.347 [0.301, 0.392]"
    assert ci.to_dict() == {"mean": 0.347, "low": 0.301, "high": 0.392, "n": 50}
    d = PairedDifference(mean=0.042, low=0.01, high=0.075, n=50, p_value=0.01)
    assert d.to_dict()["p_value"] == 0.01
    assert str(d).startswith("+0.042 [+0.010, +0.075]")


def test_paired_difference_of_identical_lists_is_zero():
    values = _scores(30)
    d = paired_difference(values, values)
    assert (d.mean, d.low, d.high, d.n) == (0.0, 0.0, 0.0, 30)
    assert d.p_value == 1.0


def test_paired_difference_detects_a_clear_shift():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 0.6, size=50)
    b = a + 0.3 + rng.normal(0.0, 0.1, size=50)
    d = paired_difference(a.tolist(), b.tolist())
    assert d.low > 0.0
    assert d.low <= d.mean <= d.high
    assert d.mean == pytest.approx(0.3, abs=0.05)
    assert d.p_value < 0.01
    # Swapping the conditions flips the sign.
    assert paired_difference(b.tolist(), a.tolist()).high < 0.0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="len\\(a\\)=3.*len\\(b\\)=2"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="empty"):
        paired_difference([], [])


def _rows() -> list[dict]:
    return [
        {
            "condition": "base",
            "accuracy": Interval(0.347, 0.301, 0.392, 50).to_dict(),
            "delta_vs_base": None,
            "passages": 50,
            "questions": 250,
            "minutes": 1.25,
        },
        {
            "condition": "passage",
            "accuracy": Interval(0.389, 0.342, 0.437, 50).to_dict(),
            "delta_vs_base": PairedDifference(0.042, 0.010, 0.075, 50, 0.0123).to_dict(),
            "passages": 50,
            "questions": 250,
            "minutes": 12.0,
        },
        {
            "condition": "self-edit",
            "accuracy": Interval(0.30, 0.25, 0.35, 50).to_dict(),
            "delta_vs_base": PairedDifference(-0.047, -0.09, -0.004, 50, 0.0).to_dict(),
        },
    ]


def test_markdown_results_table():
    text = markdown_results(_rows(), grader="contains", title="SQuAD no-context")
    lines = text.strip().splitlines()
    assert "Grader: contains" in lines[0] and "SQuAD no-context" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3  # header, separator, three rows
    assert "accuracy (95% CI)" in table[0] and "Δ vs base (95% CI)" in table[0]
    base, passage, self_edit = ([c.strip() for c in row.strip("|").split("|")] for row in table[2:])
    assert base == ["base", "50", "250", "34.7 [30.1, 39.2]", "–", "–", "1.2"]
    assert passage[3] == "38.9 [34.2, 43.7]"
    assert passage[4] == "+4.2 [+1.0, +7.5]"
    assert passage[5] == "0.012"
    assert self_edit[4] == "-4.7 [-9.0, -0.4]"
    assert self_edit[5] == "<0.001"
    assert self_edit[1] == self_edit[2] == self_edit[6] == "–"
    assert markdown_results(_rows(), grader="contains").splitlines()[0] == "Grader: contains"


def test_bar_chart_writes_png(tmp_path):
    out = bar_chart(_rows(), tmp_path / "plots" / "accuracy.png", grader="contains", title="test")
    assert out == tmp_path / "plots" / "accuracy.png"
    assert out.read_bytes().startswith(b"\x89PNG")
