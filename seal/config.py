"""Recipe dataclasses, one per concern, parsed by `trl.TrlParser` from YAML with CLI overrides.

A recipe mixes these with TRL's own `ModelConfig` (base model, dtype, LoRA of the ReST-EM update) and
`SFTConfig` (the update's training arguments; its `output_dir` is the run directory, its `seed` the run seed).
Field names are unique across all of them, hence the `ttt_`, `reward_`, `filter_` prefixes.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from trl import ModelConfig, SFTConfig

# Vocabularies: a field typed with one of these accepts only its values (TrlParser turns them into choices).
Backend = Literal["auto", "hf", "vllm"]
TemplateName = Literal["implications", "rewrite", "self-qa", "custom"]
ParserName = Literal["lines", "paragraphs", "qa", "whole"]
Overlong = Literal["split", "error"]
TTTLoss = Literal["all", "completion"]
Autocast = Literal["auto", "bfloat16", "none"]
LRScheduler = Literal["constant", "linear"]
TTTMode = Literal["batched", "sequential"]
TTTModel = Literal["generator", "base"]
GraderName = Literal["exact_match", "f1", "contains", "judge"]
FilterStrategy = Literal["top_k", "threshold", "gain"]
EvalCondition = Literal["base", "passage", "base_generator", "trained_generator"]
EvalSetting = Literal["single", "cpt"]
Labels = Literal["gold", "pseudo"]
Confidence = Literal["agreement", "token_prob", "both"]


def choices(vocabulary: Any) -> tuple[str, ...]:
    """The values of a vocabulary, e.g. ``choices(TTTMode) == ("batched", "sequential")``."""
    return typing.get_args(vocabulary)


GRADER_NAMES = choices(GraderName)


@functools.cache
def _vocabularies(cls: type) -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: choices(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    }


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class Checked:
    """A config dataclass that refuses bad values when it is made (and whenever `check()` is called again):
    a field typed with a vocabulary accepts only its values, the fields in `at_least_one` only counts >= 1;
    a subclass adds its own rules by extending `check`."""

    at_least_one: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for name, allowed in _vocabularies(type(self)).items():
            one_of(name, getattr(self, name), allowed)
        for name in self.at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DataConfig(Checked):
    """Which passages the loop reads."""

    dataset_name: str = field(
        default="sample",
        metadata={
            "help": "'sample' (the packaged invented-entity set), a SEAL/SQuAD-style .json/.jsonl file, "
            "a local dataset directory or a Hub dataset name (SQuAD rows are grouped by context)."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read (sample: train/eval)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    num_passages: int | None = field(default=None, metadata={"help": "Use only the first N passages."})
    max_questions_per_passage: int | None = field(
        default=None, metadata={"help": "Cap questions per passage."}
    )
    dataset_labels: Labels = field(
        default="gold",
        metadata={
            "help": "gold: the data's own question-answer pairs reward the self-edits; pseudo: raw "
            "documents (.txt/.md files or folders, records with 'context', a dataset's text column) are "
            "pseudo-labelled every round by the current model (seal.label); the kept ones reward them."
        },
    )
    document_max_tokens: int = field(
        default=256, metadata={"help": "Raw documents: a passage holds at most this many tokens."}
    )
    document_text_field: str = field(
        default="text", metadata={"help": "Raw documents from `datasets`: the column holding the text."}
    )

    def check(self) -> None:
        super().check()
        if self.document_max_tokens < 1:
            raise ValueError(f"document_max_tokens must be >= 1, got {self.document_max_tokens}")


@dataclass
class GenerateConfig(Checked):
    """How the generator samples self-edits."""

    at_least_one = ("num_self_edits", "max_new_tokens", "generation_batch_size")

    generator_backend: Backend = field(
        default="auto", metadata={"help": "auto | hf | vllm. auto picks vLLM when installed, else HF."}
    )
    template: TemplateName = field(
        default="implications", metadata={"help": f"Self-edit prompt: {', '.join(choices(TemplateName))}."}
    )
    custom_template: str | None = field(
        default=None, metadata={"help": "Prompt text with {title} and {context}, used when template=custom."}
    )
    custom_parser: ParserName = field(
        default="lines",
        metadata={"help": f"How a custom template's completion is split: {', '.join(choices(ParserName))}."},
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template (instruct models)."}
    )
    num_self_edits: int = field(default=5, metadata={"help": "Self-edits sampled per passage."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling p."})
    max_new_tokens: int = field(default=512, metadata={"help": "Max tokens per self-edit."})
    generation_batch_size: int = field(
        default=32, metadata={"help": "Sequences per generate call (HF backend)."}
    )
    split_items: bool = field(
        default=True, metadata={"help": "Train on each parsed item separately (else the whole completion)."}
    )
    title_prefix: bool = field(
        default=True, metadata={"help": "Prefix each training sequence with the title."}
    )
    include_passage: bool = field(
        default=True,
        metadata={"help": "Also train on the passage itself (the paper's 'passage + self-edit')."},
    )

    def check(self) -> None:
        super().check()
        if self.template == "custom" and "{context}" not in (self.custom_template or ""):
            raise ValueError("template=custom needs custom_template containing a {context} placeholder")


@dataclass
class VLLMConfig(Checked):
    """The vLLM engine (offline `vllm.LLM`, or a running `vllm serve` with `vllm_server_url`)."""

    at_least_one = ("vllm_max_model_len", "vllm_max_loras")

    vllm_dtype: str = field(
        default="auto", metadata={"help": "Engine weights dtype (auto: the checkpoint's)."}
    )
    vllm_max_model_len: int = field(
        default=2048, metadata={"help": "Longest prompt + completion, in tokens."}
    )
    vllm_max_loras: int = field(default=8, metadata={"help": "Adapters in one batch (max_loras)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory share for vLLM; the rest is left to TTT and the update."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={
            "help": "Put the engine to sleep (weights offloaded, KV cache freed) during the update (GPU)."
        },
    )
    vllm_server_url: str | None = field(
        default=None,
        metadata={
            "help": "Use a running `vllm serve` (e.g. http://127.0.0.1:8000) instead of an in-process engine."
        },
    )


@dataclass
class TTTConfig(Checked):
    """Applying a self-edit: a fresh LoRA fine-tune of the base model on its training sequences."""

    at_least_one = ("ttt_lora_r", "ttt_epochs", "ttt_batch_size")

    ttt_lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    ttt_lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    ttt_lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    ttt_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules that get LoRA."},
    )
    ttt_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    ttt_epochs: int = field(default=10, metadata={"help": "Passes over the self-edit's sequences."})
    ttt_batch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step."})
    ttt_max_length: int = field(
        default=256,
        metadata={"help": "Longest training sequence in tokens; longer ones: see ttt_overlong (never cut)."},
    )
    ttt_overlong: Overlong = field(
        default="split",
        metadata={
            "help": "split: a sequence longer than ttt_max_length is trained on as consecutive chunks (a "
            "short prompt, e.g. the title, repeated before each); error: refuse it, naming the record, "
            "before any compute."
        },
    )
    ttt_loss: TTTLoss = field(
        default="all",
        metadata={
            "help": "all: loss on every token; completion: only on the completion part (e.g. QA answers)."
        },
    )
    ttt_autocast: Autocast = field(
        default="auto",
        metadata={
            "help": "auto | bfloat16 | none. auto: bf16 autocast on CUDA and on CPUs with AMX/AVX512-BF16."
        },
    )
    ttt_max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "Clip each adapter's gradient norm to this (0: no clipping), as transformers does."
        },
    )
    ttt_lr_scheduler: LRScheduler = field(
        default="constant",
        metadata={"help": "constant | linear (decay to 0 over each adapter's steps, like transformers)."},
    )
    ttt_mode: TTTMode = field(
        default="batched",
        metadata={
            "help": "batched: many self-edits' adapters trained and evaluated together (seal.multi_lora); "
            "sequential: one PEFT adapter at a time."
        },
    )
    ttt_parallel_adapters: int = field(
        default=0,
        metadata={"help": "Adapters trained together in batched mode; 0 = as many as free memory allows."},
    )
    ttt_model: TTTModel = field(
        default="generator",
        metadata={
            "help": "generator: a self-edit is applied to the model that wrote it (SEAL: round r's TTT and "
            "baseline run on the round's generator, the update merged into the weights); base: always on "
            "the untouched base model (a teacher-student variant)."
        },
    )

    def check(self) -> None:
        super().check()
        if self.ttt_max_length < 2:
            raise ValueError(f"ttt_max_length must be >= 2, got {self.ttt_max_length}")
        if self.ttt_parallel_adapters < 0:
            raise ValueError(f"ttt_parallel_adapters must be >= 0, got {self.ttt_parallel_adapters}")


@dataclass
class RewardConfig(Checked):
    """Scoring an adapted model: it answers the passage's questions without the passage."""

    at_least_one = ("reward_repeats", "answer_max_new_tokens", "answer_batch_size")

    reward_grader: GraderName = field(
        default="contains", metadata={"help": "exact_match | f1 | contains | judge."}
    )
    judge_model: str | None = field(
        default=None, metadata={"help": "Local judge model (path/Hub id); default: the base model itself."}
    )
    judge_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for the judge."},
    )
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Env var holding the judge's key."}
    )
    reward_subtract_baseline: bool = field(
        default=True, metadata={"help": "Reward = adapted accuracy minus the base model's on that passage."}
    )
    reward_repeats: int = field(
        default=1, metadata={"help": "TTT repeats (different seeds) averaged per self-edit."}
    )
    answer_max_new_tokens: int = field(default=32, metadata={"help": "Max tokens of an answer (greedy)."})
    answer_batch_size: int = field(default=32, metadata={"help": "Questions per generate call."})


@dataclass
class FilterConfig(Checked):
    """Which self-edits the update trains on."""

    at_least_one = ("filter_top_k",)

    filter_strategy: FilterStrategy = field(
        default="top_k",
        metadata={"help": "top_k: best k per passage; threshold: reward >= t; gain: adapted - base > g."},
    )
    filter_top_k: int = field(default=1, metadata={"help": "k for top_k."})
    filter_threshold: float = field(default=0.0, metadata={"help": "t for threshold."})
    filter_min_gain: float = field(default=0.0, metadata={"help": "g for gain."})
    filter_min_reward: float | None = field(
        default=0.0,
        metadata={
            "help": "Every strategy keeps only rewards strictly above this (ReST-EM's E-step keeps rewarded "
            "samples only: with the default 0, a self-edit that did not beat the no-context baseline is "
            "never trained on); None: no bound."
        },
    )
    filter_beat_passage: bool = field(
        default=False,
        metadata={
            "help": "Also require a self-edit's adapted accuracy to be above TTT on the passage alone (one "
            "extra TTT per passage and repeat, journaled like the others)."
        },
    )


@dataclass
class LabelConfig(Checked):
    """Pseudo-labels for raw documents (seal.label): questions asked and answered with the passage in
    context; an answer is kept when its confidence reaches `label_threshold` and the passage supports it."""

    at_least_one = ("label_num_questions", "label_num_samples", "label_max_new_tokens")

    label_num_questions: int = field(default=4, metadata={"help": "Questions written per passage (at most)."})
    label_num_samples: int = field(
        default=5, metadata={"help": "Answers sampled per question (agreement is measured over them)."}
    )
    label_temperature: float = field(default=0.7, metadata={"help": "Temperature of the sampled answers."})
    label_question_temperature: float = field(
        default=0.7, metadata={"help": "Temperature of the question-writing sample."}
    )
    label_question_max_new_tokens: int = field(
        default=160, metadata={"help": "Max tokens of the question list."}
    )
    label_max_new_tokens: int = field(default=24, metadata={"help": "Max tokens of an answer."})
    label_confidence: Confidence = field(
        default="agreement",
        metadata={
            "help": "agreement: how much the sampled answers agree (token F1) with the consensus answer; "
            "token_prob: that answer's geometric-mean token probability under the labeller (greedy "
            "scoring; local labellers only); both: the smaller of the two."
        },
    )
    label_threshold: float = field(
        default=0.6, metadata={"help": "Keep a pseudo-label whose confidence is >= this (0..1)."}
    )
    label_extract: bool = field(
        default=True,
        metadata={
            "help": "Shorten each sampled answer to its longest run of words the question does not contain "
            "(small models answer in sentences that repeat the question)."
        },
    )
    label_require_support: bool = field(
        default=True,
        metadata={"help": "Keep only answers whose content words all occur in the passage."},
    )
    label_model: str | None = field(
        default=None,
        metadata={
            "help": "The labeller: None = the current model (relabels every round with θ_r); a local model "
            "(path / embedded: name); with label_url, the endpoint's model name."
        },
    )
    label_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible completions endpoint of the labeller."}
    )
    label_api_key_env: str | None = field(
        default=None, metadata={"help": "Env var holding the endpoint's key (never logged)."}
    )
    label_output_dir: str = field(
        default="runs/labels", metadata={"help": "`seal label`: where the labelled dataset is written."}
    )
    label_seed: int = field(default=0, metadata={"help": "`seal label`: the sampling seed."})

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.label_threshold <= 1.0:
            raise ValueError(f"label_threshold must be in [0, 1], got {self.label_threshold}")
        if self.label_url and self.label_confidence != "agreement":
            raise ValueError(
                f"label_confidence: {self.label_confidence} scores answers with the labeller's weights, "
                "which an endpoint (label_url) does not expose: use label_confidence: agreement"
            )


@dataclass
class LoopConfig(Checked):
    """The outer ReST-EM loop and its run directory (SFTConfig.output_dir)."""

    at_least_one = ("num_rounds",)

    num_rounds: int = field(default=1, metadata={"help": "ReST-EM rounds."})
    update_merge: bool = field(
        default=False,
        metadata={"help": "Merge the generator's update LoRA into full weights (else keep adapter)."},
    )
    model_cache_dir: str | None = field(
        default=None, metadata={"help": "Where embedded models are converted to (default ~/.cache/seal)."}
    )
    resume: bool = field(default=True, metadata={"help": "Continue from the run directory's journal."})


@dataclass
class HeldOutConfig(Checked):
    """Held-out evaluation inside the loop (like TRL's eval_strategy): before round 0 and after every update,
    the current generator's self-edits are applied to held-out passages and scored without context."""

    at_least_one = ("heldout_num_self_edits", "heldout_bootstrap_resamples")

    heldout_datasets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Held-out QA sets (sample, a SQuAD/SEAL-format .json/.jsonl, or a hub name), each with "
            "passages never trained on (a context shared with the training passages is refused); empty: no "
            "held-out evaluation."
        },
    )
    heldout_split: str = field(default="eval", metadata={"help": "Split (sample data and hub datasets)."})
    heldout_num_passages: int | None = field(
        default=None, metadata={"help": "Use the first N passages of each held-out set."}
    )
    heldout_max_questions: int | None = field(
        default=None, metadata={"help": "Questions per held-out passage (cap)."}
    )
    heldout_num_self_edits: int = field(
        default=3, metadata={"help": "Self-edits sampled per held-out passage and generator."}
    )
    heldout_bootstrap_resamples: int = field(
        default=10_000, metadata={"help": "Bootstrap resamples for the held-out CIs."}
    )


@dataclass
class ReviewConfig(Checked):
    """A person's review of each round's self-edits between the filter and the update (seal/review.py)."""

    review: bool = field(
        default=False,
        metadata={
            "help": "Stop after each round's filter and write round_<r>/review.html (accept/reject per "
            "self-edit, export of the decisions); once the round has decisions (seal review --decisions, or "
            "review_decisions), a rerun trains the update only on the accepted self-edits. Label-free runs "
            "also stop after each round's labelling (round_<r>/labels_review.html; seal review-labels)."
        },
    )
    review_decisions: str | None = field(
        default=None,
        metadata={
            "help": "A decisions file exported from review.html (or labels_review.html): imported for the "
            "round it belongs to, which must be waiting for review (not part of the recipe: may change "
            "between reruns)."
        },
    )


@dataclass
class HubConfig(Checked):
    """Sharing a run on the Hub (`seal push`, or at the end of a run with `push_to_hub: true`).

    The repo is named by TRL's own `SFTConfig` fields, read by seal's push (the update's SFTTrainer never
    pushes): `push_to_hub` (push when the run ends), `hub_model_id` (the model repo); `hub_private` here (or
    TRL's `hub_private_repo`) creates the repos private. `hub_token` is refused: the token comes only from
    the `HF_TOKEN` environment variable or `hf auth login`, resolved by huggingface_hub, and is never written
    or logged.
    """

    hub_private: bool | None = field(
        default=None,
        metadata={
            "help": "Create the model and dataset repos private (default: TRL's hub_private_repo, else the "
            "Hub's default); contradicting hub_private_repo is an error."
        },
    )
    hub_dataset_id: str | None = field(
        default=None,
        metadata={"help": "Dataset repo of the self-edits and rewards (default: <hub_model_id>-self-edits)."},
    )
    hub_push_dataset: bool = field(
        default=True, metadata={"help": "Also push every round's self-edits with rewards as a dataset."}
    )
    hub_base_model: str | None = field(
        default=None,
        metadata={
            "help": "The base model's Hub id for the card and adapter_config.json (default: the embedded "
            "model's, or model_name_or_path when it is a Hub id)."
        },
    )
    hub_license: str | None = field(
        default=None,
        metadata={"help": "Licence id of the pushed model (default: the embedded base's; else required)."},
    )
    hub_dataset_license: str | None = field(
        default=None,
        metadata={"help": "Licence id of the self-edit dataset (sample data: mit; other data: required)."},
    )
    hub_eval_dir: str | None = field(
        default=None,
        metadata={
            "help": "An evaluation's output dir (results.md, config.yaml) whose tables go into the model "
            "card (default: <run>/eval if it exists)."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Write exactly the folders that would be uploaded (<run>/hub/model, <run>/hub/dataset) "
            "and upload nothing."
        },
    )


@dataclass
class EvalConfig(Checked):
    """The held-out QA evaluation (`eval/run_eval.py`): conditions x settings x graders on one QA set."""

    at_least_one = ("eval_num_self_edits", "eval_bootstrap_resamples")

    eval_dataset: str = field(
        default="sample",
        metadata={
            "help": "Passages with questions: sample, a SQuAD/SEAL-format .json/.jsonl, or a hub name."
        },
    )
    eval_split: str = field(default="eval", metadata={"help": "Split (sample data and hub datasets)."})
    eval_num_passages: int | None = field(default=None, metadata={"help": "Use the first N passages."})
    eval_max_questions: int | None = field(default=None, metadata={"help": "Questions per passage (cap)."})
    eval_conditions: list[str] = field(
        default_factory=lambda: ["base", "passage", "base_generator"],
        metadata={
            "help": "base (no training) | passage (TTT on the passage) | base_generator (self-edits sampled "
            "from the base model) | trained_generator (from eval_generator). Files in eval_completions add "
            "one condition each."
        },
    )
    eval_completions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "label=path: self-edits read from a SEAL-format file ({title, context, questions, "
            "completions} records), matched to the passages by context."
        },
    )
    eval_generator: str | None = field(
        default=None,
        metadata={
            "help": "A trained generator: a PEFT adapter dir (e.g. a run's round_0/update/generator) "
            "or a full checkpoint."
        },
    )
    eval_num_self_edits: int = field(
        default=1, metadata={"help": "Self-edits per passage; its accuracy is the mean over them."}
    )
    eval_settings: list[str] = field(
        default_factory=lambda: ["single"],
        metadata={
            "help": "single: a fresh adapter per passage (and self-edit); cpt: continued pretraining, one "
            "adapter on every passage's data, then all questions."
        },
    )
    eval_graders: list[str] = field(
        default_factory=lambda: ["contains"],
        metadata={"help": "exact_match | f1 | contains | judge; each gets its own table."},
    )
    eval_bootstrap_resamples: int = field(default=10_000, metadata={"help": "Bootstrap resamples for CIs."})
    eval_output_dir: str = field(default="runs/eval", metadata={"help": "Results, answers, plots, journal."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of self-edit sampling and TTT."})
    eval_resume: bool = field(default=True, metadata={"help": "Continue from the output dir's journal."})

    def check(self) -> None:
        super().check()
        for c in self.eval_conditions:
            if c not in choices(EvalCondition):
                raise ValueError(
                    f"eval_conditions: unknown condition '{c}'; choose from {choices(EvalCondition)} or add "
                    "eval_completions"
                )
        for s in self.eval_settings:
            one_of("eval_settings", s, choices(EvalSetting))
        for g in self.eval_graders:
            one_of("eval_graders", g, GRADER_NAMES)
        if not self.eval_graders or not self.eval_settings:
            raise ValueError("eval_graders and eval_settings must not be empty")
        if "trained_generator" in self.eval_conditions and not self.eval_generator:
            raise ValueError(
                "condition trained_generator needs eval_generator (an adapter dir or a checkpoint)"
            )


def check_backend(model: ModelConfig, generate: GenerateConfig) -> None:
    """vLLM cannot serve the bitsandbytes-quantized base TTT trains on: `generator_backend: vllm` is refused
    with load_in_4bit/8bit (`auto` picks HF for it)."""
    if (model.load_in_4bit or model.load_in_8bit) and generate.generator_backend == "vllm":
        raise ValueError(
            "generator_backend: vllm cannot serve the bitsandbytes-quantized base that TTT trains on "
            "(load_in_4bit / load_in_8bit): use generator_backend: hf (or auto)"
        )


def _check_sections(args: Any) -> None:
    for f in dataclasses.fields(args):
        section = getattr(args, f.name)
        if isinstance(section, Checked):
            section.check()


@dataclass
class SealArgs:
    """Everything a ReST-EM run needs: TRL's model and SFT configs plus one dataclass per loop concern.

    `check()` (run when made, and again by `seal.loop.run`) re-checks every section and the rules that
    span sections; the Hub's own (repo ids, licences, a token) are checked by `seal.hub.check_hub_args`.
    """

    model: ModelConfig
    data: DataConfig
    generate: GenerateConfig
    ttt: TTTConfig
    reward: RewardConfig
    filter: FilterConfig
    loop: LoopConfig
    sft: SFTConfig
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    heldout: HeldOutConfig = field(default_factory=HeldOutConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _check_sections(self)
        check_backend(self.model, self.generate)
        if self.ttt.ttt_model != "generator":
            return
        # SEAL's setting: each update is merged into the weights TTT trains on, scores and samples with.
        if self.model.load_in_4bit or self.model.load_in_8bit:
            raise ValueError(
                "ttt_model: generator merges each update into the weights TTT trains on, which a quantized "
                "(QLoRA) base cannot hold: use ttt_model: base"
            )
        if self.vllm.vllm_server_url and (self.loop.num_rounds > 1 or self.heldout.heldout_datasets):
            raise ValueError(
                "ttt_model: generator serves each round's new weights, which a running vLLM server cannot "
                "switch to: use ttt_model: base, or the in-process engine"
            )
        if self.reward.reward_grader == "judge" and not (self.reward.judge_model or self.reward.judge_url):
            raise ValueError(
                "reward_grader judge with ttt_model: generator needs judge_model or judge_url (the base "
                "model, the default judge, changes every round)"
            )

    def to_dict(self) -> dict[str, Any]:
        return snapshot(self)


@dataclass
class EvalArgs:
    """Everything an evaluation needs (parsed by `trl.TrlParser` in eval/run_eval.py); `check()` as in
    `SealArgs`."""

    model: ModelConfig
    eval: EvalConfig
    generate: GenerateConfig
    ttt: TTTConfig
    reward: RewardConfig
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _check_sections(self)
        check_backend(self.model, self.generate)
        trained_on_itself = (
            self.ttt.ttt_model == "generator" and "trained_generator" in self.eval.eval_conditions
        )
        judge_given = self.reward.judge_model or self.reward.judge_url
        if trained_on_itself and "judge" in self.eval.eval_graders and not judge_given:
            raise ValueError(
                "the judge grader with ttt_model: generator needs judge_model or judge_url (the base model, "
                "the default judge, takes the trained generator's weights for its TTT runs)"
            )

    def to_dict(self) -> dict[str, Any]:
        return snapshot(self)


@dataclass
class LabelArgs:
    """What `seal label` needs: the labeller model, the documents, the labelling and engine settings."""

    model: ModelConfig
    data: DataConfig
    label: LabelConfig
    generate: GenerateConfig
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        _check_sections(self)

    def to_dict(self) -> dict[str, Any]:
        return snapshot(self)


def is_secret(field_name: str) -> bool:
    """Credential fields (`hub_token`, ...) are never written to the run directory."""
    return field_name == "token" or field_name.endswith("_token")


def snapshot(args: Any) -> dict[str, dict[str, Any]]:
    """A bundle of config dataclasses (SealArgs, EvalArgs) as {section: {field: value}}, without secrets."""
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        d = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        out[f.name] = {k: v for k, v in d.items() if not is_secret(k)}
    return out
