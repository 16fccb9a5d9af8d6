"""The domain seam: the loop sees a self-edit only through `seal.domain.Domain`, so a new domain runs through
the unchanged loop."""

import pytest

from seal.config import DataConfig, GenerateConfig
from seal.data import Passage
from seal.domain import Domain, Knowledge, LabelFree, Policy, build_domain
from seal.generate import SelfEdit
from seal.templates import TrainExample
from seal.utils import read_jsonl
from tests.test_loop import tiny_args


class Notes(Domain):
    """A toy domain: the self-edit is a note about the title, trained on as one example; the control is
    the title alone."""

    def load(self, data: DataConfig, tokenizer) -> list[Passage]:
        return [
            Passage("n1", "Harrowgate", "The observatory opened in 1871.", []),
            Passage("n2", "Quillon", "The ferry crosses at dawn.", []),
        ]

    def prompt(self, item: Passage) -> str:
        return f"Write one note about {item.title}."

    def examples(self, item: Passage, completion: str) -> list[TrainExample]:
        return [TrainExample(f"Note on {item.title}: ", completion.strip())] if completion.strip() else []

    def control_examples(self, item: Passage) -> list[TrainExample]:
        return [TrainExample("", item.title)]


def test_a_new_domain_runs_through_the_unchanged_loop(tiny_model_path, tmp_path, monkeypatch):
    from seal import loop

    questions = {"n1": [("When did the observatory open?", "1871")], "n2": [("When?", "dawn")]}

    class NotesWithQuestions(Notes):
        def load(self, data, tokenizer):
            from seal.data import QA

            return [
                Passage(p.id, p.title, p.context, [QA(q, a) for q, a in questions[p.id]])
                for p in super().load(data, tokenizer)
            ]

    domain = NotesWithQuestions(GenerateConfig(generator_backend="hf", num_self_edits=2, max_new_tokens=8))
    monkeypatch.setattr(loop, "build_domain", lambda args: domain)
    args = tiny_args(
        tiny_model_path, tmp_path / "run", num_rounds=1, num_self_edits=2, max_new_tokens=8,
        filter_beat_passage=True,
    )  # fmt: skip
    (summary,) = loop.run(args)
    assert summary["passages"] == 2 and summary["self_edits"] == 4
    rows = read_jsonl(tmp_path / "run" / "round_0" / "self_edits.jsonl")
    assert {r["prompt"] for r in rows} == {
        "Write one note about Harrowgate.",
        "Write one note about Quillon.",
    }
    for row in rows:  # the domain's training data, nothing of the knowledge template's
        title = "Harrowgate" if row["passage_id"] == "n1" else "Quillon"
        if row["status"] == "ok":
            assert row["examples"] == [
                {"prompt": f"Note on {title}: ", "completion": row["completion"].strip()}
            ]
        assert row["passage_accuracy"] is not None  # the control (the title alone) was trained and scored


def test_knowledge_parses_statuses_and_falls_back_to_the_control(tokenizer):
    gen = GenerateConfig(template="self-qa", include_passage=True)
    passage = Passage("p", "Title", "Some text.", [])
    ok, empty, junk = Knowledge(gen).parse(passage, ["Question: Why?\nAnswer: Text.", " ", "no pairs"])
    assert [e.status for e in (ok, empty, junk)] == ["ok", "empty", "unparseable"]
    assert ok.examples[0].completion.strip() == "Text." and ok.examples[-1].completion == "Some text."
    control = Knowledge(gen).control_examples(passage)
    assert Knowledge(gen).edit_examples(junk, passage) == control == [TrainExample("Title\n", "Some text.")]
    assert (
        Knowledge(GenerateConfig(template="self-qa", include_passage=False)).edit_examples(junk, passage)
        == []
    )


def test_sample_asks_the_policy_for_n_per_item(tokenizer):
    class Fake:
        def generate(self, prompts, sampling, adapter=None):
            self.seen = (prompts, sampling.n, sampling.seed, adapter)
            return [["- x"] * sampling.n for _ in prompts]

    fake, passage = Fake(), Passage("p", "T", "Text.", [])
    edits = Knowledge(GenerateConfig(num_self_edits=5)).sample(
        Policy(fake, "a"), tokenizer, [passage], 3, n=2
    )
    assert [[e.index for e in per] for per in edits] == [[0, 1]] and fake.seen[1:] == (2, 3, "a")
    assert "Text." in fake.seen[0][0] and isinstance(edits[0][0], SelfEdit)


def test_build_domain_and_relabelling_hooks(tiny_model_path, tmp_path):
    gold = build_domain(tiny_args(tiny_model_path, tmp_path))
    assert type(gold) is Knowledge and not gold.relabels
    with pytest.raises(NotImplementedError, match="does not relabel"):
        gold.label(0, [], Policy(None), None, 0)
    pseudo = build_domain(tiny_args(tiny_model_path, tmp_path, dataset_labels="pseudo"))
    assert isinstance(pseudo, LabelFree) and pseudo.relabels
