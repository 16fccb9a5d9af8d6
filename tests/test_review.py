"""Human review: the HTML page in a real headless Chromium (sort, accept/reject, export), the decisions
reader, and the loop's update training only on accepted self-edits.

Needs Debian's chromium and chromium-driver (`scripts/install_test_deps.sh`, run by `make test`); the tests
fail, not skip, without them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from seal import loop as loop_module
from seal.cli import main as cli_main
from seal.config import ReviewConfig
from seal.data import DataValidationError
from seal.loop import run
from seal.review import (
    ReviewError,
    import_decisions,
    load_review,
    read_decisions,
    render_page,
    review_round,
    write_page,
)
from seal.utils import read_jsonl, write_jsonl
from tests.test_loop import tiny_args

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">"quoted" & </pre></td>'


def rows_fixture() -> list[dict]:
    """Four self-edits of two passages; the filter kept one per passage; one is empty; one is hostile."""
    base = {"prompt": "Write implications.", "examples": [], "base_accuracy": 0.0, "answers": [["a", "b"]]}
    table = [  # passage_id, index, completion, status, reward, kept
        ("p1", 0, "1. fact", "ok", 0.25, True),
        ("p1", 1, EVIL, "ok", 0.5, False),
        ('p"2<b>', 0, "", "empty", 0.0, False),
        ('p"2<b>', 1, "2. other", "ok", -0.25, True),
    ]
    keys = ("passage_id", "index", "completion", "status", "reward", "kept")
    rows = [{**base, **dict(zip(keys, values, strict=True))} for values in table]
    for row in rows:
        row["adapted_accuracy"] = max(row["reward"], 0.0)
    return rows


def round_dir_with(tmp_path: Path, rows: list[dict]) -> Path:
    round_dir = tmp_path / "run" / "round_0"
    write_jsonl(round_dir / "self_edits.jsonl", rows)
    return round_dir


# ------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven by Selenium; downloads go to a fresh directory (CDP)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/install_test_deps.sh (Debian's chromium)")
    root = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={root / 'profile'}",
    ):
        options.add_argument(flag)
    # An explicit chromedriver: Selenium Manager never looks for (or downloads) a driver.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    downloads = root / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    yield driver, downloads
    driver.quit()


def click(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def table(driver) -> list[tuple[str, int, float, str]]:
    """(passage_id, index, reward, decision) per table row, in display order."""
    return [
        (
            tr.get_attribute("data-passage-id"),
            int(tr.get_attribute("data-index")),
            float(tr.get_attribute("data-reward")),
            tr.get_attribute("data-decision"),
        )
        for tr in driver.find_elements(By.CSS_SELECTOR, "#edits tbody tr")
    ]


def decide(driver, passage_id: str, index: int, decision: str) -> None:
    for tr in driver.find_elements(By.CSS_SELECTOR, "#edits tbody tr"):
        if tr.get_attribute("data-passage-id") == passage_id and tr.get_attribute("data-index") == str(index):
            click(driver, tr.find_element(By.CSS_SELECTOR, f"button[data-decision='{decision}']"))
            return
    raise AssertionError(f"no row {passage_id}/{index}")


def export(driver, downloads: Path) -> Path:
    """Click 'Export decisions' and wait for the downloaded file."""
    for old in downloads.iterdir():
        old.unlink()
    click(driver, driver.find_element(By.ID, "export"))
    deadline = time.time() + 15
    while time.time() < deadline:
        done = [p for p in downloads.iterdir() if p.suffix == ".json"]
        if done:
            time.sleep(0.2)  # let the write finish
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no download in {downloads}: {list(downloads.iterdir())}")


def test_page_sorts_decides_and_exports_in_chromium(browser, tmp_path):
    driver, downloads = browser
    rows = rows_fixture()
    round_dir = round_dir_with(tmp_path, rows)
    page = write_page(round_dir)
    driver.get(page.resolve().as_uri())

    # Model text is shown as text, never run as markup.
    assert driver.execute_script("return window.pwned === undefined")
    assert EVIL in driver.find_element(By.CSS_SELECTOR, "#edits tbody tr:nth-child(2) .edit").text
    assert driver.find_elements(By.CSS_SELECTOR, "#edits img") == []
    # The filter's choice is preselected; an empty self-edit cannot be accepted.
    assert [r[3] for r in table(driver)] == ["accept", "reject", "reject", "accept"]
    assert driver.find_element(By.ID, "n-accepted").text == "2"
    empty = driver.find_element(By.CSS_SELECTOR, "tr[data-acceptable='false']")
    assert not empty.find_element(By.CSS_SELECTOR, "button[data-decision='accept']").is_enabled()

    # Sort by reward: descending, then ascending; then back to passage order.
    header = driver.find_element(By.CSS_SELECTOR, "th[data-sort='reward'] button")
    click(driver, header)
    assert [r[2] for r in table(driver)] == [0.5, 0.25, 0.0, -0.25]
    reward_th = driver.find_element(By.CSS_SELECTOR, "th[data-sort='reward']")
    assert reward_th.get_attribute("aria-sort") == "descending"
    click(driver, header)
    assert [r[2] for r in table(driver)] == [-0.25, 0.0, 0.25, 0.5]

    # Accept the hostile-but-best self-edit, reject one the filter kept.
    decide(driver, "p1", 1, "accept")
    decide(driver, 'p"2<b>', 1, "reject")
    assert driver.find_element(By.ID, "n-accepted").text == "2"
    exported = json.loads(export(driver, downloads).read_text())
    assert exported["round"] == 0 and exported["run"] == "run" and exported["format"] == "seal-review"
    assert exported["decisions"] == [  # passage order, whatever the display order
        {"passage_id": "p1", "index": 0, "decision": "accept"},
        {"passage_id": "p1", "index": 1, "decision": "accept"},
        {"passage_id": 'p"2<b>', "index": 0, "decision": "reject"},
        {"passage_id": 'p"2<b>', "index": 1, "decision": "reject"},
    ]

    # Decisions survive a reload (kept in the browser); Reset goes back to the filter's choice. Chromium
    # hands localStorage writes to its storage service asynchronously, and a reload right after the last
    # click can still read the older state (1 run in ~10 of this module; the next reload showed them):
    # reload until they show, at most 5x.
    saved = ["accept", "accept", "reject", "reject"]
    for _ in range(5):
        driver.refresh()
        if [r[3] for r in table(driver)] == saved:
            break
        time.sleep(0.5)
    assert [r[3] for r in table(driver)] == saved
    click(driver, driver.find_element(By.ID, "reset"))
    assert [r[3] for r in table(driver)] == ["accept", "reject", "reject", "accept"]


def test_loop_update_trains_only_on_accepted(browser, tiny_model_path, tmp_path, monkeypatch):
    """A tiny-model round with review: true stops at review.html; a person flips every decision in
    Chromium, exports, imports with `seal review --decisions`; the rerun's update trains on the accepted."""
    driver, downloads = browser
    out = tmp_path / "run"
    args = tiny_args(tiny_model_path, out, num_rounds=1, review=True)
    assert run(args) == []  # stopped for review: no round finished
    round_dir = out / "round_0"
    assert (round_dir / "review.html").is_file()
    assert not (round_dir / "kept.jsonl").exists() and not (round_dir / "update").exists()

    rows = read_jsonl(round_dir / "self_edits.jsonl")
    driver.get((round_dir / "review.html").resolve().as_uri())
    want = set()
    for row in rows:  # the opposite of the filter, wherever possible
        if row["kept"]:
            decide(driver, row["passage_id"], row["index"], "reject")
        elif row["completion"].strip():
            decide(driver, row["passage_id"], row["index"], "accept")
            want.add((row["passage_id"], row["index"]))
    assert want, "the tiny model should leave some unkept non-empty self-edits"
    exported = shutil.copy(export(driver, downloads), tmp_path / "decisions.json")

    cli_main(["review", str(out), "--round", "0", "--decisions", str(exported)])
    assert load_review(round_dir)["accepted"] == len(want)

    trained_on = []
    original = loop_module.update_generator

    def spy(base_path, kept, *rest, **kw):
        trained_on.append({(k["passage_id"], k["index"]) for k in kept})
        return original(base_path, kept, *rest, **kw)

    monkeypatch.setattr(loop_module, "update_generator", spy)
    (summary,) = run(tiny_args(tiny_model_path, out, num_rounds=1, review=True))  # resumes after review
    assert trained_on == [want]
    assert {(k["passage_id"], k["index"]) for k in read_jsonl(round_dir / "kept.jsonl")} == want
    assert summary["kept"] == len(want)


# ------------------------------------------------------------------------------ page and reader, no browser


def test_page_escapes_model_text_and_allows_only_its_own_script():
    page = render_page(rows_fixture(), 'run"<x>', 0)
    assert "<script>window.pwned" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert 'data-passage-id="p&#34;2&lt;b&gt;"' in page and 'data-run="run&#34;&lt;x&gt;"' in page
    assert page.count("<script>") == 1 and "script-src &#39;sha256-" in page  # CSP: only the page's script
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


def write_decisions(tmp_path: Path, payload, name: str = "decisions.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def decision(passage_id, index, decision, **extra) -> dict:
    return {"passage_id": passage_id, "index": index, "decision": decision, **extra}


@pytest.mark.parametrize(
    "records, message",
    [
        ([decision("nope", 0, "accept")], r"record 0 \(passage_id='nope', index=0\): field 'passage_id'"),
        ([decision("p1", 7, "reject")], r"record 0 .*field 'index': no such self-edit"),
        ([decision("p1", "0", "accept")], r"field 'index': expected an integer"),
        ([decision("p1", 0, "maybe")], r"field 'decision': expected 'accept' or 'reject', got 'maybe'"),
        ([decision('p"2<b>', 0, "accept")], r"an empty self-edit cannot be accepted"),
        ([decision("p1", 0, "reject")] * 2, r"record 1 .*a second decision"),
        ([decision("p1", 0, "reject", why="x")], r"unknown field\(s\) 'why'"),
        ([["p1", 0, "accept"]], r"record 0: expected an object"),
        ({"round": 0}, r"field 'decisions' is missing"),
        ({"round": 3, "decisions": []}, r"field 'round': the file is for round 3, not round 0"),
    ],
)
def test_reader_names_file_record_and_field(tmp_path, records, message):
    path = write_decisions(tmp_path, records)
    with pytest.raises(ReviewError, match=message) as info:
        read_decisions(path, rows_fixture(), round_index=0)
    assert str(path) in str(info.value)


def test_unreadable_decisions_file_names_file_and_line(tmp_path):
    """Not JSON, or not UTF-8: a DataValidationError naming the file and the line, not a bare decode error."""
    path = write_decisions(tmp_path, '{"round": 0,\n "decisions": [}')
    with pytest.raises(DataValidationError, match=rf"{path}: line 2, column \d+: not valid JSON"):
        read_decisions(path, rows_fixture(), round_index=0)
    path.write_bytes(b'{"round": 0,\n "decisions": ["\xe9"]}')
    with pytest.raises(DataValidationError, match=rf"{path}: line 2, byte 29: not valid UTF-8"):
        read_decisions(path, rows_fixture(), round_index=0)


def test_import_defaults_to_the_filter_and_is_final(tmp_path):
    rows = rows_fixture()
    round_dir = round_dir_with(tmp_path, rows)
    path = write_decisions(tmp_path, {"round": 0, "decisions": [decision("p1", 1, "accept")]})
    record = import_decisions(round_dir, path)
    assert [d["decision"] for d in record["decisions"]] == ["accept", "accept", "reject", "accept"]
    assert [d["reviewed"] for d in record["decisions"]] == [False, True, False, False]
    assert load_review(round_dir) == record and record["accepted"] == 3
    assert import_decisions(round_dir, path) == record  # the same decisions again: fine
    other = write_decisions(tmp_path, [decision("p1", 0, "reject")], "other.json")
    with pytest.raises(ReviewError, match="already has other decisions"):
        import_decisions(round_dir, other)


def test_review_round_waits_then_imports_review_decisions(tmp_path):
    rows = rows_fixture()
    round_dir = round_dir_with(tmp_path, rows)
    assert review_round(round_dir, rows, ReviewConfig(review=True)) is None
    assert (round_dir / "review.html").is_file() and load_review(round_dir) is None
    # --review_decisions naming another round (e.g. the previous one's file, left on the command line) waits
    later = write_decisions(tmp_path, {"round": 1, "decisions": []}, "r1.json")
    assert review_round(round_dir, rows, ReviewConfig(review=True, review_decisions=str(later))) is None
    roundless = write_decisions(tmp_path, [], "bare.json")
    with pytest.raises(ReviewError, match="field 'round' is missing"):
        review_round(round_dir, rows, ReviewConfig(review=True, review_decisions=str(roundless)))
    mine = write_decisions(tmp_path, {"round": 0, "decisions": [decision("p1", 0, "reject")]}, "r0.json")
    accepted = review_round(round_dir, rows, ReviewConfig(review=True, review_decisions=str(mine)))
    assert [(r["passage_id"], r["index"]) for r in accepted] == [('p"2<b>', 1)]
    assert review_round(round_dir, rows, ReviewConfig(review=True)) == accepted  # stored: the rerun reuses it
