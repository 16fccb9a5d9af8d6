"""Recipe dataclasses, one per concern, parsed by `trl.TrlParser` from YAML with CLI overrides.

A recipe mixes these with TRL's own `ModelConfig` (base model, dtype, LoRA of the ReST-EM update) and
`SFTConfig` (the update's training arguments; its `output_dir` is the run directory, its `seed` the run seed).
Field names are unique across all of them, hence the `ttt_`, `reward_`, `filter_` prefixes. The loop's
stage configs are in `stages.py`, those of the tools around it (labels, review, Hub, evaluation) in
`tools.py`, the vocabularies and the `Checked` base in `base.py`; the bundles (`SealArgs`, `EvalArgs`,
`LabelArgs`) and the rules that span sections are here, and every name is imported from `seal.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, SFTConfig

from seal.config.base import (
    GRADER_NAMES,
    Autocast,
    Backend,
    Checked,
    Confidence,
    EvalCondition,
    EvalSetting,
    FilterStrategy,
    GraderName,
    Labels,
    LRScheduler,
    Overlong,
    ParserName,
    TemplateName,
    TTTLoss,
    TTTMode,
    TTTModel,
    choices,
    one_of,
)
from seal.config.stages import (
    DataConfig,
    FilterConfig,
    GenerateConfig,
    HeldOutConfig,
    LoopConfig,
    RewardConfig,
    TTTConfig,
    VLLMConfig,
)
from seal.config.tools import EvalConfig, HubConfig, LabelConfig, ReviewConfig


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


__all__ = [
    "Autocast",
    "Backend",
    "Checked",
    "Confidence",
    "DataConfig",
    "EvalArgs",
    "EvalCondition",
    "EvalConfig",
    "EvalSetting",
    "FilterConfig",
    "FilterStrategy",
    "GRADER_NAMES",
    "GenerateConfig",
    "GraderName",
    "HeldOutConfig",
    "HubConfig",
    "LRScheduler",
    "LabelArgs",
    "LabelConfig",
    "Labels",
    "LoopConfig",
    "Overlong",
    "ParserName",
    "ReviewConfig",
    "RewardConfig",
    "SealArgs",
    "TTTConfig",
    "TTTLoss",
    "TTTMode",
    "TTTModel",
    "TemplateName",
    "VLLMConfig",
    "check_backend",
    "choices",
    "is_secret",
    "one_of",
    "snapshot",
]
