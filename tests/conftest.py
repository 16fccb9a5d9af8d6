"""Shared fixtures: the embedded tokenizer and tiny random Llama models built from a config."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seal.models import load_tokenizer, resolve_model_path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` imported as a module (the scripts are not a package), without running main()."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def loopback_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (a free port) in a thread; yields the root URL, then shuts down."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


@pytest.fixture(scope="session")
def embedded_path() -> str:
    """The embedded SmolLM2 converted once (cached under ~/.cache/seal, or $SEAL_CACHE)."""
    return resolve_model_path("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    return load_tokenizer(embedded_path)


def build_tiny_model(
    tokenizer, seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # larger embeddings, so a LoRA on a tiny model can move the loss visibly
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@pytest.fixture
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tokenizer) -> str:
    """A tiny random model saved like any checkpoint (safetensors + tokenizer), for path-based loading."""
    path = Path(tmp_path_factory.mktemp("tiny-llama"))
    build_tiny_model(tokenizer).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def passage_examples(passage):
    """The passage and each of its sentences, title-prefixed: the 'train on passage' condition."""
    from seal.templates import TrainExample

    sentences = [s.strip().rstrip(".") + "." for s in passage.context.split(". ") if s.strip()]
    return [TrainExample(f"{passage.title}\n", text) for text in [passage.context, *sentences]]


@pytest.fixture(scope="session")
def passage_adapters(embedded_path, tokenizer, tmp_path_factory):
    """TTT adapters on the real embedded model, one per invented eval passage, trained together by the
    library's default batched TTT, with their no-context scores and their PEFT exports.

    Returns {"passages", "base", "adapted", "losses", "paths"}; shared by the HF and vLLM integration tests.
    """
    from seal.config import RewardConfig, TTTConfig
    from seal.data import load_passages
    from seal.generate import HFEngine
    from seal.generate.hf import stack_adapter
    from seal.graders import make_grader
    from seal.models import load_model
    from seal.reward import Rewarder
    from seal.ttt import BatchedTTT, wrap_for_adapters

    model = wrap_for_adapters(load_model(embedded_path), TTTConfig())
    generator = HFEngine(model, tokenizer)
    rewarder = Rewarder(generator, tokenizer, make_grader("contains"), RewardConfig())
    batched = BatchedTTT(model, tokenizer, TTTConfig(ttt_epochs=10, ttt_learning_rate=1e-3))
    passages = load_passages("sample", "eval")[:2]
    base = rewarder.score(passages, adapter=None)
    losses = batched.apply([passage_examples(p) for p in passages], seeds=[0, 1])
    generator.serve_stack(batched.stack)
    root = tmp_path_factory.mktemp("adapters")
    return {
        "passages": passages,
        "base": base,
        "adapted": rewarder.score(passages, [stack_adapter(k) for k in range(len(passages))]),
        "losses": losses,
        "paths": [str(batched.save(k, root / p.id)) for k, p in enumerate(passages)],
    }
