"""A fake Hugging Face Hub on 127.0.0.1: the minimum of the Hub API that huggingface_hub 2.x uses for
`HfApi.create_repo` + `HfApi.upload_folder` (read from its source: hf_api.py, _commit_api.py,
_upload_pipeline.py, utils/_detect_agent.py):

  POST /api/repos/create                                  {name, organization, type, visibility} -> {url}
  POST /api/validate-yaml                                 a README's front matter is checked before upload
  POST /api/{type}s/{namespace}/{name}/preupload/{rev}    -> every file "regular" (inline, base64 in the
                                                             commit), so no LFS or Xet transfer is needed
  POST /api/{type}s/{namespace}/{name}/commit/{rev}       NDJSON: header, then one "file" line per file
  GET  /api/agent-harnesses                               the user-agent's registry (empty here), fetched
                                                             from the import-time endpoint once a day

Committed files are kept in memory (`FakeHub.repos`), with every request (`FakeHub.requests`) and the
Authorization headers seen. Anything else gets 404 and is listed in `FakeHub.unexpected`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import yaml

from tests.conftest import loopback_server

# Licence ids the real Hub accepts (a subset): enough to catch a misspelt one in a card.
LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc0-1.0", "other", "unknown"}
REPO_PATH = re.compile(r"^/api/(models|datasets)/([\w.-]+)/([\w.-]+)/(preupload|commit)/([^/?]+)")


@dataclass
class Repo:
    repo_type: str
    private: bool | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    authorizations: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)


def validate_card(content: str) -> list[str]:
    """Errors in a README's YAML front matter, roughly as the Hub reports them."""
    match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = []
    licenses = meta.get("license")
    for license_id in licenses if isinstance(licenses, list) else [licenses] if licenses else []:
        if license_id not in LICENSES:
            errors.append(f'"license" must be a known licence id, got {license_id!r}')
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    if "base_model" in meta and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(meta["base_model"])):
        errors.append('"base_model" must be a Hub model id')
    return errors


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path))
            if self.path == "/api/agent-harnesses":
                return self.reply(200, {"standardEnvVars": [], "harnesses": {}})
            hub.unexpected.append(f"GET {self.path}")
            self.reply(404, {"error": f"fake hub: GET {self.path} is not implemented"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hub.requests.append(("POST", self.path))
            if self.headers.get("Authorization"):
                hub.authorizations.add(self.headers["Authorization"])
            if self.path == "/api/validate-yaml":
                errors = validate_card(json.loads(body)["content"])
                return self.reply(400 if errors else 200, {"errors": [{"message": e} for e in errors]})
            if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            if self.path == "/api/repos/create":
                return self.create(json.loads(body))
            match = REPO_PATH.match(self.path)
            if not match:
                hub.unexpected.append(f"POST {self.path}")
                return self.reply(404, {"error": f"fake hub: POST {self.path} is not implemented"})
            kind, namespace, name, action, _revision = match.groups()
            repo = hub.repos.get((kind[:-1], f"{namespace}/{name}"))
            if repo is None:
                return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self.reply(200, {"files": modes})
            return self.commit(repo, kind, f"{namespace}/{name}", body)

        def create(self, payload: dict[str, Any]) -> None:
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                return self.reply(409, {"error": "You already created this repo", "url": url})
            hub.repos[(repo_type, repo_id)] = Repo(repo_type, payload.get("visibility") == "private")
            self.reply(200, {"url": url, "name": repo_id})

        def commit(self, repo: Repo, kind: str, repo_id: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self.reply(400, {"error": "the first NDJSON line must be the header"})
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file" and value.get("encoding") == "base64":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    repo.files.pop(value["path"], None)
                else:
                    error = f"fake hub: commit operation {line['key']} is not implemented"
                    return self.reply(422, {"error": error})
            oid = hashlib.sha1(body).hexdigest()
            repo.commits.append(lines[0]["value"]["summary"])
            prefix = "" if kind == "models" else f"{kind}/"
            self.reply(200, {"commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid})

    return Handler


@contextlib.contextmanager
def fake_hub() -> Iterator[FakeHub]:
    """A FakeHub served on 127.0.0.1 (a free port) for the duration of the block."""
    hub = FakeHub()
    with loopback_server(make_handler(hub)) as url:
        hub.url = url
        yield hub
