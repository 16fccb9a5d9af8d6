import dataclasses
import json

import pytest
from peft import PeftModel
from trl import ModelConfig, SFTConfig

from seal.config import (
    DataConfig,
    FilterConfig,
    GenerateConfig,
    LoopConfig,
    RewardConfig,
    SealArgs,
    TTTConfig,
)
from seal.data import DataValidationError
from seal.loop import run
from seal.ttt import TTT, BatchedTTT
from seal.utils import read_jsonl
from tests.conftest import build_tiny_model


def tiny_args(model_path, out_dir, **overrides) -> SealArgs:
    args = SealArgs(
        model=ModelConfig(
            model_name_or_path=model_path,
            use_peft=True,
            lora_r=4,
            lora_alpha=8,
            lora_target_modules=["q_proj", "v_proj"],
        ),
        data=DataConfig(
            dataset_name="sample", dataset_split="eval", num_passages=2, max_questions_per_passage=2
        ),
        generate=GenerateConfig(generator_backend="hf", num_self_edits=2, max_new_tokens=12, temperature=1.0),
        ttt=TTTConfig(ttt_lora_r=4, ttt_lora_alpha=8, ttt_epochs=2, ttt_batch_size=4, ttt_max_length=64),
        reward=RewardConfig(answer_max_new_tokens=4),
        # a tiny random model earns no reward: keep each passage's best self-edit anyway, so the update runs
        filter=FilterConfig(filter_top_k=1, filter_min_reward=None),
        loop=LoopConfig(num_rounds=2),
        sft=SFTConfig(
            output_dir=str(out_dir),
            use_cpu=True,
            bf16=False,
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            seed=11,
        ),
    )
    for key, value in overrides.items():
        section = next(f.name for f in dataclasses.fields(args) if hasattr(getattr(args, f.name), key))
        setattr(getattr(args, section), key, value)
    return args


def run_two_rounds_on_engine(engine_cls, out_dir, monkeypatch, **overrides) -> list[tuple[int, object]]:
    """Two real rounds on the embedded model through `engine_cls`; returns its (n, adapter) generate calls
    after checking that round 2 sampled through the ReST-EM adapter and each TTT adapter had a fresh name."""
    calls = []
    original = engine_cls.generate

    def spy(self, prompts, sampling, adapter=None):
        calls.append((sampling.n, adapter))
        return original(self, prompts, sampling, adapter)

    monkeypatch.setattr(engine_cls, "generate", spy)
    args = tiny_args(
        "embedded:smollm2-135m-instruct",
        out_dir,
        generator_backend="vllm",
        num_passages=1,
        num_rounds=2,
        max_new_tokens=48,
        ttt_epochs=2,
        ttt_lora_r=8,
        ttt_lora_alpha=16,
        max_steps=1,
        answer_max_new_tokens=16,
        **overrides,
    )
    assert [s["self_edits"] for s in run(args)] == [2, 2]
    sampling_adapters = [adapter for n, adapter in calls if n == 2]  # self-edit sampling (n=num_self_edits)
    assert sampling_adapters[0] is None
    if overrides.get("ttt_model") == "base":  # round 1 samples through the update adapter on the same engine
        assert sampling_adapters[1].startswith("generator-r0")
    else:  # SEAL: an engine on the merged update samples round 1 (and answers on TTT adapters trained on it)
        assert sampling_adapters[1] is None
        assert (out_dir / "round_0" / "update" / "merged" / "model.safetensors").is_file()
    qa_adapters = []  # TTT adapters answered with: one name per call, or one per prompt (batched TTT)
    for n, adapter in calls:
        if n == 1 and adapter is not None:
            qa_adapters += [adapter] if isinstance(adapter, str) else sorted({a for a in adapter if a})
    assert len(qa_adapters) == len(set(qa_adapters)) >= 2  # every TTT adapter under a fresh name
    assert all(r["completion"].strip() for r in read_jsonl(out_dir / "round_1" / "self_edits.jsonl"))
    return calls


def results(out_dir, rounds=2):
    return [read_jsonl(out_dir / f"round_{r}" / "self_edits.jsonl") for r in range(rounds)]


def test_two_rounds_write_every_artefact(tiny_model_path, tmp_path, tokenizer):
    out = tmp_path / "run"
    summaries = run(tiny_args(tiny_model_path, out))
    assert [s["round"] for s in summaries] == [0, 1] and all(s["self_edits"] == 4 for s in summaries)
    for r in range(2):
        rows = read_jsonl(out / f"round_{r}" / "self_edits.jsonl")
        assert {
            "prompt",
            "completion",
            "reward",
            "adapted_accuracy",
            "base_accuracy",
            "kept",
            "answers",
        } <= set(rows[0])
        kept = read_jsonl(out / f"round_{r}" / "kept.jsonl")
        assert len(kept) == sum(row["kept"] for row in rows) == summaries[r]["kept"]
        assert json.loads((out / f"round_{r}" / "summary.json").read_text())["round"] == r
        assert "| round |" in (out / f"round_{r}" / "summary.md").read_text()
    # round 0's update is a PEFT adapter that loads on the base; round 1 sampled from it
    adapter = out / "round_0" / "update" / "generator"
    assert (adapter / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(build_tiny_model(tokenizer), str(adapter))
    gen0 = read_jsonl(out / "round_0" / "generations.jsonl")
    gen1 = read_jsonl(out / "round_1" / "generations.jsonl")
    assert [g["completion"] for g in gen0] != [g["completion"] for g in gen1]
    assert (out / "config.yaml").is_file() and (out / "log.txt").read_text()
    assert "| round |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_resume_after_crash_matches_uninterrupted_run(tiny_model_path, tmp_path, monkeypatch, mode):
    clean = tmp_path / "clean"
    run(tiny_args(tiny_model_path, clean, ttt_mode=mode))

    crashed, k = tmp_path / "crashed", 5  # 4 evaluations per round: the crash is in round 1, after its update

    def crash_after_k(record, seen=[]):  # noqa: B006 - a counter shared by the calls of one run
        seen.append(record)
        if len(seen) == k:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run(tiny_args(tiny_model_path, crashed, ttt_mode=mode), on_evaluation=crash_after_k)
    journaled = read_jsonl(crashed / "journal.jsonl")
    evals = [r for r in journaled if r["key"][0] == "eval"]
    assert len(evals) == k and len(journaled) == k + 2  # + the no-context baselines of θ_0 and θ_1

    trained = []
    if mode == "sequential":
        original = TTT.apply
        monkeypatch.setattr(
            TTT, "apply", lambda self, ex, seed: trained.append(seed) or original(self, ex, seed)
        )
    else:
        batched = BatchedTTT.apply
        monkeypatch.setattr(
            BatchedTTT, "apply", lambda self, jobs, seeds: trained.extend(seeds) or batched(self, jobs, seeds)
        )
    run(tiny_args(tiny_model_path, crashed, ttt_mode=mode))
    ok = sum(r["status"] == "ok" for rows in results(clean) for r in rows)
    skipped_ok = sum(r["status"] == "ok" for r in evals)
    assert len(trained) == ok - skipped_ok  # the k finished evaluations were not redone
    # Same results (a resumed batched chunk holds fewer adapters, laid out otherwise: under ttt_autocast auto,
    # bf16 on CPUs with bf16 kernels, its losses may differ by a bf16 rounding, 2^-8 relative)
    for got, want in zip(results(crashed), results(clean), strict=True):
        for g, w in zip(got, want, strict=True):
            assert g.pop("final_loss") == pytest.approx(w.pop("final_loss"), rel=2**-8)
            assert g == w


def test_bad_data_is_refused_before_any_model_loads(tiny_model_path, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "context": "c", "questions": [{"question": "q"}]}) + "\n")
    monkeypatch.setattr(
        "seal.runtime.load_model", lambda *a, **k: pytest.fail("model loaded before validation")
    )
    with pytest.raises(DataValidationError, match=r"bad.jsonl: record 0 \(id=x\): field 'questions\[0\]'"):
        run(tiny_args(tiny_model_path, tmp_path / "run", dataset_name=str(bad)))


def test_bad_recipe_is_refused(tiny_model_path, tmp_path):
    for key, value, match in [
        ("reward_grader", "bleu", "reward_grader"),
        ("filter_strategy", "best", "filter_strategy"),
        ("template", "poem", "template must be one of"),
        ("num_self_edits", 0, "num_self_edits"),
    ]:
        with pytest.raises(ValueError, match=match):
            run(tiny_args(tiny_model_path, tmp_path / "run", **{key: value}))


def test_resume_refuses_a_changed_recipe_and_resume_false_starts_over(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    run(tiny_args(tiny_model_path, out, num_rounds=1))
    with pytest.raises(ValueError, match="ttt_epochs"):
        run(tiny_args(tiny_model_path, out, num_rounds=1, ttt_epochs=3))
    run(tiny_args(tiny_model_path, out, num_rounds=1, ttt_epochs=3, resume=False))
    assert all(
        r["key"][0] == "baseline" or len(r["losses"]) in (0, 3) for r in read_jsonl(out / "journal.jsonl")
    )


def test_round_with_a_separate_local_judge_model(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    (summary,) = run(
        tiny_args(tiny_model_path, out, num_rounds=1, reward_grader="judge", judge_model=tiny_model_path)
    )
    assert summary["self_edits"] == 4
    evals = [r for r in read_jsonl(out / "journal.jsonl") if r["key"][0] == "eval" and r["status"] == "ok"]
    assert evals and all(score in (0.0, 1.0) for r in evals for score in r["scores"])  # yes/no verdicts
