"""scripts/compare_self_edits.py: reading loop rounds and harness runs, pairing them by passage."""

import pytest

from seal.data import load_passages
from seal.utils import write_jsonl
from tests.conftest import load_script


@pytest.fixture(scope="module")
def cmp():
    return load_script("compare_self_edits")


@pytest.fixture(scope="module")
def passages():
    return load_passages("sample", split="eval", limit=3)


def loop_round(path, rows):
    """A loop round's self_edits.jsonl: rows of (passage id, status, adapted, base accuracy)."""
    path.mkdir()
    write_jsonl(
        path / "self_edits.jsonl",
        [
            {
                "passage_id": p,
                "index": i,
                "status": s,
                "completion": "The lighthouse keeper rows.",
                "adapted_accuracy": a,
                "base_accuracy": b,
            }
            for i, (p, s, a, b) in enumerate(rows)
        ],
    )
    return path


def harness_run(path, edits, no_context=None, passage=None):
    """A harness run: generations_trained_generator.jsonl and answers.jsonl (two questions per self-edit)."""
    path.mkdir()
    gens, answers = [], []
    for (pid, index), (status, grades) in edits.items():
        gens.append({"passage_id": pid, "index": index, "status": status, "completion": "Keeper rows."})
        answers += [
            {
                "setting": "single",
                "condition": "trained_generator",
                "passage_id": pid,
                "self_edit": index,
                "contains": g,
            }
            for g in grades
        ]
    for condition, by_passage in (("trained_base", no_context or {}), ("passage", passage or {})):
        answers += [
            {"setting": "single", "condition": condition, "passage_id": pid, "self_edit": 0, "contains": v}
            for pid, v in by_passage.items()
        ]
    write_jsonl(path / "generations_trained_generator.jsonl", gens)
    write_jsonl(path / "answers.jsonl", answers)
    return path


def test_sources_are_paired_on_the_passages_all_of_them_score(cmp, passages, tmp_path):
    a, b, c = (p.id for p in passages)
    loop = loop_round(
        tmp_path / "round_0",
        [(a, "ok", 0.5, 0.0), (a, "ok", 0.25, 0.0), (b, "ok", 0.0, 0.25), (c, "ok", 1.0, 0.0)],
    )
    # passage c has no parsed self-edit here, so only a and b are compared
    run = harness_run(
        tmp_path / "eval",
        {(a, 0): ("ok", [1.0, 1.0]), (b, 0): ("ok", [0.5, 0.0]), (c, 0): ("unparseable", [1.0, 1.0])},
        no_context={a: 0.5, b: 0.0, c: 0.0},
    )
    result = cmp.compare([cmp.read_source(f"loop={loop}"), cmp.read_source(f"eval={run}")], passages)
    assert (result["passages"], result["of"]) == (2, 3)
    first, second = result["rows"]
    assert first["adapted"]["mean"] == pytest.approx((0.375 + 0.0) / 2)
    assert first["reward"]["mean"] == pytest.approx((0.375 - 0.25) / 2)
    assert second["adapted"]["mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert second["reward"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    assert second["adapted_vs_first"]["mean"] == pytest.approx(((1.0 - 0.375) + 0.25) / 2)
    assert second["reward_vs_first"]["mean"] == pytest.approx(((0.5 - 0.375) + (0.25 + 0.25)) / 2)
    assert (second["parsed"], second["self_edits"]) == (2, 2) and first["adapted_vs_first"] is None
    assert second["described"] == 2 and second["edit_words"] == 2


def test_without_a_no_context_row_the_reward_is_not_invented(cmp, passages, tmp_path):
    a = passages[0].id
    run = harness_run(tmp_path / "teacher", {(a, 0): ("ok", [0.5, 0.5])})
    loop = loop_round(tmp_path / "round_0", [(a, "ok", 0.0, 0.0)])
    result = cmp.compare([cmp.read_source(f"loop={loop}"), cmp.read_source(f"t={run}")], passages[:1])
    teacher = result["rows"][1]
    assert teacher["reward"] is None and teacher["no_context"] is None and teacher["reward_vs_first"] is None
    assert teacher["adapted_vs_first"]["mean"] == pytest.approx(0.5)
    assert "| t | 1/1 | – |" in cmp.to_markdown(result)


def test_unparsed_self_edits_count_as_the_passage_alone_on_request(cmp, passages, tmp_path):
    a = passages[0].id
    loop = loop_round(tmp_path / "round_0", [(a, "ok", 0.5, 0.0), (a, "unparseable", 0.0, 0.0)])
    # the harness trained the passage alone for its unparsed self-edit: that score is kept as it is
    run = harness_run(
        tmp_path / "eval",
        {(a, 0): ("unparseable", [1.0, 0.0]), (a, 1): ("ok", [0.0, 0.0])},
        passage={a: 0.25},
    )
    sources = [cmp.read_source(f"loop={loop}"), cmp.read_source(f"eval={run}")]
    parsed_only = cmp.compare(sources, passages[:1])
    assert [r["adapted"]["mean"] for r in parsed_only["rows"]] == [0.5, 0.0]
    with_passage = cmp.compare(sources, passages[:1], passage_only={a: 0.25})
    assert [r["adapted"]["mean"] for r in with_passage["rows"]] == [pytest.approx(0.375), 0.25]
    assert with_passage["passage_only"]["mean"] == 0.25
    assert with_passage["rows"][0]["adapted_vs_passage"]["mean"] == pytest.approx(0.125)


@pytest.mark.parametrize("spec", ["no-equals-sign", "=somewhere", "label= "])
def test_a_malformed_source_is_refused(cmp, spec):
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        cmp.read_source(spec)


def test_a_directory_that_is_neither_run_is_refused(cmp, tmp_path):
    with pytest.raises(SystemExit, match="neither a loop round"):
        cmp.read_source(f"x={tmp_path}")


def test_a_harness_run_with_two_self_edit_conditions_needs_one_named(cmp, passages, tmp_path):
    run = harness_run(tmp_path / "eval", {(passages[0].id, 0): ("ok", [1.0])})
    write_jsonl(run / "generations_base_generator.jsonl", [])
    with pytest.raises(SystemExit, match="name the condition"):
        cmp.read_source(f"x={run}")
    assert cmp.read_source(f"x={run}#trained_generator")["path"].endswith("#trained_generator")
