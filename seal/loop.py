"""The SEAL loop for knowledge incorporation: generate -> apply (TTT) -> reward -> filter -> update.

One round:
  1. generate: the generator samples `num_self_edits` self-edits per passage.
  2. apply:    each self-edit trains a fresh LoRA on the round's model θ_r (test-time training): the
               generator itself (SEAL), or the untouched base with `ttt_model: base`.
  3. reward:   the adapted model answers the passage's questions without the passage; graded, minus
               θ_r's own no-context accuracy.
  4. filter:   the best rewarded self-edits are kept (never one whose reward is not above 0).
  5. update:   the generator is fine-tuned on the kept (prompt, self-edit) pairs with TRL's SFTTrainer.
The next round samples from (and, in SEAL's setting, trains TTT adapters on) the updated generator
(ReST-EM). With held-out sets, the generator is evaluated before round 0 and after every update
(seal.heldout). Every finished evaluation goes to a journal, and every stage's output to the run
directory, so rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from seal.config import SealArgs
from seal.data import Passage, load_passages
from seal.describe import describe_rows
from seal.filter import passages_without_kept, select
from seal.generate import HFEngine, SelfEdit, generate_self_edits
from seal.generate.engine import build_engine, engine_backend, vllm_engine
from seal.generate.self_edits import check_prompt_lengths
from seal.heldout import HeldOut, load_heldout
from seal.hub import HUB_RESUMABLE, check_hub_args, push
from seal.inner_loop import InnerLoop, Job
from seal.journal import Journal
from seal.models import load_model, load_tokenizer, quantization_config, resolve_model_path
from seal.report import markdown_rows
from seal.review import review_round
from seal.reward import PassageScore, Rewarder, build_grader, reward
from seal.templates import passage_examples
from seal.tracking import RoundTracker
from seal.ttt import check_overlong, check_passages_fit, wrap_for_adapters
from seal.update import finished_update, update_generator
from seal.utils import atomic_write, read_jsonl, setup_logging, task_seed, write_json, write_jsonl
from seal.weights import adopt_weights, merged_update

logger = logging.getLogger("seal")


def check_args(args: SealArgs) -> None:
    """Refuse an inconsistent recipe before loading anything: every config rule (re-checked, since a caller
    may have changed a field after the args were made), and the Hub's when the run pushes."""
    args.check()
    check_hub_args(args, pushing=args.sft.push_to_hub)


def setup_run_dir(args: SealArgs, main_process: bool = True) -> Path:
    """Create the run directory, snapshot the recipe, and refuse to resume a run made with another recipe.

    Every process checks (so all of them stop on a changed recipe); only the main process writes, atomically:
    config.yaml is always a whole recipe, the old one or the new one, even after a crash mid-write.
    """
    run_dir = Path(args.sft.output_dir)
    snapshot = args.to_dict()
    for volatile in ("resume",):
        snapshot["loop"].pop(volatile, None)
    snapshot.get("review", {}).pop("review_decisions", None)  # one round's file, not part of the recipe
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        if args.loop.resume:
            previous = yaml.safe_load(config_path.read_text())
            changed = sorted(
                f"{section}.{k}"
                for section, values in snapshot.items()
                for k, v in values.items()
                if previous.get(section, {}).get(k, v) != v
                and k not in ("logging_dir", "run_name", *HUB_RESUMABLE)
                and section != "hub"  # where results are shared does not change them
            )
            if changed:
                raise ValueError(
                    f"{run_dir} holds a run made with a different recipe (changed: {', '.join(changed)}). "
                    "Use another output_dir, or --resume false to start over."
                )
        elif main_process:
            logger.info("resume=false: discarding the previous run in %s", run_dir)
            for stale in [*run_dir.glob("journal*.jsonl"), *run_dir.glob("round_*")]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(config_path, lambda f: yaml.safe_dump(snapshot, f, sort_keys=False))  # whole or old
    return run_dir


def run(
    args: SealArgs, on_evaluation: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run `num_rounds` ReST-EM rounds; return one summary dict per round.

    Under `accelerate launch` with N processes, the main process samples the self-edits (one generator, so
    the samples do not depend on N) and every process trains and rewards its shard of them; the results are
    gathered, so all processes filter the same rows, and the update is TRL's distributed SFT.
    """
    state = PartialState()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    check_args(args)
    seed = args.sft.seed
    passages: list[Passage] = load_passages(  # validated before any model is loaded
        args.data.dataset_name,
        split=args.data.dataset_split,
        config=args.data.dataset_config,
        limit=args.data.num_passages,
        max_questions=args.data.max_questions_per_passage,
    )
    heldout_sets = load_heldout(args.heldout, passages)  # validated, and refused if trained on
    run_dir = setup_run_dir(args, main)
    state.wait_for_everyone()
    setup_logging(run_dir, rank)
    logger.info(
        "run dir %s: %d passages, %d rounds, %d process(es)",
        *(run_dir, len(passages), args.loop.num_rounds, world),
    )
    tracker = RoundTracker.for_run(run_dir, args.sft) if main else None  # report_to, and rounds.png

    # One base model for the whole run: TTT adapters come and go on it; the generator is it (+ an adapter).
    with state.main_process_first():  # the embedded model is converted (once) by the main process
        base_path = resolve_model_path(args.model.model_name_or_path, args.loop.model_cache_dir)
    tokenizer = load_tokenizer(base_path, revision=args.model.model_revision)
    heldout_passages = [p for ps in heldout_sets.values() for p in ps]
    check_prompt_lengths(  # before models
        [*passages, *heldout_passages], tokenizer, args.generate, args.vllm.vllm_max_model_len
    )
    check_passages_fit(passages, tokenizer, args.ttt, args.generate)  # ttt_overlong: error
    model = wrap_for_adapters(
        load_model(
            base_path,
            args.model.dtype,
            args.model.model_revision,
            args.model.attn_implementation,
            quantization_config(args.model),
        ),
        args.ttt,
    )
    hf = HFEngine(model, tokenizer, args.generate.generation_batch_size, args.ttt.ttt_autocast)
    # The engine samples self-edits and answers questions: vLLM (adapters through LoRARequest) or HF itself.
    engine = build_engine(
        args.generate.generator_backend, args.model, hf, args.vllm, base_path, lora_rank(args), args.sft.seed
    )
    judge, judge_tokenizer = engine, tokenizer  # a local judge is the base model unless judge_model is set
    if args.reward.reward_grader == "judge" and args.reward.judge_model and not args.reward.judge_url:
        judge_path = resolve_model_path(args.reward.judge_model, args.loop.model_cache_dir)
        judge_tokenizer = load_tokenizer(judge_path)
        judge = HFEngine(load_model(judge_path), judge_tokenizer, args.reward.answer_batch_size)
    grader = build_grader(args.reward, judge, judge_tokenizer)
    rewarder = Rewarder(engine, tokenizer, grader, args.reward, args.generate.use_chat_template)
    journal = Journal(run_dir / "journal.jsonl", rank=rank if world > 1 else None)
    by_id = {p.id: p for p in passages}

    def baseline(r: int) -> dict[str, float]:
        """θ_r's no-context accuracy per passage (journaled once per round's weights; round 0: the base)."""
        key = ("baseline",) if r == 0 or args.ttt.ttt_model == "base" else ("baseline", r)
        if journal.get(*key) is None:
            record = None
            if main:
                scores = rewarder.score(passages, adapter=None)
                record = journal.append(key, scores={s.passage_id: s.to_dict() for s in scores})
            journal.merge(broadcast_object_list([record]))
        return {pid: s["accuracy"] for pid, s in journal.get(*key)["scores"].items()}

    heldout = HeldOut(heldout_sets, args.heldout, args.generate, journal, run_dir, seed, args.ttt.ttt_model)
    inner = InnerLoop(model, tokenizer, args.ttt, rewarder, run_dir / "adapters")

    def evaluate_heldout(point: int) -> dict[str, Any]:
        """The held-out evaluation of the current generator (on the main process; the others wait)."""
        fields = None
        if main and heldout_sets:
            fields = heldout.evaluate(point, inner, rewarder, generator, tokenizer, adapter)
        return (broadcast_object_list([fields])[0] if world > 1 else fields) or {}

    generator, adapter = engine, None  # round 0 samples from the base model itself
    summaries = []
    before = evaluate_heldout(0)
    for r in range(args.loop.num_rounds):
        round_dir, t0 = run_dir / f"round_{r}", time.time()
        base_acc = baseline(r)

        # 1. generate: k self-edits per passage (saved whole, so a rerun reuses them).
        gen_path = round_dir / "generations.jsonl"
        if gen_path.exists():
            edits = [SelfEdit.from_dict(d) for d in read_jsonl(gen_path)]
        elif not main:  # the main process samples; the others get its self-edits
            edits = [SelfEdit.from_dict(d) for d in broadcast_object_list([None])[0]]
        else:
            logger.info(
                "round %d: sampling %d self-edits for %d passages",
                r,
                args.generate.num_self_edits,
                len(passages),
            )
            with all_cpu_threads(world > 1):  # the other processes wait for the broadcast meanwhile
                nested = generate_self_edits(
                    generator, tokenizer, passages, args.generate, task_seed(seed, "gen", r), adapter
                )
            edits = [e for per_passage in nested for e in per_passage]
            write_jsonl(gen_path, [e.to_dict() for e in edits])
            if world > 1:
                broadcast_object_list([[e.to_dict() for e in edits]])
        t_gen = time.time() - t0
        ok = [e for e in edits if e.status == "ok"]  # TTT splits long examples (logged), or refuses them
        names = [f"passage {e.passage_id} self-edit {e.index}" for e in ok]
        ttt_split = check_overlong([e.examples for e in ok], names, tokenizer, args.ttt)

        # 2-3. apply each self-edit with a fresh LoRA, then reward the adapted model (journaled one by one;
        #      in batched mode many self-edits are trained and answered together).
        repeats = range(args.reward.reward_repeats)
        evals = [("eval", r, e.passage_id, e.index, rep) for e in edits for rep in repeats]
        if main and (resumed := journal.done(evals)):
            logger.info("round %d: resuming: %d of %d evaluations done", r, resumed, len(evals))
        jobs, keys, done_here = [], {}, []
        for p in passages if args.filter.filter_beat_passage else []:  # passage-only TTT, for the filter
            for rep in repeats:
                key = ("passage", r, p.id, rep)
                if journal.get(*key) is None:
                    keys[name := f"passage-{p.id}-{rep}"] = key
                    ttt_seed = task_seed(seed, "ttt-passage", r, p.id, rep)
                    jobs.append(Job(name, passage_examples(p, args.generate), [p], ttt_seed))
        for edit in edits:
            for rep in range(args.reward.reward_repeats):
                key = ("eval", r, edit.passage_id, edit.index, rep)
                if journal.get(*key) is not None:
                    continue
                if edit.status != "ok":  # empty/unparseable: reward 0, logged at parse time, never trained
                    if main:
                        record = journal.append(
                            key, status=edit.status, losses=[], accuracy=0.0, answers=[], scores=[]
                        )
                        done_here.append(record)
                        if on_evaluation is not None:
                            on_evaluation(record)
                    continue
                name = f"{edit.passage_id}-{edit.index}-{rep}"
                keys[name] = key
                ttt_seed = task_seed(seed, "ttt", r, edit.passage_id, edit.index, rep)
                jobs.append(Job(name, edit.examples, [by_id[edit.passage_id]], ttt_seed))

        def finished(
            job: Job,
            losses: list[float],
            scores: list[PassageScore],
            keys=keys,
            done_here=done_here,
            base_acc=base_acc,
        ) -> None:
            key = keys[job.name]
            score = scores[0]
            record = journal.append(key, status="ok", seed=job.seed, losses=losses, **score.to_dict())
            done_here.append(record)
            what = "passage alone" if key[0] == "passage" else f"self-edit {key[3]}"
            logger.info(
                "round %d passage %s %s repeat %d: accuracy %.2f (no-context %.2f), final loss %.3f",
                *(
                    key[1],
                    score.passage_id,
                    what,
                    key[-1],
                    score.accuracy,
                    base_acc[score.passage_id],
                    losses[-1],
                ),
            )
            if on_evaluation is not None:
                on_evaluation(record)

        if jobs:
            inner.adapter_dir = round_dir / "adapters"
            inner.run(jobs, finished, rank, world)
        if world > 1:  # every process gets every evaluation (each journaled its own in its own file)
            journal.merge(r for records in gather_object([done_here]) for r in records)
        t_eval = time.time() - t0 - t_gen

        # Rewards per self-edit, averaged over TTT repeats.
        rows = []
        for edit in edits:
            evals = [
                journal.get("eval", r, edit.passage_id, edit.index, rep)
                for rep in range(args.reward.reward_repeats)
            ]
            accs = [e["accuracy"] for e in evals]
            no_context = base_acc[edit.passage_id]
            alone = [
                journal.get("passage", r, edit.passage_id, rep)["accuracy"]
                for rep in range(args.reward.reward_repeats)
                if args.filter.filter_beat_passage
            ]
            rows.append(
                {
                    **edit.to_dict(),
                    "adapted_accuracy": sum(accs) / len(accs),
                    "base_accuracy": no_context,
                    "passage_accuracy": sum(alone) / len(alone) if alone else None,
                    "reward": reward(accs, no_context, args.reward) if edit.status == "ok" else 0.0,
                    "answers": [e["answers"] for e in evals],
                    "final_loss": [e["losses"][-1] if e["losses"] else None for e in evals],
                }
            )

        # 4. filter: keep the best self-edits.
        kept = select(rows, args.filter)
        kept_ids = {(k["passage_id"], k["index"]) for k in kept}
        for row in rows:
            row["kept"] = (row["passage_id"], row["index"]) in kept_ids
        if main:
            write_jsonl(round_dir / "self_edits.jsonl", rows)
        if args.review.review:  # a person accepts/rejects each self-edit; the update trains on the accepted
            kept = review_round(round_dir, rows, args.review, by_id) if main else None
            kept = broadcast_object_list([kept])[0] if world > 1 else kept
            if kept is None:  # waiting for decisions: review.html is written, a rerun continues from here
                break
        if main:
            write_jsonl(round_dir / "kept.jsonl", kept)

        # 5. update: SFT the generator on the kept (prompt, self-edit) pairs; the next round samples from it.
        update = finished_update(round_dir / "update")
        if update is None and kept:
            engine.sleep()  # free accelerator memory for training when vLLM shares the GPU
            update = update_generator(
                base_path,
                kept,
                args.model,
                args.sft,
                round_dir / "update",
                args.loop.update_merge,
                args.generate.use_chat_template,
            )
            engine.wake_up()
        elif not kept:
            logger.warning("round %d: no self-edit passed the filter; the generator is not updated", r)
        if update is not None and (r + 1 < args.loop.num_rounds or heldout_sets):
            if args.ttt.ttt_model == "generator":  # θ_{r+1}: TTT, baseline and sampling on the new weights
                with state.main_process_first():  # the main process merges (once); the others find it
                    path = merged_update(update, base_path, args.model.dtype)
                engine = adopt_weights(
                    path, model, engine, hf, args.vllm, tokenizer, lora_rank(args), args.sft.seed
                )
                rewarder = Rewarder(engine, tokenizer, grader, args.reward, args.generate.use_chat_template)
                inner = InnerLoop(model, tokenizer, args.ttt, rewarder, run_dir / "adapters")
                generator, adapter = engine, None
            else:
                generator, adapter = load_generator(update, engine, r, args, tokenizer)
        after = evaluate_heldout(r + 1)

        summary = round_summary(r, passages, rows, kept, update, t_gen, t_eval, time.time() - t0, world)
        summary["ttt_split"] = ttt_split  # training examples longer than ttt_max_length, trained as chunks
        summary["no_kept"] = passages_without_kept(rows, kept)  # passages the E-step gave no signal
        summary["ttt_model"] = args.ttt.ttt_model
        summary.update(describe_rows(rows, by_id))  # length, copying, novel words of the parsed self-edits
        if r == 0:
            summary.update({f"{k}_before": v for k, v in before.items()})
        summary.update(after)
        summaries.append(summary)
        if main:
            write_json(round_dir / "summary.json", summary)
            (round_dir / "summary.md").write_text(markdown_rows([summary]) + "\n")
            tracker.update(summaries)
        logger.info("round %d done in %.1f min", r, summary["minutes"])

    engine.close()
    if not main:  # the main process reports
        return summaries
    tracker.close()
    if len(summaries) < args.loop.num_rounds:  # stopped for a review
        return summaries
    table = markdown_rows(summaries)
    (run_dir / "summary.md").write_text(table + "\n")
    write_json(run_dir / "summary.json", summaries)
    print(table, flush=True)
    if args.sft.push_to_hub:
        push(args)
    return summaries


def load_generator(
    update: dict[str, Any], engine, r: int, args: SealArgs, tokenizer
) -> tuple[Any, str | None]:
    """The updated generator: an adapter on the shared engine, or an engine on the merged/full weights."""
    if update["kind"] == "adapter":
        return engine, engine.add_adapter(update["path"], name=f"generator-r{r}")  # a fresh name per version
    if engine_backend(args.generate.generator_backend, args.model) == "hf":
        model = load_model(update["path"], args.model.dtype)
        tok = load_tokenizer(update["path"])
        return HFEngine(model, tok, args.generate.generation_batch_size, args.ttt.ttt_autocast), None
    if args.vllm.vllm_server_url:
        raise ValueError(
            "A running vLLM server cannot switch to merged/full update weights: keep the update as a LoRA "
            "(update_merge: false, use_peft: true), or serve the new weights and rerun"
        )
    return vllm_engine(args.vllm, update["path"], tokenizer, lora_rank(args), args.sft.seed), None


@contextlib.contextmanager
def all_cpu_threads(enabled: bool) -> Iterator[None]:
    """Let this process's CPU work use every core while it runs alone (accelerate launch gives each of N
    processes OMP_NUM_THREADS=1; the others are idle while the main process samples)."""
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(max(before, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lora_rank(args: SealArgs) -> int:
    """The largest LoRA rank an engine must serve: TTT adapters and the generator's update adapter."""
    return max(args.ttt.ttt_lora_r, args.model.lora_r if args.model.use_peft else 1)


def round_summary(
    r: int,
    passages: list[Passage],
    rows: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    update: dict[str, Any] | None,
    t_gen: float,
    t_eval: float,
    total: float,
    world_size: int = 1,
) -> dict[str, Any]:
    ok = [row for row in rows if row["status"] == "ok"]
    best: dict[str, float] = {}
    for row in rows:
        best[row["passage_id"]] = max(best.get(row["passage_id"], 0.0), row["adapted_accuracy"])
    base = {row["passage_id"]: row["base_accuracy"] for row in rows}
    return {
        "round": r,
        "passages": len(passages),
        "self_edits": len(rows),
        "parsed": len(ok),
        "base_acc": sum(base.values()) / len(base),
        "mean_adapted_acc": sum(row["adapted_accuracy"] for row in rows) / len(rows),
        "best_of_k_acc": sum(best.values()) / len(best),
        "mean_reward": sum(row["reward"] for row in rows) / len(rows),
        "kept": len(kept),
        "update_loss": update["train_loss"] if update else None,
        "gen_s": round(t_gen, 1),
        "ttt_eval_s": round(t_eval, 1),
        "minutes": round(total / 60, 2),
        "processes": world_size,
    }
