"""Human review of pseudo-labels: a static page to accept, reject or correct them; the decisions read back.

    seal review-labels DIR                      # DIR holds labels.jsonl (`seal label` output, a run's round)
    seal review-labels DIR --decisions F.json   # validate and apply -> DIR/labels_review.json, reviewed.jsonl

The page lists every pseudo-label (kept or not) with its passage, samples, confidence, agreement and token
probability; Accept/Reject per label (the threshold's choice preselected) and an answer field whose edit is
a correction. Export downloads `{"format": "seal-label-review", "decisions": [{"passage_id", "question",
"decision": accept|reject|correct, "answer"?}]}`. Applied decisions give the reviewed records: accepted and
corrected labels kept (a correction replaces the answer and is marked `corrected`), rejected ones not;
labels the file does not list keep the threshold's choice. With `review: true`, a label-free run waits for
each round's label review before rewarding self-edits with the labels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seal.config import ReviewConfig
from seal.label import LabelledPassage
from seal.review import LABEL_FORMAT as FORMAT
from seal.review import PAGES, ReviewError, load_decisions_json, number_cell, page_assets
from seal.run_dir import LABELS
from seal.utils import read_json, read_jsonl, write_json, write_jsonl

logger = logging.getLogger("seal")

PAGE = "labels_review.html"
REVIEWED = "labels_review.json"
REVIEWED_DATA = "reviewed.jsonl"
DECISIONS = ("accept", "reject", "correct")

Key = tuple[str, str]  # (passage_id, question)


def page_id(records: Sequence[Mapping[str, Any]], name: str) -> str:
    digest = hashlib.sha256(json.dumps(name).encode())
    for r in records:
        for label in [*r["questions"], *r["rejected"]]:
            digest.update(json.dumps([r["id"], label["question"], label["answer"]]).encode())
    return digest.hexdigest()[:16]


def render_label_page(records: Sequence[Mapping[str, Any]], name: str, where: str) -> str:
    """The review page of labelled records (as in labels.jsonl), every value escaped by Jinja; only the
    page's own script runs (Content-Security-Policy by its hash)."""
    shown = []
    for r in records:
        for label in sorted([*r["questions"], *r["rejected"]], key=lambda lb: not lb["kept"]):
            prob = label.get("token_prob")
            shown.append({
                "passage_id": r["id"], "title": r["title"], "context": r["context"],
                "question": label["question"], "answer": label["answer"], "samples": label["samples"],
                "kept": bool(label["kept"]), "supported": bool(label["supported"]),
                "confidence_value": repr(float(label["confidence"])),
                "confidence_cell": number_cell(label["confidence"]),
                "agreement_cell": number_cell(label["agreement"]), "token_prob_cell": number_cell(prob),
            })  # fmt: skip
    return PAGES.get_template("labels_review.html.j2").render(
        labels=shown,
        name=name,
        where=where,
        filename=f"label-review-{page_id(records, name)}.json",
        page_id=page_id(records, name),
        kept_n=sum(lb["kept"] for lb in shown),
        format=FORMAT,
        **page_assets("labels_review.js"),
    )


def write_label_page(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write the review page of `folder`/labels.jsonl; returns its path."""
    folder = Path(folder)
    records = load_labels(folder)
    path = Path(output) if output else folder / PAGE
    path.write_text(render_label_page(records, folder.name, str(folder)), encoding="utf-8")
    return path


def load_labels(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / LABELS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: nothing has been labelled there yet")
    return read_jsonl(path)


def read_label_decisions(
    path: str | Path, records: Sequence[Mapping[str, Any]]
) -> dict[Key, tuple[str, str | None]]:
    """Validate a decisions file against labelled records: {(passage_id, question): (decision, answer)}.

    Every problem is reported as `file: record N (passage_id=..., question=...): field 'f': problem`.
    """
    path = Path(path)
    data = load_decisions_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT or "decisions" not in data:
        raise ReviewError(f"{path}: not a label review export (field 'format' must be '{FORMAT}')")
    if not isinstance(data["decisions"], list):
        raise ReviewError(f"{path}: field 'decisions': expected a list of records")
    known = {(r["id"], lb["question"]) for r in records for lb in [*r["questions"], *r["rejected"]]}
    problems, out = [], {}
    for i, rec in enumerate(data["decisions"]):
        if not isinstance(rec, dict):
            problems.append(f"record {i}: expected an object, got {rec!r:.60}")
            continue
        pid, question, decision = rec.get("passage_id"), rec.get("question"), rec.get("decision")
        where = f"record {i} (passage_id={pid!r:.60}, question={question!r:.60})"
        unknown = sorted(set(rec) - {"passage_id", "question", "decision", "answer"})
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
        elif (pid, question) not in known:
            field = "passage_id" if all(k[0] != pid for k in known) else "question"
            problems.append(f"{where}: field '{field}': no such pseudo-label")
        elif decision not in DECISIONS:
            problems.append(f"{where}: field 'decision': expected one of {DECISIONS}, got {decision!r:.60}")
        elif decision == "correct" and not (isinstance(rec.get("answer"), str) and rec["answer"].strip()):
            problems.append(f"{where}: field 'answer': a correction needs the corrected answer")
        elif (pid, question) in out:
            problems.append(f"{where}: a second decision for this pseudo-label")
        else:
            out[(pid, question)] = (decision, rec["answer"].strip() if decision == "correct" else None)
    if problems:
        shown = "\n  ".join(f"{path}: {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ReviewError(f"{len(problems)} problem(s) in the label review decisions:\n  {shown}{more}")
    return out


def apply_label_decisions(
    records: Sequence[Mapping[str, Any]], decisions: Mapping[Key, tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """The records after review: accepted and corrected labels in `questions`, rejected ones in `rejected`;
    a label without a decision keeps the threshold's choice."""
    out = []
    for r in records:
        labelled = LabelledPassage.from_record(dict(r))
        for label in labelled.labels:
            decision, answer = decisions.get((r["id"], label.question), (None, None))
            if decision == "correct":
                label.answer, label.corrected, label.kept = answer, True, True
            elif decision is not None:
                label.kept = decision == "accept"
            label.reviewed = decision is not None
        out.append(labelled.to_record())
    return out


def import_label_decisions(folder: str | Path, path: str | Path) -> list[dict[str, Any]]:
    """Validate `path` against `folder`/labels.jsonl and write `labels_review.json` (the decisions) and
    `reviewed.jsonl` (the reviewed records; those with a kept label are SQuAD-style data)."""
    folder = Path(folder)
    records = load_labels(folder)
    decisions = read_label_decisions(path, records)
    reviewed = apply_label_decisions(records, decisions)
    write_json(folder / REVIEWED, {
        "source": str(path),
        "decisions": [{"passage_id": k[0], "question": k[1], "decision": d, "answer": a}
                      for k, (d, a) in decisions.items()],
    })  # fmt: skip
    write_jsonl(folder / REVIEWED_DATA, [r for r in reviewed if r["questions"]])
    kept = sum(len(r["questions"]) for r in reviewed)
    logger.info(
        "label review: %d decisions, %d labels kept -> %s", len(decisions), kept, folder / REVIEWED_DATA
    )
    return reviewed


def reviewed_records(folder: str | Path) -> list[dict[str, Any]] | None:
    """The labels of `folder` as reviewed (labels_review.json applied), or None before a review."""
    folder = Path(folder)
    if not (folder / REVIEWED).is_file():
        return None
    stored = read_json(folder / REVIEWED)["decisions"]
    decisions = {(d["passage_id"], d["question"]): (d["decision"], d["answer"]) for d in stored}
    return apply_label_decisions(load_labels(folder), decisions)


def review_labels(round_dir: Path, cfg: ReviewConfig) -> list[dict[str, Any]] | None:
    """The loop's label review: the round's reviewed records, or None while they wait for review.

    Uses `labels_review.json` if the round's labels were reviewed; else imports `cfg.review_decisions` if it
    is a review of these very labels (its page id); else writes `labels_review.html` and says what to do.
    """
    reviewed = reviewed_records(round_dir)
    if reviewed is None and cfg.review_decisions:
        data = load_decisions_json(Path(cfg.review_decisions))
        if isinstance(data, dict) and data.get("format") == FORMAT:
            if data.get("page_id") == page_id(load_labels(round_dir), round_dir.name):
                reviewed = import_label_decisions(round_dir, cfg.review_decisions)
            else:
                logger.warning("%s reviews other labels than %s's", cfg.review_decisions, round_dir.name)
    if reviewed is not None:
        return reviewed
    page = write_label_page(round_dir)
    logger.warning(
        "%s's pseudo-labels are waiting for review: open %s, accept, reject or correct them, click 'Export "
        "decisions', then run `seal review-labels %s --decisions <exported file>` and rerun this command (or "
        "rerun it with --review_decisions <exported file>).",
        round_dir.name, page.resolve().as_uri(), round_dir,
    )  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> None:
    """`seal review-labels DIR [--decisions FILE] [--output PAGE]`."""
    parser = argparse.ArgumentParser(
        prog="seal review-labels", description="Write the pseudo-label review page, or apply its decisions."
    )
    parser.add_argument(
        "folder", help="A folder with labels.jsonl (`seal label` output, or a run's round_<r>)."
    )
    parser.add_argument("--decisions", default=None, help="Exported decisions to validate and apply.")
    parser.add_argument(
        "--output", default=None, help="Where to write the page (default DIR/labels_review.html)."
    )
    args = parser.parse_args(argv)
    try:
        if args.decisions:
            reviewed = import_label_decisions(args.folder, args.decisions)
            kept = sum(len(r["questions"]) for r in reviewed)
            print(f"{kept} pseudo-labels kept after review -> {Path(args.folder) / REVIEWED_DATA}")
        else:
            print(f"label review page: {write_label_page(args.folder, args.output).resolve().as_uri()}")
    except (OSError, ValueError) as e:  # ReviewError included: a clear message, no traceback
        raise SystemExit(f"seal review-labels: {e}") from None
