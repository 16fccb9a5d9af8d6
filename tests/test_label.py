"""Pseudo-labelling: questions and answers parsed, the consensus and its confidence, the keep rule, scoring,
and `seal label` end to end."""

import json
import math

import datasets
import pytest
import torch

from seal.config import LabelConfig
from seal.data import Passage, load_passages
from seal.generate import HFEngine
from seal.generate.base import Engine
from seal.label import (
    LabelledPassage,
    Labeller,
    clean_answer,
    consensus,
    extract_answer,
    grounded_consensus,
    label_summary,
    parse_questions,
    supported,
)

PASSAGE = Passage(
    "harbour#0",
    "Quillon ferry",
    "The ferry Bright Heron was built in 1987 at the Castell yard. It carries 48 passengers.",
    [],
)


class Scripted(Engine):
    """Answers question-writing prompts with `questions` and each answer prompt with `answers[question]`."""

    def __init__(self, questions: str, answers: dict[str, list[str]]):
        self.questions, self.answers, self.calls = questions, answers, []

    def generate(self, prompts, sampling, adapter=None):
        self.calls.append((len(prompts), sampling.n, adapter))
        out = []
        for prompt in prompts:
            if "different quiz questions" in prompt:
                out.append([self.questions] * sampling.n)
            else:
                question = prompt.rsplit("Question: ", 1)[1].split("<|im_end|>")[0].strip()
                out.append(self.answers[question][: sampling.n])
        return out

    def add_adapter(self, path, name=None):
        return name or path

    def remove_adapter(self, name):
        pass


def test_parse_questions_drops_numbering_duplicates_and_non_questions():
    text = "1. Who built the ferry?\n2) who built the ferry ?\n- Where is it? It is here.\n"
    text += "Not a question\n**Q3:** How many?"
    assert parse_questions(text, 5) == ["Who built the ferry?", "Where is it?", "How many?"]
    assert parse_questions(text, 1) == ["Who built the ferry?"]
    assert parse_questions("", 3) == []


def test_answers_are_cleaned_and_shortened_to_what_the_question_did_not_say():
    assert clean_answer('  Answer: "The Castell yard."\nmore text') == "The Castell yard"
    assert (
        extract_answer("The ferry was built at the Castell yard", "Where was the ferry built?")
        == "Castell yard"
    )
    assert extract_answer("It carries 48 passengers", "How many passengers does it carry?") == "48"
    assert extract_answer("Studied at the Brannock Institute", "At which institute did he study?") == (
        "Brannock Institute"  # an inflection of a question word is the question's; a name keeps its last word
    )
    assert extract_answer("the ferry", "Which ferry?") == "the ferry"  # nothing new: the answer whole
    assert extract_answer("The answer is 1847", "In which year did the law pass?") == "1847"  # no task words


def test_consensus_and_agreement():
    assert consensus(["Castell yard", "the Castell yard", "Bright Heron", "castell yard."]) == (
        "Castell yard",
        0.75,
    )
    answer, agreement = consensus(["Castell yard", "Castell", "1987"])
    assert answer == "Castell yard" and agreement == pytest.approx((1 + 2 / 3) / 3)  # token F1 counts in part
    assert consensus(["", "  ", "."]) == ("", 0.0)


def test_consensus_among_candidates_counts_agreement_over_every_sample():
    invented = ["Silver Gull", "the Silver Gull", "Bright Heron", "Silver Gull"]
    assert consensus(invented, ["Bright Heron"]) == ("Bright Heron", 0.25)
    assert grounded_consensus(invented, PASSAGE) == ("Bright Heron", 0.25)  # the passage names Bright Heron
    assert consensus(invented)[0] == "Silver Gull"
    unsupported = ["Silver Gull", "Grey Gull"]
    assert grounded_consensus(unsupported, PASSAGE) == consensus(unsupported)  # none supported: plain


def test_support_needs_every_content_word_in_the_passage():
    assert supported("the Castell yard", PASSAGE) and supported("Quillon", PASSAGE)  # the title counts
    assert not supported("Castell dockyard", PASSAGE) and not supported("the", PASSAGE)


def labeller(tokenizer, cfg, scorer=None):
    engine = Scripted(
        "1. Where was the ferry built?\n2. How many passengers does it carry?\n3. Who owns it?",
        {
            "Where was the ferry built?": ["At the Castell yard", "the Castell yard", "Castell yard", "1987"],
            "How many passengers does it carry?": ["48 passengers", "48", "It carries 48", "48"],
            "Who owns it?": ["The Harbour Trust", "Jory Penhallow", "the town", "Saltmere"],
        },
    )
    return Labeller(engine, tokenizer, cfg, scorer=scorer), engine


def test_labeller_keeps_confident_supported_answers_only(tokenizer, tmp_path):
    lab, engine = labeller(
        tokenizer, LabelConfig(label_num_questions=3, label_num_samples=4, label_threshold=0.6)
    )
    (lp,) = lab.label([PASSAGE], seed=1)
    assert engine.calls == [(1, 1, None), (3, 4, None)]  # one batched call each: questions, then answers
    by_q = {label.question: label for label in lp.labels}
    assert (
        by_q["Where was the ferry built?"].answer == "Castell yard"
        and by_q["Where was the ferry built?"].kept
    )
    assert by_q["How many passengers does it carry?"].answer == "48"
    assert by_q["How many passengers does it carry?"].agreement == 1.0
    owner = by_q["Who owns it?"]
    assert (
        not owner.kept and owner.agreement < 0.6 and not owner.supported
    )  # disagreeing, and not in the text
    assert [q.question for q in lp.as_passage().questions] == [lb.question for lb in lp.kept]
    assert label_summary([lp]) == {
        "labels_written": 3,
        "labels_kept": 2,
        "label_confidence": 0.875,  # (3/4 + 4/4) / 2
        "passages_unlabelled": 0,
    }
    record = lp.to_record()
    assert [q["answer"] for q in record["questions"]] == ["Castell yard", "48"]
    assert record["rejected"][0]["question"] == "Who owns it?"
    assert LabelledPassage.from_record(json.loads(json.dumps(record))).to_record() == record
    (tmp_path / "labelled.jsonl").write_text(json.dumps(record) + "\n")
    (p,) = load_passages(str(tmp_path / "labelled.jsonl"))  # a labelled record is gold-format data
    assert [q.answers for q in p.questions] == [["Castell yard"], ["48"]]


def test_threshold_and_support_rules_are_the_recipes(tokenizer):
    strict, _ = labeller(tokenizer, LabelConfig(label_num_samples=4, label_threshold=1.0))
    assert [lb.question for lb in strict.label([PASSAGE], 1)[0].kept] == [
        "How many passengers does it carry?"
    ]
    loose, _ = labeller(
        tokenizer, LabelConfig(label_num_samples=4, label_threshold=0.0, label_require_support=False)
    )
    assert len(loose.label([PASSAGE], 1)[0].kept) == 3
    with pytest.raises(ValueError, match="needs a local labeller"):
        labeller(tokenizer, LabelConfig(label_confidence="token_prob"))
    with pytest.raises(ValueError, match="label_threshold"):
        LabelConfig(label_threshold=1.5)
    with pytest.raises(ValueError, match="endpoint"):
        LabelConfig(label_url="http://127.0.0.1:1/v1", label_confidence="both")


def test_support_rule_chooses_among_supported_samples(tokenizer):
    answers = {"What is the ferry called?": ["Silver Gull", "Silver Gull", "Bright Heron", "Silver Gull"]}

    def name_label(**kw):
        engine = Scripted("1. What is the ferry called?", answers)
        return Labeller(engine, tokenizer, LabelConfig(label_num_samples=4, **kw)).label([PASSAGE], 1)[0]

    (grounded,) = name_label(label_threshold=0.25).labels
    assert (grounded.answer, grounded.agreement, grounded.supported, grounded.kept) == (
        "Bright Heron", 0.25, True, True
    )  # fmt: skip
    (doubtful,) = name_label(label_threshold=0.3).labels  # one sample in four: below the threshold
    assert doubtful.answer == "Bright Heron" and not doubtful.kept
    (free,) = name_label(label_threshold=0.0, label_require_support=False).labels
    assert (free.answer, free.agreement, free.supported, free.kept) == ("Silver Gull", 0.75, False, True)


def test_mean_logprobs_match_a_manual_forward(tiny_model, tokenizer):
    hf = HFEngine(tiny_model, tokenizer, batch_size=2, autocast_setting="none")
    prompts, completions = ["Question: where?\nAnswer:", "Hi"], [" Castell yard", " there you are"]
    got = hf.mean_logprobs(prompts, completions)
    for prompt, completion, value in zip(prompts, completions, got, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = tiny_model(torch.tensor([p + c])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c)) / len(c)
        assert value == pytest.approx(expected, abs=1e-5)  # float32 both ways; padding must not leak in
    assert hf.mean_logprobs(["x"], [""]) == [0.0]


def test_token_prob_confidence_uses_the_scorer(tiny_model, tokenizer):
    scorer = HFEngine(tiny_model, tokenizer, autocast_setting="none")
    lab, _ = labeller(
        tokenizer,
        LabelConfig(label_num_samples=4, label_confidence="token_prob", label_threshold=0.0),
        scorer,
    )
    labels = lab.label([PASSAGE], 1)[0].labels
    assert all(0.0 < lb.token_prob < 1.0 and lb.confidence == lb.token_prob for lb in labels)
    both, _ = labeller(
        tokenizer, LabelConfig(label_num_samples=4, label_confidence="both", label_threshold=0.0), scorer
    )
    for lb in both.label([PASSAGE], 1)[0].labels:
        assert lb.confidence == min(lb.agreement, lb.token_prob)
        assert math.isclose(lb.token_prob, next(x.token_prob for x in labels if x.question == lb.question))


@pytest.mark.slow
def test_seal_label_on_a_folder_writes_a_dataset_and_resumes(tmp_path, monkeypatch):
    from seal.cli import main

    out = tmp_path / "labels"
    argv = [
        "label", "--dataset_name", "sample-documents", "--num_passages", "2", "--label_num_questions", "2",
        "--label_num_samples", "3", "--generator_backend", "hf", "--label_threshold", "0.0",
        "--label_output_dir", str(out),
    ]  # fmt: skip
    main(argv)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passages"] == 2 and summary["labels_written"] >= 2
    every = datasets.load_dataset("json", data_files=str(out / "labels.jsonl"), split="train")
    assert len(every) == 2 and set(every.column_names) >= {"id", "title", "context", "questions", "rejected"}
    if summary["labels_kept"]:
        kept = datasets.load_dataset("json", data_files=str(out / "dataset.jsonl"), split="train")
        assert sum(len(q) for q in kept["questions"]) == summary["labels_kept"]
        assert all(len(p.questions) >= 1 for p in load_passages(str(out / "dataset.jsonl")))
    # a rerun finds the journal and labels nothing anew
    monkeypatch.setattr(Labeller, "label", lambda *a, **k: pytest.fail("relabelled on resume"))
    main(argv)
    assert json.loads((out / "summary.json").read_text()) == summary


def scripted_labelling(monkeypatch) -> list[float]:
    """HFEngine answers labelling prompts from a script (a tiny random model writes no questions) and
    everything else with its model; returns the fingerprint of the weights each labelling call ran on."""
    seen: list[float] = []
    original = HFEngine.generate

    def generate(self, prompts, sampling, adapter=None):
        if "different quiz questions" in prompts[0]:
            seen.append(sum(p.double().sum().item() for p in self.model.parameters()))
            return [["1. Who built the bridge?\n2. When was it built?"] * sampling.n for _ in prompts]
        if "short phrase from the passage" in prompts[0]:
            return [["Ada Quill" if "Who built" in p else "in 1911"] * sampling.n for p in prompts]
        return original(self, prompts, sampling, adapter)

    monkeypatch.setattr(HFEngine, "generate", generate)
    return seen


def test_label_free_rounds_relabel_with_each_rounds_model_and_resume(tiny_model_path, tmp_path, monkeypatch):
    from seal.loop import run
    from seal.utils import read_jsonl
    from tests.test_loop import tiny_args

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "velmor.txt").write_text("The Velmor bridge was built in 1911 by Ada Quill.\n")
    (docs / "orrin.md").write_text("# Orrin\n\nAda Quill built the Orrin bridge in 1911 as well.\n")
    seen = scripted_labelling(monkeypatch)
    out = tmp_path / "run"
    args = tiny_args(
        tiny_model_path, out, dataset_name=str(docs), dataset_labels="pseudo", num_passages=None,
        max_questions_per_passage=None, label_num_samples=2,
    )  # fmt: skip
    summaries = run(args)
    assert len(seen) == 2 and seen[0] != seen[1]  # round 1 relabelled with θ_1, the updated generator
    for r, summary in enumerate(summaries):
        assert summary["labels_kept"] == 4 and summary["label_confidence"] == 1.0
        assert summary["passages"] == 2 and summary["passages_unlabelled"] == 0
        labelled = read_jsonl(out / f"round_{r}" / "labels.jsonl")
        assert [q["answer"] for q in labelled[0]["questions"]] == ["Ada Quill", "1911"]
        rows = read_jsonl(out / f"round_{r}" / "self_edits.jsonl")
        assert {row["passage_id"] for row in rows} == {"orrin.md#0", "velmor.txt#0"}
        assert all(len(a) == 2 for row in rows for a in row["answers"])  # graded on the 2 pseudo-labels
    rerun = run(args)  # resumes: the journal holds both rounds' labels
    assert len(seen) == 2 and [s["labels_kept"] for s in rerun] == [4, 4]
