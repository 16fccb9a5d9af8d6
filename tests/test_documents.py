"""Raw documents into passages: splitting, titles, ids, every bad input named before compute."""

import json

import datasets
import pytest

from seal.config import HeldOutConfig
from seal.data import DataValidationError, Passage, load_passages
from seal.documents import load_documents, split_text
from seal.heldout import load_heldout
from seal.label import tokens_counter


def words_of(chunks):
    return [w for c in chunks for w in c.split()]


def test_split_keeps_every_word_in_order_within_the_budget():
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(n)) + "." for i, n in enumerate([3, 4, 9, 2, 1])]
    text = "\n\n".join(paragraphs) + "\n"
    chunks = split_text(text, max_tokens=6)
    assert words_of(chunks) == text.split()  # nothing dropped, nothing repeated
    assert all(len(c.split()) <= 6 for c in chunks)
    assert chunks[0] == paragraphs[0]  # 3 + 4 > 6: the first paragraph stands alone
    assert "p3w0 p3w1." in chunks[-1] and "p4w0." in chunks[-1]  # short paragraphs merged
    many = split_text(text, max_tokens=100)
    assert len(many) == 1 and many[0].count("\n\n") == 4  # paragraph breaks kept inside a passage


def test_long_paragraph_split_at_sentences_then_words():
    sentence = "one two three four five. "
    text = sentence * 3 + "a b c d e f g h i j k l"
    chunks = split_text(text, max_tokens=5)
    assert chunks[:3] == ["one two three four five."] * 3
    assert chunks[3:] == ["a b c d e", "f g h i j", "k l"]
    assert split_text("averyveryverylongword", max_tokens=1) == ["averyveryverylongword"]


def test_folder_of_markdown_and_text(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b_notes.txt").write_text("First fact.\n\nSecond fact.\n")
    (tmp_path / "sub" / "a.md").write_text(
        "Intro before any heading.\n\n# Harbour\n\nThe harbour is old.\n\n## Boats\n\nTwo boats.\n"
    )
    (tmp_path / "ignored.csv").write_text("x,y\n")
    passages = load_documents(str(tmp_path), max_tokens=50)
    assert [(p.id, p.title, p.context) for p in passages] == [
        ("b_notes.txt#0", "B notes", "First fact.\n\nSecond fact."),
        ("sub/a.md#0", "A", "Intro before any heading."),
        ("sub/a.md#1", "Harbour", "The harbour is old."),
        ("sub/a.md#2", "Harbour: Boats", "Two boats."),
    ]
    assert all(p.questions == [] for p in passages)
    assert [p.id for p in load_documents(str(tmp_path / "b_notes.txt"))] == ["b_notes.txt#0"]
    assert len(load_documents(str(tmp_path), limit=2)) == 2


def test_token_budget_uses_the_tokenizer(tokenizer):
    count = tokens_counter(tokenizer)
    passages = load_documents("sample-documents", max_tokens=64, count_tokens=count)
    assert len(passages) >= 6 and all(count(p.context) <= 64 for p in passages)
    assert len({p.id for p in passages}) == len(passages)
    assert len(load_documents("sample-documents", max_tokens=512, count_tokens=count)) < len(passages)


def test_records_and_a_dataset_text_column(tmp_path):
    records = [{"id": "r1", "title": "T", "context": "A. " * 30}, {"context": "Untitled text."}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    passages = load_documents(str(path), max_tokens=20)
    assert [p.id for p in passages] == ["r1#0", "r1#1", "docs-1#0"]
    assert passages[0].title == "T" and passages[-1].title == ""
    # a directory of data files reads as a Hub dataset does (datasets.load_dataset)
    rows = {"body": ["Some words here.", "More words."], "title": ["A", "B"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    passages = load_documents(str(tmp_path / "pq"), text_field="body")
    assert [(p.id, p.title, p.context) for p in passages] == [
        ("pq[train]-0#0", "A", "Some words here."),
        ("pq[train]-1#0", "B", "More words."),
    ]
    with pytest.raises(DataValidationError, match="no column 'text'.*document_text_field"):
        load_documents(str(tmp_path / "pq"), text_field="text")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"id": "x", "context": ""}\n', r"bad.jsonl: record 0 \(id=x\): field 'context'"),
        ("bad.jsonl", '{"id": "x", "context": "c", "title": 3}\n', r"record 0 \(id=x\): field 'title'"),
        ("bad.jsonl", '["not", "an", "object"]\n', "record 0: expected an object"),
        ("bad.jsonl", '{"id": "x", "context": "c"}\n{"id": "x", "context": "d"}\n', "'x#0' appears more"),
        ("bad.jsonl", "{not json\n", "bad.jsonl: line 1: invalid JSON"),
        ("empty.md", "  \n\n", "empty.md: the file holds no text"),
    ],
)
def test_bad_input_names_file_record_and_field(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataValidationError, match=message):
        load_documents(str(tmp_path / name) if name.endswith("jsonl") else str(tmp_path))


def test_non_utf8_empty_folder_wrong_suffix(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=r"latin1.txt: line 1, byte 3: not valid UTF-8"):
        load_documents(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataValidationError, match="empty folder"):
        load_documents(str(empty))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataValidationError, match="not a .txt or .md file"):
        load_documents(str(tmp_path / "table.csv"))
    with pytest.raises(ValueError, match="document_max_tokens"):
        load_documents(str(tmp_path), max_tokens=0)


def test_a_heldout_passage_overlapping_a_training_chunk_is_refused():
    heldout = load_passages("sample", "eval")[0]
    first_sentence = heldout.context.split(". ")[0] + "."
    assert len(first_sentence.split()) >= 8
    cfg = HeldOutConfig(heldout_datasets=["sample"], heldout_split="eval")
    message = rf"record \(id={heldout.id}\): field 'context': overlaps the training passage 'doc.txt#0'"
    with pytest.raises(DataValidationError, match=message):  # a document chunk inside a held-out passage
        load_heldout(cfg, [Passage("doc.txt#0", "", first_sentence, [])])
    with pytest.raises(DataValidationError, match=message):  # a held-out passage inside a document
        load_heldout(cfg, [Passage("doc.txt#0", "", f"Before. {heldout.context} After.", [])])
    assert load_heldout(cfg, [Passage("doc.txt#0", "", "It was built in 1987.", [])])  # a few words: not one
