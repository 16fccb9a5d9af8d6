"""QLoRA: TTT and the update step on a 4-bit nf4 base (bitsandbytes, for real, on the CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bitsandbytes.nn import Linear4bit  # installed by the set-up (seal[qlora]): these tests must run
from peft import PeftModel
from trl import ModelConfig, SFTConfig

from seal.config import TTTConfig
from seal.models import load_model, quantization_config
from seal.templates import TrainExample
from seal.ttt import TTT, BatchedTTT, wrap_for_adapters
from seal.update import update_generator
from tests.conftest import build_tiny_model

QLORA_FIELDS = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "dtype": "bfloat16"}
QLORA = ModelConfig(**QLORA_FIELDS)
CFG = TTTConfig(ttt_lora_r=4, ttt_lora_alpha=8, ttt_epochs=6, ttt_batch_size=2, ttt_learning_rate=3e-3)
FACTS = [TrainExample("Fact:\n", t) for t in ("The Orvel bridge is blue.", "Maru Pell was born in 1911.")]


@pytest.fixture(scope="module")
def qlora_model_path(tmp_path_factory, tokenizer) -> str:
    """A small random Llama whose matrices span whole 4-bit quantization blocks (64 values)."""
    path = tmp_path_factory.mktemp("qlora-llama")
    build_tiny_model(tokenizer, hidden_size=128, intermediate_size=256).save_pretrained(
        path, safe_serialization=True
    )
    tokenizer.save_pretrained(path)
    return str(path)


def four_bit(path: str):
    model = load_model(path, "bfloat16", quantization_config=quantization_config(QLORA))
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert linears and all(m.weight.dtype == torch.uint8 for m in linears)  # really quantized
    return model


def test_no_quantization_unless_asked():
    assert quantization_config(ModelConfig()) is None
    assert quantization_config(QLORA).bnb_4bit_quant_type == "nf4"


def test_batched_and_sequential_ttt_learn_on_a_4bit_base(qlora_model_path, tokenizer, tmp_path):
    model = wrap_for_adapters(four_bit(qlora_model_path), CFG)
    packed = {n: b.clone() for n, b in model.named_parameters() if "lora_" not in n}
    losses = BatchedTTT(model, tokenizer, CFG).apply([FACTS, FACTS[:1]], seeds=[0, 1])
    assert all(ls[-1] < ls[0] - 0.5 for ls in losses), losses
    sequential = TTT(model, tokenizer, CFG)
    seq_losses = sequential.apply(FACTS, seed=0)
    assert seq_losses[-1] < seq_losses[0] - 0.5
    for n, p in model.named_parameters():  # the 4-bit base is never touched
        if "lora_" not in n:
            assert torch.equal(p, packed[n]), n
    # the adapter trained on the 4-bit base loads in PEFT on a freshly quantized base
    path = sequential.save(tmp_path / "adapter")
    ids = tokenizer("Fact:\nThe Orvel bridge", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(four_bit(qlora_model_path), str(path))(input_ids=ids).logits
    # No float64 here (4-bit nf4 weights, bf16 compute). Yet the two forwards are one computation: the 4-bit
    # codes and scales are a deterministic function of the same saved weights, the float32 adapter
    # round-trips exactly through safetensors, and both run the same kernels on the same shapes in one
    # process: bitwise equal (any bound would be a rounding allowance for a difference that cannot arise).
    assert torch.equal(loaded, expected)
    diff = (base.float() - expected.float()).norm() / expected.float().norm()
    assert diff > 1e-2  # without the adapter: far outside bf16 rounding (2^-8 relative per rounding)


def test_update_step_trains_a_qlora_adapter(qlora_model_path, tmp_path):
    kept = [{"prompt": "Write implications.", "completion": "The Orvel bridge is blue."}] * 2
    model_args = ModelConfig(
        use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"], **QLORA_FIELDS
    )
    sft = SFTConfig(
        output_dir=str(tmp_path / "t"),
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
    )
    record = update_generator(
        qlora_model_path, kept, model_args, sft, tmp_path / "u", use_chat_template=False
    )
    assert record.kind == "adapter" and record.train_loss > 0
    adapted = PeftModel.from_pretrained(four_bit(qlora_model_path), record.path)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in adapted.named_parameters())


def test_quantized_base_is_served_by_hf(tmp_path):
    from seal.generate.engine import engine_backend
    from tests.test_loop import tiny_args

    args = tiny_args("x", tmp_path, load_in_4bit=True, generator_backend="auto")
    assert engine_backend(args.generate.generator_backend, args.model) == "hf"
    with pytest.raises(ValueError, match="load_in_4bit"):  # refused by the recipe's own check
        dataclasses.replace(args, generate=dataclasses.replace(args.generate, generator_backend="vllm"))
