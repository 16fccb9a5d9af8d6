"""Self-edit prompt templates, and parsing a completion into training examples for TTT."""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from seal.config import GenerateConfig, ParserName, choices
from seal.data import Passage


@dataclass(frozen=True)
class Template:
    """A prompt with {title} and {context} placeholders, and how its completion splits into items."""

    prompt: str
    parser: str


BUILTIN_TEMPLATES: dict[str, Template] = {  # every TemplateName but custom
    "implications": Template(
        "Read the following passage and write a list of implications that follow directly or indirectly "
        "from it, one per line.\n\nPassage:\n{title}\n{context}\n\nImplications:",
        parser="lines",
    ),
    "rewrite": Template(
        "Read the following passage and rewrite it in several different ways. Separate the rewrites with a "
        "blank line.\n\nPassage:\n{title}\n{context}\n\nRewrites:",
        parser="paragraphs",
    ),
    "self-qa": Template(
        "Read the following passage and write questions about its facts, each followed by its answer, in "
        "the form 'Question: ...' then 'Answer: ...'.\n\nPassage:\n{title}\n{context}\n\n"
        "Questions and answers:",
        parser="qa",
    ),
}


@dataclass(frozen=True)
class TrainExample:
    """One TTT sequence: `prompt + completion`; with ttt_loss=completion only the completion is learned."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def get_template(cfg: GenerateConfig) -> Template:
    """The recipe's template (GenerateConfig has checked its name and a custom one's placeholder)."""
    if cfg.template == "custom":
        return Template(cfg.custom_template, cfg.custom_parser)
    return BUILTIN_TEMPLATES[cfg.template]


def build_prompt(template: Template, passage: Passage) -> str:
    """The self-edit request for one passage, as plain text (see `render_chat` for instruct models)."""
    return template.prompt.format(title=passage.title, context=passage.context)


def render_chat(tokenizer: PreTrainedTokenizerBase, text: str, use_chat_template: bool = True) -> str:
    """Wrap a user message in the tokenizer's chat template with the assistant turn opened."""
    if not use_chat_template or tokenizer.chat_template is None:
        return text if text.endswith(("\n", " ")) else text + "\n"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.)]|[a-zA-Z][.)](?=\s))\s*")
_HEADING = re.compile(r"^[*#\s]*[\w ]{1,40}:[*\s]*$")  # "**Implications:**", "Rewrites:" (no content)
_QA = re.compile(
    r"(?:^|\n)\s*(?:\*\*)?(?:Q(?:uestion)?\s*\d*)(?:\*\*)?\s*[:.]\s*(?P<q>.+?)\s*\n+\s*(?:\*\*)?A(?:nswer)?\s*\d*"
    r"(?:\*\*)?\s*[:.]\s*(?P<a>.+?)(?=\n\s*\n|\n\s*(?:\*\*)?Q(?:uestion)?\s*\d*(?:\*\*)?\s*[:.]|\Z)",
    re.DOTALL | re.IGNORECASE,
)


def parse_items(completion: str, parser: str) -> list[tuple[str, str]]:
    """Split a completion into (prompt, completion) items; plain-text items have an empty prompt."""
    text = completion.strip()
    if not text:
        return []
    if parser == "whole":
        return [("", text)]
    if parser == "lines":
        lines = (_BULLET.sub("", line).strip() for line in text.splitlines())
        return [("", line) for line in lines if len(line) > 2 and not _HEADING.match(line)]
    if parser == "paragraphs":
        paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
        return [("", p) for p in paragraphs if len(p) > 2]
    if parser == "qa":
        return [
            (f"Question: {m['q'].strip()}\nAnswer: ", " ".join(m["a"].split()))
            for m in _QA.finditer(text)
            if m["a"].strip()
        ]
    raise ValueError(f"Unknown parser '{parser}'; choose from {choices(ParserName)}")


def training_examples(
    completion: str, passage: Passage, template: Template, cfg: GenerateConfig
) -> list[TrainExample]:
    """Turn a self-edit into TTT examples: items (or the whole text), title prefix, optionally the passage."""
    items = parse_items(completion, template.parser)
    if items and not cfg.split_items:
        items = [("", "\n".join(p + c for p, c in items))]
    prefix = f"{passage.title}\n" if cfg.title_prefix and passage.title else ""
    examples = [TrainExample(prefix + p, c) for p, c in items]
    if examples and cfg.include_passage:
        examples.extend(passage_examples(passage, cfg))
    return examples


def passage_examples(passage: Passage, cfg: GenerateConfig) -> list[TrainExample]:
    """The passage itself as TTT data (title-prefixed like the self-edit items)."""
    prefix = f"{passage.title}\n" if cfg.title_prefix and passage.title else ""
    return [TrainExample(prefix, passage.context)]
