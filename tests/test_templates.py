import pytest

from seal.config import GenerateConfig
from seal.data import QA, Passage
from seal.templates import (
    BUILTIN_TEMPLATES,
    build_prompt,
    get_template,
    parse_items,
    render_chat,
    training_examples,
)

PASSAGE = Passage("p", "Zorvath", "Zorvath is a town founded in 1820.", [QA("When?", ["1820"])])


def test_lines_parser_strips_bullets_and_numbering():
    text = "1. First fact.\n- Second fact\n\n* Third\n2) Fourth one\nb. Fifth\nok"
    assert [c for _, c in parse_items(text, "lines")] == [
        "First fact.",
        "Second fact",
        "Third",
        "Fourth one",
        "Fifth",
    ]


def test_paragraphs_and_whole():
    text = "First rewrite\nstill first.\n\nSecond rewrite."
    assert [c for _, c in parse_items(text, "paragraphs")] == [
        "First rewrite still first.",
        "Second rewrite.",
    ]
    assert parse_items(text, "whole") == [("", text)]
    assert parse_items("   \n", "lines") == []


def test_qa_parser_gives_prompt_and_completion():
    text = "Question: When was Zorvath founded?\nAnswer: In 1820.\n\nQ2: Who?\nA2: Nobody\nQuestion: dangling"
    items = parse_items(text, "qa")
    assert items == [
        ("Question: When was Zorvath founded?\nAnswer: ", "In 1820."),
        ("Question: Who?\nAnswer: ", "Nobody"),
    ]


def test_unknown_parser():
    with pytest.raises(ValueError, match="Unknown parser"):
        parse_items("x", "bogus")


def test_training_examples_options():
    completion = "1. Zorvath is old.\n2. Zorvath had a founding."
    template = BUILTIN_TEMPLATES["implications"]
    ex = training_examples(completion, PASSAGE, template, GenerateConfig(include_passage=False))
    assert [e.text for e in ex] == ["Zorvath\nZorvath is old.", "Zorvath\nZorvath had a founding."]
    ex = training_examples(
        completion, PASSAGE, template, GenerateConfig(title_prefix=False, include_passage=True)
    )
    assert [e.text for e in ex] == ["Zorvath is old.", "Zorvath had a founding.", PASSAGE.context]
    ex = training_examples(
        completion, PASSAGE, template, GenerateConfig(split_items=False, include_passage=False)
    )
    assert [e.completion for e in ex] == ["Zorvath is old.\nZorvath had a founding."]
    assert training_examples("", PASSAGE, template, GenerateConfig()) == []


def test_builtin_and_custom_templates():
    for name in ("implications", "rewrite", "self-qa"):
        prompt = build_prompt(get_template(GenerateConfig(template=name)), PASSAGE)
        assert PASSAGE.context in prompt and PASSAGE.title in prompt
    custom = GenerateConfig(
        template="custom", custom_template="Facts of {title}: {context}", custom_parser="whole"
    )
    assert build_prompt(get_template(custom), PASSAGE) == f"Facts of Zorvath: {PASSAGE.context}"
    with pytest.raises(ValueError, match="context"):
        get_template(GenerateConfig(template="custom", custom_template="no placeholder"))
    with pytest.raises(ValueError, match="custom_parser"):
        get_template(GenerateConfig(template="custom", custom_template="{context}", custom_parser="x"))
    with pytest.raises(ValueError, match="template must be one of"):
        get_template(GenerateConfig(template="nope"))


def test_render_chat(tokenizer):
    chat = render_chat(tokenizer, "Hello")
    assert "Hello" in chat and chat.rstrip().endswith("assistant")
    assert render_chat(tokenizer, "Hello", use_chat_template=False) == "Hello\n"
