import torch
from peft import PeftModel

from seal.config import TTTConfig
from seal.templates import TrainExample
from seal.ttt import ADAPTER, IGNORE_INDEX, TTT, collate, tokenize_examples, wrap_for_adapters
from tests.conftest import build_tiny_model

EXAMPLES = [
    TrainExample("Zorvath\n", "Zorvath was founded in 1820 by Ilsa Marrow."),
    TrainExample("", "Short one."),
]
CFG = TTTConfig(ttt_lora_r=8, ttt_lora_alpha=16, ttt_learning_rate=5e-2, ttt_epochs=12, ttt_batch_size=2)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{ADAPTER}." in n}


def test_tokenize_masks_prompt_for_completion_loss(tokenizer):
    (ids, labels), _ = tokenize_examples(EXAMPLES, tokenizer, 64, completion_only=True)
    n_prompt = len(tokenizer("Zorvath\n", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    (ids_all, labels_all), _ = tokenize_examples(EXAMPLES, tokenizer, 64, completion_only=False)
    assert labels_all == ids_all
    (short, short_labels), _ = tokenize_examples(EXAMPLES, tokenizer, 5, completion_only=False)
    assert len(short) == len(short_labels) == 5


def test_collate_pads_dynamically():
    batch = collate([([1, 2, 3], [1, 2, 3]), ([4], [IGNORE_INDEX])], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE_INDEX] * 3]


def test_ttt_learns_resets_and_leaves_base_untouched(tiny_model, tokenizer):
    model = wrap_for_adapters(tiny_model, CFG)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ttt = TTT(model, tokenizer, CFG)
    losses = ttt.apply(EXAMPLES, seed=3)
    assert len(losses) == CFG.ttt_epochs and losses[-1] < losses[0] - 2.0
    first = lora_state(model)
    assert first and any(v.abs().sum() > 0 for n, v in first.items() if "lora_B" in n)
    # same seed -> identical run; a new apply starts from a fresh adapter, not the trained one
    assert ttt.apply(EXAMPLES, seed=3) == losses
    assert all(torch.equal(first[n], v) for n, v in lora_state(model).items())
    assert not any(p.requires_grad for p in model.parameters())  # frozen again for evaluation
    ttt.reset(seed=4)
    assert all(v.abs().sum() == 0 for n, v in lora_state(model).items() if "lora_B" in n)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_ttt_coexists_with_another_adapter(tiny_model, tokenizer, tmp_path):
    model = wrap_for_adapters(tiny_model, CFG)
    ttt = TTT(model, tokenizer, CFG)
    ttt.apply(EXAMPLES, seed=1)
    model.load_adapter(str(ttt.save(tmp_path / "a")), adapter_name="generator-r0")
    frozen = lora_state(model)
    gen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".generator-r0." in n}
    ttt.apply(EXAMPLES[:1], seed=2)
    assert all(torch.equal(p, gen_before[n]) for n, p in model.named_parameters() if ".generator-r0." in n)
    assert any(not torch.equal(frozen[n], v) for n, v in lora_state(model).items())


def test_saved_adapter_reproduces_outputs_in_peft(tiny_model, tokenizer, tmp_path):
    model = wrap_for_adapters(tiny_model, CFG)
    ttt = TTT(model, tokenizer, CFG)
    ttt.apply(EXAMPLES, seed=5)
    saved = ttt.save(tmp_path / "adapter")
    assert (saved / "adapter_model.safetensors").is_file()
    ids = tokenizer("Zorvath was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        fresh = PeftModel.from_pretrained(build_tiny_model(tokenizer), str(saved)).eval()
        assert torch.allclose(fresh(input_ids=ids).logits, expected, atol=1e-5)
