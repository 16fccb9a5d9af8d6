"""scripts/reward_noise.py: the variance split and the top-1 agreement it reports."""

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def noise():
    return load_script("reward_noise")


def test_pure_seed_noise_has_no_self_edit_share(noise):
    # both self-edits of each passage are the same draw of noise: their means differ only by it
    acc = {"a": {0: [0.0, 0.5], 1: [0.5, 0.0]}, "b": {0: [0.25, 0.25], 1: [0.25, 0.25]}}
    parts = noise.variance_components(acc)
    assert parts["self_edit_share"] == 0.0 and parts["within_sd"] > 0


def test_noise_free_differences_are_all_self_edit(noise):
    acc = {"a": {0: [0.5, 0.5, 0.5], 1: [0.0, 0.0, 0.0]}, "b": {0: [0.2] * 3, 1: [0.6] * 3}}
    parts = noise.variance_components(acc)
    assert parts["within_sd"] == 0.0 and parts["self_edit_share"] == 1.0
    assert parts["between_sd"] == pytest.approx(((0.125 + 0.08) / 2) ** 0.5)  # sample variance of 2 means


def test_top1_agreement_compares_seed_0_with_the_other_seeds(noise):
    acc = {
        "a": {0: [0.5, 0.5, 0.5], 1: [0.0, 0.0, 0.0]},  # agree: self-edit 0
        "b": {0: [0.5, 0.0, 0.0], 1: [0.0, 0.5, 0.5]},  # seed 0 picks 0, the others 1
    }
    assert noise.top1_agreement(acc) == 0.5
    assert noise.top1_agreement({"a": {0: [0.5], 1: [0.0]}}) is None  # one seed: nothing to compare


def test_selection_gain_scores_one_seeds_pick_with_the_others(noise):
    # seed 0 picks self-edit 0 (a tie, broken low), which seeds 1-2 score 0.0 against their mean of 0.25;
    # seeds 1 and 2 pick self-edit 1, which the other two seeds score 0.5 against a mean of 0.375
    acc = {"a": {0: [0.5, 0.0, 0.0], 1: [0.5, 0.5, 0.5]}}
    gain = noise.selection_gain(acc)
    picks = [0.0 - 0.25, 0.5 - 0.375, 0.5 - 0.375]
    assert gain["pick_gain"] == pytest.approx(sum(picks) / 3)
    assert gain["oracle_gain"] == pytest.approx((0.25 + 0.125 + 0.125) / 3)
    assert noise.selection_gain({"a": {0: [0.5, 0.5]}}) is None  # one self-edit: no choice to make
