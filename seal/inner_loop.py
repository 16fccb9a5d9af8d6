"""SEAL's inner loop: apply (TTT) then reward, for many self-edits, batched or one at a time.

Used by the ReST-EM loop and the evaluation harness alike. Batched mode trains up to K adapters together
(:class:`seal.ttt.BatchedTTT`) and answers every adapted model's questions in one generation pass: on the
HF engine straight from the stacked weights, on vLLM (or a vLLM server) through PEFT adapters exported to
disk and served as LoRA requests side by side. Sequential mode is the plain PEFT path, one adapter at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from seal.config import TTTConfig
from seal.data import Passage
from seal.generate.hf import stack_adapter
from seal.memory import parallel_adapters, tokens_per_step
from seal.paths import safe_name
from seal.reward import PassageScore, Rewarder
from seal.templates import TrainExample
from seal.ttt import TTT, BatchedTTT

logger = logging.getLogger("seal")


@dataclass
class Job:
    """Train one adapter on `examples` (seeded), then answer the questions of `passages` without context."""

    name: str  # unique within a run; names the exported adapter directory (through safe_name)
    examples: Sequence[TrainExample]
    passages: Sequence[Passage]
    seed: int


Result = tuple[Job, list[float], list[PassageScore]]  # job, TTT loss per epoch, one score per passage
OnResult = Callable[[Job, list[float], list[PassageScore]], Any]


def assign_chunks(chunks: Sequence[Sequence[int]], jobs: Sequence[Job], world_size: int) -> list[int]:
    """The rank that runs each chunk: largest first to the least-loaded rank (LPT scheduling), the load
    being the chunk's training sequences. Deterministic, so every rank computes the same assignment; the
    chunks themselves are not changed, so results do not depend on the number of processes."""
    load, owner = [0] * world_size, [0] * len(chunks)
    for c in sorted(range(len(chunks)), key=lambda c: -sum(len(jobs[i].examples) for i in chunks[c])):
        owner[c] = min(range(world_size), key=lambda r: load[r])
        load[owner[c]] += sum(len(jobs[i].examples) for i in chunks[c])
    return owner


class InnerLoop:
    """Runs jobs through TTT + reward; `engine` answers (the HF generator on `model`, or vLLM)."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: TTTConfig,
        rewarder: Rewarder,
        adapter_dir: str | Path,
    ):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.rewarder = rewarder
        self.engine = rewarder.engine
        self.adapter_dir = Path(adapter_dir)
        self.sequential = TTT(model, tokenizer, cfg)
        self.batched = BatchedTTT(model, tokenizer, cfg)

    @property
    def shares_model(self) -> bool:
        """True when the engine generates with the very model TTT trains (no export needed)."""
        return self.engine.serves_live(self.model)

    def chunk_size(self, jobs: Sequence[Job], world_size: int = 1) -> int:
        """K, the adapters trained together. Chosen from free memory (`ttt_parallel_adapters: 0`), it is
        capped so that every one of `world_size` processes gets a chunk; a fixed K keeps the chunks, hence
        the results, identical whatever the number of processes."""
        if self.cfg.ttt_mode == "sequential":
            return 1
        step_tokens = tokens_per_step([j.examples for j in jobs], self.tokenizer, self.cfg)
        k = parallel_adapters(self.model, self.cfg, step_tokens)
        if self.cfg.ttt_parallel_adapters <= 0 and world_size > 1:
            k = max(1, min(k, math.ceil(len(jobs) / world_size)))
        logger.info("TTT: %d adapters trained together (%s mode)", k, self.cfg.ttt_mode)
        return k

    def run(
        self,
        jobs: Sequence[Job],
        on_result: Callable[[Job, list[float], list[PassageScore]], Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[Result]:
        """Train and score jobs; `on_result` sees each result as soon as its chunk is done.

        Jobs are grouped by size (most training sequences first), so the adapters of a chunk finish at
        about the same step instead of a few long ones running on after the rest. With several processes
        every rank computes the same chunks and runs its share of them (:func:`assign_chunks`); the results
        of its own jobs come back, in the order of `jobs`.
        """
        results: dict[int, Result] = {}
        k = self.chunk_size(jobs, world_size)
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].examples)) if k > 1 else range(len(jobs))
        chunks = [list(order[s : s + k]) for s in range(0, len(jobs), k)]
        mine = [
            c
            for c, owner in zip(chunks, assign_chunks(chunks, jobs, world_size), strict=True)
            if owner == rank
        ]
        with tqdm(
            total=sum(map(len, mine)),
            desc="TTT + reward" if world_size == 1 else f"TTT + reward (rank {rank})",
            unit="eval",
            position=rank,
        ) as bar:
            try:
                for indices in mine:
                    chunk = [jobs[i] for i in indices]
                    done = self._run_sequential(chunk[0]) if k == 1 else self._run_batched(chunk)
                    for i, result in zip(indices, done, strict=True):
                        if on_result is not None:
                            on_result(*result)
                        results[i] = result
                    bar.update(len(chunk))
            finally:
                self.batched.release()  # its training state is kept from chunk to chunk
        return [results[i] for i in sorted(results)]

    def _run_sequential(self, job: Job) -> list[Result]:
        losses = self.sequential.apply(job.examples, job.seed)
        with self._served([job], lambda i, path: self.sequential.save(path)) as (name,):
            scores = self.rewarder.score(job.passages, [name] * len(job.passages))
        return [(job, losses, scores)]

    def _run_batched(self, chunk: list[Job]) -> list[Result]:
        losses = self.batched.apply([j.examples for j in chunk], [j.seed for j in chunk])
        with self._served(chunk, self.batched.save) as names:
            passages = [p for j in chunk for p in j.passages]
            adapters = [name for j, name in zip(chunk, names, strict=True) for _ in j.passages]
            scores = self.rewarder.score(passages, adapters)
        out, i = [], 0
        for j, loss in zip(chunk, losses, strict=True):
            out.append((j, loss, scores[i : i + len(j.passages)]))
            i += len(j.passages)
        return out

    @contextlib.contextmanager
    def _served(self, jobs: list[Job], save: Callable[[int, Path], Path]) -> Iterator[list[str]]:
        """The adapter names under which the engine answers with each job's freshly trained adapter.

        The HF engine on the TTT model uses the live weights (the `ttt` PEFT adapter, or the stack). Any
        other engine gets them through disk: PEFT directories registered under fresh names, unregistered and
        deleted afterwards. Each directory is ``adapter_dir / safe_name(job.name)``: a job name carries a
        passage id (user data), which must not pick where adapters are written or deleted.
        """
        if self.shares_model:
            if self.cfg.ttt_mode == "sequential":
                yield ["ttt"]
            else:
                self.engine.serve_stack(self.batched.stack)
                yield [stack_adapter(i) for i in range(len(jobs))]
            return
        names: list[str] = []
        paths = [self.adapter_dir / safe_name(job.name) for job in jobs]
        try:
            for i, path in enumerate(paths):
                names.append(self.engine.add_adapter(str(save(i, path))))
            yield names
        finally:
            for name in names:
                self.engine.remove_adapter(name)
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
