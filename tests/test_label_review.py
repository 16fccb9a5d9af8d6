"""Review of pseudo-labels: the page in a real browser (accept, reject, correct, export), the decisions
validated and applied, and a label-free round that waits for them."""

import json
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By

from seal.config import ReviewConfig
from seal.data import load_passages
from seal.label import PseudoLabel
from seal.label_review import (
    apply_label_decisions,
    import_label_decisions,
    page_id,
    read_label_decisions,
    render_label_page,
    review_labels,
    write_label_page,
)
from seal.review import LABEL_FORMAT, ReviewError
from seal.utils import read_jsonl, write_jsonl
from tests.test_review import browser, click, export  # noqa: F401  (browser is a fixture)


def label(question, answer, kept, confidence=0.8, supported=True):
    return PseudoLabel(
        question, answer, [answer] * 3, confidence, None, supported, confidence, kept
    ).to_dict()


def records():
    ferry = {
        "id": "ferry.txt#0",
        "title": "Quillon ferry",
        "context": "The ferry <b>Bright Heron</b> was built in 1987 at the Castell yard.",
        "questions": [
            label("When was it built?", "1987", True),
            label("Where was it built?", "Castell", True),
        ],
        "rejected": [label("Who owns it?", "<script>alert(1)</script>", False, 0.3, supported=False)],
    }
    fell = {
        "id": "fell.md#0",
        "title": "Tolland Fell",
        "context": "The observatory stands 412 metres up.",
        "questions": [],
        "rejected": [label("How high?", "412", False, 0.4)],
    }
    return [ferry, fell]


def folder_with(tmp_path: Path) -> Path:
    folder = tmp_path / "round_0"
    folder.mkdir()
    write_jsonl(folder / "labels.jsonl", records())
    return folder


def test_label_page_in_chromium_accepts_rejects_corrects_and_exports(browser, tmp_path):  # noqa: F811
    driver, downloads = browser
    folder = folder_with(tmp_path)
    driver.get(write_label_page(folder).resolve().as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "#labels tbody tr")
    assert len(rows) == 4 and driver.find_element(By.ID, "n-accepted").text == "2"  # the threshold's choice
    assert not driver.find_elements(By.CSS_SELECTOR, "#labels script")  # model text stays text

    def row(question):
        return next(r for r in rows if r.get_attribute("data-question") == question)

    click(driver, row("When was it built?").find_element(By.CSS_SELECTOR, "button[data-decision='reject']"))
    click(driver, row("How high?").find_element(By.CSS_SELECTOR, "button[data-decision='accept']"))
    field = row("Where was it built?").find_element(By.CSS_SELECTOR, "input.answer")
    field.clear()
    field.send_keys("the Castell yard")
    assert row("Where was it built?").find_element(By.CSS_SELECTOR, ".corrected").is_displayed()
    assert driver.find_element(By.ID, "n-accepted").text == "2"
    exported = json.loads(export(driver, downloads).read_text())
    assert exported["format"] == LABEL_FORMAT and exported["page_id"] == page_id(records(), folder.name)
    by_q = {d["question"]: d for d in exported["decisions"]}
    assert by_q["When was it built?"]["decision"] == "reject"
    assert by_q["Where was it built?"] == {
        "passage_id": "ferry.txt#0", "question": "Where was it built?", "decision": "correct",
        "answer": "the Castell yard",
    }  # fmt: skip
    assert by_q["How high?"]["decision"] == "accept" and by_q["Who owns it?"]["decision"] == "reject"

    decisions = tmp_path / "decisions.json"
    decisions.write_text(json.dumps(exported))
    import_label_decisions(folder, decisions)
    reviewed = {p.id: p for p in load_passages(str(folder / "reviewed.jsonl"))}  # gold-format data
    assert [(q.question, q.answer) for q in reviewed["ferry.txt#0"].questions] == [
        ("Where was it built?", "the Castell yard")
    ]
    assert [q.answer for q in reviewed["fell.md#0"].questions] == ["412"]
    stored = read_jsonl(folder / "reviewed.jsonl")[0]["questions"][0]
    assert stored["corrected"] and stored["reviewed"]


def test_page_escapes_text_and_allows_only_its_own_script():
    html = render_label_page(records(), "round_0", "runs/x/round_0")
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>Bright Heron</b>" not in html and html.count("<script>") == 1
    assert "script-src &#39;sha256-" in html and "default-src &#39;none&#39;" in html


def write(tmp_path, decisions, **extra):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"format": LABEL_FORMAT, "decisions": decisions, **extra}))
    return path


@pytest.mark.parametrize(
    "decision, message",
    [
        (
            {"passage_id": "nope", "question": "How high?", "decision": "accept"},
            "field 'passage_id': no such",
        ),
        ({"passage_id": "fell.md#0", "question": "Why?", "decision": "accept"}, "field 'question': no such"),
        ({"passage_id": "fell.md#0", "question": "How high?", "decision": "maybe"}, "field 'decision'"),
        ({"passage_id": "fell.md#0", "question": "How high?", "decision": "correct"}, "field 'answer'"),
        ({"passage_id": "fell.md#0", "question": "How high?", "decision": "accept", "x": 1}, "unknown field"),
    ],
)
def test_reader_names_file_record_and_field(tmp_path, decision, message):
    path = write(tmp_path, [decision])
    with pytest.raises(ReviewError, match=rf"d.json: record 0 \(passage_id=.*{message}"):
        read_label_decisions(path, records())


def test_reader_refuses_other_files_and_duplicates(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"round": 0, "decisions": []}))  # a self-edit review's export
    with pytest.raises(ReviewError, match="not a label review export"):
        read_label_decisions(path, records())
    twice = [{"passage_id": "fell.md#0", "question": "How high?", "decision": "accept"}] * 2
    with pytest.raises(ReviewError, match="record 1 .*a second decision"):
        read_label_decisions(write(tmp_path, twice), records())


def test_unlisted_labels_keep_the_thresholds_choice():
    out = apply_label_decisions(records(), {("fell.md#0", "How high?"): ("reject", None)})
    assert [q["question"] for q in out[0]["questions"]] == ["When was it built?", "Where was it built?"]
    assert not any(q["reviewed"] for q in out[0]["questions"]) and out[1]["rejected"][0]["reviewed"]


def test_loop_review_waits_then_imports_the_matching_export(tmp_path):
    folder = folder_with(tmp_path)
    assert review_labels(folder, ReviewConfig(review=True)) is None
    assert (folder / "labels_review.html").is_file()
    other = write(tmp_path, [], page_id="someone-elses")
    assert review_labels(folder, ReviewConfig(review=True, review_decisions=str(other))) is None
    accept = [{"passage_id": "fell.md#0", "question": "How high?", "decision": "accept"}]
    mine = write(tmp_path, accept, page_id=page_id(records(), folder.name))
    reviewed = review_labels(folder, ReviewConfig(review=True, review_decisions=str(mine)))
    assert [q["answer"] for q in reviewed[1]["questions"]] == ["412"]
    assert review_labels(folder, ReviewConfig(review=True)) == reviewed  # stored: final for the round
