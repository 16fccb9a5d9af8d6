import pytest
from peft import LoraConfig, get_peft_model

from seal.config import GenerateConfig
from seal.data import load_passages
from seal.domain import Knowledge, Policy
from seal.generate import HFEngine, Sampling, SelfEdit


def test_hf_generator_counts_determinism_and_greedy(tiny_model, tokenizer):
    gen = HFEngine(tiny_model, tokenizer, batch_size=3)
    prompts = ["Hello there", "A much longer prompt about something"]
    sampled = Sampling(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    out = gen.generate(prompts, sampled)
    assert [len(o) for o in out] == [2, 2] and all(isinstance(t, str) for o in out for t in o)
    assert gen.generate(prompts, sampled) == out  # same seed, same samples
    greedy = Sampling(max_new_tokens=6)
    assert gen.generate(prompts, greedy) == gen.generate(prompts, greedy)
    # left padding: a prompt's greedy answer does not depend on its batch mates
    assert gen.generate(prompts[:1], greedy)[0] == gen.generate(prompts, greedy)[0]


def test_hf_generator_adapters(tiny_model, tokenizer):
    gen = HFEngine(tiny_model, tokenizer)
    with pytest.raises(ValueError, match="no PEFT adapters"):
        gen.generate(["x"], Sampling(max_new_tokens=2), adapter="adp")
    peft = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "adp")
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 2.0)  # a strong random adapter
    gen = HFEngine(peft, tokenizer)
    with pytest.raises(KeyError, match="Unknown adapter 'b'"):
        gen.generate(["x"], Sampling(max_new_tokens=2), adapter="b")
    prompts = ["x", "Tell me about the town"]
    base = gen.generate(prompts, Sampling(max_new_tokens=8), adapter=None)
    assert gen.generate(prompts, Sampling(max_new_tokens=8), adapter="adp") != base
    with peft.disable_adapter():
        assert (
            HFEngine(peft.base_model.model, tokenizer).generate(prompts, Sampling(max_new_tokens=8)) == base
        )


class FakeGenerator:
    def __init__(self, completions):
        self.completions = completions
        self.calls = []

    def generate(self, prompts, sampling, adapter=None):
        self.calls.append((list(prompts), sampling, adapter))
        return [list(self.completions[: sampling.n]) for _ in prompts]


def test_sample_self_edits_statuses(tokenizer):
    passages = load_passages("sample", "eval")[:2]
    fake = FakeGenerator(["1. A fact.\n2. Another fact.", "", "??"])
    cfg = GenerateConfig(num_self_edits=3, include_passage=False)
    edits = Knowledge(cfg).sample(Policy(fake, adapter="g"), tokenizer, passages, seed=1)
    assert len(fake.calls) == 1 and fake.calls[0][1].n == 3 and fake.calls[0][2] == "g"
    assert passages[0].context in fake.calls[0][0][0]
    assert [[e.status for e in per] for per in edits] == [["ok", "empty", "unparseable"]] * 2
    assert [e.completion for e in edits[0][0].examples] == ["A fact.", "Another fact."]


def test_self_edit_roundtrip():
    passage = load_passages("sample", "eval")[0]
    (edit,) = Knowledge(GenerateConfig()).parse(passage, ["- x is y"])

    assert SelfEdit.from_dict(edit.to_dict()) == edit


def test_select_backend(monkeypatch):
    import seal.generate as generate

    monkeypatch.setattr(generate, "vllm_available", lambda: False)
    assert generate.select_backend("auto") == "hf" and generate.select_backend("hf") == "hf"
    with pytest.raises(ImportError, match="not installed"):
        generate.select_backend("vllm")
    monkeypatch.setattr(generate, "vllm_available", lambda: True)
    assert generate.select_backend("auto") == "vllm" and generate.select_backend("hf") == "hf"
    with pytest.raises(ValueError, match="generator_backend"):
        generate.select_backend("tgi")
