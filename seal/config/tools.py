"""The configs of what surrounds the loop: pseudo-labels (label-free runs, `seal label`), a person's review,
the Hub push and the evaluation harness."""

from __future__ import annotations

from dataclasses import dataclass, field

from seal.config.base import GRADER_NAMES, Checked, Confidence, EvalCondition, EvalSetting, choices, one_of


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
        metadata={
            "help": "Choose the answer among the sampled answers whose content words all occur in the "
            "passage (agreement still over every sample), and keep only such answers."
        },
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
