"""Sharing a run on the Hub: the dry-run folders load back (PEFT, datasets), the cards parse with
huggingface_hub, a push to a fake Hub on 127.0.0.1 uploads exactly those folders, and the token never lands in
a file or a log."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_dataset
from huggingface_hub import DatasetCard, ModelCard, ModelCardData
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from seal.cli import main
from seal.hub import push, read_run
from seal.loop import check_args, run
from seal.run_dir import setup_run_dir
from seal.update import DONE
from seal.utils import write_json, write_jsonl
from tests.conftest import build_tiny_model
from tests.fake_hub import fake_hub, validate_card
from tests.test_loop import tiny_args

BASE_ID = "fake-org/tiny-llama"
MODEL_ID = "seal-test/tiny-generator"
TOKEN = "hf_SECRETfakeTOKENforSEALtests0123"


def self_edit_row(passage: str, index: int, reward: float, kept: bool, ok: bool = True) -> dict:
    return {
        "passage_id": passage,
        "index": index,
        "prompt": f"Write implications of the passage about {passage}.",
        "completion": f"{passage} is old.\n{passage} is far." if ok else "",
        "examples": [{"prompt": f"{passage}\n", "completion": f"{passage} is old."}] if ok else [],
        "status": "ok" if ok else "empty",
        "adapted_accuracy": reward,
        "base_accuracy": 0.0,
        "reward": reward,
        "answers": [["1820", "Ilsa"]] if ok else [[]],
        "final_loss": [0.25] if ok else [None],
        "kept": kept,
    }


def save_adapter(tokenizer, path: Path, seed: int) -> None:
    """A real PEFT LoRA (random non-zero weights) on the tiny model, saved as safetensors."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    get_peft_model(build_tiny_model(tokenizer), config).save_pretrained(str(path))


@pytest.fixture
def run_args(tmp_path, tiny_model_path, tokenizer):
    """A finished two-round run (recipe, summaries, self-edits, a generator adapter per round), hand-made."""
    args = tiny_args(
        tiny_model_path,
        tmp_path / "run",
        hub_model_id=MODEL_ID,
        hub_base_model=BASE_ID,
        hub_license="apache-2.0",
        dry_run=True,
    )
    run_dir = setup_run_dir(args)
    summaries = []
    for r in range(2):
        rows = [
            self_edit_row("zorvath", 0, 0.5 + r / 4, True),
            self_edit_row("zorvath", 1, 0.0, False, ok=False),
            self_edit_row("ilsa-marrow", 0, 0.25, False),
            self_edit_row("ilsa-marrow", 1, 0.5, True),
        ]
        write_jsonl(run_dir / f"round_{r}" / "self_edits.jsonl", rows)
        if r == 1:  # a review rejected one of the filter's picks: the update trained on the other only
            write_jsonl(run_dir / "round_1" / "kept.jsonl", rows[:1])
        update = run_dir / f"round_{r}" / "update"
        save_adapter(tokenizer, update / "generator", seed=r)
        record = {"kind": "adapter", "path": str(update / "generator"), "train_loss": 2.5}
        record["num_examples"] = 2 - r
        write_json(update / DONE, record)
        summaries.append({"round": r, "passages": 2, "self_edits": 4, "kept": 2, "update_loss": 2.5 - r})
    write_json(run_dir / "summary.json", summaries)
    return args


@pytest.fixture
def hubs(monkeypatch, tmp_path):
    """Two fake Hubs: `HF_ENDPOINT` (read by seal at push time) names the first; huggingface_hub's import-time
    endpoint is pointed at the second, so nothing it sends elsewhere (its user-agent registry, a push by the
    update's trainer) can leave 127.0.0.1, and the test sees it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
    with fake_hub() as hub, fake_hub() as other:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", other.url)
        yield hub, other


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_dry_run_writes_folders_that_load_back(run_args, tokenizer, capsys):
    folders = push(run_args)
    run_dir = Path(run_args.sft.output_dir)
    assert (folders.model, folders.dataset) == (run_dir / "hub" / "model", run_dir / "hub" / "dataset")
    assert f"{MODEL_ID}: {folders.model}" in capsys.readouterr().out
    assert set(files_of(folders.model)) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "seal_config.yaml",
    }
    # the latest round's adapter, byte for byte; it loads on the base model with the same weights
    source = run_dir / "round_1" / "update" / "generator" / "adapter_model.safetensors"
    assert (folders.model / "adapter_model.safetensors").read_bytes() == source.read_bytes()
    config = json.loads((folders.model / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID and config["r"] == 4
    model = PeftModel.from_pretrained(build_tiny_model(tokenizer), folders.model)
    loaded = {k.replace(".default", ""): v for k, v in model.named_parameters() if "lora_" in k}
    saved = load_file(source)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    recipe = yaml.safe_load((folders.model / "seal_config.yaml").read_text())
    assert recipe["ttt"]["ttt_lora_r"] == run_args.ttt.ttt_lora_r and "hub_token" not in recipe["sft"]
    # every round's self-edits with rewards, through datasets' own loader
    rows = load_dataset(str(folders.dataset), split="train", cache_dir=str(run_dir / "datasets-cache"))
    assert len(rows) == 8 and rows["round"] == [0] * 4 + [1] * 4
    assert rows["reward"][:4] == [0.5, 0.0, 0.25, 0.5] and sum(rows["kept"]) == 4
    assert rows["trained"] == [True, False, False, True] + [True, False, False, False]  # kept.jsonl wins
    assert rows[1]["status"] == "empty" and rows[1]["final_loss"] == [None]
    assert rows[0]["examples"] == [{"prompt": "zorvath\n", "completion": "zorvath is old."}]


def test_cards_carry_the_metadata_and_tables(run_args, tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    table = "| condition | accuracy (95% CI) |\n|---|---:|\n| Base model | 0.0 |\n"
    (eval_dir / "results.md").write_text(table)
    generator = Path(run_args.sft.output_dir) / "round_1" / "update" / "generator"
    eval_config = {"eval": {"eval_dataset": "sample", "eval_split": "eval", "eval_generator": str(generator)}}
    (eval_dir / "config.yaml").write_text(yaml.safe_dump(eval_config))
    run_args.hub.hub_eval_dir = str(eval_dir)
    folders = push(run_args)

    card = ModelCard.load(folders.model / "README.md")
    assert card.data.base_model == BASE_ID and card.data.license == "apache-2.0"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"seal", "rest-em", "lora"} <= set(card.data.tags)
    assert card.data.datasets == [f"{MODEL_ID}-self-edits"]
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()  # round-trips
    assert validate_card(str(card)) == []
    for text in ("## Training recipe", "LoRA r=4", "| round |", "## Evaluation", "| Base model | 0.0 |"):
        assert text in card.text
    assert "this model" in card.text and "PeftModel.from_pretrained(base, " in card.text
    assert "Round 1's update trained on 1 (prompt, self-edit) pairs" in card.text

    dataset_card = DatasetCard.load(folders.dataset / "README.md")
    assert dataset_card.data.license == "mit" and "seal" in dataset_card.data.tags
    assert dataset_card.data.task_categories == ["text-generation"]
    assert validate_card(str(dataset_card)) == []


def test_push_uploads_exactly_the_dry_run_folders(run_args, hubs, capsys, caplog):
    hub, other = hubs
    run_args.hub.hub_private = True  # the recipe field (TRL's hub_private_repo works too)
    dry = push(run_args)
    expected = {"model": files_of(dry.model), "dataset": files_of(dry.dataset)}
    run_args.hub.dry_run = False
    push(run_args)
    push(run_args)  # again: the repos exist (409 is fine), a second commit
    assert not other.repos and not other.unexpected  # HF_ENDPOINT was read at push time
    assert set(hub.repos) == {("model", MODEL_ID), ("dataset", f"{MODEL_ID}-self-edits")}
    for (repo_type, _), repo in hub.repos.items():
        assert repo.files == expected[repo_type]  # byte for byte
        assert repo.private and len(repo.commits) == 2
    assert hub.authorizations == {f"Bearer {TOKEN}"} and not hub.unexpected
    assert any(path == "/api/validate-yaml" for _, path in hub.requests)  # README checked before upload

    out, err = capsys.readouterr()
    assert f"pushed {hub.url}/{MODEL_ID}" in out
    logs = out + err + caplog.text
    written = b"".join(p.read_bytes() for p in Path(run_args.sft.output_dir).rglob("*") if p.is_file())
    assert TOKEN not in logs and TOKEN.encode() not in written


def test_refusals_name_the_field_or_file(run_args, tmp_path, monkeypatch):
    run_args.sft.hub_token = TOKEN
    for call in (check_args, push):
        with pytest.raises(ValueError, match="hub_token.*HF_TOKEN") as error:
            call(run_args)
        assert TOKEN not in str(error.value)
    run_args.sft.hub_token = None

    cases = [
        ("hub_model_id", None, ValueError, "hub_model_id is required"),
        ("hub_model_id", "a/b/c", ValueError, "hub_model_id 'a/b/c'"),
        ("hub_license", None, ValueError, "hub_license is required"),
        ("dataset_name", "passages.json", ValueError, "hub_dataset_license is required"),
        ("hub_revision", "dev", ValueError, "hub_revision"),
        ("output_dir", str(tmp_path / "missing"), FileNotFoundError, "missing/config.yaml"),
    ]
    for key, value, error, match in cases:
        section = next(s for s in ("sft", "hub", "data") if hasattr(getattr(run_args, s), key))
        previous = getattr(getattr(run_args, section), key)
        setattr(getattr(run_args, section), key, value)
        with pytest.raises(error, match=match):
            push(run_args)
        setattr(getattr(run_args, section), key, previous)
    run_args.hub.hub_private, run_args.sft.hub_private_repo = False, True
    with pytest.raises(ValueError, match="hub_private.*hub_private_repo.*disagree"):
        push(run_args)
    run_args.hub.hub_private, run_args.sft.hub_private_repo = None, False

    run_dir = Path(run_args.sft.output_dir)
    assert read_run(run_dir).update_round == 1
    (run_dir / "round_1" / "update" / DONE).unlink()  # the last update did not finish: round 0's is pushed
    assert read_run(run_dir).update_round == 0
    (run_dir / "round_0" / "update" / DONE).unlink()
    with pytest.raises(FileNotFoundError, match="seal_update.json"):
        push(run_args)

    # a real push without a token stops before any work (and so does a run that would push at its end)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("seal.hub.read_run", lambda path: pytest.fail("the run was read"))
    run_args.hub.dry_run, run_args.sft.push_to_hub = False, True
    for call in (push, check_args):
        with pytest.raises(PermissionError, match="HF_TOKEN"):
            call(run_args)


def test_a_merged_generator_and_a_local_base_without_hub_id(run_args, tokenizer):
    """update_merge: full safetensors weights + tokenizer, no pickles; a local base is not named."""
    generator = Path(run_args.sft.output_dir) / "round_1" / "update" / "generator"
    shutil.rmtree(generator)
    build_tiny_model(tokenizer, seed=3).save_pretrained(generator, safe_serialization=True)
    tokenizer.save_pretrained(generator)
    (generator / "training_args.bin").write_bytes(b"pickle")
    write_json(generator.parent / DONE, {"kind": "model", "path": str(generator), "train_loss": 2.0})
    run_args.hub.hub_base_model = None
    folders = push(run_args)
    files = set(files_of(folders.model))
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "seal_config.yaml"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    loaded = AutoModelForCausalLM.from_pretrained(folders.model, use_safetensors=True)
    assert torch.equal(loaded.lm_head.weight, build_tiny_model(tokenizer, seed=3).lm_head.weight)
    card = ModelCard.load(folders.model / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert 'AutoModelForCausalLM.from_pretrained("seal-test/tiny-generator")' in card.text
    assert validate_card(str(card)) == []


def test_cli_push_dry_run(run_args, capsys):
    run_dir = run_args.sft.output_dir
    argv = ["push", "--model_name_or_path", run_args.model.model_name_or_path, "--output_dir", run_dir]
    argv += ["--hub_model_id", MODEL_ID, "--hub_base_model", BASE_ID, "--hub_license", "apache-2.0"]
    main([*argv, "--use_cpu", "true", "--dry_run"])
    out = capsys.readouterr().out
    assert f"{MODEL_ID}: {Path(run_dir) / 'hub' / 'model'}" in out
    assert f"{MODEL_ID}-self-edits: {Path(run_dir) / 'hub' / 'dataset'}" in out
    assert (Path(run_dir) / "hub" / "model" / "adapter_model.safetensors").is_file()


def test_the_loop_pushes_when_the_run_ends(tiny_model_path, tmp_path, hubs, capsys):
    hub, other = hubs
    out = tmp_path / "run"
    args = tiny_args(
        tiny_model_path,
        out,
        num_rounds=1,
        push_to_hub=True,
        hub_model_id=MODEL_ID,
        hub_base_model=BASE_ID,
        hub_license="apache-2.0",
    )
    run(args)
    assert not other.repos and not other.unexpected  # the update's SFTTrainer pushed nothing
    assert set(hub.repos) == {("model", MODEL_ID), ("dataset", f"{MODEL_ID}-self-edits")}
    assert all(len(repo.commits) == 1 for repo in hub.repos.values())  # seal's push only
    assert hub.repos[("model", MODEL_ID)].files == files_of(out / "hub" / "model")
    assert TOKEN.encode() not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert TOKEN not in "".join(capsys.readouterr())
    # where a run is shared is not part of its recipe: a rerun with other hub settings resumes
    run(tiny_args(tiny_model_path, out, num_rounds=1, hub_model_id="someone/else", hub_push_dataset=False))
