"""seal.describe: length, copied sentences and novel content words of a self-edit against its passage."""

import pytest

from seal.data import QA, Passage
from seal.describe import describe, describe_all, describe_rows, sentences

PASSAGE = "Lantern Tide\nThe Merrowick lantern was lit in 1821. It burned whale oil until 1890."


def test_sentences_split_at_stops_and_line_breaks():
    assert sentences("One two. Three!\n- four five?") == [["one", "two"], ["three"], ["four", "five"]]


def test_a_copied_sentence_and_a_new_fact():
    d = describe("The Merrowick lantern was lit in 1821.\nIt was painted red by sailors.", PASSAGE)
    assert d["edit_words"] == 7 + 6
    assert d["edit_copied"] == 0.5  # the first sentence occurs verbatim, the second does not
    # content words of the self-edit: merrowick lantern lit 1821 painted red sailors -> 3 of 7 are new
    assert d["edit_novel"] == pytest.approx(3 / 7)


def test_reordered_words_are_not_a_copy_and_case_and_punctuation_do_not_matter():
    assert describe("lit in 1821, the Merrowick lantern was", PASSAGE)["edit_copied"] == 0.0
    assert describe("THE MERROWICK LANTERN -- WAS LIT IN 1821", PASSAGE)["edit_copied"] == 1.0


def test_non_ascii_words_are_words():
    d = describe("Zürich liegt am See.", "Zürich liegt am Zürichsee.")
    assert d["edit_words"] == 4 and d["edit_novel"] == pytest.approx(1 / 3)  # "am": a stopword; "see": new


def test_empty_self_edits_are_not_described():
    assert describe("  \n ...", PASSAGE) is None
    assert describe_all([("", PASSAGE)]) == {
        "described": 0,
        "edit_words": None,
        "edit_copied": None,
        "edit_novel": None,
    }


def test_rows_use_their_own_passage_and_skip_unparsed_ones():
    passages = {
        "a": Passage("a", "Lantern Tide", PASSAGE.split("\n", 1)[1], [QA("q", ["a"])]),
        "b": Passage("b", "Other", "Nothing in common here.", [QA("q", ["a"])]),
    }
    rows = [
        {"passage_id": "a", "completion": "The Merrowick lantern was lit in 1821.", "status": "ok"},
        {"passage_id": "b", "completion": "The Merrowick lantern was lit in 1821.", "status": "ok"},
        {"passage_id": "b", "completion": "garbage", "status": "unparseable"},
    ]
    d = describe_rows(rows, passages)
    assert d["described"] == 2
    assert d["edit_copied"] == 0.5  # copied from a, not from b
    assert d["edit_novel"] == pytest.approx((0 + 1) / 2)  # all new against b, none against a
