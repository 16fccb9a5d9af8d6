"""The loop across processes: sharded inner loop, per-rank journals, a real two-process round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seal.config import RewardConfig, TTTConfig
from seal.inner_loop import InnerLoop, Job
from seal.journal import Journal
from seal.reward import Rewarder
from seal.templates import TrainExample

ROOT = Path(__file__).resolve().parents[1]

# A real round on the embedded model, sized so that some self-edits earn a reward (TTT that learns).
RECIPE = {
    "model_name_or_path": "embedded:smollm2-135m-instruct",
    "dtype": "float32",
    "use_peft": True,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_target_modules": ["q_proj", "v_proj"],
    "dataset_name": "sample",
    "dataset_split": "eval",
    "num_passages": 4,
    "max_questions_per_passage": 3,
    "generator_backend": "hf",
    "num_self_edits": 2,
    "max_new_tokens": 48,
    "ttt_lora_r": 16,
    "ttt_lora_alpha": 32,
    "ttt_epochs": 8,
    "ttt_batch_size": 2,
    "ttt_max_length": 64,
    "ttt_parallel_adapters": 2,  # a fixed K: the same chunks whatever the number of processes
    "reward_grader": "contains",
    "answer_max_new_tokens": 16,
    "filter_strategy": "top_k",
    "filter_top_k": 1,
    "num_rounds": 1,
    "seed": 7,
    "use_cpu": True,
    "bf16": False,
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "learning_rate": 1.0e-3,
    "save_strategy": "no",
    "report_to": "none",
}


def test_journal_reads_every_rank_and_merges(tmp_path):
    base = tmp_path / "journal.jsonl"
    Journal(base).append(("baseline",), v=0)
    rank0, rank1 = Journal(base, rank=0), Journal(base, rank=1)
    rank0.append(("eval", 0), v=1)
    rank1.append(("eval", 1), v=2)
    assert rank0.path.name == "journal.rank0.jsonl" and rank1.path.name == "journal.rank1.jsonl"
    rank0.merge([rank1.get("eval", 1)])  # gathered from the other process: in memory, not written again
    assert rank0.get("eval", 1)["v"] == 2
    assert '"eval", 1' not in (tmp_path / "journal.rank0.jsonl").read_text()
    resumed = Journal(base)  # a later run with any number of processes sees all of it
    assert {k for k in resumed.records} == {("baseline",), ("eval", 0), ("eval", 1)}


@pytest.mark.parametrize("parallel", [0, 3])
def test_inner_loop_shards_are_disjoint_and_cover_all_jobs(tiny_model, tokenizer, tmp_path, parallel):
    from seal.generate import HFEngine
    from seal.graders import make_grader
    from seal.ttt import wrap_for_adapters

    cfg = TTTConfig(ttt_parallel_adapters=parallel, ttt_lora_r=2, ttt_lora_alpha=4)
    model = wrap_for_adapters(tiny_model, cfg)
    rewarder = Rewarder(HFEngine(model, tokenizer), tokenizer, make_grader("contains"), RewardConfig())
    loop = InnerLoop(model, tokenizer, cfg, rewarder, tmp_path)
    jobs = [Job(f"j{i}", [TrainExample("", "x " * (i + 1))] * (1 + i % 4), [], seed=i) for i in range(10)]
    chunks: dict[int, list[list[str]]] = {}

    def fake_batched(chunk, rank):
        chunks.setdefault(rank, []).append([j.name for j in chunk])
        return [(j, [0.0], []) for j in chunk]

    for rank in range(2):
        loop._run_batched = lambda chunk, rank=rank: fake_batched(chunk, rank)
        results = loop.run(jobs, rank=rank, world_size=2)
        own = [j.name for j in jobs if any(j.name in c for c in chunks[rank])]
        assert [r[0].name for r in results] == own  # its own results, in job order
    mine = [{n for c in chunks[r] for n in c} for r in range(2)]
    assert mine[0] and mine[1] and not mine[0] & mine[1] and mine[0] | mine[1] == {j.name for j in jobs}
    if parallel:  # a fixed K: chunk c goes to rank c % 2, exactly the chunks one process would run
        loop._run_batched = lambda chunk: fake_batched(chunk, "single")
        loop.run(jobs)
        assert sorted(chunks["single"]) == sorted(chunks[0] + chunks[1])
    else:  # K from memory is capped so that both processes get work
        assert all(len(c) <= 5 for r in range(2) for c in chunks[r])


def test_chunks_go_to_the_least_loaded_rank():
    from seal.inner_loop import assign_chunks

    jobs = [Job(f"j{i}", [TrainExample("", "x")] * n, [], seed=i) for i, n in enumerate([9, 8, 3, 3, 2, 1])]
    chunks = [[0], [1], [2, 3], [4, 5]]  # loads 9, 8, 6, 3
    owner = assign_chunks(chunks, jobs, 2)
    assert owner == [0, 1, 1, 0]  # 9 + 3 = 12 vs 8 + 6 = 14, instead of 9 + 6 = 15 vs 8 + 3 = 11
    assert assign_chunks(chunks, jobs, 1) == [0] * 4


def launch(recipe: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    script = [str(ROOT / "scripts" / "seal_knowledge.py"), "--config", str(recipe), "--output_dir", str(out)]
    if processes == 1:
        command = [sys.executable, *script]
    else:  # `--cpu` would start ONE process; --multi_gpu without GPUs starts N over gloo
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
        command += ["--dynamo_backend", "no", "--main_process_port", "29517", *script]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:  # the thread count of each of accelerate's CPU processes: the same bf16 rounding
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def round_rows(out: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (out / "round_0" / "self_edits.jsonl").read_text().splitlines()]
    return {(r["passage_id"], r["index"]): r for r in rows}


def epoch_losses(journals: list[Path]) -> dict[tuple, list[float]]:
    """Each journaled TTT evaluation's mean loss per epoch, keyed by its journal key."""
    rows = [json.loads(line) for path in journals for line in path.read_text().splitlines()]
    return {tuple(r["key"]): r["losses"] for r in rows if r["key"][0] == "eval" and r.get("losses")}


@pytest.mark.slow
def test_two_processes_gather_the_single_process_round(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    one, two = tmp_path / "one", tmp_path / "two"
    launch(recipe, two, processes=2)
    launch(recipe, one, processes=1)

    summary_two = json.loads((two / "summary.json").read_text())[0]
    assert summary_two["processes"] == 2  # really two processes
    assert json.loads((one / "summary.json").read_text())[0]["processes"] == 1
    # each rank journaled its own, non-empty share of the evaluations
    shares = [
        {tuple(json.loads(line)["key"]) for line in (two / f"journal.rank{r}.jsonl").read_text().splitlines()}
        for r in range(2)
    ]
    evals = [{k for k in share if k[0] == "eval"} for share in shares]
    assert evals[0] and evals[1] and not evals[0] & evals[1] and len(evals[0] | evals[1]) == 8

    a, b = round_rows(one), round_rows(two)
    assert a.keys() == b.keys()
    assert [a[k]["reward"] for k in a] == [b[k]["reward"] for k in a]
    assert [a[k]["kept"] for k in a] == [b[k]["kept"] for k in a]
    assert any(a[k]["reward"] > 0 for k in a)  # the comparison is not between all-zero rounds
    # Same seeds, same chunks (a fixed K), one thread per process in both runs: every TTT run executes the
    # same ops on the same data in the same order on the same machine, so its losses are bit-identical, every
    # epoch (with two threads against one, bf16 rounding differs and compounds over the epochs: hence the
    # one-process run's single thread). A sharding bug (a job trained in another chunk, with other seeds or
    # data) changes them.
    losses = [epoch_losses([one / "journal.jsonl"])]
    losses.append(epoch_losses([two / f"journal.rank{r}.jsonl" for r in range(2)]))
    assert losses[0].keys() == losses[1].keys() and len(losses[0]) == 8
    assert losses[0] == losses[1]
    kept = [
        sorted((r["passage_id"], r["index"], r["completion"]) for r in map(json.loads, open(d)))
        for d in (one / "round_0/kept.jsonl", two / "round_0/kept.jsonl")
    ]
    assert kept[0] == kept[1] and kept[0]

    # Resume across world sizes: one process rerunning the two-process run finds every evaluation done.
    launch(recipe, two, processes=1)
    assert not (two / "journal.jsonl").exists() or all(
        json.loads(line)["key"][0] != "eval" for line in (two / "journal.jsonl").read_text().splitlines()
    )
    assert json.loads((two / "summary.json").read_text())[0]["mean_reward"] == summary_two["mean_reward"]


@pytest.mark.parametrize("name", ["cpu", "ddp", "fsdp", "zero3"])
def test_accelerate_recipes_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    expected = {"cpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
