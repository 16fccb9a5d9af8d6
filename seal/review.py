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
import json
import logging
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import yaml

from seal.config import ReviewConfig
from seal.data import SAMPLE, load_passages
from seal.run_dir import SELF_EDITS, RoundDir, RunDir, round_number
from seal.update import finished_update
from seal.utils import read_json, read_jsonl, write_json

logger = logging.getLogger("seal")

DECISIONS = ("accept", "reject")
PAGE = "review.html"
REVIEWED = "review.json"
FORMAT = "seal-review"
LABEL_FORMAT = "seal-label-review"  # a pseudo-label review's export (seal.label_review), not this page's

Key = tuple[str, int]


class ReviewError(ValueError):
    """A decisions file that does not fit the round; the message names the file, the record and the field."""


# ---------------------------------------------------------------------------------------------- the page


ASSETS = "assets"  # seal/assets/: the page's template, stylesheet and script
PAGES = jinja2.Environment(
    loader=jinja2.PackageLoader("seal", ASSETS), autoescape=True, undefined=jinja2.StrictUndefined
)


def number_cell(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.2f}"


def page_assets(script: str) -> dict[str, str]:
    """A review page's inlined assets: the shared stylesheet, its script after the shared helpers, and a
    Content-Security-Policy that lets only that script run (by its hash)."""
    files = resources.files("seal").joinpath(ASSETS)
    js = files.joinpath("download.js").read_text(encoding="utf-8") + files.joinpath(script).read_text("utf-8")
    script_hash = base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()
    return {
        "css": files.joinpath("review.css").read_text(encoding="utf-8"),
        "js": js,
        "csp": f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'",
    }


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


def render_page(
    rows: Sequence[Mapping[str, Any]],
    run_name: str,
    round_index: int,
    passages: Mapping[str, Any] | None = None,
    run_dir: str | None = None,
) -> str:
    """The review page for one round's self-edit rows (as in `round_<r>/self_edits.jsonl`): seal/assets'
    template, every value HTML-escaped by Jinja; the script runs under a Content-Security-Policy that allows
    only it (by its hash)."""
    passages = passages or {}
    shown = []
    for row in rows:
        reward, acc = row.get("reward"), row.get("adapted_accuracy")
        shown.append(
            {
                "passage_id": row["passage_id"],
                "index": int(row["index"]),
                "passage": passages.get(row["passage_id"]),
                "answers": (row.get("answers") or [[]])[0] or [],
                "completion": row.get("completion", ""),
                "status": row.get("status", "ok"),
                "kept": bool(row.get("kept")),
                "acceptable": acceptable(row),
                "reward_value": repr(float(reward or 0.0)),
                "accuracy_value": repr(float(acc or 0.0)),
                "sign": "pos" if (reward or 0) > 0 else "neg" if (reward or 0) < 0 else "",
                "reward_cell": number_cell(reward, signed=True),
                "accuracy_cell": number_cell(acc),
                "base_cell": number_cell(row.get("base_accuracy")),
            }
        )
    return PAGES.get_template("review.html.j2").render(
        rows=shown,
        run_name=run_name,
        round_index=round_index,
        where=run_dir or run_name,
        filename=decisions_filename(run_name, round_index),
        page_id=page_id(rows, run_name, round_index),
        kept_n=sum(bool(r.get("kept")) for r in rows),
        format=FORMAT,
        **page_assets("review.js"),
    )


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


def load_rows(round_dir: str | Path) -> list[dict[str, Any]]:
    path = RoundDir(Path(round_dir)).self_edits
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the round has not reached its filter yet")
    return read_jsonl(path)


def load_decisions_json(path: Path) -> Any:
    """A decisions file's JSON; one that is not UTF-8 JSON is a DataValidationError naming file and line."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ReviewError(f"{path}: no such decisions file") from None


def file_round(path: str | Path, data: Any = None) -> int | None:
    """The round a decisions file names (None: a bare list or no `round` field); `data`: its parsed JSON."""
    data = load_decisions_json(Path(path)) if data is None else data
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
    data = load_decisions_json(path)
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
    decisions = load_decisions_json(Path(cfg.review_decisions)) if cfg.review_decisions else None
    if isinstance(decisions, dict) and decisions.get("format") == LABEL_FORMAT:
        decisions = None  # the round's pseudo-label review, imported before its rewards (seal.label_review)
    if decisions is not None:
        named = file_round(cfg.review_decisions, decisions)
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
    rounds = [rd.path for rd in RunDir(run_dir).rounds() if rd.self_edits.is_file()]
    if not rounds:
        raise FileNotFoundError(f"{run_dir} has no round with {SELF_EDITS} yet")
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
    round_dir = RunDir(run_dir).round(args.round).path if args.round is not None else _latest_round(run_dir)
    rows = load_rows(round_dir)
    r = round_number(round_dir)
    if args.decisions:
        record = import_decisions(round_dir, args.decisions, rows)
        counts = f"{record['accepted']} accepted, {record['rejected']} rejected"
        print(f"round {r}: {counts} -> {round_dir / REVIEWED}")
        if finished_update(RoundDir(round_dir).update) is not None:
            print(f"note: round {r}'s update had already finished; these decisions did not change it")
        else:
            print("Rerun the recipe (with review: true): the update trains only on the accepted self-edits.")
        return
    page = write_page(round_dir, rows, run_passages(run_dir), args.output)
    print(f"review page: {page.resolve().as_uri()}")
