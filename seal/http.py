"""A small JSON-over-HTTP client with retries on httpx, shared by the endpoint judge and the vLLM server
engine (httpx sends; the retry, redaction and error policy below are seal's).

Connection errors, timeouts, HTTP 429 and HTTP 5xx are retried with exponential backoff; other HTTP errors
raise :class:`EndpointError` at once. Loopback hosts bypass any configured proxy, redirects are never
followed (they could carry the ``Authorization`` header to another host), the API key is read from an
environment variable at request time, never stored, and scrubbed from every error message, and URLs are
shown without credentials or query string.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Collection
from typing import Any

import httpx

__all__ = ["EndpointError", "JSONClient", "is_loopback", "redact_url"]

BODY_SNIPPET_CHARS = 300  # of a response body, quoted in error messages
BODY_KEEP_CHARS = 4000  # of a response body, kept on EndpointError.body


class EndpointError(RuntimeError):
    """An HTTP endpoint could not be reached or answered with an error or a malformed body.

    ``url`` is the redacted URL, ``status`` the HTTP status (``None`` for connection errors) and ``body`` the
    start of the (scrubbed) response body (its first 300 characters are quoted in the message).
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body


def is_loopback(host: str | None) -> bool:
    """True for localhost / loopback IP hosts (those bypass any configured HTTP proxy)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """Drop any user:password part and the query string from a URL for display."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<url>"


def _default_retry(status: int) -> bool:
    return status == 429 or status >= 500


class JSONClient:
    """JSON requests to ``base_url + path`` with retries; see the module docstring for the policy.

    ``error_cls`` (a subclass of :class:`EndpointError`) and ``label`` shape the errors raised, e.g.
    ``"judge request failed after 1 attempt(s): HTTP 404 from http://127.0.0.1:8000/v1/x: '...'"``.
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        *,
        error_cls: type[EndpointError] = EndpointError,
        label: str = "request",
    ) -> None:
        """Validate the settings; ``base_url`` must be an ``http(s)://`` URL."""
        if not base_url or not isinstance(base_url, str):
            raise ValueError("base_url must be a non-empty string such as 'http://127.0.0.1:8000/v1'")
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL, got {redact_url(base_url)!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.error_cls = error_cls
        self.label = label
        # A 3xx comes back as an error reply (never followed); loopback hosts ignore proxy settings.
        self._client = httpx.Client(follow_redirects=False, trust_env=not is_loopback(parsed.hostname))

    def __repr__(self) -> str:
        return (
            f"JSONClient(base_url={redact_url(self.base_url)!r}, api_key_env={self.api_key_env!r}, "
            f"timeout={self.timeout}, max_retries={self.max_retries})"
        )

    # -- helpers ------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """The full URL of ``path`` (``"/v1/models"`` or ``"v1/models"``)."""
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def api_key(self) -> str | None:
        """Current API key from the environment, or ``None``."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def scrub(self, text: str) -> str:
        """Remove the current API key from ``text`` (e.g. a server echoing request headers)."""
        key = self.api_key()
        return text.replace(key, "***") if key else text

    def error(
        self, message: str, *, path: str = "", status: int | None = None, body: str = ""
    ) -> EndpointError:
        """An ``error_cls`` with a scrubbed message and body snippet (for callers validating replies)."""
        return self.error_cls(
            self.scrub(message),
            url=redact_url(self.url(path)),
            status=status,
            body=self.scrub(body)[:BODY_KEEP_CHARS],
        )

    def malformed(self, path: str, status: int, what: str, body: Any) -> EndpointError:
        """The error for a 2xx reply that lacks ``what``; ``body`` is the raw text or the parsed JSON."""
        text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        snippet = self.scrub(text)[:BODY_SNIPPET_CHARS]
        shown = redact_url(self.url(path))
        return self.error(
            f"malformed response from {shown} (HTTP {status}): {what} in {snippet!r}",
            path=path,
            status=status,
            body=text,
        )

    def _sleep_before_retry(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * (2**attempt))
        if delay > 0:
            time.sleep(delay)

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        retry_status: Callable[[int], bool] | Collection[int] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str]:
        """Send one request (JSON body if ``payload`` is not None), retrying as configured.

        Returns ``(status, body text)`` for a 2xx reply. ``retry_status`` says which HTTP statuses are
        retried (default: 429 and 5xx); connection errors and timeouts are always retried.
        """
        if retry_status is None:
            should_retry: Callable[[int], bool] = _default_retry
        elif callable(retry_status):
            should_retry = retry_status
        else:
            statuses = frozenset(retry_status)
            should_retry = statuses.__contains__
        url = self.url(path)
        shown_url = redact_url(url)
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            api_key = self.api_key()
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            tries = attempt + 1
            try:
                response = self._client.request(
                    method, url, content=data, headers=headers, timeout=timeout or self.timeout
                )
                text = response.content.decode("utf-8", errors="replace")
            except (httpx.TransportError, OSError) as exc:  # refused, reset, timeout, protocol errors
                reason = str(exc) or type(exc).__name__
                last_error = f"connection error to {shown_url}: {self.scrub(reason)}"
                if attempt < self.max_retries:
                    self._sleep_before_retry(attempt)
                    continue
                raise self.error_cls(
                    f"{self.label} failed after {tries} attempt(s): {last_error}", url=shown_url
                ) from None
            if 200 <= response.status_code < 300:
                return response.status_code, text
            kept = self.scrub(text)[:BODY_KEEP_CHARS]
            last_error = f"HTTP {response.status_code} from {shown_url}: {kept[:BODY_SNIPPET_CHARS]!r}"
            if should_retry(response.status_code) and attempt < self.max_retries:
                self._sleep_before_retry(attempt)
                continue
            raise self.error_cls(
                f"{self.label} failed after {tries} attempt(s): {last_error}",
                url=shown_url,
                status=response.status_code,
                body=kept,
            ) from None
        raise self.error_cls(f"{self.label} failed: {last_error}", url=shown_url)  # pragma: no cover

    def _json(self, path: str, status: int, body: str) -> dict[str, Any]:
        try:
            reply = json.loads(body)
        except ValueError:
            raise self.malformed(path, status, "not JSON", body) from None
        if not isinstance(reply, dict):
            raise self.malformed(path, status, "not a JSON object", body)
        return reply

    def post(self, path: str, payload: Any, **kwargs: Any) -> dict[str, Any]:
        """POST ``payload`` as JSON and return the reply's JSON object (``kwargs`` as in :meth:`request`)."""
        status, body = self.request("POST", path, payload, **kwargs)
        return self._json(path, status, body)

    def get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """GET ``path`` and return the reply's JSON object (``kwargs`` as in :meth:`request`)."""
        status, body = self.request("GET", path, **kwargs)
        return self._json(path, status, body)
