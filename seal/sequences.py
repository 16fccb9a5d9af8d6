"""TTT's training sequences: self-edit examples tokenized, split when longer than ttt_max_length (never cut),
checked before any compute, and packed into rows for batched TTT.

A sequence is (input_ids, labels): the example's prompt + completion + EOS, labels IGNORE_INDEX where no loss
is taken (the prompt with ttt_loss: completion, a repeated prompt before each chunk).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from seal.config import GenerateConfig, TTTConfig
from seal.data import DataValidationError, Passage
from seal.losses import IGNORE_INDEX
from seal.templates import TrainExample, passage_examples

PROMPT_SHARE = 4  # a prompt of at most ttt_max_length // 4 tokens is repeated before every chunk
Sequences = list[tuple[list[int], list[int]]]  # (input_ids, labels) training sequences

logger = logging.getLogger("seal")


def encode_example(ex: TrainExample, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS) of one example, without other special tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
    return prompt_ids, tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos


def split_sequence(
    prompt_ids: list[int], completion_ids: list[int], max_length: int, completion_only: bool
) -> Sequences:
    """`prompt + completion` as (input_ids, labels) chunks of at most `max_length` tokens, nothing cut.

    One chunk when it fits. Else the first chunk is its first `max_length` tokens and every further chunk
    starts with masked context: the prompt (e.g. the title line) when it is at most max_length //
    PROMPT_SHARE tokens, else the previous chunk's last token. Invariant: every position of the sequence is
    a label (masked or not exactly as unsplit) in exactly one chunk, and each chunk's first label position
    is preceded by context, so every token the unsplit sequence predicts is predicted once (the EOS only at
    the end of the last chunk). Prompt labels are masked when `completion_only`.
    """
    ids = prompt_ids + completion_ids
    labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)) + completion_ids
    if len(ids) <= max_length:
        return [(ids, labels)]
    if max_length < 2:
        raise ValueError(f"cannot split a sequence into chunks of at most {max_length} token")
    repeat = 0 < len(prompt_ids) <= max_length // PROMPT_SHARE
    chunks = [(ids[:max_length], labels[:max_length])]
    start = max_length
    while start < len(ids):
        context = list(prompt_ids) if repeat else ids[start - 1 : start]
        end = start + max_length - len(context)
        chunks.append((context + ids[start:end], [IGNORE_INDEX] * len(context) + labels[start:end]))
        start = end
    return chunks


def tokenize_examples(
    examples: Sequence[TrainExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    completion_only: bool,
) -> Sequences:
    """(input_ids, labels) training sequences of `examples`, in order, EOS appended, prompt tokens masked
    when `completion_only`; an example longer than `max_length` gives several (:func:`split_sequence`)."""
    return [
        chunk
        for ex in examples
        for chunk in split_sequence(*encode_example(ex, tokenizer), max_length, completion_only)
    ]


def overlong(
    examples: Sequence[TrainExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[int, int]]:
    """(index, tokens) of every example whose prompt + completion + EOS is longer than `max_length`."""
    lengths = ((i, sum(map(len, encode_example(ex, tokenizer)))) for i, ex in enumerate(examples))
    return [(i, n) for i, n in lengths if n > max_length]


def check_overlong(
    jobs: Sequence[Sequence[TrainExample]],
    names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TTTConfig,
    log: bool = True,
) -> int:
    """How many examples of `jobs` are longer than ttt_max_length (TTT splits them; logged once, INFO, on
    `seal`). With ttt_overlong=error a DataValidationError instead, naming each one's job (`names[k]`),
    example, length and the limit: call it before any training."""
    limit = cfg.ttt_max_length
    found = [
        (name, i, n, job[i])
        for job, name in zip(jobs, names, strict=True)
        for i, n in overlong(job, tokenizer, limit)
    ]
    if cfg.ttt_overlong == "error" and found:
        raise DataValidationError(
            [
                f"{name}: training example {i} ({ex.text!r:.50}): {n} tokens (prompt + completion + EOS), "
                f"longer than ttt_max_length={limit} (ttt_overlong: error)"
                for name, i, n, ex in found
            ]
        )
    if log:
        longest = ""
        if found:
            longest = f" (longest {max(n for _, _, n, _ in found)}): split into chunks, all trained on"
        logger.info(
            "TTT: %d of %d training examples longer than ttt_max_length=%d tokens%s",
            *(len(found), sum(map(len, jobs)), limit, longest),
        )
    return len(found)


def check_passages_fit(
    passages: Sequence[Passage],
    tokenizer: PreTrainedTokenizerBase,
    cfg: TTTConfig,
    gen: GenerateConfig,
    trained: bool | None = None,
) -> None:
    """With ttt_overlong=error, refuse (before any model loads) a passage whose own TTT sequence (title
    prefix + context + EOS) is longer than ttt_max_length; `trained`: is the passage trained on (default
    `gen.include_passage`)."""
    if cfg.ttt_overlong != "error" or not (gen.include_passage if trained is None else trained):
        return
    problems = [
        f"record {p.id}: field 'context': {n} tokens as a TTT sequence (title + context + EOS), longer than "
        f"ttt_max_length={cfg.ttt_max_length} (ttt_overlong: error)"
        for p in passages
        for _, n in overlong(passage_examples(p, gen), tokenizer, cfg.ttt_max_length)
    ]
    if problems:
        raise DataValidationError(problems)


def training_sequences(
    jobs: Sequence[Sequence[TrainExample]], tokenizer: PreTrainedTokenizerBase, cfg: TTTConfig
) -> list[Sequences]:
    """Each job's (input_ids, labels) sequences exactly as sequential and batched TTT train on them: long
    examples split, or (ttt_overlong=error) refused before any training."""
    if cfg.ttt_overlong == "error":
        check_overlong(jobs, [f"TTT job {k}" for k in range(len(jobs))], tokenizer, cfg, log=False)
    completion_only = cfg.ttt_loss == "completion"
    return [tokenize_examples(job, tokenizer, cfg.ttt_max_length, completion_only) for job in jobs]


def collate(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in this batch only (dynamic padding)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@dataclass
class PackedBatch:
    """Sequences of several adapters packed into rows without padding between them.

    Each row holds whole sequences back to back; ``position_ids`` restart at 0 for every sequence, which is
    how transformers recognises packed sequences and keeps attention within each one (no attention mask
    is passed). Read row after row, the batch lists group 0's sequences, then group 1's, and so on; the
    padding at a row's end is its own sequence, of no group and with no target. ``targets`` are next-token
    labels already shifted within each sequence; ``token_group`` routes each position to its group's
    adapter (:meth:`seal.multi_lora.StackedLoRA.route`).
    """

    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length)
    targets: torch.Tensor  # (rows * length,), IGNORE_INDEX where there is nothing to predict
    token_group: torch.Tensor  # (rows * length,), the group of each position, -1 for padding


def pack_sequences(
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    capacity: int,
    device: torch.device,
) -> PackedBatch:
    """Pack every group's (input_ids, labels) sequences, in group order, into rows of at most `capacity`.

    A sequence is never split across rows. The rows are as few as `capacity` allows in this order and as
    even as possible, so padding (only at row ends) is small; a sequence longer than `capacity` gets a row
    of its own length.
    """
    items = [(g, ids, labels) for g, seqs in enumerate(groups) for ids, labels in seqs]
    if not items:
        raise ValueError("nothing to pack: every group is empty")
    lengths = [len(ids) for _, ids, _ in items]
    rows = balanced_rows(lengths, capacity)
    length = max(sum(lengths[i] for i in row) for row in rows)
    total = len(rows) * length
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    token_group = torch.full((total,), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            g, ids, labels = items[i]
            n, start = len(ids), r * length + col
            input_ids[r, col : col + n] = torch.tensor(ids)
            position_ids[r, col : col + n] = torch.arange(n)
            targets[start : start + n - 1] = torch.tensor(labels[1:], dtype=torch.long)
            token_group[start : start + n] = g
            col += n
        position_ids[r, col:] = torch.arange(length - col)  # padding: its own "sequence", no loss
    return PackedBatch(
        input_ids.to(device),
        position_ids.to(device),
        targets.to(device),
        token_group.to(device),
    )


def balanced_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Split items 0..n-1, in order, into consecutive rows: as few as `capacity` allows, then the smallest
    longest row with that count (binary search on the row limit; next-fit is optimal for a fixed order)."""

    def next_fit(limit: int) -> list[list[int]]:
        rows: list[list[int]] = []
        fill = 0
        for i, n in enumerate(lengths):
            if not rows or fill + n > limit:
                rows.append([])
                fill = 0
            rows[-1].append(i)
            fill += n
        return rows

    capacity = max(capacity, max(lengths))
    count = len(next_fit(capacity))
    low, high = max(max(lengths), math.ceil(sum(lengths) / count)), capacity
    while low < high:
        mid = (low + high) // 2
        if len(next_fit(mid)) <= count:
            high = mid
        else:
            low = mid + 1
    return next_fit(low)
