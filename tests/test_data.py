import json

import pytest

from seal.data import DataValidationError, group_squad_rows, load_passages


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


GOOD = {"id": "p1", "title": "T", "context": "Some text.", "questions": [{"question": "Q?", "answer": "A"}]}


def test_sample_splits_are_valid_and_invented():
    train, evals = load_passages("sample", "train"), load_passages("sample", "eval")
    assert len(train) >= 24 and len(evals) >= 8
    assert not {p.id for p in train} & {p.id for p in evals}
    for p in train + evals:
        assert 3 <= len(p.questions) <= 5
        assert all(q.answer in p.context for q in p.questions)


def test_sample_unknown_split():
    with pytest.raises(FileNotFoundError, match="train"):
        load_passages("sample", "validation")


def test_json_and_jsonl_limit_and_question_cap(tmp_path):
    records = [
        dict(GOOD, id=f"p{i}", questions=[{"question": f"Q{j}?", "answer": "A"} for j in range(4)])
        for i in range(3)
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "d.jsonl", records)
    for name in ("d.json", "d.jsonl"):
        ps = load_passages(str(tmp_path / name), limit=2, max_questions=3)
        assert [p.id for p in ps] == ["p0", "p1"] and len(ps[0].questions) == 3


def test_answers_list_and_squad_dict_and_completions(tmp_path):
    rec = {
        "title": "T",
        "context": "c",
        "questions": [
            {"question": "q1", "answers": ["x", "y", "x"]},
            {"question": "q2", "answers": {"text": ["z"]}},
        ],
        "completions": ["one", "two"],
    }
    (p,) = load_passages(str(write_jsonl(tmp_path / "d.jsonl", [rec])))
    assert p.questions[0].answers == ["x", "y"] and p.questions[1].answer == "z"
    assert p.completions == ["one", "two"] and p.id == "d-0"


def test_group_squad_rows():
    rows = [
        {
            "id": "a",
            "title": "T",
            "context": "C1",
            "question": "q1",
            "answers": {"text": ["x"], "answer_start": [0]},
        },
        {
            "id": "b",
            "title": "T",
            "context": "C1",
            "question": "q2",
            "answers": {"text": ["y"], "answer_start": [0]},
        },
        {
            "id": "c",
            "title": "U",
            "context": "C2",
            "question": "q3",
            "answers": {"text": ["z"], "answer_start": [0]},
        },
    ]
    grouped = group_squad_rows(rows)
    assert [len(g["questions"]) for g in grouped] == [2, 1] and grouped[0]["id"] == "a"


BAD_CASES = {
    "missing context": ({k: v for k, v in GOOD.items() if k != "context"}, "field 'context'"),
    "empty context": (dict(GOOD, context="   "), "field 'context'"),
    "title not a string": (dict(GOOD, title=3), "field 'title'"),
    "questions not a list": (dict(GOOD, questions="Q?"), "field 'questions'"),
    "no questions": (dict(GOOD, questions=[]), "field 'questions'"),
    "question not an object": (dict(GOOD, questions=["Q?"]), "field 'questions[0]'"),
    "empty question": (
        dict(GOOD, questions=[{"question": "", "answer": "A"}]),
        "field 'questions[0].question'",
    ),
    "missing answer": (dict(GOOD, questions=[{"question": "Q?"}]), "field 'questions[0]'"),
    "empty answer": (dict(GOOD, questions=[{"question": "Q?", "answer": ""}]), "field 'questions[0].answer'"),
    "completions not strings": (dict(GOOD, completions=[1]), "field 'completions'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_names_file_record_and_field(tmp_path, case):
    bad, field = BAD_CASES[case]
    path = write_jsonl(tmp_path / "data.jsonl", [dict(GOOD, id="ok"), bad])
    with pytest.raises(DataValidationError) as err:
        load_passages(str(path))
    message = str(err.value)
    assert str(path) in message and "record 1" in message and field in message
    assert "record 0" not in message


def test_every_problem_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [dict(GOOD, context=""), dict(GOOD, id="p2", questions=[])])
    with pytest.raises(DataValidationError) as err:
        load_passages(str(path))
    assert len(err.value.problems) == 2


def test_invalid_json_line_and_duplicate_ids_and_non_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataValidationError, match=r"data.jsonl: line 2: invalid JSON"):
        load_passages(str(path))
    write_jsonl(path, [GOOD, GOOD])
    with pytest.raises(DataValidationError, match="id 'p1' appears more than once"):
        load_passages(str(path))
    (tmp_path / "d.json").write_text(json.dumps([GOOD, 7]))
    with pytest.raises(DataValidationError, match=r"d.json: record 1: expected a JSON object"):
        load_passages(str(tmp_path / "d.json"))
    (tmp_path / "e.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(DataValidationError, match="expected a JSON list"):
        load_passages(str(tmp_path / "e.json"))


def test_non_utf8_file_names_file_line_and_byte_offset(tmp_path):
    good = (json.dumps(GOOD) + "\n").encode()
    latin1 = json.dumps(dict(GOOD, id="p2", context="S\u00f6me text."), ensure_ascii=False).encode("latin-1")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(good + latin1 + b"\n")
    offset = len(good) + latin1.index(b"\xf6")
    with pytest.raises(DataValidationError) as err:
        load_passages(str(jsonl))
    assert str(err.value.problems[0]).startswith(f"{jsonl}: line 2, byte {offset}: not valid UTF-8")
    raw = b'[{"id": "p1", "title": "\xff"}]'
    (tmp_path / "d.json").write_bytes(raw)
    offset = raw.index(b"\xff")
    with pytest.raises(DataValidationError, match=rf"d\.json: line 1, byte {offset}: not valid UTF-8"):
        load_passages(str(tmp_path / "d.json"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_passages(str(tmp_path / "nope.json"))


def test_local_hub_style_dataset_directory(tmp_path):
    from datasets import Dataset

    rows = [
        {
            "id": "a",
            "title": "T",
            "context": "C",
            "question": "q",
            "answers": {"text": ["x"], "answer_start": [0]},
        }
    ]
    # `datasets.load_dataset` reads a directory of data files exactly as it reads a Hub dataset.
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    (p,) = load_passages(str(tmp_path / "pq"), split="train")
    assert p.questions[0].answers == ["x"]
