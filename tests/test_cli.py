from pathlib import Path

import pytest

from seal.cli import main, parse_args, parse_eval_args
from seal.documents import load_documents

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "knowledge"


def test_cpu_recipe_parses_with_overrides():
    args = parse_args(
        ["--config", str(RECIPES / "smollm2-135m-cpu.yaml"), "--num_rounds", "3", "--ttt_epochs", "2"]
    )
    assert args.model.model_name_or_path == "embedded:smollm2-135m-instruct" and args.model.use_peft
    assert args.loop.num_rounds == 3 and args.ttt.ttt_epochs == 2  # CLI beats YAML
    assert args.data.num_passages >= 8 and args.sft.output_dir.startswith("runs/")
    assert set(args.to_dict()) == {
        "model",
        "data",
        "generate",
        "ttt",
        "reward",
        "filter",
        "loop",
        "sft",
        "vllm",
        "hub",
        "review",
        "heldout",
        "label",
    }


def test_gpu_recipe_mirrors_the_paper():
    # bf16 needs a GPU (or use_cpu) to validate; the override lets the recipe parse on a CPU-only machine
    args = parse_args(["--config", str(RECIPES / "qwen2.5-7b-gpu.yaml"), "--use_cpu", "true"])
    assert args.model.model_name_or_path == "Qwen/Qwen2.5-7B"
    assert (
        args.ttt.ttt_lora_r,
        args.ttt.ttt_lora_alpha,
        args.ttt.ttt_learning_rate,
        args.ttt.ttt_epochs,
    ) == (32, 64, 1e-3, 10)
    assert (args.generate.num_self_edits, args.data.num_passages, args.loop.num_rounds) == (5, 50, 2)
    assert args.ttt.ttt_model == "generator" and args.filter.filter_min_reward == 0.0  # SEAL's setting


def test_squad_experiment_recipe_is_seals_setting():
    args = parse_args(["--config", str(RECIPES / "smollm2-135m-squad-cpu.yaml")])
    assert (args.generate.num_self_edits, args.data.num_passages, args.loop.num_rounds) == (5, 50, 2)
    assert args.ttt.ttt_model == "generator" and args.filter.filter_min_reward == 0.0
    assert len(args.heldout.heldout_datasets) == 2 and args.heldout.heldout_num_self_edits >= 3


def test_label_free_squad_recipe_differs_from_the_gold_one_only_in_its_labels():
    gold = parse_args(["--config", str(RECIPES / "smollm2-135m-squad-cpu.yaml")]).to_dict()
    free = parse_args(["--config", str(RECIPES / "smollm2-135m-squad-labelfree-cpu.yaml")]).to_dict()
    changed = {
        f"{section}.{k}"
        for section, values in free.items()
        for k, v in values.items()
        if gold[section][k] != v
    }
    labels = {"data.dataset_labels", "data.document_text_field", "data.document_max_tokens"}
    assert {c for c in changed if not c.startswith("label.")} == labels | {"sft.output_dir"}
    assert free["data"]["dataset_labels"] == "pseudo" and gold["data"]["dataset_labels"] == "gold"


def test_teacher_eval_recipe_samples_trains_and_grades_as_the_rl_recipe():
    rl = parse_args(["--config", str(RECIPES / "smollm2-135m-squad-cpu.yaml")]).to_dict()
    teacher = parse_eval_args(
        ["--config", str(RECIPES.parent / "eval" / "squad-rl-teacher-smollm2-cpu.yaml")]
    )
    differ = {
        f"{section}.{k}"
        for section, values in teacher.to_dict().items()
        if section in ("generate", "ttt", "reward", "vllm")
        for k, v in values.items()
        if rl[section][k] != v
    }
    assert differ == {"ttt.ttt_model"} and teacher.ttt.ttt_model == "base"
    assert teacher.eval.eval_dataset == rl["heldout"]["heldout_datasets"][0]
    assert teacher.eval.eval_generator.startswith(rl["sft"]["output_dir"])


def test_documents_recipe_is_label_free_on_the_packaged_documents():
    args = parse_args(["--config", str(RECIPES / "smollm2-135m-documents-cpu.yaml")])
    assert args.data.dataset_labels == "pseudo" and args.label.label_threshold > 0
    assert len(load_documents(args.data.dataset_name, max_tokens=args.data.document_max_tokens)) >= 6


def test_unknown_field_and_command_are_refused(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("ttt_epocs: 3\nuse_cpu: true\n")
    with pytest.raises(ValueError, match="ttt_epocs"):
        parse_args(["--config", str(bad)])
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_snapshot_never_contains_tokens():
    args = parse_args(["--config", str(RECIPES / "smollm2-135m-cpu.yaml"), "--hub_token", "hf_secret"])
    snapshot = args.to_dict()
    assert "hf_secret" not in str(snapshot)
    assert snapshot["generate"]["max_new_tokens"] == args.generate.max_new_tokens  # not a secret
