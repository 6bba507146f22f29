"""A stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub 2.x calls to list and download.

Two threaded HTTP servers: the Hub and a "CDN" on another port (another origin, as the real
Hub's LFS storage is). They serve, for the repos added with :meth:`HubStandIn.add`:

- ``GET /api/models/ORG/NAME[/revision/REV][?blobs=true]``: the model info (``id``, ``sha``,
  ``siblings``; with ``blobs`` each sibling's ``size``, ``blobId`` and ``lfs`` {size, sha256,
  pointerSize}), as ``HfApi.model_info``/``repo_info`` read it;
- ``GET /api/models/ORG/NAME/tree/REV[/PATH]?recursive=...``: the tree listing
  (``list_repo_tree``, which ``snapshot_download`` reads), files and directories;
- ``HEAD|GET /ORG/NAME/resolve/REV/PATH``: a git file answers 200 with ``X-Repo-Commit``,
  ``ETag`` (its git blob SHA-1), ``Content-Length``; an LFS file answers 302 with ``Location`` on
  the CDN, ``X-Linked-Etag`` (its SHA-256), ``X-Linked-Size`` and ``X-Repo-Commit``;
- ``GET|HEAD /cdn/SHA256`` on the CDN: the bytes.

An unknown repo is 404 ``X-Error-Code: RepoNotFound``, an unknown revision ``RevisionNotFound``,
an unknown file ``EntryNotFound``; anything else is a plain 404. Every request is recorded in
:attr:`HubStandIn.requests` as ``(method, path)``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hf_cache import etag, git_blob_sha1, is_lfs

_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files


class HubStandIn:
    """The Hub and its CDN, on two free ports of 127.0.0.1 (``with HubStandIn() as hub: hub.url``)."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        # called after each model-info answer with (repo_id, revision asked): lets a test move a branch
        self.after_info: list[Callable[[str, str | None], None]] = []
        self._lock = threading.Lock()
        self._servers = [
            ThreadingHTTPServer(("127.0.0.1", 0), self._handler(role)) for role in ("hub", "cdn")
        ]
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ set-up
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def add(
        self, repo_id: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...] = ("main",)
    ) -> None:
        """Serve ``files`` as ``commit`` of ``repo_id``, with the branches/tags ``refs`` pointing at it."""
        repo = self.repos.setdefault(repo_id, _Repo())
        repo.commits[commit] = dict(files)
        for ref in refs:
            repo.refs[ref] = commit

    def paths(self, method: str = "GET", prefix: str = "") -> list[str]:
        """The paths of the requests made with ``method`` that start with ``prefix``."""
        with self._lock:
            return [p for m, p in self.requests if m == method and p.startswith(prefix)]

    def __enter__(self) -> HubStandIn:
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # ------------------------------------------------------------------ answers
    def _resolve(self, repo_id: str, revision: str | None) -> tuple[str, dict[str, bytes]] | tuple[int, str]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, "RepoNotFound"
        rev = revision or "main"
        commit = repo.refs.get(rev) or (rev if _COMMIT.fullmatch(rev) and rev in repo.commits else None)
        if commit is None:
            return 404, "RevisionNotFound"
        return commit, repo.commits[commit]

    def _info(self, repo_id: str, commit: str, files: dict[str, bytes], blobs: bool) -> dict:
        siblings = []
        for path, data in sorted(files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
                if is_lfs(path):
                    sibling["lfs"] = {"size": len(data), "sha256": etag(path, data), "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": "0" * 24,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["diffusers", "safetensors"],
            "library_name": "diffusers",
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": siblings,
        }

    def _tree(self, files: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "oid": git_blob_sha1(folder.encode()),
                            "size": 0,
                            "path": folder,
                        },
                    )
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
                if is_lfs(path):
                    entry["lfs"] = {"oid": etag(path, data), "size": len(data), "pointerSize": 134}
                entries[path] = entry
        return list(entries.values())

    def _handler(self, role: str) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer("HEAD")

            def do_GET(self) -> None:
                self._answer("GET")

            # -------------------------------------------------------------- plumbing
            def _send(
                self, status: int, body: bytes = b"", headers: dict | None = None, method: str = "GET"
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, str(value))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method == "GET" and body:
                    self.wfile.write(body)

            def _json(self, data: object, method: str) -> None:
                self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, method)

            def _error(self, status: int, code: str | None, method: str, commit: str | None = None) -> None:
                headers = {"Content-Type": "application/json"}
                if code:
                    headers["X-Error-Code"] = code
                    headers["X-Error-Message"] = {"RepoNotFound": "Repository not found"}.get(code, code)
                if commit:
                    headers["X-Repo-Commit"] = commit
                self._send(status, json.dumps({"error": code or "not found"}).encode(), headers, method)

            def _answer(self, method: str) -> None:
                split = urlsplit(self.path)
                with stand_in._lock:
                    stand_in.requests.append((method, unquote(split.path)))
                query = parse_qs(split.query)
                seg = [unquote(s) for s in split.path.split("/")[1:]]
                if role == "cdn":
                    return self._cdn(seg, method)
                if seg[:2] == ["api", "models"] and len(seg) >= 4:
                    return self._api(seg[2] + "/" + seg[3], seg[4:], query, method)
                if len(seg) >= 5 and seg[2] == "resolve":
                    return self._resolve_file(seg[0] + "/" + seg[1], seg[3], "/".join(seg[4:]), method)
                self._error(404, None, method)

            def _api(self, repo_id: str, rest: list[str], query: dict, method: str) -> None:
                if rest and rest[0] == "tree":
                    found = stand_in._resolve(repo_id, rest[1] if len(rest) > 1 else None)
                    if isinstance(found[0], int):
                        return self._error(found[0], found[1], method)
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    return self._json(stand_in._tree(found[1], "/".join(rest[2:]), recursive), method)
                if rest and rest[0] != "revision":
                    return self._error(404, None, method)
                revision = rest[1] if len(rest) > 1 else None
                found = stand_in._resolve(repo_id, revision)
                if isinstance(found[0], int):
                    return self._error(found[0], found[1], method)
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                self._json(stand_in._info(repo_id, found[0], found[1], blobs), method)
                for hook in list(stand_in.after_info):
                    hook(repo_id, revision)

            def _resolve_file(self, repo_id: str, revision: str, path: str, method: str) -> None:
                found = stand_in._resolve(repo_id, revision)
                if isinstance(found[0], int):
                    return self._error(found[0], found[1], method)
                commit, files = found
                if path not in files:
                    return self._error(404, "EntryNotFound", method, commit)
                data = files[path]
                if is_lfs(path):
                    sha = etag(path, data)
                    headers = {
                        "Location": f"{stand_in.cdn_url}/cdn/{sha}",
                        "X-Repo-Commit": commit,
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": len(data),
                        "ETag": f'"{git_blob_sha1(data)}"',
                    }
                    return self._send(302, b"", headers, method)
                headers = {
                    "X-Repo-Commit": commit,
                    "ETag": f'"{git_blob_sha1(data)}"',
                    "Accept-Ranges": "bytes",
                }
                self._send(200, data, headers, method)

            def _cdn(self, seg: list[str], method: str) -> None:
                if len(seg) == 2 and seg[0] == "cdn":
                    for repo in stand_in.repos.values():
                        for files in repo.commits.values():
                            for path, data in files.items():
                                if is_lfs(path) and etag(path, data) == seg[1]:
                                    return self._send(
                                        200, data, {"Content-Type": "application/octet-stream"}, method
                                    )
                self._error(404, None, method)

        return Handler
