"""Record ids never reach the file system raw: safe_name, adapter labels, the inner loop's adapter dirs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from seal.config import RewardConfig, TTTConfig
from seal.data import QA, Passage
from seal.generate import HFEngine
from seal.graders import make_grader
from seal.inner_loop import InnerLoop, Job
from seal.paths import HASH_CHARS, SLUG_CHARS, adapter_label, safe_name
from seal.reward import Rewarder
from seal.templates import TrainExample
from seal.ttt import wrap_for_adapters
from tests.conftest import build_tiny_model

HOSTILE = [
    "../x",
    "../../outside",
    "/tmp/evil",
    "a/b",
    "a?b",
    "a\\b",
    "nul\x00byte",
    "x" * 500,
    "日本語-é",
    ".",
    "..",
    "",
    ".hidden",
    "-rf",
    "con",
    "\ud800lone-surrogate",
    "p1-0-0",
]
SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_name_is_one_safe_path_component(text, tmp_path):
    name = safe_name(text)
    assert SAFE.fullmatch(name) and name.isascii() and name not in (".", "..")
    assert len(name) <= SLUG_CHARS + 1 + HASH_CHARS
    assert safe_name(text) == name  # deterministic
    joined = tmp_path / name
    assert joined.parent == tmp_path and joined.resolve().parent == tmp_path.resolve()
    assert os.path.basename(name) == name and not os.path.isabs(name)


def test_safe_name_is_readable_and_injective():
    assert safe_name("p1-0-0").startswith("p1-0-0-")
    assert safe_name("日本語-é").startswith("e-")  # accents kept as ASCII, the rest dropped
    assert safe_name("a/b") != safe_name("a?b")  # same slug, different hash
    assert safe_name("a/b").split("-")[0] == safe_name("a?b").split("-")[0] == "a_b"
    assert safe_name("x" * 500) != safe_name("x" * 501)  # slugs cut to the same length
    assert len({safe_name(t) for t in HOSTILE}) == len(HOSTILE)
    assert re.fullmatch(r"[0-9a-f]{10}", safe_name("..")) and safe_name("..") != safe_name(".")
    assert safe_name("abc") == "abc-ba7816bf8f"  # sha256("abc"): the same on every machine


@pytest.mark.parametrize("text", HOSTILE)
def test_adapter_label_is_a_valid_module_name(text):
    label = adapter_label(f"/runs/adapters/{safe_name(text)}")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", label) and "." not in label
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", adapter_label("/", text))


def test_adapter_label_keeps_plain_names():
    assert adapter_label("runs/x/ttt") == "ttt"
    assert adapter_label("runs/x/ttt/") == "ttt"
    assert adapter_label("anything", name="generator-r1") == "generator-r1"
    assert adapter_label("ckpt.v2") == "ckpt_v2"  # PEFT refuses '.' in adapter names


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_inner_loop_writes_adapters_only_under_the_run_dir(tokenizer, tmp_path, mode):
    """Hostile passage ids go through a disk-backed engine: every adapter directory is a direct child of
    adapter_dir, nothing outside the run dir (nor the run dir's own files) changes, ids come back as given."""
    run_dir = tmp_path / "run"
    adapter_dir = run_dir / "adapters"
    run_dir.mkdir()
    (run_dir / "journal.jsonl").write_text("keep me\n")  # `..` as a job name would be the run dir itself
    outside = tmp_path / "outside"  # where ../../outside resolves from adapter_dir
    outside.mkdir()
    (outside / "sentinel").write_text("outside")
    (tmp_path / "x").mkdir()  # where ../../x resolves
    (tmp_path / "x" / "sentinel").write_text("x")
    evil = tmp_path / "evil"  # an absolute id: pathlib would join it as the whole path
    evil.mkdir()
    (evil / "sentinel").write_text("evil")
    ids = [
        "../../outside",
        "../../x",
        str(evil),
        "..",
        ".",
        "",
        "a/b",
        "a?b",
        "a\\b",
        "日本語-é",
        "y" * 300,
        "doc.v2",
    ]
    before = _files(tmp_path)

    cfg = TTTConfig(
        ttt_mode=mode, ttt_lora_r=2, ttt_lora_alpha=4, ttt_epochs=1, ttt_parallel_adapters=4, ttt_batch_size=2
    )
    model = wrap_for_adapters(build_tiny_model(tokenizer), cfg)
    other = wrap_for_adapters(build_tiny_model(tokenizer, seed=1), cfg)  # not the TTT model: through disk
    engine = HFEngine(other, tokenizer)
    rewarder = Rewarder(engine, tokenizer, make_grader("contains"), RewardConfig(answer_max_new_tokens=2))
    loop = InnerLoop(model, tokenizer, cfg, rewarder, adapter_dir)
    assert not loop.shares_model
    served: list[Path] = []
    add = engine.add_adapter

    def spy(path: str, name: str | None = None) -> str:
        served.append(Path(path))
        assert Path(path).parent == adapter_dir and Path(path).resolve().parent == adapter_dir.resolve()
        assert _files(outside) == {"sentinel": b"outside"} and (run_dir / "journal.jsonl").is_file()
        return add(path, name)

    engine.add_adapter = spy
    passages = [Passage(pid, "T", "ctx", [QA("Who?", ["Ilsa"])]) for pid in ids]
    jobs = [
        Job(pid, [TrainExample("", f"fact {i} about {pid}")], [p], seed=i)
        for i, (pid, p) in enumerate(zip(ids, passages, strict=True))
    ]
    results = loop.run(jobs)

    assert [job.name for job, _, _ in results] == ids  # ids untouched in results and scores
    assert [[s.passage_id for s in scores] for _, _, scores in results] == [[pid] for pid in ids]
    assert len(served) == len(ids) and len(set(served)) == len(ids)  # one directory each, no collision
    assert {p.name for p in served} == {safe_name(pid) for pid in ids}
    assert _files(tmp_path) == before  # adapters removed again; nothing else created, changed or deleted
    assert not adapter_dir.exists() or not any(adapter_dir.iterdir())
