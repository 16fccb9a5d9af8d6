"""The run directory's recipe snapshot (config.yaml) for `seal knowledge` and `seal evaluate`: written whole
or not at all, and checked against the recipe whenever the directory holds one."""

from __future__ import annotations

import errno
import io

import pytest
import yaml

from seal.evaluate import open_run
from seal.run_dir import RunDir, round_number, setup_run_dir
from tests.test_evaluate import eval_args
from tests.test_loop import tiny_args


class DiskFullAfterHalf:
    """A file opened for writing that takes half of the first write, then fails as a full disk does."""

    def __init__(self, f):
        self._f = f

    def write(self, text: str) -> int:
        self._f.write(text[: len(text) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file opened for writing from now on fails half-way (Path.write_text and os.fdopen alike)."""
    real_open = io.open

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return DiskFullAfterHalf(f) if "w" in mode else f

    monkeypatch.setattr(io, "open", opener)


@pytest.mark.parametrize("command", ["knowledge", "evaluate"])
def test_a_failed_config_write_leaves_the_previous_config_whole(tmp_path, monkeypatch, command):
    out = tmp_path / "run"
    if command == "knowledge":
        args = tiny_args("model", out)
        write = lambda: setup_run_dir(args)  # noqa: E731
    else:
        args = eval_args("model", out)
        write = lambda: open_run(out, args, None)  # noqa: E731
    write()
    config = out / "config.yaml"
    before = config.read_text()
    disk_full(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write()  # the resumed run writes its snapshot again
    monkeypatch.undo()
    assert config.read_text() == before and yaml.safe_load(before)
    assert not list(out.glob(".config.yaml.*"))  # no temp file left behind either


def test_evaluate_checks_the_recipe_whenever_a_config_is_there(tmp_path):
    """A run killed after sampling but before its first journal record left config.yaml and sampled
    self-edits, no journal: another recipe must not reuse those self-edits."""
    out = tmp_path / "eval"
    open_run(out, eval_args("model", out), None)
    (out / "generations_base_generator.jsonl").write_text('{"passage_id": "p", "index": 0}\n')
    assert not (out / "journal.jsonl").exists()
    with pytest.raises(ValueError, match="different recipe"):
        open_run(out, eval_args("model", out, temperature=0.5), None)
    open_run(out, eval_args("model", out, temperature=0.5, eval_resume=False), None)  # starts over
    assert not (out / "generations_base_generator.jsonl").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["generate"]["temperature"] == 0.5
    (out / "config.yaml").write_text("generate: [unclosed\n")  # unreadable: matches no recipe
    with pytest.raises(ValueError, match="different recipe"):
        open_run(out, eval_args("model", out, temperature=0.5), None)


def test_layout_names_rounds_in_order_and_ignores_other_entries(tmp_path):
    run = RunDir(str(tmp_path))
    for name in ("round_10", "round_2", "round_x", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "round_3").write_text("a file, not a round")
    assert [rd.index for rd in run.rounds()] == [2, 10]
    assert run.round(2).self_edits == tmp_path / "round_2" / "self_edits.jsonl"
    assert run.round(2).update == tmp_path / "round_2" / "update" and run.config == tmp_path / "config.yaml"
    with pytest.raises(ValueError, match="not a round directory"):
        round_number(tmp_path / "round_x")


def test_resume_false_discards_every_round_and_journal_but_nothing_else(tiny_model_path, tmp_path):
    args = tiny_args(tiny_model_path, tmp_path / "run")
    run_dir = setup_run_dir(args)
    for stale in ("journal.jsonl", "journal.rank1.jsonl", "round_0/self_edits.jsonl", "round_12/kept.jsonl"):
        (run_dir / stale).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / stale).write_text("{}\n")
    (run_dir / "notes.txt").write_text("mine")
    args.loop.resume = False
    setup_run_dir(args)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "notes.txt"]
