"""Tests for seal.graders (string metrics, judge parsing, local and HTTP judges, factory)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from seal.graders import (
    JUDGE_PROMPT,
    EndpointJudge,
    FunctionGrader,
    Grader,
    JudgeError,
    LocalJudge,
    exact_match,
    gold_contained,
    make_grader,
    normalize_answer,
    parse_judgement,
    token_f1,
)
from seal.http import EndpointError
from tests.conftest import loopback_server

SECRET = "sk-test-SECRET-0123456789"
KEY_ENV = "SEAL_TEST_JUDGE_KEY"

# --------------------------------------------------------------------------------------------
# String metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An   apple,  a day  ", "apple day"),
        ("Theory of the ART", "theory of art"),
        ("U.S.A.", "usa"),
        ("", ""),
        ("a an the", ""),
        ("Hello\tworld\n", "hello world"),
        ("rock-'n'-roll", "rocknroll"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match() -> None:
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("paris", ["London", "PARIS!"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("", ["Paris"]) == 0.0
    assert exact_match("Paris", []) == 0.0
    assert exact_match("Paris", "Paris") == 1.0  # bare string is one gold, not characters


def test_token_f1() -> None:
    assert token_f1("Paris", ["Paris"]) == 1.0
    assert token_f1("the city of Paris", ["Paris"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # max over golds
    assert token_f1("new york city", ["boston", "New York"]) == pytest.approx(0.8)
    # articles/punctuation ignored
    assert token_f1("The Beatles!", ["beatles"]) == 1.0
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("Paris", []) == 0.0
    assert token_f1("London", ["Paris"]) == 0.0


def test_gold_contained() -> None:
    assert gold_contained("I think it is the Eiffel Tower, in Paris.", ["eiffel tower"]) == 1.0
    assert gold_contained("It was Paris", ["London", "Paris"]) == 1.0
    assert gold_contained("", ["Paris"]) == 0.0
    assert gold_contained("anything", ["", "the"]) == 0.0  # empty (after normalisation) golds never match
    # whole-word spans only
    assert gold_contained("We went to a party", ["art"]) == 0.0
    assert gold_contained("modern art museum", ["art"]) == 1.0
    assert gold_contained("parisian", ["paris"]) == 0.0


def test_function_grader() -> None:
    for name in ("exact_match", "f1", "contains"):
        grader = FunctionGrader(name)
        assert grader.name == name
        assert isinstance(grader, Grader)
    scores = FunctionGrader("contains").grade(
        ["q1", "q2", "q3"], ["the party", "modern art", ""], [["art"], ["Art"], ["x"]]
    )
    assert scores == [0.0, 1.0, 0.0]
    assert FunctionGrader("f1").grade([], [], []) == []
    with pytest.raises(ValueError):
        FunctionGrader("exact_match").grade(["q"], ["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        FunctionGrader("nope")


# --------------------------------------------------------------------------------------------
# Judge prompt and parsing
# --------------------------------------------------------------------------------------------


def test_judge_prompt_placeholders() -> None:
    text = JUDGE_PROMPT.format(question="Q?", gold="G", prediction="P")
    assert "Q?" in text and "G" in text and "P" in text
    assert "yes" in text.lower() and "no" in text.lower()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes.", 1.0),
        ("yes, because the gold answer says so", 1.0),
        ("YES", 1.0),
        ("  **Yes**", 1.0),
        ('"yes"', 1.0),
        ("Answer: yes", 1.0),
        ("<think>hmm, no idea</think> Yes", 1.0),
        ("No", 0.0),
        ("no.", 0.0),
        ("", 0.0),
        ("maybe", 0.0),
        ("yesterday", 0.0),
        ("Not correct", 0.0),
    ],
)
def test_parse_judgement(reply: str, expected: float) -> None:
    assert parse_judgement(reply) == expected


def test_parse_judgement_never_raises() -> None:
    assert parse_judgement("\x00\ufffd yes?") == 0.0
    assert parse_judgement(None) == 0.0  # type: ignore[arg-type]
    assert parse_judgement(123) == 0.0  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# LocalJudge
# --------------------------------------------------------------------------------------------


def test_local_judge_batches_prompts() -> None:
    calls: list[list[str]] = []

    def fake_complete(prompts: list[str]) -> list[str]:
        calls.append(list(prompts))
        return ["Yes." if "Student's answer: Paris" in p else "No" for p in prompts]

    judge = LocalJudge(fake_complete)
    assert judge.name == "judge"
    assert isinstance(judge, Grader)
    scores = judge.grade(
        ["Capital of France?", "Capital of Spain?", "Capital of Italy?"],
        ["Paris", "Lisbon", "Rome"],
        [["Paris"], ["Madrid", "Madrid, Spain"], ["Rome"]],
    )
    assert scores == [1.0, 0.0, 0.0]
    assert len(calls) == 1 and len(calls[0]) == 3
    first, second, _ = calls[0]
    assert "Capital of France?" in first and "Paris" in first
    assert "Capital of Spain?" in second and "Lisbon" in second
    assert "Madrid" in second and "Madrid, Spain" in second
    assert judge.grade([], [], []) == []
    assert len(calls) == 1  # no call for an empty batch


def test_local_judge_wrong_reply_count() -> None:
    judge = LocalJudge(lambda prompts: ["yes"])
    with pytest.raises(JudgeError):
        judge.grade(["q1", "q2"], ["a", "b"], [["a"], ["b"]])


# --------------------------------------------------------------------------------------------
# EndpointJudge against a real local HTTP server
# --------------------------------------------------------------------------------------------


@dataclass
class FakeServer:
    """A chat-completions stand-in; ``respond(index, body, headers) -> (status, raw_body)``."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    respond: Callable[[int, dict[str, Any], dict[str, str]], tuple[int, str]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _chat_reply(content: str) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = FakeServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                index = len(state.requests)
                state.requests.append({"path": self.path, "body": body, "headers": headers})
            assert state.respond is not None
            status, raw = state.respond(index, body, headers)
            data = raw.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            """Keep the test output quiet."""

    with loopback_server(Handler) as url:
        state.url = f"{url}/v1/"
        yield state


def _fast_judge(url: str, **kwargs: Any) -> EndpointJudge:
    params: dict[str, Any] = {"api_key_env": KEY_ENV, "timeout": 5.0, "backoff": 0.001, "max_workers": 4}
    params.update(kwargs)
    return EndpointJudge(url, "judge-model", **params)


def test_endpoint_judge_grades_items(fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)

    def respond(index: int, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
        prompt = body["messages"][0]["content"]
        return 200, _chat_reply("Yes." if "Student's answer: right" in prompt else "No")

    fake_server.respond = respond
    judge = _fast_judge(fake_server.url)
    assert judge.name == "judge"
    assert isinstance(judge, Grader)
    questions = [f"Question {i}?" for i in range(6)]
    predictions = ["right", "wrong", "right", "right", "wrong", "right"]
    answers = [[f"gold {i}"] for i in range(6)]
    scores = judge.grade(questions, predictions, answers)
    assert scores == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]

    assert len(fake_server.requests) == 6
    seen_questions = set()
    for req in fake_server.requests:
        assert req["path"] == "/v1/chat/completions"
        body = req["body"]
        assert body["model"] == "judge-model"
        assert body["temperature"] == 0
        assert body["max_tokens"] == 4
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        assert req["headers"]["authorization"] == f"Bearer {SECRET}"
        assert req["headers"]["content-type"] == "application/json"
        content = body["messages"][0]["content"]
        idx = next(i for i in range(6) if f"Question {i}?" in content)
        assert f"gold {idx}" in content and predictions[idx] in content
        seen_questions.add(idx)
    assert seen_questions == set(range(6))
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge))


def test_endpoint_judge_no_key_no_auth_header(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    fake_server.respond = lambda i, b, h: (200, _chat_reply("yes"))
    assert _fast_judge(fake_server.url).grade(["q"], ["a"], [["a"]]) == [1.0]
    assert "authorization" not in fake_server.requests[0]["headers"]


@pytest.mark.parametrize("first_status", [500, 503, 429])
def test_endpoint_judge_retries_then_succeeds(fake_server: FakeServer, first_status: int) -> None:
    fake_server.respond = lambda i, b, h: (
        (first_status, '{"error": "busy"}') if i == 0 else (200, _chat_reply("Yes"))
    )
    judge = _fast_judge(fake_server.url, max_retries=2)
    assert judge.grade(["q"], ["a"], [["a"]]) == [1.0]
    assert len(fake_server.requests) == 2


def test_endpoint_judge_gives_up_after_max_retries(fake_server: FakeServer) -> None:
    fake_server.respond = lambda i, b, h: (502, "bad gateway")
    judge = _fast_judge(fake_server.url, max_retries=2)
    with pytest.raises(JudgeError) as info:
        judge.grade(["q"], ["a"], [["a"]])
    assert "502" in str(info.value) and "bad gateway" in str(info.value)
    assert len(fake_server.requests) == 3


@pytest.mark.parametrize("status", [404, 400])
def test_endpoint_judge_client_error_not_retried_and_key_hidden(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    # A hostile/debug server echoing the request headers must not leak the key into the error.
    fake_server.respond = lambda i, b, h: (status, json.dumps({"error": "nope", "echo": h}))
    judge = _fast_judge(fake_server.url, max_retries=3)
    with pytest.raises(JudgeError) as info:
        judge.grade(["q"], ["a"], [["a"]])
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, EndpointError)
    assert info.value.status == status and "nope" in info.value.body and SECRET not in info.value.body
    assert str(status) in message
    assert "/v1/chat/completions" in message and "127.0.0.1" in message
    assert "nope" in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)
    assert len(fake_server.requests) == 1  # 4xx other than 429 is not retried


@pytest.mark.parametrize(
    "raw",
    ["this is not json", "{}", '{"choices": []}', '{"choices": [{"message": {}}]}', "[1, 2]"],
)
def test_endpoint_judge_malformed_response(fake_server: FakeServer, raw: str) -> None:
    fake_server.respond = lambda i, b, h: (200, raw)
    with pytest.raises(JudgeError, match="malformed"):
        _fast_judge(fake_server.url).grade(["q"], ["a"], [["a"]])


def test_endpoint_judge_connection_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = _fast_judge(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=1.0)
    with pytest.raises(JudgeError) as info:
        judge.grade(["q"], ["a"], [["a"]])
    assert "connection error" in str(info.value) and SECRET not in str(info.value)


def test_endpoint_judge_empty_batch_makes_no_request() -> None:
    judge = EndpointJudge("http://127.0.0.1:9/v1", "m")
    assert judge.grade([], [], []) == []


def test_endpoint_judge_validates_arguments() -> None:
    with pytest.raises(ValueError):
        EndpointJudge("", "m")
    with pytest.raises(ValueError):
        EndpointJudge("ftp://host/v1", "m")
    with pytest.raises(ValueError):
        EndpointJudge("http://127.0.0.1:8000/v1", "")
    with pytest.raises(ValueError):
        EndpointJudge("http://127.0.0.1:8000/v1", "m", max_workers=0)


# --------------------------------------------------------------------------------------------
# make_grader
# --------------------------------------------------------------------------------------------


def test_make_grader_metrics() -> None:
    for name in ("exact_match", "f1", "contains"):
        grader = make_grader(name)
        assert grader.name == name
        assert isinstance(grader, FunctionGrader)


def test_make_grader_judge_variants() -> None:
    local = make_grader("judge", complete=lambda prompts: ["yes"] * len(prompts))
    assert isinstance(local, LocalJudge)
    assert local.grade(["q"], ["a"], [["b"]]) == [1.0]
    remote = make_grader(
        "judge", judge_url="http://127.0.0.1:8000/v1", judge_model="m", judge_api_key_env=None
    )
    assert isinstance(remote, EndpointJudge)
    assert remote.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert remote.api_key_env is None


def test_make_grader_errors() -> None:
    with pytest.raises(ValueError) as info:
        make_grader("bleu")
    for valid in ("exact_match", "f1", "contains", "judge"):
        assert valid in str(info.value)
    with pytest.raises(ValueError):
        make_grader("judge")
    with pytest.raises(ValueError):
        make_grader("judge", judge_url="http://127.0.0.1:8000/v1")  # model missing
