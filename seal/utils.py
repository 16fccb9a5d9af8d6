"""Small shared helpers: device, bf16 autocast, deterministic per-task seeds, atomic writes, JSON readers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from seal.data import DataValidationError, read_text  # data.py owns the file, line and byte message


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def bf16_supported(device: torch.device) -> bool:
    """True on CUDA with bf16, and on CPUs whose oneDNN has fast bf16 kernels (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, setting: str = "auto") -> torch.dtype | None:
    """The dtype `autocast(device, setting)` computes in, or None when it leaves autocast off."""
    if setting not in ("auto", "bfloat16", "none"):
        raise ValueError(f"autocast setting must be auto, bfloat16 or none, got '{setting}'")
    if setting == "none" or (setting == "auto" and not bf16_supported(device)):
        return None
    return torch.bfloat16


def autocast(device: torch.device, setting: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast per the recipe's `auto | bfloat16 | none` (auto: only where hardware is fast at it)."""
    dtype = autocast_dtype(device, setting)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def frozen_linears_in(model: torch.nn.Module, dtype: torch.dtype | None):
    """Hold every frozen float32 ``nn.Linear`` weight and bias of `model` in `dtype` inside this context.

    Autocast keeps the casts it makes only for leaf tensors that require grad, so a frozen base model's
    weights are cast anew in every forward (~135M parameters per training step and per generated token on
    SmolLM2-135M). Under autocast to `dtype` the results are bit-identical (autocast casts a
    Linear's weight and bias to `dtype` anyway). Each module gets new Parameter objects for the duration,
    so a weight tied to an input embedding (an LM head) stays in its own dtype for the embedding lookup;
    the originals are put back on exit. None: leave the model as is.
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    if dtype is not None:
        copies: dict[int, torch.nn.Parameter] = {}  # one copy per shared tensor
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            for name in ("weight", "bias"):
                param = module._parameters.get(name)
                if param is None or param.requires_grad or param.dtype != torch.float32:
                    continue  # autocast casts only float32: a float64 (or already low-precision) one stays
                if param.dtype != dtype:
                    if id(param) not in copies:
                        copies[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
                    swapped.append((module, name, param))
                    setattr(module, name, copies[id(param)])
    try:
        yield
    finally:
        for module, name, param in swapped:
            setattr(module, name, param)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `t`'s device run in here: autocast's when it is on, else `t`'s own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def task_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (run seed, round, passage id, ...), independent of task order."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """Write `path` through a temp file in its directory, fsynced, then renamed over it.

    Invariant: at any instant (kill -9, power loss) `path` is absent, its old content, or the whole new one;
    a kill mid-write leaves at most a stray hidden ``.<name>.*`` temp file, which nothing reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes it 0600; a written file gets the usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves a truncated file."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False))


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write JSON Lines atomically; `datasets.load_dataset("json", data_files=path)` reads it back."""
    atomic_write(path, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines file (blank lines skipped).

    Invariant: a file that is not UTF-8 or holds a line that is not JSON raises a DataValidationError naming
    the file and the line (and the byte, for UTF-8), never a bare decode error.
    """
    path = Path(path)
    records = []
    # split on "\n" only: str.splitlines() also splits on U+2028 & co, which JSON strings may hold raw
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataValidationError(
                    [f"{path}: line {lineno}, column {e.colno}: not valid JSON ({e.msg})"]
                ) from None
    return records


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; undecodable bytes or invalid JSON raise a DataValidationError naming the file
    and the line (as :func:`read_jsonl`)."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataValidationError(
            [f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"]
        ) from None


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, implementation: str | None):
    """Temporarily switch a transformers model's attention kernel (None: leave it as it is)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if implementation is None or previous is None or previous == implementation:
        yield
        return
    inner.set_attn_implementation(implementation)
    try:
        yield
    finally:
        inner.set_attn_implementation(previous)


def setup_logging(run_dir: Path, rank: int = 0) -> None:
    """Log the `seal` logger to the run directory (`log.txt`; other ranks `log.rank<r>.txt`) and to stderr,
    each handler once however often it is called."""
    logger = logging.getLogger("seal")
    logger.setLevel(logging.INFO)
    log_file = run_dir / ("log.txt" if rank == 0 else f"log.rank{rank}.txt")
    if not any(
        isinstance(h, logging.FileHandler) and h.baseFilename == str(log_file) for h in logger.handlers
    ):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(
            logging.Formatter("[seal] %(message)s" if rank == 0 else f"[seal:{rank}] %(message)s")
        )
        logger.addHandler(stream)
