"""Integration tests on the real embedded SmolLM2-135M-Instruct (about two minutes on 2 CPU cores)."""

import pytest

from seal.loop import run
from seal.utils import read_jsonl
from tests.test_loop import tiny_args

pytestmark = pytest.mark.slow


def test_ttt_on_an_invented_passage_teaches_its_facts(passage_adapters):
    for losses in passage_adapters["losses"]:
        assert losses[-1] < 0.3 * losses[0]
    base, adapted = passage_adapters["base"], passage_adapters["adapted"]
    base_acc = sum(s.accuracy for s in base) / len(base)
    adapted_acc = sum(s.accuracy for s in adapted) / len(adapted)
    print(
        f"no-context accuracy: base {base_acc:.2f} -> after TTT {adapted_acc:.2f}",
        [s.answers for s in adapted],
    )
    assert adapted_acc >= base_acc + 0.25  # the model could not know these invented facts before


def test_one_round_on_the_embedded_model(embedded_path, tmp_path):
    args = tiny_args(
        "embedded:smollm2-135m-instruct",
        tmp_path / "run",
        num_passages=1,
        num_rounds=1,
        max_new_tokens=64,
        ttt_epochs=3,
        ttt_lora_r=8,
        ttt_lora_alpha=16,
        max_steps=1,
        answer_max_new_tokens=16,
    )
    (summary,) = run(args)
    rows = read_jsonl(tmp_path / "run" / "round_0" / "self_edits.jsonl")
    assert summary["self_edits"] == len(rows) == 2 and all(r["completion"].strip() for r in rows)
    assert summary["parsed"] >= 1 and summary["kept"] == 1
    assert (tmp_path / "run" / "round_0" / "update" / "generator" / "adapter_model.safetensors").is_file()
