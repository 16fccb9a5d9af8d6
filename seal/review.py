"""Human review of a round's self-edits: a static HTML page to accept/reject them; the decisions read back.

    seal review runs/my-run                         # write round_<r>/review.html for the latest round
    seal review runs/my-run --decisions file.json   # validate the exported decisions -> round_<r>/review.json

The page is one self-contained file (no network): a table of the round's self-edits with their passage,
reward, accuracy and the filter's choice, sortable by reward or accuracy, with Accept/Reject per self-edit
(the filter's choice preselected) and an "Export decisions" button that downloads
`{"round": r, "decisions": [{"passage_id", "index", "decision"}]}`. All model text is HTML-escaped and a
Content-Security-Policy allows only the page's own script. With `review: true` in the recipe the loop stops
after each round's filter until that round has decisions, then trains the update on the accepted self-edits
only (`review_round`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from seal.config import ReviewConfig
from seal.data import SAMPLE, load_passages
from seal.utils import read_json, read_jsonl, write_json

logger = logging.getLogger("seal")

DECISIONS = ("accept", "reject")
PAGE = "review.html"
KEPT_BADGE = '<span class="badge kept">kept</span>'
REVIEWED = "review.json"
FORMAT = "seal-review"

Key = tuple[str, int]


class ReviewError(ValueError):
    """A decisions file that does not fit the round; the message names the file, the record and the field."""


# ---------------------------------------------------------------------------------------------- the page


_CSS = """
:root { color-scheme: light; --ok: #1a7f37; --no: #b42318; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328; }
header { position: sticky; top: 0; z-index: 2; background: #f6f8fa; border-bottom: 1px solid var(--line);
  padding: 10px 16px; display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: center; }
h1 { font-size: 17px; margin: 0; }
.stats { color: var(--muted); }
.stats b { color: #1f2328; }
.actions { margin-left: auto; display: flex; gap: 8px; }
.help { margin: 10px 16px; color: var(--muted); max-width: 110ch; }
code { background: #eff1f3; padding: 1px 4px; border-radius: 4px; font-size: 12.5px; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border-bottom: 1px solid var(--line); padding: 8px 10px; vertical-align: top; text-align: left; }
thead th { background: #fff; font-weight: 600; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th button.sort { font: inherit; font-weight: 600; border: 0; background: none; padding: 0; cursor: pointer; }
th button.sort::after { content: " \\2195"; color: var(--muted); }
th[aria-sort="descending"] button.sort::after { content: " \\2193"; color: #1f2328; }
th[aria-sort="ascending"] button.sort::after { content: " \\2191"; color: #1f2328; }
col.c-passage { width: 24%; } col.c-edit { width: 40%; } col.c-reward { width: 8%; }
col.c-acc { width: 10%; } col.c-filter { width: 6%; } col.c-decision { width: 12%; }
.title { font-weight: 600; }
.sub { color: var(--muted); font-size: 12.5px; }
details summary { cursor: pointer; color: var(--muted); font-size: 12.5px; }
details .context { white-space: pre-wrap; margin: 6px 0; }
ol.qa { margin: 4px 0; padding-left: 18px; font-size: 12.5px; }
ol.qa .gold { color: var(--ok); }
ol.qa .answer { color: var(--muted); }
.edit { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 16em; overflow: auto; margin: 0;
  font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.badge { display: inline-block; border-radius: 10px; padding: 0 7px; font-size: 12px; border: 1px solid; }
.badge.kept { color: var(--ok); border-color: var(--ok); }
.badge.status { color: var(--no); border-color: var(--no); margin-bottom: 4px; }
.neg { color: var(--no); } .pos { color: var(--ok); }
button { font: inherit; border: 1px solid var(--line); border-radius: 6px; background: #fff;
  padding: 4px 10px; cursor: pointer; }
button:hover { background: #f3f4f6; }
button.primary { background: #1f6feb; color: #fff; border-color: #1f6feb; }
.decide { display: flex; gap: 6px; flex-wrap: wrap; }
.decide button[aria-pressed="true"][data-decision="accept"] { background: var(--ok); color: #fff;
  border-color: var(--ok); }
.decide button[aria-pressed="true"][data-decision="reject"] { background: var(--no); color: #fff;
  border-color: var(--no); }
.decide button:disabled { opacity: .45; cursor: not-allowed; }
tr.accepted td:first-child { box-shadow: inset 4px 0 0 var(--ok); }
tr.rejected td:first-child { box-shadow: inset 4px 0 0 var(--no); }
tr.rejected .edit, tr.rejected .title { color: var(--muted); }
"""

_JS = """
(() => {
  const page = document.body.dataset;
  const tbody = document.querySelector('#edits tbody');
  const rows = Array.from(tbody.rows);
  const store = 'seal-review:' + page.pageId;
  const count = document.getElementById('n-accepted');

  const key = tr => tr.dataset.passageId + '\\u001f' + tr.dataset.index;
  const filterChoice = tr => (tr.dataset.kept === 'true' ? 'accept' : 'reject');

  function setDecision(tr, decision) {
    tr.dataset.decision = decision;
    tr.classList.toggle('accepted', decision === 'accept');
    tr.classList.toggle('rejected', decision === 'reject');
    for (const b of tr.querySelectorAll('button[data-decision]')) {
      b.setAttribute('aria-pressed', String(b.dataset.decision === decision));
    }
    count.textContent = rows.filter(r => r.dataset.decision === 'accept').length;
  }
  function save() {
    const state = {};
    for (const tr of rows) state[key(tr)] = tr.dataset.decision;
    try { localStorage.setItem(store, JSON.stringify(state)); } catch (e) { /* no storage: fine */ }
  }
  function reset() {
    for (const tr of rows) setDecision(tr, filterChoice(tr));
    save();
  }

  // Start from the decisions saved in this browser for this very page, else from the filter's choice.
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(store) || 'null'); } catch (e) { saved = null; }
  for (const tr of rows) {
    const d = saved ? saved[key(tr)] : undefined;
    const valid = d === 'reject' || (d === 'accept' && tr.dataset.acceptable === 'true');
    setDecision(tr, valid ? d : filterChoice(tr));
  }

  tbody.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-decision]');
    if (button && !button.disabled) {
      setDecision(button.closest('tr'), button.dataset.decision);
      save();
    }
  });
  document.getElementById('reset').addEventListener('click', reset);

  const headers = Array.from(document.querySelectorAll('#edits th[data-sort]'));
  for (const th of headers) {
    th.querySelector('button').addEventListener('click', () => {
      const key = th.dataset.sort;
      const current = th.getAttribute('aria-sort');
      const dir = key === 'order' ? 'ascending' : (current === 'descending' ? 'ascending' : 'descending');
      for (const other of headers) other.removeAttribute('aria-sort');
      th.setAttribute('aria-sort', dir);
      const sign = dir === 'ascending' ? 1 : -1;
      const value = (tr, k) => Number(tr.dataset[k]);
      const sorted = rows.slice().sort((a, b) =>
        sign * (value(a, key) - value(b, key)) || value(a, 'order') - value(b, 'order'));
      for (const tr of sorted) tbody.appendChild(tr);
    });
  }

  document.getElementById('export').addEventListener('click', () => {
    const payload = {
      format: page.format, run: page.run, round: Number(page.round), page_id: page.pageId,
      exported_at: new Date().toISOString(),
      decisions: rows.map(tr => ({
        passage_id: tr.dataset.passageId, index: Number(tr.dataset.index), decision: tr.dataset.decision,
      })),
    };
    const blob = new Blob([JSON.stringify(payload, null, 2) + '\\n'], {type: 'application/json'});
    const url = URL.createObjectURL(blob);
    const a = document.createElement('a');
    a.href = url;
    a.download = page.filename;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    document.getElementById('exported').textContent = 'Exported ' + page.filename;
  });
})();
"""


def _e(value: Any) -> str:
    """HTML-escape text for element content and quoted attribute values."""
    return html.escape(str(value), quote=True)


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.2f}"


def page_id(rows: Sequence[Mapping[str, Any]], run_name: str, round_index: int) -> str:
    """A short fingerprint of the reviewed self-edits (keys the browser's saved state; echoed in exports)."""
    digest = hashlib.sha256(json.dumps([run_name, round_index], ensure_ascii=False).encode())
    for row in rows:
        digest.update(json.dumps([row["passage_id"], row["index"], row["completion"]]).encode())
    return digest.hexdigest()[:16]


def decisions_filename(run_name: str, round_index: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-.") or "run"
    return f"review-{safe}-round_{round_index}.json"


def acceptable(row: Mapping[str, Any]) -> bool:
    """A self-edit can be accepted if it has text to train on (empty ones cannot)."""
    return bool(str(row.get("completion", "")).strip())


def _passage_cell(row: Mapping[str, Any], passage: Any | None) -> str:
    pid = row["passage_id"]
    if passage is None:
        return f'<div class="title">{_e(pid)}</div><div class="sub">self-edit {_e(row["index"])}</div>'
    answers = (row.get("answers") or [[]])[0] or []
    items = []
    for q, qa in enumerate(passage.questions):
        got = f' <span class="answer">→ {_e(answers[q])}</span>' if q < len(answers) else ""
        items.append(f'<li>{_e(qa.question)} <span class="gold">[{_e(qa.answer)}]</span>{got}</li>')
    return (
        f'<div class="title">{_e(passage.title)}</div>'
        f'<div class="sub">{_e(pid)} · self-edit {_e(row["index"])}</div>'
        f"<details><summary>passage, questions [gold] → answers</summary>"
        f'<div class="context">{_e(passage.context)}</div><ol class="qa">{"".join(items)}</ol></details>'
    )


def render_page(
    rows: Sequence[Mapping[str, Any]],
    run_name: str,
    round_index: int,
    passages: Mapping[str, Any] | None = None,
    run_dir: str | None = None,
) -> str:
    """The review page for one round's self-edit rows (as in `round_<r>/self_edits.jsonl`)."""
    passages = passages or {}
    body = []
    for order, row in enumerate(rows):
        kept = bool(row.get("kept"))
        ok = acceptable(row)
        reward, acc, base = row.get("reward"), row.get("adapted_accuracy"), row.get("base_accuracy")
        status = row.get("status", "ok")
        badge = f'<span class="badge status">{_e(status)}</span>' if status != "ok" else ""
        sign = "pos" if (reward or 0) > 0 else "neg" if (reward or 0) < 0 else ""
        body.append(
            f'<tr data-order="{order}" data-passage-id="{_e(row["passage_id"])}"'
            f' data-index="{int(row["index"])}"'
            f' data-reward="{float(reward or 0.0)!r}" data-accuracy="{float(acc or 0.0)!r}"'
            f' data-kept="{str(kept).lower()}" data-acceptable="{str(ok).lower()}">'
            f"<td>{_passage_cell(row, passages.get(row['passage_id']))}</td>"
            f'<td>{badge}<pre class="edit">{_e(row.get("completion", ""))}</pre></td>'
            f'<td class="num {sign}">{_num(reward, signed=True)}</td>'
            f'<td class="num">{_num(acc)}<div class="sub">base {_num(base)}</div></td>'
            f"<td>{KEPT_BADGE if kept else ''}</td>"
            f'<td><div class="decide">'
            f'<button type="button" data-decision="accept" aria-pressed="false"{"" if ok else " disabled"}>'
            f"Accept</button>"
            f'<button type="button" data-decision="reject" aria-pressed="false">Reject</button></div></td>'
            "</tr>"
        )
    script_hash = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    kept_n = sum(bool(r.get("kept")) for r in rows)
    filename = decisions_filename(run_name, round_index)
    where = run_dir or run_name
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>seal review · {_e(run_name)} · round {round_index}</title>
<style>{_CSS}</style>
</head>
<body data-run="{_e(run_name)}" data-round="{round_index}"
 data-page-id="{page_id(rows, run_name, round_index)}" data-filename="{_e(filename)}" data-format="{FORMAT}">
<header>
<h1>seal review · {_e(run_name)} · round {round_index}</h1>
<div class="stats"><b>{len(rows)}</b> self-edits · filter kept <b>{kept_n}</b> ·
 accepted <b id="n-accepted">{kept_n}</b></div>
<div class="actions"><button type="button" id="reset">Reset to filter's choice</button>
<button type="button" id="export" class="primary">Export decisions</button></div>
<div class="sub" id="exported" role="status"></div>
</header>
<p class="help">Accept the self-edits the generator should learn from, reject the others (preselected: the
filter's choice; the update trains only on accepted ones). Then <b>Export decisions</b> and import the
downloaded file:
<code>seal review {_e(where)} --round {round_index} --decisions {_e(filename)}</code>, and rerun the
recipe (or pass <code>--review_decisions {_e(filename)}</code> to the rerun). Decisions stay in this browser
until then.
</p>
<table id="edits">
<colgroup><col class="c-passage"><col class="c-edit"><col class="c-reward"><col class="c-acc">
<col class="c-filter"><col class="c-decision"></colgroup>
<thead><tr>
<th data-sort="order" aria-sort="ascending"><button type="button" class="sort">Passage</button></th>
<th>Self-edit</th>
<th class="num" data-sort="reward"><button type="button" class="sort">Reward</button></th>
<th class="num" data-sort="accuracy"><button type="button" class="sort">Accuracy</button></th>
<th>Filter</th>
<th>Decision</th>
</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<script>{_JS}</script>
</body>
</html>
"""


def write_page(
    round_dir: str | Path,
    rows: Sequence[Mapping[str, Any]] | None = None,
    passages: Mapping[str, Any] | None = None,
    output: str | Path | None = None,
) -> Path:
    """Write the review page of `round_dir` (rows default to its self_edits.jsonl); returns its path."""
    round_dir = Path(round_dir)
    rows = load_rows(round_dir) if rows is None else rows
    run_dir = round_dir.parent
    path = Path(output) if output else round_dir / PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        render_page(rows, run_dir.name, round_number(round_dir), passages, str(run_dir)), encoding="utf-8"
    )
    return path


# ----------------------------------------------------------------------------------- reading decisions


def round_number(round_dir: str | Path) -> int:
    match = re.fullmatch(r"round_(\d+)", Path(round_dir).name)
    if not match:
        raise ValueError(f"{round_dir} is not a round directory (round_<r>)")
    return int(match.group(1))


def load_rows(round_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(round_dir) / "self_edits.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the round has not reached its filter yet")
    return read_jsonl(path)


def _load_json(path: Path) -> Any:
    """A decisions file's JSON; one that is not UTF-8 JSON is a DataValidationError naming file and line."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ReviewError(f"{path}: no such decisions file") from None


def file_round(path: str | Path, data: Any = None) -> int | None:
    """The round a decisions file names (None: a bare list or no `round` field); `data`: its parsed JSON."""
    data = _load_json(Path(path)) if data is None else data
    if isinstance(data, dict) and "round" in data:
        value = data["round"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ReviewError(f"{path}: field 'round': expected a round number, got {value!r:.60}")
        return value
    return None


def read_decisions(
    path: str | Path, rows: Sequence[Mapping[str, Any]], round_index: int | None = None
) -> dict[Key, str]:
    """Validate a decisions file against a round's self-edits; return {(passage_id, index): decision}.

    The file is what the page exports (`{"round", "decisions": [...]}`) or a bare list of
    `{"passage_id", "index", "decision"}` records; self-edits it does not list keep the filter's choice.
    Every problem is reported as `file: record N (passage_id=..., index=...): field 'f': problem`.
    """
    path = Path(path)
    data = _load_json(path)
    if isinstance(data, dict):
        if "decisions" not in data:
            raise ReviewError(f"{path}: field 'decisions' is missing (expected a list of decision records)")
        named = file_round(path, data)
        if round_index is not None and named is not None and named != round_index:
            raise ReviewError(
                f"{path}: field 'round': the file is for round {named}, not round {round_index}"
            )
        records = data["decisions"]
    else:
        records = data
    if not isinstance(records, list):
        raise ReviewError(
            f"{path}: field 'decisions': expected a list of records, got {type(records).__name__}"
        )
    by_key = {(str(r["passage_id"]), int(r["index"])): r for r in rows}
    problems, decisions = [], {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"record {i}: expected an object, got {rec!r:.60}")
            continue
        pid, idx, decision = rec.get("passage_id"), rec.get("index"), rec.get("decision")
        where = f"record {i} (passage_id={pid!r:.60}, index={idx!r:.20})"
        unknown = sorted(set(rec) - {"passage_id", "index", "decision"})
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
        if not isinstance(pid, str):
            problems.append(f"{where}: field 'passage_id': expected a string")
            continue
        if not isinstance(idx, int) or isinstance(idx, bool):
            problems.append(f"{where}: field 'index': expected an integer")
            continue
        if decision not in DECISIONS:
            problems.append(f"{where}: field 'decision': expected 'accept' or 'reject', got {decision!r:.60}")
            continue
        key = (pid, idx)
        if key not in by_key:
            field = "passage_id" if all(k[0] != pid for k in by_key) else "index"
            problems.append(f"{where}: field '{field}': no such self-edit in this round")
        elif key in decisions:
            problems.append(f"{where}: a second decision for this self-edit")
        elif decision == "accept" and not acceptable(by_key[key]):
            problems.append(f"{where}: field 'decision': an empty self-edit cannot be accepted")
        else:
            decisions[key] = decision
    if problems:
        shown = "\n  ".join(f"{path}: {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ReviewError(f"{len(problems)} problem(s) in the review decisions:\n  {shown}{more}")
    return decisions


def resolve(rows: Sequence[Mapping[str, Any]], decisions: Mapping[Key, str]) -> list[dict[str, Any]]:
    """One decision per self-edit, in row order: the reviewer's, else the filter's choice."""
    out = []
    for row in rows:
        key = (str(row["passage_id"]), int(row["index"]))
        default = "accept" if row.get("kept") else "reject"
        out.append(
            {
                "passage_id": key[0],
                "index": key[1],
                "decision": decisions.get(key, default),
                "filter_kept": bool(row.get("kept")),
                "reviewed": key in decisions,
            }
        )
    return out


def import_decisions(
    round_dir: str | Path, path: str | Path, rows: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Validate `path` against the round's self-edits and store the decisions as `round_<r>/review.json`.

    A round's decisions are final once stored: importing different ones again is refused.
    """
    round_dir = Path(round_dir)
    rows = load_rows(round_dir) if rows is None else rows
    r = round_number(round_dir)
    resolved = resolve(rows, read_decisions(path, rows, r))
    record = {
        "round": r,
        "source": str(path),
        "accepted": sum(d["decision"] == "accept" for d in resolved),
        "rejected": sum(d["decision"] == "reject" for d in resolved),
        "decisions": resolved,
    }
    previous = load_review(round_dir)
    if previous is not None:
        if [d["decision"] for d in previous["decisions"]] == [d["decision"] for d in resolved]:
            return previous
        raise ReviewError(
            f"{path}: round {r} already has other decisions ({round_dir / REVIEWED}); decisions are final "
            f"once imported. To redo the review, delete {round_dir / REVIEWED} and {round_dir / 'update'}."
        )
    write_json(round_dir / REVIEWED, record)
    logger.info(
        "round %d review: %d accepted, %d rejected (%s) -> %s",
        r,
        record["accepted"],
        record["rejected"],
        path,
        round_dir / REVIEWED,
    )
    return record


def load_review(round_dir: str | Path) -> dict[str, Any] | None:
    path = Path(round_dir) / REVIEWED
    return read_json(path) if path.is_file() else None


def accepted_rows(rows: Sequence[Mapping[str, Any]], review: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows a stored review accepted, in row order: what the update trains on."""
    decided = {(d["passage_id"], d["index"]): d["decision"] for d in review["decisions"]}
    keys = [(str(r["passage_id"]), int(r["index"])) for r in rows]
    if set(decided) != set(keys):
        raise ReviewError(
            f"round {review['round']}: the stored review does not match the round's self-edits "
            "(they were sampled again?); delete review.json and review the round again"
        )
    return [dict(row) for row, key in zip(rows, keys, strict=True) if decided[key] == "accept"]


def review_round(
    round_dir: str | Path,
    rows: list[dict[str, Any]],
    cfg: ReviewConfig,
    passages: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]] | None:
    """The loop's review step after the filter: the accepted rows, or None while the round awaits review.

    Uses `round_<r>/review.json` if the round was reviewed; else imports `cfg.review_decisions` if that file
    is for this round; else writes `round_<r>/review.html`, tells the user what to do and returns None.
    """
    round_dir = Path(round_dir)
    r = round_number(round_dir)
    review = load_review(round_dir)
    if cfg.review_decisions:
        named = file_round(cfg.review_decisions)
        if named is None:
            raise ReviewError(
                f"{cfg.review_decisions}: field 'round' is missing, so the loop cannot tell which round the "
                f"decisions are for: add it, or import them with `seal review {round_dir.parent} --round R "
                "--decisions FILE`"
            )
        if named == r:
            review = import_decisions(round_dir, cfg.review_decisions, rows)
        elif review is None:
            logger.warning("review_decisions %s is for round %d, not %d", cfg.review_decisions, named, r)
    if review is not None:
        return accepted_rows(rows, review)
    page = write_page(round_dir, rows, passages)
    run_dir = round_dir.parent
    logger.warning(
        "round %d is waiting for review: open %s in a browser, accept/reject the self-edits, click "
        "'Export decisions', then run `seal review %s --round %d --decisions <exported file>` and rerun this "
        "command (or rerun it with --review_decisions <exported file>). The update trains only on accepted "
        "self-edits.",
        r,
        page.resolve().as_uri(),
        run_dir,
        r,
    )
    return None


# ------------------------------------------------------------------------------------------ command line


def _latest_round(run_dir: Path) -> Path:
    rounds = sorted(
        (p for p in run_dir.glob("round_*") if (p / "self_edits.jsonl").is_file()),
        key=round_number,
    )
    if not rounds:
        raise FileNotFoundError(f"{run_dir} has no round with self_edits.jsonl yet")
    return rounds[-1]


def run_passages(run_dir: Path) -> dict[str, Any] | None:
    """The run's passages (for questions and context on the page) if its data is local; else None."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    data = (yaml.safe_load(config.read_text()) or {}).get("data", {})
    name = data.get("dataset_name", SAMPLE)
    if name != SAMPLE and not Path(name).exists():  # a Hub dataset: not worth a download for the page
        return None
    try:
        passages = load_passages(
            name,
            split=data.get("dataset_split", "train"),
            config=data.get("dataset_config"),
            limit=data.get("num_passages"),
            max_questions=data.get("max_questions_per_passage"),
        )
    except Exception as e:  # the page still works without them
        logger.warning("review page without passage text: %s", e)
        return None
    return {p.id: p for p in passages}


def main(argv: list[str] | None = None) -> None:
    """`seal review RUN_DIR [--round R] [--decisions FILE] [--output PAGE]`."""
    parser = argparse.ArgumentParser(
        prog="seal review",
        description="Write a round's review page, or import the decisions exported from it.",
    )
    parser.add_argument("run_dir", help="The run directory (the recipe's output_dir).")
    parser.add_argument("--round", type=int, default=None, help="Round to review (default: the latest).")
    parser.add_argument(
        "--decisions", default=None, help="Exported decisions: validated, stored as round_<r>/review.json."
    )
    parser.add_argument(
        "--output", default=None, help="Where to write the page (default round_<r>/review.html)."
    )
    args = parser.parse_args(argv)
    try:
        _review_command(args)
    except (OSError, ValueError) as e:  # ReviewError included: a clear message, no traceback
        raise SystemExit(f"seal review: {e}") from None


def _review_command(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    round_dir = run_dir / f"round_{args.round}" if args.round is not None else _latest_round(run_dir)
    rows = load_rows(round_dir)
    r = round_number(round_dir)
    if args.decisions:
        record = import_decisions(round_dir, args.decisions, rows)
        counts = f"{record['accepted']} accepted, {record['rejected']} rejected"
        print(f"round {r}: {counts} -> {round_dir / REVIEWED}")
        if (round_dir / "update" / "seal_update.json").is_file():
            print(f"note: round {r}'s update had already finished; these decisions did not change it")
        else:
            print("Rerun the recipe (with review: true): the update trains only on the accepted self-edits.")
        return
    page = write_page(round_dir, rows, run_passages(run_dir), args.output)
    print(f"review page: {page.resolve().as_uri()}")
