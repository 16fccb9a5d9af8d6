"""Over-long inputs are refused before any model loads: self-edit prompts past the engine's context, and (with
ttt_overlong: error) passages past ttt_max_length."""

import json

import pytest

import seal.evaluate as evaluate_module
from seal import loop as loop_module
from seal.config import GenerateConfig
from seal.data import DataValidationError, Passage
from seal.domain import Knowledge
from tests.test_evaluate import eval_args
from tests.test_loop import tiny_args

HUGE = "The archive of Zorvath holds one more ledger. " * 21_740  # ~1,000,000 characters


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the over-long record was refused")


def data_file(tmp_path) -> str:
    records = [
        {"id": "ok", "title": "T", "context": "Some text.", "questions": [{"question": "Q?", "answer": "A"}]},
        {"id": "huge", "title": "Archive", "context": HUGE, "questions": [{"question": "Q?", "answer": "A"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_check_prompts_names_record_tokens_and_limit(tokenizer):
    assert len(HUGE) >= 1_000_000
    gen = GenerateConfig(max_new_tokens=100)
    short = Passage("ok", "T", "Some text.", [])
    Knowledge(gen).check_prompts([short], tokenizer, 2048)
    with pytest.raises(DataValidationError) as err:
        Knowledge(gen).check_prompts([short, Passage("huge", "Archive", HUGE, [])], tokenizer, 2048)
    (problem,) = err.value.problems
    assert problem.startswith("record huge: field 'context': the self-edit prompt is ")
    assert "+ max_new_tokens 100" in problem and "> vllm_max_model_len=2048" in problem
    with pytest.raises(DataValidationError, match="record ok"):  # max_new_tokens counts too
        Knowledge(GenerateConfig(max_new_tokens=2048)).check_prompts([short], tokenizer, 2048)


def test_loop_refuses_an_overlong_passage_before_loading_a_model(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr("seal.runtime.load_model", no_model)
    args = tiny_args(tiny_model_path, tmp_path / "run", dataset_name=data_file(tmp_path), num_passages=None)
    with pytest.raises(
        DataValidationError, match=r"record huge: field 'context': the self-edit prompt is \d+"
    ):
        loop_module.run(args)


def test_loop_overlong_error_mode_refuses_before_loading_a_model(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr("seal.runtime.load_model", no_model)
    args = tiny_args(tiny_model_path, tmp_path / "run", ttt_overlong="error")  # sample passages > 64 tokens
    with pytest.raises(
        DataValidationError, match=r"record \S+: field 'context': \d+ tokens .*ttt_max_length=64"
    ):
        loop_module.run(args)


def test_evaluate_refuses_an_overlong_passage_before_loading_a_model(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr("seal.runtime.load_model", no_model)
    args = eval_args(tiny_model_path, tmp_path / "eval", eval_dataset=data_file(tmp_path))
    with pytest.raises(DataValidationError, match="record huge: field 'context'"):
        evaluate_module.evaluate(args)
