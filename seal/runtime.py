"""The models a ReST-EM run or an evaluation works with, set up in one place for both.

A `Runtime` holds the tokenizer, the one model TTT trains adapters on (a PeftModel for the whole run), its
HF engine, the engine that samples and answers (that HF engine, or vLLM on the same weights), and the
graders. `adopt` makes other full weights (θ_r in SEAL's setting) the ones all of them run on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase
from trl import ModelConfig

from seal.config import GenerateConfig, RewardConfig, TTTConfig, VLLMConfig
from seal.generate import Engine, HFEngine
from seal.generate.engine import build_engine
from seal.graders import Grader
from seal.inner_loop import InnerLoop
from seal.models import load_model, load_tokenizer, quantization_config
from seal.reward import Rewarder, build_grader
from seal.ttt import wrap_for_adapters
from seal.weights import adopt_weights


@dataclass
class Runtime:
    base_path: str
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel
    hf: HFEngine
    engine: Engine
    model_args: ModelConfig
    generate: GenerateConfig
    ttt: TTTConfig
    reward: RewardConfig
    vllm: VLLMConfig
    max_lora_rank: int
    seed: int
    judge: Engine | None = None  # a local judge model of its own (judge_model); None: the engine itself
    judge_tokenizer: PreTrainedTokenizerBase | None = None
    graders: dict[str, Grader] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        base_path: str,
        tokenizer: PreTrainedTokenizerBase,
        model_args: ModelConfig,
        generate: GenerateConfig,
        ttt: TTTConfig,
        reward: RewardConfig,
        vllm: VLLMConfig,
        max_lora_rank: int,
        seed: int,
        judge_path: str | None = None,
    ) -> Runtime:
        """Load the base (quantized with QLoRA settings) wrapped for TTT adapters, and its engine: vLLM
        (whose LoRA limit fits `max_lora_rank`) or HF itself; `judge_path`: a local judge model of its own."""
        model = wrap_for_adapters(
            load_model(
                base_path,
                model_args.dtype,
                model_args.model_revision,
                model_args.attn_implementation,
                quantization_config(model_args),
            ),
            ttt,
        )
        hf = HFEngine(model, tokenizer, generate.generation_batch_size, ttt.ttt_autocast)
        engine = build_engine(
            generate.generator_backend, model_args, hf, vllm, base_path, max_lora_rank, seed
        )
        judge = judge_tokenizer = None
        if judge_path is not None:
            judge_tokenizer = load_tokenizer(judge_path)
            judge = HFEngine(load_model(judge_path), judge_tokenizer, reward.answer_batch_size)
        return cls(
            base_path, tokenizer, model, hf, engine, model_args, generate, ttt, reward, vllm,
            max_lora_rank, seed, judge, judge_tokenizer,
        )  # fmt: skip

    def grader(self, name: str | None = None) -> Grader:
        """The grader `name` (default: the recipe's), built once; a local judge answers through the judge
        model, else through the engine."""
        name = name or self.reward.reward_grader
        if name not in self.graders:
            cfg = dataclasses.replace(self.reward, reward_grader=name)
            judge = self.judge or self.engine
            self.graders[name] = build_grader(cfg, judge, self.judge_tokenizer or self.tokenizer)
        return self.graders[name]

    def rewarder(self, grader: str | None = None) -> Rewarder:
        """Answers without context on the current weights, graded by `grader` (default: the recipe's)."""
        return Rewarder(
            self.engine, self.tokenizer, self.grader(grader), self.reward, self.generate.use_chat_template
        )

    def inner_loop(self, adapter_dir: str | Path, grader: str | None = None) -> InnerLoop:
        """TTT + reward on the current weights."""
        return InnerLoop(self.model, self.tokenizer, self.ttt, self.rewarder(grader), adapter_dir)

    def adopt(self, path: str | Path) -> None:
        """Make the full weights in `path` the ones TTT trains on and the engine serves (vLLM: rebuilt)."""
        self.engine = adopt_weights(
            path, self.model, self.engine, self.hf, self.vllm, self.tokenizer, self.max_lora_rank, self.seed
        )
        if self.judge is None:  # a local judge was the engine: the next grader asks the new one
            self.graders.clear()

    def close(self) -> None:
        self.engine.close()
