"""The held-out QA table: no-context accuracy after TTT under several conditions, with bootstrap CIs.

Conditions (rows of the paper's table): ``base`` (no training), ``passage`` (TTT on the passage alone),
``base_generator`` (TTT on the passage + self-edits sampled from the base model), ``trained_generator``
(self-edits from a generator trained by the ReST-EM loop) and one condition per completions file (self-edits
written by another model, in SEAL's ``{title, context, questions, completions}`` format).

Settings: ``single`` trains a fresh adapter per passage (per self-edit, averaged over a passage's
self-edits); ``cpt`` (continued pretraining) trains one adapter on every passage's data, then asks all the
questions. Training and answering go through the library's inner loop (batched TTT + reward), so the
numbers here are produced by exactly the code the ReST-EM loop uses. Every finished TTT is journaled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from seal.config import EvalArgs, EvalCondition, EvalConfig, choices
from seal.data import DataValidationError, Passage, context_key, load_passages
from seal.domain import Knowledge, Policy
from seal.generate import HFEngine, SelfEdit
from seal.generate.engine import adapter_rank
from seal.graders import Grader
from seal.inner_loop import Job
from seal.journal import Journal
from seal.models import load_model, load_tokenizer, resolve_model_path
from seal.report import bar_chart, markdown_results, markdown_timing
from seal.run_dir import CONFIG, JOURNAL
from seal.runtime import Runtime
from seal.sequences import check_overlong, check_passages_fit
from seal.stats import bootstrap_ci, paired_difference
from seal.update import Update
from seal.utils import atomic_write, read_jsonl, setup_logging, task_seed, write_json, write_jsonl
from seal.weights import MERGED, merged_update

logger = logging.getLogger("seal")

BUILTIN_CONDITIONS = choices(EvalCondition)
LABELS = {
    "base": "Base model",
    "passage": "Train on passage",
    "base_generator": "Passage + self-edits (base generator)",
    "trained_generator": "Passage + self-edits (trained generator)",
    "trained_base": "Trained generator, no training",
}
TTT_ON = {  # the trained generator's row says which model its self-edits were applied to (ttt_model)
    "generator": "Passage + self-edits (trained generator; TTT on it)",
    "base": "Passage + self-edits (trained generator; TTT on the base)",
}


def completion_files(cfg: EvalConfig) -> dict[str, str]:
    """``label=path`` entries of eval_completions as {label: path}, both stripped of whitespace.

    Invariant: every label is checked as it is used (stripped), so `' base=f.json'` is refused like `base`.
    """
    out = {}
    for entry in cfg.eval_completions:
        label, sep, path = (part.strip() for part in entry.partition("="))
        if not sep or not label or not path:
            raise ValueError(f"eval_completions entries are 'label=path', got '{entry}'")
        if label in BUILTIN_CONDITIONS or label in out:
            raise ValueError(f"eval_completions label '{label}' is already a condition")
        out[label] = path
    return out


def table_conditions(args: EvalArgs) -> list[str]:
    """The conditions in table order: the recipe's, then one per completions file; in SEAL's setting
    `trained_base` (the trained generator without TTT) comes right before `trained_generator`."""
    conditions = list(dict.fromkeys([*args.eval.eval_conditions, *completion_files(args.eval)]))
    if args.ttt.ttt_model == "generator" and "trained_generator" in conditions:
        conditions.insert(conditions.index("trained_generator"), "trained_base")
    return conditions


def serving_rank(args: EvalArgs, conditions: Sequence[str]) -> int:
    """The largest LoRA rank the engine serves: the TTT adapters', and the trained generator's update adapter
    (its own rank, e.g. 64 beside TTT's 32) when that condition samples from one."""
    rank = args.ttt.ttt_lora_r
    generator = args.eval.eval_generator
    if (
        "trained_generator" in conditions
        and generator
        and (Path(generator) / "adapter_config.json").is_file()
    ):
        rank = max(rank, adapter_rank(generator))
    return rank


def load_completions(path: str, passages: Sequence[Passage], n: int) -> dict[str, list[str]]:
    """The first `n` completions of each evaluated passage from a SEAL-format file, matched by context."""
    records = load_passages(path, limit=None)  # validated: names file, record and field on error
    by_context = {context_key(p.context): p for p in records}
    out, problems = {}, []
    for p in passages:
        match = by_context.get(context_key(p.context))
        if match is None:
            problems.append(f"{path}: no record has the context of passage '{p.id}' ({p.title!r})")
        elif len(match.completions) < n:
            problems.append(
                f"{path}: record (id={match.id}): field 'completions': has {len(match.completions)}, "
                f"eval_num_self_edits needs {n}"
            )
        else:
            out[p.id] = match.completions[:n]
    if problems:
        raise DataValidationError(problems)
    return out


def evaluate(args: EvalArgs, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every condition x setting; write results.{json,md}, plots and answers; return the results."""
    cfg, gen = args.eval, args.generate
    args.check()  # re-checked: a caller may have changed a field since the args were made
    conditions = table_conditions(args)
    if PartialState().num_processes > 1:  # each process would redo (and rewrite) the whole evaluation
        raise NotImplementedError(
            "The evaluation runs in one process (accelerate launch --num_processes 1); "
            "only the ReST-EM loop (scripts/seal_knowledge.py) shards across processes."
        )
    passages = load_passages(
        cfg.eval_dataset, cfg.eval_split, limit=cfg.eval_num_passages, max_questions=cfg.eval_max_questions
    )
    domain = Knowledge(gen)  # held-out passages with gold questions
    files = completion_files(cfg)
    from_files = {
        label: load_completions(path, passages, cfg.eval_num_self_edits) for label, path in files.items()
    }
    out = Path(cfg.eval_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)  # the loop's set-up: log.txt in the output dir, and INFO lines on stderr
    journal = open_run(out, args, argv)
    keys = evaluation_keys(passages, conditions, cfg)
    if resumed := journal.done(keys):
        logger.info("resuming: %d of %d evaluations done", resumed, len(keys))

    base_path = resolve_model_path(args.model.model_name_or_path)
    tokenizer = load_tokenizer(base_path, revision=args.model.model_revision)
    if {"base_generator", "trained_generator"} & set(conditions):  # self-edits are sampled: before models
        domain.check_prompts(passages, tokenizer, args.vllm.vllm_max_model_len)
    check_passages_fit(passages, tokenizer, args.ttt, gen, gen.include_passage or "passage" in conditions)
    rt = Runtime.load(
        base_path, tokenizer, args.model, gen, args.ttt, args.reward, args.vllm,
        serving_rank(args, conditions), cfg.eval_seed,
    )  # fmt: skip
    graders = {g: rt.grader(g) for g in cfg.eval_graders}
    rewarder = rt.rewarder(cfg.eval_graders[0])
    engine = rt.engine

    # Self-edits per condition: sampled once (saved, reused on resume) or read from files.
    edits: dict[str, dict[str, list[SelfEdit]]] = {}
    sampled = [c for c in conditions if c in ("base_generator", "trained_generator")]
    for c in conditions:
        if c in ("base", "passage", "trained_base"):
            continue
        if c in from_files:
            edits[c] = {p.id: domain.parse(p, from_files[c][p.id]) for p in passages}
        else:
            edits[c] = sampled_self_edits(c, out, domain, engine, tokenizer, passages, args, journal)

    # Base answers: once, no training.
    if journal.get("base") is None:
        logger.info("base model: answering %d questions", sum(len(p.questions) for p in passages))
        start = time.monotonic()
        scores = rewarder.score(passages, adapter=None)
        journal.append(
            ("base",), scores=[s.to_dict() for s in scores], seconds=round(time.monotonic() - start, 3)
        )

    # Every TTT of every condition and setting, in one inner-loop run (batched across conditions).
    jobs, on_trained = [], set()  # on_trained: the trained generator's runs (TTT on it in SEAL's setting)
    for setting in cfg.eval_settings:
        for c in conditions:
            if c in ("base", "trained_base"):
                continue
            data = {
                p.id: [domain.control_examples(p)]
                if c == "passage"
                else [domain.edit_examples(e, p) for e in edits[c][p.id]]
                for p in passages
            }
            n_before = len(jobs)
            if setting == "single":
                for p in passages:
                    for i, examples in enumerate(data[p.id]):
                        name = ttt_name(setting, c, p.id, i)
                        jobs.append(Job(name, examples, [p], task_seed(cfg.eval_seed, name)))
            else:
                examples = [x for p in passages for per_edit in data[p.id] for x in per_edit]
                name = ttt_name(setting, c)
                jobs.append(Job(name, examples, list(passages), task_seed(cfg.eval_seed, name)))
            if c == "trained_generator" and "trained_base" in conditions:
                on_trained.update(j.name for j in jobs[n_before:])
    pending = [j for j in jobs if journal.get("ttt", j.name) is None]
    logger.info("TTT + answers: %d of %d runs to do", len(pending), len(jobs))
    ttt_split = check_overlong([j.examples for j in jobs], [j.name for j in jobs], tokenizer, args.ttt)
    # Runs train together in chunks, so a run has no time of its own: each record carries the time since
    # the previous result, and their sum over the journal is the stage's wall time, across resumes.
    last = [time.monotonic()]

    def finished(job: Job, losses: list[float], scores) -> None:
        now = time.monotonic()
        record = {
            "losses": losses,
            "scores": [s.to_dict() for s in scores],
            "seconds": round(now - last[0], 3),
        }
        journal.append(("ttt", job.name), **record)
        last[0] = now

    # TTT on the base first; then (ttt_model: generator) the trained generator's self-edits on its own weights
    first = [j for j in pending if j.name not in on_trained]
    if first:
        rt.inner_loop(out / "adapters", cfg.eval_graders[0]).run(first, finished)
    if "trained_base" in conditions and (journal.get("trained_base") is None or len(first) < len(pending)):
        path = Path(args.eval.eval_generator)
        if (path / "adapter_config.json").is_file():
            path = merged_update(Update("adapter", str(path)), base_path, args.model.dtype, out / MERGED)
        rt.adopt(path)
        rewarder = rt.rewarder(cfg.eval_graders[0])
        if journal.get("trained_base") is None:
            start = time.monotonic()
            scores = rewarder.score(passages, adapter=None)
            journal.append(
                ("trained_base",),
                scores=[s.to_dict() for s in scores],
                seconds=round(time.monotonic() - start, 3),
            )
        second = [j for j in pending if j.name in on_trained]
        if second:
            rt.inner_loop(out / "adapters", cfg.eval_graders[0]).run(second, finished)
    rt.close()

    records = graded_answers(passages, conditions, journal, graders, cfg)
    results = summarize(records, passages, conditions, cfg, measured_minutes(journal, keys, sampled))
    results["ttt_split"] = ttt_split  # training examples (over all TTT runs) split into chunks
    results["ttt_model"] = args.ttt.ttt_model
    for rows in results["tables"].values():
        for row in rows:
            if row["key"] == "trained_generator":
                row["condition"] = TTT_ON[args.ttt.ttt_model]
    write_outputs(out, results, records)
    logger.info("results in %s", out / "results.md")
    return results


def sampled_self_edits(
    condition: str,
    out: Path,
    domain: Knowledge,
    engine,
    tokenizer,
    passages: Sequence[Passage],
    args: EvalArgs,
    journal: Journal | None = None,
) -> dict[str, list[SelfEdit]]:
    """Self-edits sampled from the base or the trained generator; saved so a rerun reuses them, and the
    sampling's wall time journaled as ``("sampled", condition)`` (when a journal is given)."""
    path = out / f"generations_{condition}.jsonl"
    if path.exists():
        saved = [SelfEdit.from_dict(d) for d in read_jsonl(path)]
        logger.info("%s: reusing %d sampled self-edits from %s", condition, len(saved), path)
    else:
        n = args.eval.eval_num_self_edits
        logger.info("%s: sampling %d self-edits for each of %d passages", condition, n, len(passages))
        start = time.monotonic()
        generator, adapter = engine, None
        if condition == "trained_generator":
            generator, adapter = trained_generator(args, engine, tokenizer)
        seed = task_seed(args.eval.eval_seed, condition)
        nested = domain.sample(Policy(generator, adapter), tokenizer, passages, seed, n)
        if adapter is not None:
            engine.remove_adapter(adapter)
        saved = [e for per in nested for e in per]
        write_jsonl(path, [e.to_dict() for e in saved])
        if journal is not None:
            journal.append(("sampled", condition), seconds=round(time.monotonic() - start, 3))
    grouped: dict[str, list[SelfEdit]] = {p.id: [] for p in passages}
    for e in saved:
        grouped[e.passage_id].append(e)
    return grouped


def trained_generator(args: EvalArgs, engine, tokenizer):
    """(generator, adapter) for eval_generator: a PEFT adapter on the shared engine, or a full checkpoint."""
    path = Path(args.eval.eval_generator)
    if (path / "adapter_config.json").is_file():
        return engine, engine.add_adapter(str(path), name="trained-generator")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"eval_generator {path}: neither a PEFT adapter nor a model checkpoint")
    model = load_model(str(path), args.model.dtype)
    return HFEngine(model, load_tokenizer(str(path)), args.generate.generation_batch_size), None


def open_run(out: Path, args: EvalArgs, argv: Sequence[str] | None) -> Journal:
    """The output dir's journal.

    Invariant: whatever an output dir holds (journal, sampled self-edits) was made with the recipe in its
    config.yaml, so a dir with a config.yaml is resumed only with that very recipe; another one is refused,
    unless eval_resume is false, which discards the journal and the sampled self-edits. config.yaml is
    written atomically (whole, old or new, even after a crash mid-write).
    """
    out.mkdir(parents=True, exist_ok=True)
    snapshot = args.to_dict()
    snapshot["eval"].pop("eval_resume", None)
    config_path, journal_path = out / CONFIG, out / JOURNAL
    if config_path.exists():
        if not args.eval.eval_resume:
            logger.info("eval_resume=false: discarding the previous evaluation in %s", out)
            journal_path.unlink(missing_ok=True)
            for stale in out.glob("generations_*.jsonl"):
                stale.unlink()
        elif stored_recipe(config_path) != snapshot:
            raise ValueError(
                f"{out} holds an evaluation made with a different recipe; use another eval_output_dir, "
                "or --eval_resume false to start over"
            )
    atomic_write(config_path, lambda f: yaml.safe_dump(snapshot, f, sort_keys=False))
    if argv is not None:
        atomic_write(out / "command.txt", lambda f: f.write(" ".join(argv) + "\n"))
    return Journal(journal_path)


def stored_recipe(config_path: Path) -> Any:
    """The recipe a config.yaml holds; None when it cannot be read (then it matches no recipe)."""
    try:
        return yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


def ttt_name(setting: str, condition: str, passage_id: str | None = None, index: int = 0) -> str:
    """The journal name of one TTT run: per (condition, passage, self-edit) in `single`, per condition in
    `cpt`. One function, so the jobs, the resume count and the tables name runs alike."""
    return f"{setting}-{condition}" if setting == "cpt" else f"{setting}-{condition}-{passage_id}-{index}"


def evaluation_keys(passages: Sequence[Passage], conditions: Sequence[str], cfg: EvalConfig) -> list[tuple]:
    """The journal key of every evaluation the run makes: the base answers, and each TTT run (+ answers)."""
    keys: list[tuple] = [("base",), *([("trained_base",)] if "trained_base" in conditions else [])]
    for setting in cfg.eval_settings:
        for c in conditions:
            if c in ("base", "trained_base"):
                continue
            if setting == "cpt":
                keys.append(("ttt", ttt_name(setting, c)))
                continue
            n = 1 if c == "passage" else cfg.eval_num_self_edits
            keys += [("ttt", ttt_name(setting, c, p.id, i)) for p in passages for i in range(n)]
    return keys


def measured_minutes(
    journal: Journal, keys: Sequence[tuple], sampled: Sequence[str]
) -> dict[str, float | None]:
    """Wall-clock minutes per stage, summed from the journal, so a resumed run keeps what earlier runs
    measured: sampling per sampled condition, the base answers, TTT + answers (every condition and setting
    together: they train in shared batches, so no per-condition share is measured), and their total.

    None marks a stage some record of which carries no time (journaled by an older seal): not measured.
    """

    def minutes(records: list[dict[str, Any] | None]) -> float | None:
        seconds = [r.get("seconds") if r else None for r in records]
        return None if None in seconds else round(sum(seconds) / 60, 2)

    stages = {f"sampling: {c}": minutes([journal.get("sampled", c)]) for c in sampled}
    stages["base answers"] = minutes([journal.get("base")])
    stages["TTT + answers"] = minutes([journal.get(*k) for k in keys if k[0] == "ttt"])
    values = list(stages.values())
    stages["total"] = None if None in values else round(sum(values), 2)
    return stages


def per_passage(
    condition: str, setting: str, passages: Sequence[Passage], journal: Journal, n_edits: int
) -> dict[str, list[dict[str, Any]]]:
    """{passage id: [score dicts]} for one condition and setting (one per self-edit in `single`)."""
    if condition in ("base", "trained_base"):  # no training: the base's or the trained generator's answers
        return {r["passage_id"]: [r] for r in journal.get(condition)["scores"]}
    if setting == "cpt":
        return {r["passage_id"]: [r] for r in journal.get("ttt", ttt_name(setting, condition))["scores"]}
    n = 1 if condition == "passage" else n_edits
    return {
        p.id: [journal.get("ttt", ttt_name(setting, condition, p.id, i))["scores"][0] for i in range(n)]
        for p in passages
    }


def graded_answers(
    passages: Sequence[Passage],
    conditions: list[str],
    journal: Journal,
    graders: dict[str, Grader],
    cfg: EvalConfig,
) -> list[dict[str, Any]]:
    """One record per (setting, condition, passage, self-edit, question) with every grader's grade."""
    records = []
    for setting in cfg.eval_settings:
        for c in conditions:
            scores = per_passage(c, setting, passages, journal, cfg.eval_num_self_edits)
            for p in passages:
                questions, golds = [q.question for q in p.questions], [q.answers for q in p.questions]
                for i, s in enumerate(scores[p.id]):
                    grades = {
                        g: grader.grade(questions, s["answers"], golds) for g, grader in graders.items()
                    }
                    for j, (question, answer) in enumerate(zip(questions, s["answers"], strict=True)):
                        records.append(
                            {
                                "setting": setting,
                                "condition": c,
                                "passage_id": p.id,
                                "self_edit": i,
                                "question": question,
                                "gold": golds[j],
                                "answer": answer,
                                **{g: float(v[j]) for g, v in grades.items()},
                            }
                        )
    return records


def summarize(
    records: list[dict[str, Any]],
    passages: Sequence[Passage],
    conditions: list[str],
    cfg: EvalConfig,
    minutes: dict[str, float | None],
) -> dict[str, Any]:
    """Accuracy per condition (bootstrap CI over passages) and paired differences against base/passage.

    A passage's accuracy is the mean over its questions, averaged over its self-edits; passages are the
    resampled units, and every condition is compared with base on the same passages (paired).
    """
    n, seed = cfg.eval_bootstrap_resamples, cfg.eval_seed
    out: dict[str, Any] = {
        "passages": len(passages),
        "questions": sum(len(p.questions) for p in passages),
        "minutes": minutes,  # measured per stage (see measured_minutes); not per condition
        "tables": {},
    }
    for setting in cfg.eval_settings:
        for grader in cfg.eval_graders:
            accuracy: dict[str, list[float]] = {}
            for c in conditions:
                cells: dict[tuple[str, int], list[float]] = {}
                for r in records:
                    if r["setting"] == setting and r["condition"] == c:
                        cells.setdefault((r["passage_id"], r["self_edit"]), []).append(r[grader])
                accuracy[c] = [
                    mean([mean(v) for (pid, _), v in cells.items() if pid == p.id]) for p in passages
                ]
            rows = []
            for c in conditions:
                rows.append(
                    {
                        "condition": LABELS.get(c, f"Passage + self-edits ({c})"),
                        "key": c,
                        "passages": len(passages),
                        "questions": out["questions"],
                        "accuracy": bootstrap_ci(accuracy[c], n, seed=seed).to_dict(),
                        "delta_vs_base": None
                        if c == "base" or "base" not in accuracy
                        else paired_difference(accuracy["base"], accuracy[c], n, seed=seed).to_dict(),
                        "delta_vs_passage": None
                        if c in ("base", "passage") or "passage" not in accuracy
                        else paired_difference(accuracy["passage"], accuracy[c], n, seed=seed).to_dict(),
                        "per_passage": accuracy[c],
                    }
                )
            out["tables"][f"{setting}/{grader}"] = rows
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def write_outputs(out: Path, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """results.json, results.md (one table per setting x grader), one PNG per table, answers.jsonl."""
    write_json(out / "results.json", results)
    sections = []
    for name, rows in results["tables"].items():
        setting, grader = name.split("/")
        title = (
            f"{'Single passage' if setting == 'single' else 'Continued pretraining'}: "
            f"{results['passages']} passages, {results['questions']} questions"
        )
        sections.append(markdown_results(rows, grader, title))
        bar_chart(rows, out / f"accuracy_{setting}_{grader}.png", grader, title)
    sections.append(markdown_timing(results["minutes"]))
    (out / "results.md").write_text("\n\n".join(sections) + "\n")
    write_jsonl(out / "answers.jsonl", records)


def answer_means(
    out: str | Path, condition: str, grader: str = "contains", setting: str = "single"
) -> dict[tuple[str, int], float]:
    """{(passage id, self-edit index): mean grade} of one condition in a finished run's answers.jsonl
    (the records :func:`graded_answers` writes); empty when the run has no such condition."""
    sums: dict[tuple[str, int], list[float]] = {}
    for record in read_jsonl(Path(out) / "answers.jsonl"):
        if record["condition"] == condition and record["setting"] == setting:
            sums.setdefault((record["passage_id"], record["self_edit"]), []).append(float(record[grader]))
    return {key: mean(grades) for key, grades in sums.items()}


def passage_means(
    out: str | Path, condition: str, grader: str = "contains", setting: str = "single"
) -> dict[str, float]:
    """{passage id: mean over its self-edits of :func:`answer_means`} (one entry per passage for the
    conditions without self-edits: base, trained_base, passage)."""
    by_passage: dict[str, list[float]] = {}
    for (passage_id, _), value in answer_means(out, condition, grader, setting).items():
        by_passage.setdefault(passage_id, []).append(value)
    return {passage_id: mean(values) for passage_id, values in by_passage.items()}
