"""The inner loop (TTT + QA evaluation per self-edit): a reference-style implementation vs seal's batched one.

    python scripts/bench_ttt.py --num_passages 8 --num_self_edits 4 --out scripts/results/bench_ttt_32

On the same self-edits (sampled once from the embedded model for the sample data's eval passages and
cached in the output directory) and the same questions, in one process:

  reference  per self-edit: a fresh PEFT model and a `trl.SFTTrainer`, batch 1, SEAL's TTT defaults
             (r=32, alpha=64, lr 1e-3, 10 epochs, linear decay), then greedy answers one question at a time;
  same-hp    seal.ttt.BatchedTTT with exactly those hyperparameters (batch 1, linear decay), and per seed set
             the reference's initial LoRA weights and data order: all adapters trained together (packed,
             bf16 autocast), all answers generated in one batch;
  recipe     the same with the CPU recipe's TTT settings (batch 8, constant lr);
  --extra    rows of seal with other TTT settings (choose them on train passages: ttt_recipe_sweep.py).

seal same-hp is timed right before and right after each of the reference's seed sets (the mean of the two),
so that the CPU's drift in speed cancels out of the speed-up (--no_bracket: after all of the reference's).
Prints and writes (JSON + Markdown) evaluations/hour, speed-up over the reference, mean adapted accuracy with
a paired bootstrap CI of the difference, training tokens/s and the share of this CPU's measured matmul peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from tqdm.auto import tqdm
from trl import SFTConfig, SFTTrainer

from seal.config import GenerateConfig, RewardConfig, TTTConfig
from seal.data import load_passages
from seal.domain import Knowledge, Policy
from seal.generate import HFEngine, SelfEdit
from seal.generate.hf import stack_adapter
from seal.graders import make_grader
from seal.losses import IGNORE_INDEX
from seal.memory import parallel_adapters, tokens_per_step
from seal.models import load_model, load_tokenizer, resolve_model_path
from seal.reward import QA_PROMPT, Rewarder
from seal.sequences import tokenize_examples
from seal.stats import bootstrap_ci, paired_difference
from seal.templates import render_chat
from seal.ttt import BatchedTTT, batch_schedule, ttt_lora_config, wrap_for_adapters
from seal.utils import autocast, bf16_supported, task_seed, write_json

REFERENCE = TTTConfig(ttt_batch_size=1, ttt_lr_scheduler="linear", ttt_max_length=128)


SETTINGS = {
    "bs": "ttt_batch_size",
    "epochs": "ttt_epochs",
    "lr": "ttt_learning_rate",
    "sched": "ttt_lr_scheduler",
}


def ttt_settings(text: str) -> TTTConfig:
    """``bs=1,epochs=5,lr=2e-3,sched=linear`` -> the reference's TTT settings with those changed."""
    changes: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise ValueError(f"unknown TTT setting '{key}' in '{text}'; use {sorted(SETTINGS)}")
        changes[SETTINGS[key]] = value if key == "sched" else (float(value) if key == "lr" else int(value))
    return replace(REFERENCE, **changes)


def matmul_peak() -> dict[str, float]:
    """This CPU's dense matmul throughput (GFLOP/s), bf16 and fp32, on transformer-sized shapes."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        for _ in range(3):
            a @ b
        start, n = time.perf_counter(), 20
        for _ in range(n):
            a @ b
        out[name] = round(2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9, 1)
    return out


def trainer_schedule(n: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """The order a `transformers.Trainer` with `seed` feeds n examples in: accelerate's seedable sampler
    (data_seed = seed) draws epoch e as ``randperm(n)`` from a generator seeded with ``seed + e``, which is
    seal's one-epoch :func:`batch_schedule` for that seed."""
    return [
        (epoch, indices)
        for epoch in range(epochs)
        for _, indices in batch_schedule(n, batch_size, 1, seed + epoch)
    ]


def training_tokens(edits: list[SelfEdit], tokenizer, cfg: TTTConfig) -> int:
    per_epoch = sum(
        len(ids)
        for e in edits
        for ids, _ in tokenize_examples(e.examples, tokenizer, cfg.ttt_max_length, False)
    )
    return per_epoch * cfg.ttt_epochs


def self_edits(path: Path, model_path: str, tokenizer, passages, num_self_edits: int) -> list[SelfEdit]:
    """Sample (once; cached in `path`) self-edits with the recipe's generation settings. A cache sampled for
    other passages or another number per passage is an error, not silently reused."""
    if path.exists():
        edits = [SelfEdit.from_dict(json.loads(line)) for line in path.read_text().splitlines()]
        wanted = {(p.id, i) for p in passages for i in range(num_self_edits)}
        cached = {(e.passage_id, e.index) for e in edits}
        if cached != wanted:
            per_passage = max((e.index for e in edits), default=-1) + 1
            raise ValueError(
                f"{path} holds {len(edits)} self-edits ({len({e.passage_id for e in edits})} passages, up to "
                f"{per_passage} each), not {num_self_edits} for each of the {len(passages)} passages asked "
                "for: choose another --out, or match --num_passages/--num_self_edits to it"
            )
        return edits
    cfg = GenerateConfig(num_self_edits=num_self_edits, max_new_tokens=192, include_passage=True)
    generator = HFEngine(load_model(path=model_path), tokenizer, batch_size=32)
    nested = Knowledge(cfg).sample(Policy(generator), tokenizer, passages, seed=0)
    edits = [e for per in nested for e in per]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in edits))
    return edits


def reference(
    model_path: str, tokenizer, edits: list[SelfEdit], by_id, grader, reward_cfg, tag: str = "bench"
) -> dict:
    """SEAL-style: a fresh model, PEFT wrapper and SFTTrainer per self-edit; answers one at a time.

    `tag` seeds the LoRA initialisation and the trainer (data order), as in :func:`ours`."""
    accuracies, answers = [], []
    start = time.perf_counter()
    train_seconds = 0.0
    for e in tqdm(edits, desc=f"reference {tag}"):
        seed = task_seed(tag, e.passage_id, e.index)
        model = load_model(model_path)
        torch.manual_seed(seed)
        model = get_peft_model(model, ttt_lora_config(REFERENCE))
        # seal's training sequences (long examples split, not cut), tokenized: both train on the same tokens
        data = Dataset.from_list(
            [
                {"input_ids": ids, "completion_mask": [int(x != IGNORE_INDEX) for x in labels]}
                for ids, labels in tokenize_examples(e.examples, tokenizer, REFERENCE.ttt_max_length, False)
            ]
        )
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(
                output_dir=tmp,
                per_device_train_batch_size=1,
                num_train_epochs=REFERENCE.ttt_epochs,
                learning_rate=REFERENCE.ttt_learning_rate,
                lr_scheduler_type="linear",
                weight_decay=0.0,
                max_length=REFERENCE.ttt_max_length,
                # loss where seal's labels are: all tokens but a split chunk's repeated context (ttt_loss=all)
                completion_only_loss=True,
                use_cpu=True,
                bf16=bf16_supported(torch.device("cpu")),
                save_strategy="no",
                report_to=[],
                logging_strategy="no",
                disable_tqdm=True,
                seed=seed,
            )
            t0 = time.perf_counter()
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
            train_seconds += time.perf_counter() - t0
        model.eval()
        passage = by_id[e.passage_id]
        preds = []
        for q in passage.questions:  # one question at a time, greedy
            enc = tokenizer(
                render_chat(tokenizer, QA_PROMPT.format(question=q.question)),
                return_tensors="pt",
                add_special_tokens=False,
            )
            with torch.inference_mode(), autocast(torch.device("cpu")):  # the dtype seal answers in
                out = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=reward_cfg.answer_max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            preds.append(
                tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            )
        grades = grader.grade(
            [q.question for q in passage.questions], preds, [q.answers for q in passage.questions]
        )
        accuracies.append(sum(map(float, grades)) / len(grades))
        answers.append(preds)
        del model
        gc.collect()
    return {
        "seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "accuracies": accuracies,
        "answers": answers,
    }


def ours(
    model,
    tokenizer,
    edits: list[SelfEdit],
    by_id,
    grader,
    reward_cfg,
    cfg: TTTConfig,
    tag: str = "bench",
    paired: bool = False,
) -> dict:
    """seal's inner loop: BatchedTTT on chunks of K self-edits, then one batched answer pass per chunk; as in
    :class:`seal.inner_loop.InnerLoop`, the chunks group self-edits by size (most training sequences first),
    so a chunk's adapters finish at about the same step.

    `tag` seeds the adapters' initialisation and data order as it seeds the reference's. With `paired`
    each adapter starts from the very LoRA weights the reference's PEFT model starts from and sees the
    examples in the reference trainer's order, so the two differ only in implementation (numerics);
    otherwise seal draws its own (same distributions)."""
    generator = HFEngine(model, tokenizer, batch_size=256)
    rewarder = Rewarder(generator, tokenizer, grader, reward_cfg)
    schedule = trainer_schedule if paired else batch_schedule
    batched = BatchedTTT(model, tokenizer, cfg, exact_peft_init=paired, schedule=schedule)
    k = parallel_adapters(model, cfg, tokens_per_step([e.examples for e in edits], tokenizer, cfg))
    accuracies, answers = [0.0] * len(edits), [[]] * len(edits)
    order = sorted(range(len(edits)), key=lambda i: -len(edits[i].examples))
    start = time.perf_counter()
    train_seconds = 0.0
    for c in range(0, len(edits), k):
        indices = order[c : c + k]
        chunk = [edits[i] for i in indices]
        t0 = time.perf_counter()
        batched.apply([e.examples for e in chunk], [task_seed(tag, e.passage_id, e.index) for e in chunk])
        train_seconds += time.perf_counter() - t0
        generator.serve_stack(batched.stack)
        scores = rewarder.score(
            [by_id[e.passage_id] for e in chunk], [stack_adapter(i) for i in range(len(chunk))]
        )
        for i, score in zip(indices, scores, strict=True):
            accuracies[i], answers[i] = score.accuracy, score.answers
    batched.release()
    batched.stack.remove()
    return {
        "seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "accuracies": accuracies,
        "answers": answers,
        "parallel_adapters": k,
    }


def seed_tag(i: int) -> str:
    """The seed tag of seed set i (0 is "bench", the tag the first published reference run used)."""
    return "bench" if i == 0 else f"bench-{i}"


def reference_runs(path: Path, seed_sets: Sequence[int], reuse: bool, run) -> list[dict]:
    """The reference's runs for `seed_sets`: those stored in `path` reused when `reuse`, the others run
    (`run(tag)`) and stored one by one, so an interrupted benchmark loses at most one seed set."""
    stored = json.loads(path.read_text()) if reuse and path.exists() else {}
    if stored and "runs" not in stored:  # a single-run file from before seed sets: seed set 0
        stored = {"runs": {seed_tag(0): stored}}
    runs = stored.get("runs", {})
    for i in seed_sets:
        tag = seed_tag(i)
        if tag not in runs:
            runs[tag] = run(tag)
            write_json(path, {"runs": runs})
        print(f"reference seed set {i}: {runs[tag]['seconds']:.0f} s", flush=True)
    return [runs[seed_tag(i)] for i in seed_sets]


def run_seed_sets(
    name: str, seed_sets: Sequence[int], run, prefix: str = "", done: dict | None = None
) -> dict:
    """`run(tag)` for `seed_sets` (tags `prefix` + :func:`seed_tag`), each one's time printed as it
    ends, averaged by :func:`average_seeds`. A seed set with runs in `done` (tag -> runs, see
    :func:`bracketing`) is their average instead."""
    seeded = []
    for i in seed_sets:
        tag = prefix + seed_tag(i)
        if done and tag in done:
            seeded.append(average_seeds(done[tag]))
            times = " and ".join(f"{t:.0f}" for t in seeded[-1]["seed_seconds"])
            print(f"{name} seed set {i}: {times} s, before and after the reference's", flush=True)
        else:
            seeded.append(run(tag))
            print(f"{name} seed set {i}: {seeded[-1]['seconds']:.0f} s", flush=True)
    return average_seeds(seeded)


def bracketing(reference_run, seal_run, done: dict, tags: set[str]):
    """`reference_run(tag)` between two runs of `seal_run(tag)`, which are kept in ``done[tag]``, for the
    seed tags in `tags` (the seed sets seal runs; the reference's others run alone).

    The CPU's speed drifts by 15-30 % within an hour here, and the reference takes 25-45 min per seed set:
    timing seal right before and right after it and taking the mean cancels a steady drift out of the
    speed-up instead of charging it to whichever method ran in the slower period."""

    def run(tag: str) -> dict:
        if tag not in tags:
            return reference_run(tag)
        done[tag] = [seal_run(tag)]
        out = reference_run(tag)
        done[tag].append(seal_run(tag))
        return out

    return run


def signed_points(ci: dict | None) -> str:
    """A difference with its CI in percentage points, ``+1.2 [-3.4, +5.6]``; ``–`` for none."""
    if not ci:
        return "–"
    return f"{100 * ci['mean']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def percents(values: list[float]) -> str:
    """Fractions as comma-separated percentages, ``–`` for none."""
    return ", ".join(f"{100 * a:.1f}" for a in values) or "–"


def write_markdown(path: Path, lines: list[str]) -> None:
    """Write a Markdown report and print it."""
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def average_seeds(runs: list[dict]) -> dict:
    """Several seed sets of one method: mean time, per-self-edit accuracy averaged over the seed sets."""
    n = len(runs)
    return {
        "seconds": sum(r["seconds"] for r in runs) / n,
        "train_seconds": sum(r["train_seconds"] for r in runs) / n,
        "accuracies": [sum(accs) / n for accs in zip(*(r["accuracies"] for r in runs), strict=True)],
        "seed_accuracies": [sum(r["accuracies"]) / len(r["accuracies"]) for r in runs],
        "seed_seconds": [r["seconds"] for r in runs],
        "answers": runs[0]["answers"],
        "parallel_adapters": runs[0].get("parallel_adapters"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--num_passages", type=int, default=8)
    # 4 per passage (30 parsable self-edits from the 8 sample passages) fills a batch of K adapters as a SEAL
    # round does (the library samples 5 per passage); with 2 the batch thins out sooner
    parser.add_argument("--num_self_edits", type=int, default=4)
    parser.add_argument("--out", default="scripts/results/bench_ttt_32")
    parser.add_argument(
        "--skip_reference",
        action="store_true",
        help="reuse the reference seed sets stored in --out/reference.json (missing ones are run)",
    )
    parser.add_argument("--reference_seeds", type=int, default=1, help="seed sets of the reference")
    parser.add_argument("--reference_only", action="store_true", help="stop after the reference's runs")
    parser.add_argument(
        "--no_bracket",
        action="store_true",
        help="time seal same-hp once per seed set, after all of the reference's runs, instead of right "
        "before and right after each seed set the reference runs now (the mean of the two)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run ours with this many seed sets (LoRA init and data order) and report the mean accuracy",
    )
    parser.add_argument(
        "--first_seed",
        type=int,
        default=0,
        help="number of the first seed set (of the reference's and ours): a further seed set in a run of its "
        "own, bracketed like the first, e.g. --first_seed 1 --out <a new directory holding a copy of the "
        "first run's self_edits.jsonl, so that it runs on the same self-edits>",
    )
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="SETTINGS",
        help="more rows of seal with other TTT settings, e.g. bs=1,epochs=5,lr=3e-3,sched=linear",
    )
    args = parser.parse_args()
    if args.first_seed < 0:
        parser.error(f"--first_seed must be >= 0, got {args.first_seed}")
    seal_seeds = range(args.first_seed, args.first_seed + args.seeds)
    reference_seeds = range(args.first_seed, args.first_seed + args.reference_seeds)
    for text in args.extra:
        ttt_settings(text)  # bad settings fail before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    passages = load_passages("sample", "eval", limit=args.num_passages)
    by_id = {p.id: p for p in passages}
    edits = [
        e for e in self_edits(out / "self_edits.jsonl", model_path, tokenizer, passages, args.num_self_edits)
    ]
    edits = [e for e in edits if e.status == "ok"]
    grader, reward_cfg = make_grader("contains"), RewardConfig(answer_max_new_tokens=24)
    questions = sum(len(by_id[e.passage_id].questions) for e in edits)
    print(f"{len(edits)} self-edits, {questions} questions", flush=True)

    peak = matmul_peak()
    model = wrap_for_adapters(load_model(model_path), TTTConfig())
    methods = {
        "seal same-hp": REFERENCE,
        "seal recipe": replace(REFERENCE, ttt_batch_size=8, ttt_lr_scheduler="constant"),
    }
    methods.update({f"seal {text}": ttt_settings(text) for text in args.extra})
    seal_runs = {
        name: partial(
            ours, model, tokenizer, edits, by_id, grader, reward_cfg, cfg, paired=name == "seal same-hp"
        )
        for name, cfg in methods.items()
    }  # paired: same hyperparameters, init and data order as the reference
    bracketed: dict[str, list[dict]] = {}  # seal same-hp's runs timed around the reference's, by seed tag
    reference_run = partial(reference, model_path, tokenizer, edits, by_id, grader, reward_cfg)
    if not args.reference_only and not args.no_bracket:
        seal_tags = {seed_tag(i) for i in seal_seeds}
        reference_run = bracketing(reference_run, seal_runs["seal same-hp"], bracketed, seal_tags)
    ref = average_seeds(
        reference_runs(out / "reference.json", reference_seeds, args.skip_reference, reference_run)
    )
    if args.reference_only:
        return
    runs = {"reference": (ref, REFERENCE)}
    for name, cfg in methods.items():
        done = bracketed if name == "seal same-hp" else None  # only same-hp is timed around the reference
        runs[name] = (run_seed_sets(name, seal_seeds, seal_runs[name], done=done), cfg)
    n_params = sum(p.numel() for p in model.get_base_model().parameters())
    rows = []
    for name, (run, cfg) in runs.items():
        tokens = training_tokens(edits, tokenizer, cfg)
        tok_s = tokens / run["train_seconds"]
        diff = paired_difference(ref["accuracies"], run["accuracies"]) if name != "reference" else None
        rows.append(
            {
                "method": name,
                "batch": cfg.ttt_batch_size,
                "epochs": cfg.ttt_epochs,
                "lr": cfg.ttt_learning_rate,
                "lr_schedule": cfg.ttt_lr_scheduler,
                "evals_per_hour": round(len(edits) / run["seconds"] * 3600, 1),
                "speedup": round(ref["seconds"] / run["seconds"], 2),
                "seconds": round(run["seconds"], 1),
                "train_tok_s": round(tok_s, 1),
                # frozen base: forward 2N + backward (activations only) 2N FLOPs per token; LoRA excluded
                "pct_bf16_peak": round(100 * 4 * n_params * tok_s / (peak["bf16"] * 1e9), 1),
                "accuracy": bootstrap_ci(run["accuracies"]).to_dict(),
                "seed_accuracies": [round(a, 4) for a in run.get("seed_accuracies", [])],
                # per self-edit, averaged over the seed sets: runs on other seed sets can be paired later
                "accuracies": [round(a, 4) for a in run["accuracies"]],
                "delta_vs_reference": diff.to_dict() if diff else None,
            }
        )
    result = {
        "self_edits": len(edits),
        "questions": questions,
        "matmul_peak_gflops": peak,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "train_dtype": "bfloat16" if bf16_supported(torch.device("cpu")) else "float32",
        "base_params": n_params,
        "parallel_adapters": {k: v[0].get("parallel_adapters") for k, v in runs.items()},
        # seal same-hp's seconds before and after each reference seed set run in this invocation
        "bracketed_seconds": {tag: [r["seconds"] for r in pair] for tag, pair in bracketed.items()},
        "rows": rows,
    }
    write_json(out / "bench_ttt.json", result)
    timing = (
        f"seal same-hp timed right before and right after the reference's seed sets {sorted(bracketed)} "
        "(the mean of the two)"
        if bracketed
        else "the reference's runs first (or reused), then seal's"
    )
    lines = [
        f"{len(edits)} self-edits, {questions} questions; CPU {result['cpu_capability']}, training in "
        f"{result['train_dtype']}; matmul peak bf16 {peak['bf16']} GFLOP/s, fp32 {peak['fp32']} GFLOP/s; "
        f"{timing}",
        "",
        "| method | batch | epochs, lr | evals/hour | speed-up | train tok/s | % bf16 peak "
        "| accuracy (95% CI) | Δ vs ref | accuracy per seed set |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["accuracy"]
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['epochs']}, {r['lr']:g} {r['lr_schedule']} "
            f"| {r['evals_per_hour']} "
            f"| {r['speedup']}× | "
            f"{r['train_tok_s']} | {r['pct_bf16_peak']} | {100 * acc['mean']:.1f} "
            f"[{100 * acc['low']:.1f}, {100 * acc['high']:.1f}] | {signed_points(r['delta_vs_reference'])} "
            f"| {percents(r['seed_accuracies'])} |"
        )
    write_markdown(out / "bench_ttt.md", lines)


if __name__ == "__main__":
    main()
