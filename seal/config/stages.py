"""The ReST-EM loop's configs, one per stage: data, generate (+ vLLM), TTT, reward, filter, the loop itself
and its held-out evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from seal.config.base import (
    Autocast,
    Backend,
    Checked,
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
)


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
