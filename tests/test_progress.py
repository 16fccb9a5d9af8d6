"""What a user sees on long work: progress bars while sampling (every backend), a resumed run saying what it
found, and `seal evaluate` logging like the loop (log.txt and stderr)."""

from __future__ import annotations

import json
import logging

import pytest
from tqdm.auto import tqdm

import seal.generate.hf as hf_module
import seal.generate.server as server_module
from seal.evaluate import evaluate
from seal.generate import HFEngine, Sampling
from seal.generate.server import ServerEngine
from seal.loop import run
from tests.test_evaluate import eval_args
from tests.test_loop import tiny_args


def recording_tqdm(bars: list[tqdm]) -> type[tqdm]:
    """A tqdm.auto subclass that keeps every bar it makes and the count after each update."""

    class Recording(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts: list[float] = []
            bars.append(self)

        def update(self, n: float = 1) -> bool | None:
            shown = super().update(n)
            if not self.disable:
                self.counts.append(self.n)
            return shown

    return Recording


def test_hf_generate_shows_a_bar_that_moves_at_every_decoding_step(tiny_model, tokenizer, monkeypatch):
    """A long batch shows progress while it runs: the bar is the call's token budget (rows x max_new_tokens),
    moved by the batch's rows at each decoding step, and full when the call returns."""
    bars: list[tqdm] = []
    monkeypatch.setattr(hf_module, "tqdm", recording_tqdm(bars))
    gen = HFEngine(tiny_model, tokenizer, batch_size=4)  # bars are on by default
    out = gen.generate(["Hello", "The sky is", "One two"], Sampling(n=2, max_new_tokens=6, temperature=1.0))
    assert [len(o) for o in out] == [2, 2, 2]
    (bar,) = bars
    assert bar.total == 3 * 2 * 6 and bar.n == bar.total and not bar.leave
    # 6 rows in batches of 4 and 2: one update per decoding step of each batch (plus, for a batch that
    # stopped early, one for its unused budget)
    assert bar.counts[:2] == [4, 8] and len(bar.counts) >= 6

    bars.clear()
    quiet = HFEngine(tiny_model, tokenizer, batch_size=4, progress=False)
    quiet.generate(["Hello"], Sampling(max_new_tokens=3))
    assert [b.disable for b in bars] == [True]


def test_vllm_generate_asks_vllm_for_its_bar(monkeypatch):
    """The vLLM backend passes `use_tqdm` a tqdm.auto factory (vLLM makes and updates the bar itself)."""
    pytest.importorskip("vllm")
    from seal.generate.vllm_backend import VLLMEngine

    calls = []

    class FakeLLM:
        def generate(self, inputs, params, lora_request=None, use_tqdm=True):
            calls.append(use_tqdm)
            completion = type("Completion", (), {"text": "x"})
            return [type("Output", (), {"outputs": [completion] * p.n}) for p in params]

    class FakeTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    gen = object.__new__(VLLMEngine)
    gen.llm, gen.tokenizer, gen._adapters, gen.progress = FakeLLM(), FakeTokenizer(), {}, True
    assert gen.generate(["a", "b"], Sampling(n=2, temperature=1.0)) == [["x", "x"], ["x", "x"]]
    (use_tqdm,) = calls
    bar = use_tqdm(total=4, desc="Processed prompts")  # as vLLM calls it
    assert isinstance(bar, tqdm) and not bar.leave and bar.total == 4
    bar.close()
    gen.progress = False
    gen.generate(["a"], Sampling())
    assert calls[-1] is False


def test_server_generate_counts_finished_requests(monkeypatch):
    bars: list[tqdm] = []
    monkeypatch.setattr(server_module, "tqdm", recording_tqdm(bars))
    gen = ServerEngine("http://127.0.0.1:9", model="base")  # an explicit model: no request at start
    monkeypatch.setattr(gen, "_complete", lambda payload: [payload["prompt"]] * payload["n"])
    assert gen.generate(["a", "b", "c"], Sampling(n=2)) == [["a", "a"], ["b", "b"], ["c", "c"]]
    (bar,) = bars
    assert bar.total == 3 and bar.counts == [1, 2, 3] and not bar.leave


def drop_records(journal, drop) -> int:
    """Rewrite `journal` without the records `drop(key)` picks (as a run killed earlier left it)."""
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    kept = [r for r in records if not drop(r["key"])]
    journal.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def test_evaluate_logs_like_the_loop_and_a_resumed_run_says_what_it_found(tiny_model_path, tmp_path):
    """`seal evaluate` logs at INFO to log.txt and stderr (the loop's set-up); rerun after a kill, it says how
    many of its evaluations are done, and the wall time measured before the kill is kept."""
    out = tmp_path / "eval"
    args = eval_args(
        tiny_model_path,
        out,
        eval_conditions=["base", "passage", "base_generator"],
        eval_num_self_edits=1,
        eval_settings=["single"],
        eval_graders=["contains"],
    )
    first = evaluate(args)
    log = (out / "log.txt").read_text()
    assert "base_generator: sampling 1 self-edits for each of 2 passages" in log
    assert "TTT + answers: 4 of 4 runs to do" in log and "resuming" not in log
    assert any(type(h) is logging.StreamHandler for h in logging.getLogger("seal").handlers)

    # measured per stage, not per condition (the conditions train together)
    minutes = first["minutes"]
    assert set(minutes) == {"sampling: base_generator", "base answers", "TTT + answers", "total"}
    assert all(v is not None and v >= 0 for v in minutes.values())
    assert minutes["total"] == pytest.approx(sum(v for k, v in minutes.items() if k != "total"), abs=0.02)
    md = (out / "results.md").read_text()
    assert "| minutes |" not in md.split("**Wall time**")[0]  # no column of dashes in the tables
    assert "| TTT + answers |" in md and "| total |" in md

    # killed after two of the four TTT runs: the rerun says so, and keeps what was measured before
    ttt = [k for k in journal_keys(out / "journal.jsonl") if k[0] == "ttt"]
    assert drop_records(out / "journal.jsonl", lambda key: key in ttt[2:]) == 2
    again = evaluate(args)
    log = (out / "log.txt").read_text()
    assert "resuming: 3 of 5 evaluations done" in log
    assert "base_generator: reusing 2 sampled self-edits" in log
    assert again["minutes"]["base answers"] == minutes["base answers"]
    assert again["minutes"]["sampling: base_generator"] == minutes["sampling: base_generator"]


def journal_keys(journal) -> list[list]:
    return [json.loads(line)["key"] for line in journal.read_text().splitlines()]


def test_a_resumed_loop_round_says_how_many_evaluations_are_done(tiny_model_path, tmp_path, caplog):
    args = tiny_args(tiny_model_path, tmp_path / "run", num_rounds=1, max_steps=1)
    run(args)
    journal = tmp_path / "run" / "journal.jsonl"
    assert drop_records(journal, lambda key: key[0] == "eval" and key[3] == 1) == 2  # each passage's 2nd
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seal"):
        run(args)
    assert "round 0: resuming: 2 of 4 evaluations done" in caplog.text
    assert "round 0: resuming" in (tmp_path / "run" / "log.txt").read_text()
