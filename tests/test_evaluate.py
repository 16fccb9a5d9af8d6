"""The held-out QA evaluation harness on a tiny random model: every condition, setting and grader."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from trl import ModelConfig

import seal.evaluate as evaluate_module
from seal.config import EvalArgs, EvalConfig, GenerateConfig, RewardConfig, TTTConfig
from seal.data import DataValidationError, load_passages
from seal.evaluate import evaluate
from seal.inner_loop import InnerLoop
from seal.utils import read_jsonl
from seal.weights import base_parameters
from tests.conftest import build_tiny_model


def seal_file(path, passages, completions_per_passage=2, **overrides):
    """A completions file in SEAL's format for `passages` (records in a different order, as a check)."""
    records = [
        {
            "title": p.title,
            "context": p.context,
            "questions": [{"question": q.question, "answer": q.answer} for q in p.questions],
            "completions": [f"{p.title} is notable.\n{p.context.split('.')[0]}."] * completions_per_passage,
            **overrides,
        }
        for p in reversed(passages)
    ]
    path.write_text(json.dumps(records))
    return str(path)


def eval_args(model_path, out_dir, **overrides) -> EvalArgs:
    args = EvalArgs(
        model=ModelConfig(model_name_or_path=model_path),
        eval=EvalConfig(
            eval_dataset="sample",
            eval_split="eval",
            eval_num_passages=2,
            eval_max_questions=2,
            eval_conditions=["base", "passage", "base_generator"],
            eval_num_self_edits=2,
            eval_settings=["single", "cpt"],
            eval_graders=["contains", "f1", "exact_match"],
            eval_bootstrap_resamples=200,
            eval_output_dir=str(out_dir),
        ),
        generate=GenerateConfig(generator_backend="hf", max_new_tokens=12, temperature=1.0),
        ttt=TTTConfig(ttt_lora_r=4, ttt_lora_alpha=8, ttt_epochs=2, ttt_batch_size=4, ttt_max_length=64),
        reward=RewardConfig(answer_max_new_tokens=4),
    )
    for key, value in overrides.items():
        section = next(
            s
            for s in ("model", "eval", "generate", "ttt", "reward", "vllm")
            if hasattr(getattr(args, s), key)
        )
        setattr(getattr(args, section), key, value)
    return args


@pytest.fixture(scope="module")
def passages():
    return load_passages("sample", "eval", limit=2, max_questions=2)


@pytest.fixture(scope="module")
def trained_generator(tmp_path_factory, tokenizer):
    """A PEFT adapter like the ReST-EM loop's update writes (round_N/update/generator)."""
    path = tmp_path_factory.mktemp("generator")
    model = get_peft_model(build_tiny_model(tokenizer, seed=3), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(path)
    return str(path)


def test_every_condition_setting_and_grader(
    tiny_model_path, tmp_path, passages, trained_generator, monkeypatch
):
    out = tmp_path / "eval"
    completions = seal_file(tmp_path / "seal.json", passages)
    args = eval_args(
        tiny_model_path,
        out,
        eval_conditions=["base", "passage", "base_generator", "trained_generator"],
        eval_completions=[f"from_file={completions}"],
        eval_generator=trained_generator,
    )
    results = evaluate(args, argv=["seal", "evaluate", "--config", "x.yaml"])
    # SEAL's setting (ttt_model: generator): the trained generator's own no-context row comes with it
    conditions = ["base", "passage", "base_generator", "trained_base", "trained_generator", "from_file"]
    assert set(results["tables"]) == {
        f"{s}/{g}" for s in ("single", "cpt") for g in ("contains", "f1", "exact_match")
    }
    for rows in results["tables"].values():
        assert [r["key"] for r in rows] == conditions
        for r in rows:
            acc = r["accuracy"]
            assert 0.0 <= acc["low"] <= acc["mean"] <= acc["high"] <= 1.0 and acc["n"] == 2
            assert (r["delta_vs_base"] is None) == (r["key"] == "base")
            assert len(r["per_passage"]) == 2
    # the answers behind every number, x 2 passages x 2 questions: single has base, trained_base, passage and
    # 3 conditions x 2 self-edits; cpt has one adapter per condition (all passages' self-edits in one)
    answers = read_jsonl(out / "answers.jsonl")
    assert len(answers) == ((2 + 1 + 3 * 2) + (2 + 1 + 3)) * 2 * 2
    assert {"question", "gold", "answer", "contains", "f1", "exact_match"} <= set(answers[0])
    base_single = [a for a in answers if a["condition"] == "base" and a["setting"] == "single"]
    contains_row = results["tables"]["single/contains"][0]
    assert contains_row["accuracy"]["mean"] == pytest.approx(sum(a["contains"] for a in base_single) / 4)
    md = (out / "results.md").read_text()
    assert "Grader: contains" in md and "Continued pretraining" in md and "from_file" in md
    for setting in ("single", "cpt"):
        assert (out / f"accuracy_{setting}_f1.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "command.txt").read_text().startswith("seal evaluate")
    assert len(read_jsonl(out / "generations_trained_generator.jsonl")) == 4

    # A rerun resumes from the journal: no TTT is redone, identical results.
    monkeypatch.setattr(InnerLoop, "run", lambda *a, **k: pytest.fail("TTT redone on resume"))
    again = evaluate(args)
    assert again["tables"] == results["tables"]
    with pytest.raises(ValueError, match="different recipe"):
        evaluate(eval_args(tiny_model_path, out, ttt_epochs=3))


def test_local_judge_grader_and_sequential_mode(tiny_model_path, tmp_path):
    args = eval_args(
        tiny_model_path,
        tmp_path / "eval",
        eval_conditions=["base", "passage"],
        eval_settings=["single"],
        eval_graders=["judge"],
        ttt_mode="sequential",
    )
    results = evaluate(args)
    (rows,) = results["tables"].values()
    assert [r["key"] for r in rows] == ["base", "passage"]
    assert all(a["judge"] in (0.0, 1.0) for a in read_jsonl(tmp_path / "eval" / "answers.jsonl"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eval_conditions": ["base", "oracle"]}, "eval_conditions: unknown condition 'oracle'"),
        ({"eval_conditions": ["trained_generator"]}, "needs eval_generator"),
        ({"eval_settings": ["multi"]}, "eval_settings must be one of"),
        ({"eval_graders": ["bleu"]}, "eval_graders must be one of"),
        ({"eval_completions": ["no-label-here"]}, "label=path"),
        ({"eval_completions": ["base=x.json"]}, "already a condition"),
        ({"ttt_mode": "parallel"}, "ttt_mode"),
    ],
)
def test_bad_recipe_is_refused_before_any_model_loads(
    tiny_model_path, tmp_path, monkeypatch, overrides, match
):
    monkeypatch.setattr("seal.runtime.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=match):
        evaluate(eval_args(tiny_model_path, tmp_path / "eval", **overrides))


def test_bad_completion_files_are_refused_naming_file_record_and_field(
    tiny_model_path, tmp_path, passages, monkeypatch
):
    monkeypatch.setattr("seal.runtime.load_model", lambda *a, **k: pytest.fail("model loaded"))
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps([{"title": "t", "context": "Unrelated.", "questions": [{"question": "q", "answer": "a"}]}])
    )
    short = seal_file(tmp_path / "short.json", passages, completions_per_passage=1)
    broken = seal_file(tmp_path / "broken.json", passages, completions="not a list")
    for path, match in [
        (str(other), r"other.json: no record has the context of passage"),
        (short, r"short.json: record \(id=.*\): field 'completions': has 1, eval_num_self_edits needs 2"),
        (broken, r"broken.json: record 0.*field 'completions'"),
    ]:
        with pytest.raises(DataValidationError, match=match):
            evaluate(eval_args(tiny_model_path, tmp_path / "eval", eval_completions=[f"f={path}"]))


def test_evaluation_serves_a_quantized_base_by_hf_like_the_loop(tiny_model_path, tmp_path, monkeypatch):
    """A 4-bit base is served by HF transformers (the engine TTT trains on): `auto` picks it without building
    vLLM, an explicit `vllm` is refused before any model loads, as in the ReST-EM loop."""
    from seal.generate import engine as engine_module

    monkeypatch.setattr(
        engine_module, "select_backend", lambda requested: "vllm"
    )  # as if vLLM were installed
    monkeypatch.setattr(
        engine_module, "vllm_engine", lambda *a, **k: pytest.fail("vLLM built for a 4-bit base")
    )
    args = eval_args(tiny_model_path, tmp_path / "eval", load_in_4bit=True, generator_backend="vllm")
    monkeypatch.setattr("seal.runtime.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="load_in_4bit"):
        evaluate(args)
    args.generate.generator_backend = "auto"
    hf = object.__new__(engine_module.HFEngine)
    built = engine_module.build_engine("auto", args.model, hf, args.vllm, tiny_model_path, 8, 0)
    assert built is hf


def test_serving_rank_covers_the_trained_generators_update_adapter(tmp_path, tokenizer):
    """The engine's LoRA limit fits the trained generator's adapter when its rank exceeds TTT's (the GPU
    recipe: update lora_r 64, TTT 32); without that condition TTT's rank is enough."""
    path = tmp_path / "generator"
    model = get_peft_model(build_tiny_model(tokenizer), LoraConfig(r=64, target_modules=["q_proj"]))
    model.save_pretrained(path)
    args = eval_args("unused", tmp_path / "eval", eval_generator=str(path), ttt_lora_r=32)
    assert evaluate_module.serving_rank(args, ["base", "trained_generator"]) == 64
    assert evaluate_module.serving_rank(args, ["base", "passage"]) == 32
    (path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="field 'r'"):
        evaluate_module.serving_rank(args, ["trained_generator"])


@pytest.mark.parametrize(
    "entries, match",
    [
        ([" base=x.json"], "label 'base' is already a condition"),
        (["gpt=a.json", "gpt =b.json"], "label 'gpt' is already a condition"),
        (["  = a.json"], "label=path"),
    ],
)
def test_completion_labels_are_checked_after_stripping(entries, match):
    with pytest.raises(ValueError, match=match):
        evaluate_module.completion_files(EvalConfig(eval_completions=entries))


def test_completion_files_strip_labels_and_paths():
    cfg = EvalConfig(eval_completions=[" gpt = runs/a.json ", "qwen=b.json"])
    assert evaluate_module.completion_files(cfg) == {"gpt": "runs/a.json", "qwen": "b.json"}


PROBE = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("ttt_model", ["generator", "base"])
def test_trained_generator_self_edits_are_applied_to_the_trained_model(
    tiny_model_path, tmp_path, tokenizer, monkeypatch, ttt_model
):
    generator = tmp_path / "generator"  # an update adapter that changes the weights (B != 0)
    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(build_tiny_model(tokenizer), lora).save_pretrained(generator)
    seen, original = {}, InnerLoop.run

    def spy(self, jobs, *args, **kwargs):
        weight = base_parameters(self.model)[PROBE].detach().clone()
        seen.update({j.name: weight for j in jobs})
        return original(self, jobs, *args, **kwargs)

    monkeypatch.setattr(InnerLoop, "run", spy)
    out = tmp_path / "eval"
    args = eval_args(
        tiny_model_path,
        out,
        eval_conditions=["base", "passage", "trained_generator"],
        eval_generator=str(generator),
        eval_settings=["single"],
        eval_graders=["contains"],
        ttt_model=ttt_model,
    )
    results = evaluate(args)
    base = load_file(Path(tiny_model_path) / "model.safetensors")[PROBE]
    trained = [w for name, w in seen.items() if "-trained_generator-" in name]
    others = [w for name, w in seen.items() if "-trained_generator-" not in name]
    assert trained and others and all(torch.equal(w, base) for w in others)
    rows = results["tables"]["single/contains"]
    if ttt_model == "generator":
        merged = load_file(out / "merged" / "model.safetensors")[PROBE]
        assert not torch.equal(merged, base) and all(torch.equal(w, merged) for w in trained)
        assert [r["key"] for r in rows] == ["base", "passage", "trained_base", "trained_generator"]
        assert rows[-1]["condition"].endswith("TTT on it)")
    else:
        assert all(torch.equal(w, base) for w in trained)
        assert [r["key"] for r in rows] == ["base", "passage", "trained_generator"]
        assert rows[-1]["condition"].endswith("TTT on the base)")
    assert results["ttt_model"] == ttt_model
