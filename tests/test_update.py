import logging

import torch
from peft import PeftModel
from trl import ModelConfig, SFTConfig

from seal.update import finished_update, sft_dataset, update_generator
from tests.conftest import build_tiny_model

KEPT = [
    {
        "prompt": "List implications of: Zorvath was founded in 1820.",
        "completion": "1. Zorvath is over 200 years old.",
    },
    {
        "prompt": "List implications of: Ilsa Marrow founded Zorvath.",
        "completion": "1. Ilsa Marrow was a founder.",
    },
]


def sft_args(out):
    return SFTConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )


def test_sft_dataset_formats(tokenizer):
    chat = sft_dataset(KEPT, tokenizer, use_chat_template=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": KEPT[0]["prompt"]}]
    assert chat[0]["completion"][0]["role"] == "assistant"
    plain = sft_dataset(KEPT, tokenizer, use_chat_template=False)
    assert plain[1] == {"prompt": KEPT[1]["prompt"] + "\n", "completion": KEPT[1]["completion"]}


def test_update_adapter_changes_the_generator(tiny_model_path, tokenizer, tmp_path):
    model_args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    record = update_generator(tiny_model_path, KEPT, model_args, sft_args(tmp_path / "t"), tmp_path / "u")
    assert record.kind == "adapter" and record.num_examples == 2 and record.train_loss > 0
    assert finished_update(tmp_path / "u") == record
    assert finished_update(tmp_path / "nothing") is None
    base = build_tiny_model(tokenizer)
    ids = tokenizer(KEPT[0]["completion"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, record.path)(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_update_merged_is_a_full_model(tiny_model_path, tmp_path):
    model_args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj"])
    record = update_generator(
        tiny_model_path, KEPT, model_args, sft_args(tmp_path), tmp_path / "u", merge=True
    )
    assert record.kind == "model"
    from seal.models import load_model, load_tokenizer

    load_model(record.path), load_tokenizer(record.path)


def test_pairs_longer_than_max_length_are_counted_at_warning(tiny_model_path, tmp_path, caplog):
    """TRL cuts (prompt, self-edit) pairs to max_length: never silently (TTT splits or refuses its long
    examples; a pair cannot be split without its prompt), so the update says how many, before training."""
    model_args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj"])
    long_pair = {"prompt": "Implications of: Zorvath.", "completion": " ".join(["Zorvath is old."] * 40)}
    args = sft_args(tmp_path / "t")
    args.max_steps, args.max_length = 1, 96
    with caplog.at_level(logging.WARNING, logger="seal"):
        update_generator(tiny_model_path, [*KEPT, long_pair], model_args, args, tmp_path / "u")
    (warning,) = [r for r in caplog.records if r.name.startswith("seal") and r.levelno == logging.WARNING]
    assert (
        "1 of 3 (prompt, self-edit) pairs are longer than max_length=96 tokens: 1 cut to it"
        in warning.message
    )

    caplog.clear()
    args.max_length = 1024
    with caplog.at_level(logging.WARNING, logger="seal"):
        update_generator(tiny_model_path, KEPT, model_args, args, tmp_path / "u2")
    assert not [r for r in caplog.records if r.name.startswith("seal") and r.levelno == logging.WARNING]
