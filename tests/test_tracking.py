"""The loop's per-round metrics to report_to trackers (TensorBoard, trackio, wandb; offline), rounds.png."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seal.loop import run
from seal.tracking import RoundTracker, plot_rounds, round_metrics, tracker_names
from tests.test_loop import tiny_args

PNG = b"\x89PNG\r\n\x1a\n"


def summary(r: int, reward: float) -> dict:
    return {
        "round": r,
        "passages": 2,
        "self_edits": 4,
        "parsed": 3,
        "base_acc": 0.0,
        "mean_adapted_acc": reward,
        "best_of_k_acc": 2 * reward,
        "mean_reward": reward,
        "kept": 2,
        "update_loss": None if r == 0 else 1.5,
        "gen_s": 1.0,
        "ttt_eval_s": 2.0,
        "minutes": 0.1,
    }


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `log_dir`: {tag: [(step, value), ...]}."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_report_to_names():
    assert tracker_names("none") == tracker_names([]) == tracker_names(None) == []
    assert tracker_names(["tensorboard", "codecarbon", "tensorboard"]) == ["tensorboard"]  # HF-only: skipped
    assert {"tensorboard", "trackio"} <= set(tracker_names("all"))
    with pytest.raises(ValueError, match="'aim'.*not installed"):
        tracker_names(["aim"])
    metrics = round_metrics(summary(0, 0.25))
    assert metrics["seal/mean_reward"] == 0.25 and metrics["seal/kept"] == 2
    assert "seal/update_loss" not in metrics and "seal/round" not in metrics  # None, and the step itself


def test_tensorboard_gets_one_step_per_round_once(tmp_path):
    tracker = RoundTracker(tmp_path, ["tensorboard"])
    tracker.update([summary(0, 0.1)])
    tracker.update([summary(0, 0.1), summary(1, 0.3)])
    tracker.close()
    resumed = RoundTracker(tmp_path, ["tensorboard"])  # a rerun resumes: finished rounds are not logged again
    resumed.update([summary(0, 0.1), summary(1, 0.3)])
    resumed.close()
    got = scalars(tmp_path / "tensorboard" / "loop")
    assert got["seal/mean_reward"] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.3))]
    assert got["seal/best_of_k_acc"] == [(0, pytest.approx(0.2)), (1, pytest.approx(0.6))]
    assert got["seal/update_loss"] == [(1, 1.5)]
    assert (tmp_path / "round_1" / "tracked.json").is_file()
    assert (tmp_path / "rounds.png").read_bytes().startswith(PNG)


def test_none_logs_nothing_but_plots(tmp_path):
    tracker = RoundTracker(tmp_path, "none")
    tracker.update([summary(0, 0.1)])
    tracker.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["rounds.png"]
    plot_rounds([summary(r, 0.1 * r) for r in range(3)], tmp_path / "three.png")
    assert (tmp_path / "three.png").read_bytes().startswith(PNG)


def test_heldout_tables_get_a_panel_each_with_cis(tmp_path):
    def row(key, mean):
        return {"key": key, "accuracy": {"mean": mean, "low": mean - 0.02, "high": mean + 0.02, "n": 5}}

    rows = [row("base", 0.02), row("passage", 0.1), row("generator_0", 0.07), row("generator_1", 0.09)]
    heldout = {"tables": {"a.json": rows, "sample": rows[:3]}}
    two = plot_rounds([summary(0, 0.1)], tmp_path / "two.png", heldout)
    one = plot_rounds([summary(0, 0.1)], tmp_path / "one.png", {"tables": {"sample": rows}})
    width = lambda path: int.from_bytes(path.read_bytes()[16:20], "big")  # noqa: E731 (PNG IHDR)
    assert width(two) - width(one) == width(one) // 3  # 2 + 2 panels vs 2 + 1, 4 inches each


def track_two_rounds_in_subprocess(tmp_path: Path, tracker: str, env: dict[str, str], then: str = "") -> str:
    """Log two rounds to `tracker` in a fresh interpreter (trackers fix their directories on import), run
    the code `then` after closing it, and return its stdout."""
    rounds = json.dumps([summary(0, 0.1), summary(1, 0.3)])
    script = textwrap.dedent(
        f"""
        import json
        from seal.tracking import RoundTracker

        tracker = RoundTracker({str(tmp_path / "run")!r}, [{tracker!r}], project="seal-test", run_name="demo")
        tracker.update(json.loads({rounds!r}))
        tracker.close()
        """
    ) + textwrap.dedent(then)
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_trackio_offline(tmp_path):
    """trackio writes a local SQLite project (no server, no network); read back with trackio itself."""
    env = {"TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    read_back = """
        from trackio.sqlite_storage import SQLiteStorage

        logs = SQLiteStorage.get_logs("seal-test", "demo-loop")
        print("LOGS", json.dumps([[row["step"], row["seal/mean_reward"], row["seal/kept"]] for row in logs]))
        """
    stdout = track_two_rounds_in_subprocess(tmp_path, "trackio", env, read_back)
    (logs,) = [line[5:] for line in stdout.splitlines() if line.startswith("LOGS ")]
    assert json.loads(logs) == [[0, 0.1, 2], [1, 0.3, 2]]
    assert (tmp_path / "trackio" / "seal-test.db").is_file()  # local only


def wandb_history(run_file: Path) -> list[dict[str, object]]:
    """The history rows of an offline W&B run, from its transaction log (`run-*.wandb`).

    The file is a W&B header (7 bytes) then LevelDB log records (32 KiB blocks; each record a 7-byte
    header: crc, length, type full/first/middle/last) holding wandb's own protobuf `Record`s.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, partial = run_file.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(partial)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def test_wandb_offline(tmp_path):
    """wandb in offline mode (no account, no network): the run's history read back from its local file."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    track_two_rounds_in_subprocess(tmp_path, "wandb", env)
    (run_file,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [(r["_step"], r["seal/mean_reward"], r["seal/kept"]) for r in rows] == [(0, 0.1, 2), (1, 0.3, 2)]
    assert "seal/update_loss" not in rows[0] and rows[1]["seal/update_loss"] == 1.5


def test_loop_and_update_report_to_tensorboard(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    (first,) = run(tiny_args(tiny_model_path, out, num_rounds=1, report_to=["tensorboard"]))
    loop_scalars = scalars(out / "tensorboard" / "loop")
    assert loop_scalars["seal/mean_reward"] == [(0, pytest.approx(first["mean_reward"]))]
    assert loop_scalars["seal/kept"] == [(0, first["kept"])]
    assert loop_scalars["seal/update_loss"] == [(0, pytest.approx(first["update_loss"]))]
    (update_dir,) = (out / "round_0" / "update" / "trainer" / "runs").iterdir()  # SFTTrainer's own events
    assert "train/loss" in scalars(update_dir)
    assert (out / "rounds.png").read_bytes().startswith(PNG) and (out / "round_0" / "tracked.json").is_file()
