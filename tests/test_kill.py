"""Real kill -9s: `seal knowledge` and `seal evaluate` subprocesses are SIGKILLed at several points, rerun
with the same command, and must end with exactly the files of an uninterrupted run, no journaled task redone.

Kill points are found by polling the run directory (no test hook in the library): each kill is sent as soon
as its condition is seen, and the checks hold wherever exactly it landed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from seal.journal import Journal
from seal.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
KNOWLEDGE_RECIPE = ROOT / "recipes" / "knowledge" / "smollm2-135m-cpu.yaml"
EVAL_RECIPE = ROOT / "recipes" / "eval" / "sample-smollm2-cpu.yaml"
TIMING = ("gen_s", "ttt_eval_s", "minutes")  # wall-clock fields: differ between any two runs

# The real recipes, shrunk to a tiny random model: 2 passages x 2 self-edits, 2 rounds, 2 adapters per chunk
# (so evaluations are journaled chunk by chunk while the run goes on).
TINY_TTT = {
    "ttt_lora_r": 4,
    "ttt_lora_alpha": 8,
    "ttt_epochs": 4,
    "ttt_batch_size": 4,
    "ttt_max_length": 64,
    "ttt_parallel_adapters": 2,
    "generator_backend": "hf",
    "max_new_tokens": 12,
    "answer_max_new_tokens": 4,
}
TINY_KNOWLEDGE = {
    **TINY_TTT,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_target_modules": ["q_proj", "v_proj"],
    "dataset_split": "eval",
    "num_passages": 2,
    "max_questions_per_passage": 2,
    "num_self_edits": 2,
    "num_rounds": 2,
    "filter_min_reward": None,  # a tiny random model earns no reward: keep its best anyway, so an update runs
    "bf16": False,
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "learning_rate": 1.0e-3,
    "logging_steps": 1,
    "seed": 11,
}
TINY_EVAL = {
    **TINY_TTT,
    "eval_num_passages": 2,
    "eval_max_questions": 2,
    "eval_num_self_edits": 2,
    "eval_bootstrap_resamples": 200,
}


def write_recipe(base: Path, path: Path, **fields: Any) -> Path:
    """`base` (a shipped recipe) with `fields` overridden, written to `path`."""
    recipe = yaml.safe_load(base.read_text())
    unknown = set(fields) - set(recipe) - set(TINY_KNOWLEDGE) - set(TINY_EVAL) - {"eval_output_dir"}
    assert not unknown, f"not recipe fields: {unknown}"
    path.write_text(yaml.safe_dump({**recipe, **fields}, sort_keys=False))
    return path


class Launcher:
    """Starts `python -m seal.cli <command> --config <recipe>` runs on one thread each, output to a log."""

    ENV = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def __call__(self, command: str, recipe: Path, log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "seal.cli", command, "--config", str(recipe)],
                cwd=ROOT,
                env={**os.environ, **self.ENV},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Kill the runs a failed test left running (only those it started)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def start() -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    launcher.stop()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """Wait for a run to end; fail showing its log unless it succeeded. Returns the log."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], what: str, log: Path) -> None:
    """SIGKILL `proc` as soon as `condition()` holds (polled every 10 ms)."""
    deadline = time.monotonic() + 240
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no kill {what}: the run ended first\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill {what}"


def complete_lines(journal: Path) -> list[str]:
    """The journal's newline-terminated lines (a line being appended right now is left out)."""
    if not journal.exists():
        return []
    data = journal.read_text(encoding="utf-8", errors="replace")
    return data[: data.rfind("\n") + 1].splitlines()


def count_keys(journal: Path, *prefix: Any) -> int:
    return sum(json.loads(line)["key"][: len(prefix)] == list(prefix) for line in complete_lines(journal))


def tear_last_record(journal: Path) -> list[str]:
    """Cut the last record in half, as a kill mid-append leaves it; returns the intact lines before it."""
    lines = complete_lines(journal)
    data = journal.read_bytes()
    start_of_last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: start_of_last + (len(data) - start_of_last) // 2])
    return lines[:-1]


def check_journal(journal: Path, clean: Path, snapshots: list[list[str]]) -> None:
    """Every line a whole record, every task once, the same tasks as the clean run's, and every record
    journaled before a kill kept as it was (not redone, not rewritten)."""
    text = journal.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    keys = [tuple(json.loads(line)["key"]) for line in lines]  # raises on a torn or glued line
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not twice, f"tasks journaled twice: {twice}"
    assert set(keys) == {tuple(r["key"]) for r in read_jsonl(clean)}
    for before in snapshots:
        assert lines[: len(before)] == before


def same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal rows; TTT losses to float precision (a resumed chunk batches other adapters together)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g, w = dict(g), dict(w)
        assert g.pop("final_loss") == pytest.approx(w.pop("final_loss"), rel=1e-4)
        assert g == w


def without(summary: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in summary.items() if k not in fields}
    if out.get("update_loss") is not None:
        out["update_loss"] = pytest.approx(out["update_loss"], rel=1e-5)
    return out


def test_journal_cuts_a_torn_tail_so_the_next_append_is_readable(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append(("a",), v=1)
    journal.append(("b",), v=2)
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # a kill mid-append
    with caplog.at_level(logging.WARNING, logger="seal.journal"):
        resumed = Journal(path)
    assert f"{path}:2: cut off a partially written record" in caplog.text
    assert set(resumed.records) == {("a",)} and path.read_bytes() == whole[: whole.index(b"\n") + 1]
    resumed.append(("b",), v=3)  # the task reruns: its record lands on a line of its own
    assert Journal(path).get("b") == {"key": ["b"], "v": 3}

    path.write_bytes(path.read_bytes()[:-1])  # a whole record whose newline was lost: kept, terminated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seal.journal"):
        assert Journal(path).get("b")["v"] == 3
    assert f"{path}:2: the last record lacked its newline" in caplog.text
    assert path.read_text().endswith('"v": 3}\n')


def test_journal_recovers_a_record_glued_after_a_torn_one(tmp_path, caplog):
    """What the journal used to write after a crash: the next record right after the torn bytes."""
    path = tmp_path / "journal.jsonl"
    path.write_text('{"key": ["a"], "v": 1}\n{"key": ["b"], "v"{"key": ["c"], "v": {"key": 5}}\n')
    with caplog.at_level(logging.WARNING, logger="seal.journal"):
        journal = Journal(path)
    assert journal.records == {("a",): {"key": ["a"], "v": 1}, ("c",): {"key": ["c"], "v": {"key": 5}}}
    assert f"{path}:2: recovered a record written after a torn one" in caplog.text


def test_journal_leaves_other_ranks_files_alone(tmp_path):
    base = tmp_path / "journal.jsonl"
    Journal(base, rank=1).append(("eval", 1), v=1)
    other = tmp_path / "journal.rank1.jsonl"
    torn = other.read_bytes() + b'{"key": ["eval", 2], "v'
    other.write_bytes(torn)
    rank0 = Journal(base, rank=0)  # reads rank 1's records, skips its torn tail, does not write its file
    assert set(rank0.records) == {("eval", 1)} and other.read_bytes() == torn
    assert set(Journal(base, rank=1).records) == {("eval", 1)} and other.read_bytes().endswith(b"}\n")


def test_knowledge_run_killed_at_every_stage_resumes_to_the_same_result(tiny_model_path, tmp_path, start):
    clean_dir, out = tmp_path / "clean", tmp_path / "killed"
    tiny = {**TINY_KNOWLEDGE, "model_name_or_path": tiny_model_path}
    clean_recipe = write_recipe(KNOWLEDGE_RECIPE, tmp_path / "clean.yaml", **tiny, output_dir=str(clean_dir))
    recipe = write_recipe(KNOWLEDGE_RECIPE, tmp_path / "killed.yaml", **tiny, output_dir=str(out))
    clean = start("knowledge", clean_recipe, tmp_path / "clean.log")  # on the other core meanwhile
    journal, round0 = out / "journal.jsonl", out / "round_0"
    logs = [tmp_path / f"killed{i}.log" for i in range(5)]
    snapshots = []

    # 1. while round 0's generations.jsonl is written (its directory is made by that very write)
    kill_when(start("knowledge", recipe, logs[0]), round0.exists, "writing generations.jsonl", logs[0])
    generations = round0 / "generations.jsonl"
    assert not generations.exists() or len(read_jsonl(generations)) == 4  # whole, or not there at all
    (round0 / ".generations.jsonl.killed").write_text('{"passage_id": "x", "compl')  # a kill mid-write
    snapshots.append(complete_lines(journal))

    # 2. during round 0's TTT, right after its first evaluation is journaled
    kill_when(
        start("knowledge", recipe, logs[1]), lambda: count_keys(journal, "eval", 0) >= 1, "in TTT", logs[1]
    )
    snapshots.append(tear_last_record(journal))  # and the last append torn, as a kill mid-write leaves it
    torn = f"{journal}:{len(snapshots[-1]) + 1}: cut off a partially written record"

    # 3. during round 0's update (the SFT of the generator), once the rerun has opened (repaired) the journal
    kill_when(
        start("knowledge", recipe, logs[2]),
        lambda: (round0 / "update").exists() and torn in logs[2].read_text(errors="replace"),
        "in the update",
        logs[2],
    )
    snapshots.append(complete_lines(journal))

    # 4. in round 1, right after a journal append
    before = count_keys(journal, "eval", 1)
    kill_when(
        start("knowledge", recipe, logs[3]),
        lambda: count_keys(journal, "eval", 1) > before,
        "after an append in round 1",
        logs[3],
    )
    snapshots.append(complete_lines(journal))

    # 5. the same command once more runs to the end
    log = finish(start("knowledge", recipe, logs[4]), logs[4])
    assert "resuming:" in log and "partially written" not in log
    finish(clean, tmp_path / "clean.log")

    check_journal(journal, clean_dir / "journal.jsonl", snapshots)
    assert {p.parent for p in out.glob("**/.*.jsonl.*")} == {round0}  # only where kill 1 landed
    for r in range(2):
        got, want = out / f"round_{r}", clean_dir / f"round_{r}"
        assert read_jsonl(got / "generations.jsonl") == read_jsonl(want / "generations.jsonl")
        same_rows(read_jsonl(got / "self_edits.jsonl"), read_jsonl(want / "self_edits.jsonl"))
        same_rows(read_jsonl(got / "kept.jsonl"), read_jsonl(want / "kept.jsonl"))
        summary = json.loads((got / "summary.json").read_text())
        assert without(summary, TIMING) == without(json.loads((want / "summary.json").read_text()), TIMING)
    summaries = json.loads((out / "summary.json").read_text())
    assert [without(s, TIMING) for s in summaries] == [
        without(s, TIMING) for s in json.loads((clean_dir / "summary.json").read_text())
    ]


def test_evaluation_killed_during_ttt_resumes_to_the_same_result(tiny_model_path, tmp_path, start):
    clean_dir, out = tmp_path / "clean", tmp_path / "killed"
    tiny = {**TINY_EVAL, "model_name_or_path": tiny_model_path}
    clean_recipe = write_recipe(EVAL_RECIPE, tmp_path / "clean.yaml", **tiny, eval_output_dir=str(clean_dir))
    recipe = write_recipe(EVAL_RECIPE, tmp_path / "killed.yaml", **tiny, eval_output_dir=str(out))
    clean = start("evaluate", clean_recipe, tmp_path / "clean.log")
    journal, logs = out / "journal.jsonl", [tmp_path / "killed0.log", tmp_path / "killed1.log"]

    # Killed right after the first TTT run is journaled (the next chunk is training), its last record torn.
    kill_when(start("evaluate", recipe, logs[0]), lambda: count_keys(journal, "ttt") >= 1, "in TTT", logs[0])
    intact = tear_last_record(journal)

    log = finish(start("evaluate", recipe, logs[1]), logs[1])
    assert f"{journal}:{len(intact) + 1}: cut off a partially written record" in log
    finish(clean, tmp_path / "clean.log")

    check_journal(journal, clean_dir / "journal.jsonl", [intact])
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, clean_dir))
    assert without(got, ("minutes",)) == without(want, ("minutes",))
    assert read_jsonl(out / "answers.jsonl") == read_jsonl(clean_dir / "answers.jsonl")
