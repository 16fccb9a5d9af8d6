"""The SEAL loop: generate -> apply (TTT) -> reward -> filter -> update.

What a self-edit is and where a round's passages come from is the recipe's domain (seal.domain: gold
question-answer passages, or documents pseudo-labelled every round). One round:
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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from seal.config import SealArgs
from seal.data import Passage
from seal.describe import describe_rows
from seal.domain import Domain, Policy, build_domain
from seal.filter import passages_without_kept, select
from seal.generate import HFEngine, SelfEdit
from seal.generate.engine import engine_backend, vllm_engine
from seal.heldout import HeldOut, load_heldout
from seal.hub import check_hub_args, push
from seal.inner_loop import Job
from seal.journal import Journal
from seal.models import load_model, load_tokenizer, resolve_model_path
from seal.report import markdown_rows
from seal.review import review_round
from seal.reward import PassageScore, reward
from seal.run_dir import RunDir, setup_run_dir
from seal.runtime import Runtime
from seal.sequences import check_overlong, check_passages_fit
from seal.tracking import RoundTracker
from seal.update import Update, finished_update, update_generator
from seal.utils import read_jsonl, setup_logging, task_seed, write_json, write_jsonl
from seal.weights import merged_update

logger = logging.getLogger("seal")


def check_args(args: SealArgs) -> None:
    """Refuse an inconsistent recipe before loading anything: every config rule (re-checked, since a caller
    may have changed a field after the args were made), and the Hub's when the run pushes."""
    args.check()
    check_hub_args(args, pushing=args.sft.push_to_hub)


def run(
    args: SealArgs, on_evaluation: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run `num_rounds` ReST-EM rounds; return one summary dict per round.

    Under `accelerate launch` with N processes, the main process samples the self-edits (one generator, so
    the samples do not depend on N) and every process trains and rewards its shard of them; the results are
    gathered, so all processes filter the same rows, and the update is TRL's distributed SFT.
    """
    check_args(args)
    state = PartialState()
    domain = build_domain(args)  # what a self-edit is, and where a round's items come from
    passages = load_data(args, state, domain)  # validated before any model is loaded
    heldout_sets = load_heldout(args.heldout, passages)  # validated, and refused if trained on
    run_dir = setup_run_dir(args, state.is_main_process)
    state.wait_for_everyone()
    setup_logging(run_dir, state.process_index)
    logger.info(
        "run dir %s: %d passages, %d rounds, %d process(es)",
        *(run_dir, len(passages), args.loop.num_rounds, state.num_processes),
    )
    tracker = RoundTracker.for_run(run_dir, args.sft) if state.is_main_process else None  # + rounds.png
    rt = load_runtime(args, state, domain, passages, [p for ps in heldout_sets.values() for p in ps])
    rounds = Rounds(args, domain, rt, passages, heldout_sets, run_dir, state, tracker, on_evaluation)

    summaries: list[dict[str, Any]] = []
    before = rounds.evaluate_heldout(0)
    for r in range(args.loop.num_rounds):
        t0 = time.time()
        labels = rounds.items(r)  # label-free: the round's model writes the questions its reward uses
        if labels is None:  # waiting for a person's review of the pseudo-labels (labels_review.html)
            break
        base_acc = rounds.baseline(r)
        edits = rounds.generate(r)  # 1. generate: k self-edits per passage
        t_gen = time.time() - t0
        rows, ttt_split = rounds.apply_and_reward(r, edits, base_acc)  # 2-3. a fresh LoRA each, rewarded
        t_eval = time.time() - t0 - t_gen
        kept = rounds.filter(r, rows)  # 4. filter (and a person's review): what the generator learns from
        if kept is None:  # waiting for review decisions: review.html is written, a rerun continues here
            break
        update = rounds.update(r, kept)  # 5. update: SFT of the generator on the kept self-edits
        rounds.next_generator(r, update)  # θ_{r+1}
        after = rounds.evaluate_heldout(r + 1)
        summary = round_summary(
            r, rounds.passages, rows, kept, update, t_gen, t_eval, time.time() - t0, state.num_processes
        )
        summary.update(labels)
        summary["ttt_split"] = ttt_split  # training examples longer than ttt_max_length, trained as chunks
        summary["no_kept"] = passages_without_kept(rows, kept)  # passages the E-step gave no signal
        summary["ttt_model"] = args.ttt.ttt_model
        summary.update(describe_rows(rows, rounds.by_id))  # length, copying, novel words of the self-edits
        summary.update({f"{k}_before": v for k, v in before.items()} if r == 0 else {})
        summary.update(after)
        summaries.append(summary)
        rounds.report(r, summaries)

    rt.close()
    if not state.is_main_process:  # the main process reports
        return summaries
    tracker.close()
    if len(summaries) < args.loop.num_rounds:  # stopped for a review
        return summaries
    table = markdown_rows(summaries)
    write_json(rounds.run.summary_json, summaries)
    rounds.run.summary_md.write_text(table + "\n")
    print(table, flush=True)
    if args.sft.push_to_hub:
        push(args)
    return summaries


def load_data(args: SealArgs, state: PartialState, domain: Domain) -> list[Passage]:
    """The run's items, validated by the domain (gold question-answer passages, or documents split into
    passages whose questions come from pseudo-labelling every round)."""

    def tokenizer() -> Any:
        with state.main_process_first():  # the embedded model is converted (once) by the main process
            path = resolve_model_path(args.model.model_name_or_path, args.loop.model_cache_dir)
            return load_tokenizer(path, revision=args.model.model_revision)

    return domain.load(args.data, tokenizer)


def load_runtime(
    args: SealArgs, state: PartialState, domain: Domain, passages: list[Passage], heldout: list[Passage]
) -> Runtime:
    """The run's models (one base for the whole run: TTT adapters come and go on it), after the checks that
    need only the tokenizer."""
    with state.main_process_first():  # the embedded model is converted (once) by the main process
        base_path = resolve_model_path(args.model.model_name_or_path, args.loop.model_cache_dir)
    tokenizer = load_tokenizer(base_path, revision=args.model.model_revision)
    domain.check_prompts([*passages, *heldout], tokenizer, args.vllm.vllm_max_model_len)
    check_passages_fit(passages, tokenizer, args.ttt, args.generate)  # ttt_overlong: error
    judge_path = None  # a local judge is the engine itself unless judge_model is set
    if args.reward.reward_grader == "judge" and args.reward.judge_model and not args.reward.judge_url:
        judge_path = resolve_model_path(args.reward.judge_model, args.loop.model_cache_dir)
    return Runtime.load(
        base_path, tokenizer, args.model, args.generate, args.ttt, args.reward, args.vllm,
        lora_rank(args), args.sft.seed, judge_path,
    )  # fmt: skip


class Rounds:
    """The stages of a round, with the plumbing around them: the journal (resume), the run directory, the
    broadcast and gather between processes, and which generator samples next."""

    def __init__(
        self,
        args: SealArgs,
        domain: Domain,
        rt: Runtime,
        passages: list[Passage],
        heldout_sets: dict[str, list[Passage]],
        run_dir: Path,
        state: PartialState,
        tracker: RoundTracker | None,
        on_evaluation: Callable[[dict[str, Any]], None] | None,
    ):
        self.args, self.domain, self.rt, self.passages, self.run = args, domain, rt, passages, RunDir(run_dir)
        self.documents = passages  # relabelling domains: what each round labels anew
        self.rank, self.world, self.main = state.process_index, state.num_processes, state.is_main_process
        self.on_evaluation = on_evaluation or (lambda record: None)
        self.by_id = {p.id: p for p in passages}
        self.seed = args.sft.seed
        self.journal = Journal(self.run.journal, rank=self.rank if self.world > 1 else None)
        self.heldout_sets = heldout_sets
        self.heldout = HeldOut(
            heldout_sets, args.heldout, domain, self.journal, run_dir, self.seed, args.ttt.ttt_model
        )
        self.tracker = tracker
        self.inner = rt.inner_loop(self.run.adapters)
        self.generator, self.adapter = rt.engine, None  # round 0 samples from the base model itself

    def _broadcast(self, value: Any) -> Any:
        return broadcast_object_list([value])[0] if self.world > 1 else value

    def policy(self) -> Policy:
        """The generator that writes now (θ_r, or the base through its update adapter), with the HF engine on
        the same weights when there is one (for token probabilities)."""
        rt = self.rt
        scorer = rt.hf if self.generator is rt.hf or self.adapter is None else None
        return Policy(self.generator, self.adapter, scorer)

    def items(self, r: int) -> dict[str, Any] | None:
        """The round's items: the run's own, or (relabelling domains) the documents with a kept label written
        by the round's model, journaled, then reviewed with `review: true`; returns the label counts for the
        round summary (None while the labels wait for review)."""
        if not self.domain.relabels:
            return {}
        key = ("labels", r)
        if self.journal.get(*key) is None:
            record = None
            if self.main:
                with all_cpu_threads(self.world > 1):
                    seed = task_seed(self.seed, "label", r)
                    records = self.domain.label(r, self.documents, self.policy(), self.rt.tokenizer, seed)
                record = self.journal.append(key, records=records)
            self.journal.merge([self._broadcast(record)])
        records = self.journal.get(*key)["records"]
        round_dir = self.run.round(r)
        if self.main and not round_dir.labels.is_file():
            write_jsonl(round_dir.labels, records)
        if self.args.review.review:
            reviewed = self.domain.review(round_dir.path, self.args.review) if self.main else None
            records = self._broadcast(reviewed)
            if records is None:
                return None
        self.passages, counts = self.domain.labelled(round_dir.path, records)
        self.by_id = {p.id: p for p in self.passages}
        return counts

    def baseline(self, r: int) -> dict[str, float]:
        """θ_r's no-context accuracy per passage (journaled once per round's weights; round 0: the base;
        label-free runs: every round, since the questions change)."""
        fixed = r == 0 or self.args.ttt.ttt_model == "base"
        key = ("baseline",) if fixed and not self.domain.relabels else ("baseline", r)
        if self.journal.get(*key) is None:
            record = None
            if self.main:
                scores = self.inner.rewarder.score(self.passages, adapter=None)
                record = self.journal.append(key, scores={s.passage_id: s.to_dict() for s in scores})
            self.journal.merge(broadcast_object_list([record]))
        return {pid: s["accuracy"] for pid, s in self.journal.get(*key)["scores"].items()}

    def evaluate_heldout(self, point: int) -> dict[str, Any]:
        """The held-out evaluation of the current generator (on the main process; the others wait)."""
        fields = None
        if self.main and self.heldout_sets:
            fields = self.heldout.evaluate(
                point, self.inner, self.inner.rewarder, self.policy(), self.rt.tokenizer
            )
        return self._broadcast(fields) or {}

    def generate(self, r: int) -> list[SelfEdit]:
        """k self-edits per passage, sampled by the main process and saved whole (a rerun reuses them)."""
        path = self.run.round(r).generations
        if path.exists():
            return [SelfEdit.from_dict(d) for d in read_jsonl(path)]
        if not self.main:  # the main process samples; the others get its self-edits
            return [SelfEdit.from_dict(d) for d in broadcast_object_list([None])[0]]
        gen = self.args.generate
        logger.info(
            "round %d: sampling %d self-edits for %d passages", r, gen.num_self_edits, len(self.passages)
        )
        with all_cpu_threads(self.world > 1):  # the other processes wait for the broadcast meanwhile
            seed = task_seed(self.seed, "gen", r)
            nested = self.domain.sample(self.policy(), self.rt.tokenizer, self.passages, seed)
        edits = [e for per_passage in nested for e in per_passage]
        write_jsonl(path, [e.to_dict() for e in edits])
        if self.world > 1:
            broadcast_object_list([[e.to_dict() for e in edits]])
        return edits

    def apply_and_reward(
        self, r: int, edits: list[SelfEdit], base_acc: dict[str, float]
    ) -> tuple[list[dict[str, Any]], int]:
        """Each self-edit applied by a fresh LoRA and rewarded, journaled one by one (in batched mode many
        are trained and answered together); returns a row per self-edit, and how many training examples
        were longer than ttt_max_length (TTT splits them; ttt_overlong: error refuses them)."""
        args, journal = self.args, self.journal
        ok = [e for e in edits if e.status == "ok"]
        names = [f"passage {e.passage_id} self-edit {e.index}" for e in ok]
        ttt_split = check_overlong([e.examples for e in ok], names, self.rt.tokenizer, args.ttt)
        repeats = range(args.reward.reward_repeats)
        evals = [("eval", r, e.passage_id, e.index, rep) for e in edits for rep in repeats]
        if self.main and (resumed := journal.done(evals)):
            logger.info("round %d: resuming: %d of %d evaluations done", r, resumed, len(evals))
        jobs, keys, done_here = [], {}, []
        for p in self.passages if args.filter.filter_beat_passage else []:  # passage-only TTT, for the filter
            for rep in repeats:
                if journal.get("passage", r, p.id, rep) is None:
                    keys[name := f"passage-{p.id}-{rep}"] = ("passage", r, p.id, rep)
                    ttt_seed = task_seed(self.seed, "ttt-passage", r, p.id, rep)
                    jobs.append(Job(name, self.domain.control_examples(p), [p], ttt_seed))
        for edit in edits:
            for rep in repeats:
                key = ("eval", r, edit.passage_id, edit.index, rep)
                if journal.get(*key) is not None:
                    continue
                if edit.status != "ok":  # empty/unparseable: reward 0, logged at parse time, never trained
                    if self.main:
                        record = journal.append(
                            key, status=edit.status, losses=[], accuracy=0.0, answers=[], scores=[]
                        )
                        done_here.append(record)
                        self.on_evaluation(record)
                    continue
                keys[name := f"{edit.passage_id}-{edit.index}-{rep}"] = key
                ttt_seed = task_seed(self.seed, "ttt", r, edit.passage_id, edit.index, rep)
                jobs.append(Job(name, edit.examples, [self.by_id[edit.passage_id]], ttt_seed))

        def finished(job: Job, losses: list[float], scores: list[PassageScore]) -> None:
            key, score = keys[job.name], scores[0]
            record = journal.append(key, status="ok", seed=job.seed, losses=losses, **score.to_dict())
            done_here.append(record)
            what = "passage alone" if key[0] == "passage" else f"self-edit {key[3]}"
            logger.info(
                "round %d passage %s %s repeat %d: accuracy %.2f (no-context %.2f), final loss %.3f",
                *(r, score.passage_id, what, key[-1], score.accuracy, base_acc[score.passage_id], losses[-1]),
            )
            self.on_evaluation(record)

        if jobs:
            self.inner.adapter_dir = self.run.round(r).adapters
            self.inner.run(jobs, finished, self.rank, self.world)
        if self.world > 1:  # every process gets every evaluation (each journaled its own in its own file)
            journal.merge(rec for records in gather_object([done_here]) for rec in records)
        return [self.scored(r, edit, base_acc) for edit in edits], ttt_split

    def scored(self, r: int, edit: SelfEdit, base_acc: dict[str, float]) -> dict[str, Any]:
        """A self-edit's row: its accuracy and reward averaged over the TTT repeats, from the journal."""
        repeats = range(self.args.reward.reward_repeats)
        evals = [self.journal.get("eval", r, edit.passage_id, edit.index, rep) for rep in repeats]
        accs = [e["accuracy"] for e in evals]
        alone = [
            self.journal.get("passage", r, edit.passage_id, rep)["accuracy"]
            for rep in repeats
            if self.args.filter.filter_beat_passage
        ]
        no_context = base_acc[edit.passage_id]
        return {
            **edit.to_dict(),
            "adapted_accuracy": sum(accs) / len(accs),
            "base_accuracy": no_context,
            "passage_accuracy": sum(alone) / len(alone) if alone else None,
            "reward": reward(accs, no_context, self.args.reward) if edit.status == "ok" else 0.0,
            "answers": [e["answers"] for e in evals],
            "final_loss": [e["losses"][-1] if e["losses"] else None for e in evals],
        }

    def filter(self, r: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The kept rows (ReST-EM's E-step), or a person's accepted ones with review: None while the round
        waits for review decisions."""
        round_dir = self.run.round(r)
        kept = select(rows, self.args.filter)
        kept_ids = {(k["passage_id"], k["index"]) for k in kept}
        for row in rows:
            row["kept"] = (row["passage_id"], row["index"]) in kept_ids
        if self.main:
            write_jsonl(round_dir.self_edits, rows)
        if self.args.review.review:
            kept = review_round(round_dir.path, rows, self.args.review, self.by_id) if self.main else None
            kept = self._broadcast(kept)
            if kept is None:
                return None
        if self.main:
            write_jsonl(round_dir.kept, kept)
        return kept

    def update(self, r: int, kept: list[dict[str, Any]]) -> Update | None:
        """SFT of the generator on the kept (prompt, self-edit) pairs; a finished one is read back."""
        out = self.run.round(r).update
        update = finished_update(out)
        if update is None and kept:
            self.rt.engine.sleep()  # free accelerator memory for training when vLLM shares the GPU
            args = self.args
            update = update_generator(
                self.rt.base_path, kept, args.model, args.sft, out, args.loop.update_merge,
                args.generate.use_chat_template,
            )  # fmt: skip
            self.rt.engine.wake_up()
        elif not kept:
            logger.warning("round %d: no self-edit passed the filter; the generator is not updated", r)
        return update

    def next_generator(self, r: int, update: Update | None) -> None:
        """θ_{r+1}: in SEAL's setting the update merged into the weights TTT, the baseline and sampling run
        on; with ttt_model: base the updated generator only samples."""
        args = self.args
        if update is None or (r + 1 == args.loop.num_rounds and not self.heldout_sets):
            return
        if args.ttt.ttt_model == "generator":
            with PartialState().main_process_first():  # the main process merges (once); the others find it
                path = merged_update(update, self.rt.base_path, args.model.dtype)
            self.rt.adopt(path)
            self.inner = self.rt.inner_loop(self.run.adapters)
            self.generator, self.adapter = self.rt.engine, None
        else:
            self.generator, self.adapter = load_generator(update, self.rt.engine, r, args, self.rt.tokenizer)

    def report(self, r: int, summaries: list[dict[str, Any]]) -> None:
        """The round's summary files, trackers and rounds.png (main process)."""
        if self.main:
            round_dir = self.run.round(r)
            write_json(round_dir.summary_json, summaries[-1])
            round_dir.summary_md.write_text(markdown_rows([summaries[-1]]) + "\n")
            self.tracker.update(summaries, self.heldout.results)
        logger.info("round %d done in %.1f min", r, summaries[-1]["minutes"])


def load_generator(update: Update, engine, r: int, args: SealArgs, tokenizer) -> tuple[Any, str | None]:
    """The updated generator: an adapter on the shared engine, or an engine on the merged/full weights."""
    if update.kind == "adapter":
        return engine, engine.add_adapter(update.path, name=f"generator-r{r}")  # a fresh name per version
    if engine_backend(args.generate.generator_backend, args.model) == "hf":
        model = load_model(update.path, args.model.dtype)
        tok = load_tokenizer(update.path)
        return HFEngine(model, tok, args.generate.generation_batch_size, args.ttt.ttt_autocast), None
    if args.vllm.vllm_server_url:
        raise ValueError(
            "A running vLLM server cannot switch to merged/full update weights: keep the update as a LoRA "
            "(update_merge: false, use_peft: true), or serve the new weights and rerun"
        )
    return vllm_engine(args.vllm, update.path, tokenizer, lora_rank(args), args.sft.seed), None


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
    update: Update | None,
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
        "update_loss": update.train_loss if update else None,
        "gen_s": round(t_gen, 1),
        "ttt_eval_s": round(t_eval, 1),
        "minutes": round(total / 60, 2),
        "processes": world_size,
    }
