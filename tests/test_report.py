"""The evaluation's Markdown: no column that says nothing; measured stage times in a table of their own."""

from seal.report import markdown_results, markdown_timing
from seal.stats import Interval


def row(condition: str, **extra) -> dict:
    return {"condition": condition, "accuracy": Interval(0.5, 0.4, 0.6, 10).to_dict(), **extra}


def header(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("| condition"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_minutes_column_only_when_some_row_has_minutes():
    untimed = markdown_results([row("base"), row("passage")], grader="contains")
    assert header(untimed) == [
        "condition",
        "passages",
        "questions",
        "accuracy (95% CI)",
        "Δ vs base (95% CI)",
        "p",
    ]
    timed = markdown_results([row("base", minutes=1.25), row("passage")], grader="contains")
    assert header(timed)[-1] == "minutes"
    assert timed.splitlines()[-1].rstrip(" |").endswith("–")  # the row without a time


def test_timing_table_marks_unmeasured_stages():
    text = markdown_timing({"sampling: base_generator": 3.21, "TTT + answers": None, "total": None})
    assert "| sampling: base_generator | 3.2 |" in text and "| TTT + answers | – |" in text
    assert "not measured" in text
    assert "not measured" not in markdown_timing({"base answers": 0.4, "total": 0.4})
