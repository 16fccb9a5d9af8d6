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

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from trl import ModelConfig

from seal.config import EvalConfig, GenerateConfig, RewardConfig, TTTConfig, VLLMConfig, snapshot
from seal.data import DataValidationError, Passage, load_passages
from seal.generate import HFGenerator, SelfEdit, generate_self_edits, make_self_edits
from seal.generate.engine import adapter_rank, build_engine, engine_backend
from seal.generate.self_edits import check_prompt_lengths
from seal.graders import GRADER_NAMES, Grader
from seal.inner_loop import MODES, InnerLoop, Job
from seal.journal import Journal
from seal.models import load_model, load_tokenizer, quantization_config, resolve_model_path
from seal.report import bar_chart, markdown_results
from seal.reward import Rewarder, build_grader
from seal.stats import bootstrap_ci, paired_difference
from seal.templates import TrainExample, passage_examples
from seal.ttt import check_overlong, check_passages_fit, wrap_for_adapters
from seal.utils import read_jsonl, task_seed, write_json, write_jsonl

logger = logging.getLogger("seal")

BUILTIN_CONDITIONS = ("base", "passage", "base_generator", "trained_generator")
SETTINGS = ("single", "cpt")
LABELS = {
    "base": "Base model",
    "passage": "Train on passage",
    "base_generator": "Passage + self-edits (base generator)",
    "trained_generator": "Passage + self-edits (trained generator)",
}


@dataclass
class EvalArgs:
    """Everything an evaluation needs (parsed by `trl.TrlParser` in eval/run_eval.py)."""

    model: ModelConfig
    eval: EvalConfig
    generate: GenerateConfig
    ttt: TTTConfig
    reward: RewardConfig
    vllm: VLLMConfig = dataclasses.field(default_factory=VLLMConfig)

    def to_dict(self) -> dict[str, Any]:
        return snapshot(self)


def completion_files(cfg: EvalConfig) -> dict[str, str]:
    """``label=path`` entries of eval_completions as {label: path}."""
    out = {}
    for entry in cfg.eval_completions:
        label, sep, path = entry.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise ValueError(f"eval_completions entries are 'label=path', got '{entry}'")
        if label in BUILTIN_CONDITIONS or label in out:
            raise ValueError(f"eval_completions label '{label}' is already a condition")
        out[label.strip()] = path.strip()
    return out


def check_args(args: EvalArgs) -> list[str]:
    """Validate the recipe before any model loads; returns the conditions in table order."""
    cfg = args.eval
    files = completion_files(cfg)
    for c in cfg.eval_conditions:
        if c not in BUILTIN_CONDITIONS:
            raise ValueError(
                f"Unknown condition '{c}'; choose from {BUILTIN_CONDITIONS} or add eval_completions"
            )
    if "trained_generator" in cfg.eval_conditions and not cfg.eval_generator:
        raise ValueError("condition trained_generator needs eval_generator (an adapter dir or a checkpoint)")
    for s in cfg.eval_settings:
        if s not in SETTINGS:
            raise ValueError(f"Unknown setting '{s}'; choose from {SETTINGS}")
    for g in cfg.eval_graders:
        if g not in GRADER_NAMES:
            raise ValueError(f"Unknown grader '{g}'; choose from {GRADER_NAMES}")
    if not cfg.eval_graders or not cfg.eval_settings:
        raise ValueError("eval_graders and eval_settings must not be empty")
    if cfg.eval_num_self_edits < 1:
        raise ValueError(f"eval_num_self_edits must be >= 1, got {cfg.eval_num_self_edits}")
    if args.ttt.ttt_mode not in MODES:
        raise ValueError(f"ttt_mode must be one of {MODES}, got '{args.ttt.ttt_mode}'")
    engine_backend(args.generate.generator_backend, args.model)
    return list(dict.fromkeys([*cfg.eval_conditions, *files]))


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
    by_context = {" ".join(p.context.split()): p for p in records}
    out, problems = {}, []
    for p in passages:
        match = by_context.get(" ".join(p.context.split()))
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


def self_edit_examples(edit: SelfEdit, passage: Passage, gen: GenerateConfig) -> list[TrainExample]:
    """A self-edit's TTT data; one that parsed into nothing leaves the passage alone (if included)."""
    return edit.examples or (passage_examples(passage, gen) if gen.include_passage else [])


def evaluate(args: EvalArgs, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every condition x setting; write results.{json,md}, plots and answers; return the results."""
    cfg, gen = args.eval, args.generate
    conditions = check_args(args)
    if PartialState().num_processes > 1:  # each process would redo (and rewrite) the whole evaluation
        raise NotImplementedError(
            "The evaluation runs in one process (accelerate launch --num_processes 1); "
            "only the ReST-EM loop (scripts/seal_knowledge.py) shards across processes."
        )
    passages = load_passages(
        cfg.eval_dataset, cfg.eval_split, limit=cfg.eval_num_passages, max_questions=cfg.eval_max_questions
    )
    files = completion_files(cfg)
    from_files = {
        label: load_completions(path, passages, cfg.eval_num_self_edits) for label, path in files.items()
    }
    out = Path(cfg.eval_output_dir)
    journal = open_run(out, args, argv)
    t_start = time.time()

    base_path = resolve_model_path(args.model.model_name_or_path)
    tokenizer = load_tokenizer(base_path, revision=args.model.model_revision)
    if {"base_generator", "trained_generator"} & set(conditions):  # self-edits are sampled: before models
        check_prompt_lengths(passages, tokenizer, gen, args.vllm.vllm_max_model_len)
    check_passages_fit(passages, tokenizer, args.ttt, gen, gen.include_passage or "passage" in conditions)
    model = wrap_for_adapters(
        load_model(
            base_path,
            args.model.dtype,
            args.model.model_revision,
            quantization_config=quantization_config(args.model),
        ),
        args.ttt,
    )
    hf = HFGenerator(model, tokenizer, gen.generation_batch_size, args.ttt.ttt_autocast)
    engine = build_engine(
        gen.generator_backend,
        args.model,
        hf,
        args.vllm,
        base_path,
        serving_rank(args, conditions),
        cfg.eval_seed,
    )
    graders = {
        g: build_grader(dataclasses.replace(args.reward, reward_grader=g), engine, tokenizer)
        for g in cfg.eval_graders
    }
    rewarder = Rewarder(engine, tokenizer, graders[cfg.eval_graders[0]], args.reward, gen.use_chat_template)

    # Self-edits per condition: sampled once (saved, reused on resume) or read from files.
    edits: dict[str, dict[str, list[SelfEdit]]] = {}
    for c in conditions:
        if c in ("base", "passage"):
            continue
        if c in from_files:
            edits[c] = {p.id: make_self_edits(p, from_files[c][p.id], gen) for p in passages}
        else:
            edits[c] = sampled_self_edits(c, out, engine, tokenizer, passages, args)

    # Base answers: once, no training.
    if journal.get("base") is None:
        scores = rewarder.score(passages, adapter=None)
        journal.append(("base",), scores=[s.to_dict() for s in scores])

    # Every TTT of every condition and setting, in one inner-loop run (batched across conditions).
    jobs = []
    for setting in cfg.eval_settings:
        for c in conditions:
            if c == "base":
                continue
            data = {
                p.id: [passage_examples(p, gen)]
                if c == "passage"
                else [self_edit_examples(e, p, gen) for e in edits[c][p.id]]
                for p in passages
            }
            if setting == "single":
                for p in passages:
                    for i, examples in enumerate(data[p.id]):
                        name = f"{setting}-{c}-{p.id}-{i}"
                        jobs.append(Job(name, examples, [p], task_seed(cfg.eval_seed, name)))
            else:
                examples = [x for p in passages for per_edit in data[p.id] for x in per_edit]
                name = f"{setting}-{c}"
                jobs.append(Job(name, examples, list(passages), task_seed(cfg.eval_seed, name)))
    pending = [j for j in jobs if journal.get("ttt", j.name) is None]
    logger.info("%d TTT runs (%d already done)", len(jobs), len(jobs) - len(pending))

    def finished(job: Job, losses: list[float], scores) -> None:
        journal.append(("ttt", job.name), losses=losses, scores=[s.to_dict() for s in scores])

    ttt_split = check_overlong([j.examples for j in jobs], [j.name for j in jobs], tokenizer, args.ttt)
    if pending:
        InnerLoop(model, tokenizer, args.ttt, rewarder, out / "adapters").run(pending, finished)
    if hasattr(engine, "close"):
        engine.close()

    records = graded_answers(passages, conditions, journal, graders, cfg)
    results = summarize(records, passages, conditions, cfg, time.time() - t_start)
    results["ttt_split"] = ttt_split  # training examples (over all TTT runs) split into chunks
    write_outputs(out, results, records)
    logger.info("results in %s", out / "results.md")
    return results


def sampled_self_edits(
    condition: str, out: Path, engine, tokenizer, passages: Sequence[Passage], args: EvalArgs
) -> dict[str, list[SelfEdit]]:
    """Self-edits sampled from the base or the trained generator; saved so a rerun reuses them."""
    path = out / f"generations_{condition}.jsonl"
    if path.exists():
        saved = [SelfEdit.from_dict(d) for d in read_jsonl(path)]
    else:
        gen = dataclasses.replace(args.generate, num_self_edits=args.eval.eval_num_self_edits)
        generator, adapter = engine, None
        if condition == "trained_generator":
            generator, adapter = trained_generator(args, engine, tokenizer)
        nested = generate_self_edits(
            generator, tokenizer, passages, gen, task_seed(args.eval.eval_seed, condition), adapter
        )
        if adapter is not None:
            engine.remove_adapter(adapter)
        saved = [e for per in nested for e in per]
        write_jsonl(path, [e.to_dict() for e in saved])
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
    return HFGenerator(model, load_tokenizer(str(path)), args.generate.generation_batch_size), None


def open_run(out: Path, args: EvalArgs, argv: Sequence[str] | None) -> Journal:
    """The output dir's journal; a rerun with another recipe is refused unless eval_resume is false."""
    out.mkdir(parents=True, exist_ok=True)
    snapshot = args.to_dict()
    snapshot["eval"].pop("eval_resume", None)
    config_path, journal_path = out / "config.yaml", out / "journal.jsonl"
    if config_path.exists() and journal_path.exists():
        if not args.eval.eval_resume:
            journal_path.unlink()
            for stale in out.glob("generations_*.jsonl"):
                stale.unlink()
        elif yaml.safe_load(config_path.read_text()) != snapshot:
            raise ValueError(
                f"{out} holds an evaluation made with a different recipe; use another eval_output_dir, "
                "or --eval_resume false to start over"
            )
    config_path.write_text(yaml.safe_dump(snapshot, sort_keys=False))
    if argv is not None:
        (out / "command.txt").write_text(" ".join(argv) + "\n")
    return Journal(journal_path)


def per_passage(
    condition: str, setting: str, passages: Sequence[Passage], journal: Journal, n_edits: int
) -> dict[str, list[dict[str, Any]]]:
    """{passage id: [score dicts]} for one condition and setting (one per self-edit in `single`)."""
    if condition == "base":
        return {r["passage_id"]: [r] for r in journal.get("base")["scores"]}
    if setting == "cpt":
        return {r["passage_id"]: [r] for r in journal.get("ttt", f"cpt-{condition}")["scores"]}
    n = 1 if condition == "passage" else n_edits
    return {
        p.id: [journal.get("ttt", f"single-{condition}-{p.id}-{i}")["scores"][0] for i in range(n)]
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
    seconds: float,
) -> dict[str, Any]:
    """Accuracy per condition (bootstrap CI over passages) and paired differences against base/passage.

    A passage's accuracy is the mean over its questions, averaged over its self-edits; passages are the
    resampled units, and every condition is compared with base on the same passages (paired).
    """
    n, seed = cfg.eval_bootstrap_resamples, cfg.eval_seed
    out: dict[str, Any] = {
        "passages": len(passages),
        "questions": sum(len(p.questions) for p in passages),
        "minutes": round(seconds / 60, 1),
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
    (out / "results.md").write_text("\n\n".join(sections) + "\n")
    write_jsonl(out / "answers.jsonl", records)
