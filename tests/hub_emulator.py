"""A small in-memory Hugging Face Hub on 127.0.0.1, so tests drive the real `huggingface_hub` client.

The server is the standard library's ThreadingHTTPServer (PyYAML, which huggingface_hub itself needs,
reads card metadata). It speaks the routes the client uses to create repos, commit, branch, list and
download; it has no LFS/Xet storage: preupload answers "regular" for every file, so contents travel
base64 inside the commit. The `hub` fixture points the client (in-process and in subprocesses) at it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import string
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# License ids the Hub accepts in card metadata (a subset of https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail openrail++ bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 eupl-1.1 agpl-3.0
    gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl osl-3.0 postgresql
    ofl-1.1 ncsa unlicense zlib pddl lgpl-lr llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other
""".split())

# What the Hub writes into a new repo's first commit (files git-lfs would track).
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.model",
    "*.npy", "*.npz", "*.parquet", "*.arrow", "*.zip", "*.tar.gz", "*tfevents*"))

REPO_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
BRANCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def realistic_token(seed: int = 0) -> str:
    """A token shaped like a Hub user access token: 'hf_' and 34 letters (deterministic per seed)."""
    rng = random.Random(seed)
    return "hf_" + "".join(rng.choice(string.ascii_letters) for _ in range(34))


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubError(Exception):
    """An error answer in the Hub's shape: status, X-Error-Code / X-Error-Message headers, {"error": ...}."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    message: str
    files: dict[str, bytes]
    author: str
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    gated: Union[bool, str] = False
    created: str = field(default_factory=_now)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class _FailureRule:
    remaining: int
    status: int
    paths: Optional[tuple[str, ...]]
    methods: Optional[tuple[str, ...]]

    def matches(self, method: str, path: str) -> bool:
        return ((self.paths is None or any(p in path for p in self.paths))
                and (self.methods is None or method in self.methods))


class HubEmulator:
    """The Hub's HTTP API for one user (and their orgs), kept in memory, served from a background thread.

    `url` and `token` are what the client needs; `requests` lists every (method, unquoted path) seen;
    `fail_next` injects errors; `stop()` / `start()` take the server away and bring it back on the same port.
    """

    def __init__(self, token: Optional[str] = None, user: Optional[str] = None,
                 orgs: Iterable[str] = ("lmssl-org",), host: str = "127.0.0.1"):
        self.token = token or realistic_token()
        self.user = user or "user-" + self.token[3:9].lower()  # derived from the token, stable per token
        self.orgs = tuple(orgs)
        self.host, self.port = host, 0
        self.tokens: dict[str, tuple[str, str]] = {self.token: (self.user, "write")}  # token -> (user, role)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._failures: list[_FailureRule] = []
        self._lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle and test helpers

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubEmulator":
        """Serve (again) in a background thread; a restart reuses the first port, so clients keep their URL."""
        if self._server is not None:
            return self
        emulator = self

        class Handler(_Handler):
            hub = emulator

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-emulator-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: clients get connection errors until `start()`; the data stays."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "HubEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, n: int = 1, status: int = 500, paths: Union[str, Iterable[str], None] = None,
                  methods: Union[str, Iterable[str], None] = None) -> None:
        """Answer the next `n` requests whose path contains one of `paths` (any, if None) with `status`."""
        def as_tuple(value):
            return None if value is None else (value,) if isinstance(value, str) else tuple(value)

        methods = None if methods is None else tuple(m.upper() for m in as_tuple(methods))
        with self._lock:
            self._failures.append(_FailureRule(n, status, as_tuple(paths), methods))

    def add_token(self, token: str, user: Optional[str] = None, role: str = "write") -> str:
        """Accept another token (role 'read' gets 403 on writes, as a read-only Hub token does)."""
        self.tokens[token] = (user or self.user, role)
        return token

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """{path: content} of a repo at a branch, tag or commit sha."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            return dict(self._resolve(repo, revision).files)

    def commit_titles(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit titles on a revision, newest first."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            return [c.title for c in self._history(repo, self._resolve(repo, revision))]

    def subprocess_env(self, base: Optional[dict] = None) -> dict[str, str]:
        """os.environ (or `base`) as the `hub` fixture left it: for subprocess.run(..., env=hub.subprocess_env())."""
        return dict(os.environ if base is None else base)

    # ------------------------------------------------------------------ request plumbing

    def _take_failure(self, method: str, path: str) -> Optional[int]:
        with self._lock:
            for rule in self._failures:
                if rule.remaining > 0 and rule.matches(method, path):
                    rule.remaining -= 1
                    return rule.status
            self._failures = [r for r in self._failures if r.remaining > 0]
        return None

    def _caller(self, headers) -> tuple[Optional[str], Optional[str]]:
        """(user, role) of the bearer token; (None, None) without one; 401 for a token the Hub does not know."""
        auth = headers.get("Authorization") or ""
        if not auth:
            return None, None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(raw_path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self._lock:
            self.requests.append((method, path))
        status = self._take_failure(method, path)
        if status is not None:
            return _error_response(HubError(status, f"Injected failure {status} (HubEmulator.fail_next)"))
        try:
            with self._lock:
                caller = self._caller(headers)
                segments = [unquote(s) for s in split.path.split("/")[1:]]
                result = self._route(method, segments, query, headers, body, caller)
        except HubError as error:
            return _error_response(error)
        if isinstance(result, tuple):
            return result
        return _json_response(200, result)

    def _route(self, method, seg, query, headers, body, caller):
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami(caller)
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(_json_body(body))
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(_json_body(body), caller)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(_json_body(body), caller)
            if len(rest) >= 3 and rest[0] in REPO_KINDS:
                return self._repo_api(method, REPO_KINDS[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:],
                                      query, headers, body, caller)
        # /{ns}/{name}/resolve/{rev}/{path} (models) or /datasets/{ns}/{name}/resolve/... (others)
        kind = "model"
        if seg and seg[0] in REPO_KINDS and seg[0] != "models":
            kind, seg = REPO_KINDS[seg[0]], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(kind, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), headers, caller)
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} /{'/'.join(seg)}).")

    def _repo_api(self, method, kind, repo_id, rest, query, headers, body, caller):
        action, arg = (rest[0] if rest else ""), rest[1:]
        if action == "" and method == "GET":
            return self._info(self._readable(kind, repo_id, caller), "main", query)
        if action == "revision" and arg and method == "GET":
            return self._info(self._readable(kind, repo_id, caller), "/".join(arg), query)
        if action == "refs" and method == "GET":
            return self._refs(self._readable(kind, repo_id, caller), query)
        if action == "tree" and arg and method == "GET":
            return self._tree(self._readable(kind, repo_id, caller), arg[0], "/".join(arg[1:]), query)
        if action == "paths-info" and arg and method == "POST":
            return self._paths_info(self._readable(kind, repo_id, caller), arg[0], body, headers)
        if action == "commits" and arg and method == "GET":
            return self._commits(self._readable(kind, repo_id, caller), arg[0])
        if action == "preupload" and arg and method == "POST":
            return self._preupload(self._writable(kind, repo_id, caller), arg[0], _json_body(body), query)
        if action == "commit" and arg and method == "POST":
            return self._commit(self._writable(kind, repo_id, caller), arg[0], body, query, caller)
        if action == "branch" and arg and method in ("POST", "DELETE"):
            repo = self._writable(kind, repo_id, caller)
            name = "/".join(arg)
            if method == "POST":
                return self._create_branch(repo, name, _json_body(body) if body else {})
            return self._delete_ref(repo.branches, name, protect="main")
        if action == "tag" and arg and method in ("POST", "DELETE"):
            repo = self._writable(kind, repo_id, caller)
            if method == "POST":
                return self._create_tag(repo, "/".join(arg), _json_body(body))
            return self._delete_ref(repo.tags, "/".join(arg))
        if action == "settings" and method == "PUT":
            return self._settings(self._writable(kind, repo_id, caller), _json_body(body))
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} {action}).")

    # ------------------------------------------------------------------ permissions and lookups

    def _namespaces(self, user: Optional[str]) -> set[str]:
        return {user, *self.orgs} if user == self.user else {user} if user else set()

    def _readable(self, kind: str, repo_id: str, caller) -> Repo:
        """The repo, or the Hub's answer for a missing one (404), which a private repo also gets without rights."""
        user, _ = caller
        repo = self.repos.get((kind, repo_id))
        if repo is None or (repo.private and repo.namespace not in self._namespaces(user)):
            # The Hub hides private repos: 401 when anonymous, 404 when signed in without access.
            raise HubError(401 if repo is not None and user is None else 404,
                           "Repository not found", code="RepoNotFound")
        return repo

    def _writable(self, kind: str, repo_id: str, caller) -> Repo:
        user, role = caller
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository (Authorization: Bearer hf_...)")
        repo = self._readable(kind, repo_id, caller)
        if role != "write" or repo.namespace not in self._namespaces(user):
            raise HubError(403, f"You don't have the rights to write to {kind} {repo_id}: this token is {role}-only"
                           if role != "write" else f"You don't have the rights to write to {kind} {repo_id}")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag, a full commit sha or an unambiguous sha prefix (7+ hex digits)."""
        oid = repo.branches.get(revision) or repo.tags.get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for c in repo.commits if c.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[oid]

    def _history(self, repo: Repo, commit: Commit) -> Iterator[Commit]:
        while commit is not None:
            yield commit
            commit = repo.commits.get(commit.parent) if commit.parent else None

    def _new_commit(self, repo: Repo, parent: Optional[Commit], title: str, message: str,
                    files: dict[str, bytes], author: str) -> Commit:
        self._counter += 1
        seed = f"{repo.repo_id}\n{parent.oid if parent else ''}\n{title}\n{self._counter}\n"
        seed += "".join(f"{p}:{git_blob_sha(d)}\n" for p, d in sorted(files.items()))
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.oid if parent else None, title, message,
                        files, author)
        repo.commits[commit.oid] = commit
        return commit

    # ------------------------------------------------------------------ account and repos

    def _whoami(self, caller):
        user, role = caller
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "id": hashlib.md5(user.encode()).hexdigest()[:24], "name": user,
                "fullname": user, "email": f"{user}@example.org", "emailVerified": True, "canPay": False,
                "isPro": False, "avatarUrl": "", "periodEnd": None,
                "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write"}
                         for o in self._namespaces(user) - {user}],
                "auth": {"type": "access_token",
                         "accessToken": {"displayName": "lmssl-tests", "role": role, "createdAt": _now()}}}

    def _create_repo(self, payload: dict, caller):
        user, role = caller
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        kind = payload.get("type") or "model"
        if kind not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {kind!r}")
        name, namespace = payload.get("name") or "", payload.get("organization") or user
        if not REPO_NAME.match(name) or "--" in name or ".." in name or len(name) > 96:
            raise HubError(400, f"Invalid repo name {name!r}: use letters, digits, '-', '_', '.' "
                                "(no '--' or '..', at most 96 characters)")
        if role != "write" or namespace not in self._namespaces(user):
            raise HubError(403, f"You don't have the rights to create a {kind} under the namespace \"{namespace}\"")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{URL_PREFIX[kind]}{repo_id}"
        if (kind, repo_id) in self.repos:
            return _json_response(409, {"error": f"You already created this {kind} repo", "url": url},
                                  {"X-Error-Message": f"You already created this {kind} repo"})
        private = payload.get("visibility") == "private" if "visibility" in payload else bool(payload.get("private"))
        repo = Repo(kind, repo_id, private)
        first = self._new_commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES.encode()}, user)
        repo.branches["main"] = first.oid
        self.repos[(kind, repo_id)] = repo
        return {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}

    def _delete_repo(self, payload: dict, caller):
        kind = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or caller[0]}/{payload.get('name')}"
        repo = self._writable(kind, repo_id, caller)
        del self.repos[(repo.repo_type, repo.repo_id)]
        return {}

    def _settings(self, repo: Repo, payload: dict):
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "gated" in payload:
            repo.gated = payload["gated"]
        return {"private": repo.private, "gated": repo.gated}

    def _info(self, repo: Repo, revision: str, query: dict):
        commit = self._resolve(repo, revision)
        with_blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(data), blobId=git_blob_sha(data))
            siblings.append(sibling)
        card = _card_metadata(commit.files.get("README.md", b"").decode("utf-8", "replace")) or {}
        tags = card.get("tags") if isinstance(card.get("tags"), list) else []
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.namespace, "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created,
                "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
                "tags": tags, "siblings": siblings, "usedStorage": sum(map(len, commit.files.values()))}
        if card:
            info["cardData"] = card
        if repo.repo_type == "model":
            info.update(library_name=card.get("library_name"), pipeline_tag=card.get("pipeline_tag"))
        return info

    # ------------------------------------------------------------------ refs

    def _refs(self, repo: Repo, query: dict):
        def ref(kind, name, oid):
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
        return {"branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
                "converts": [], "tags": [ref("tags", n, o) for n, o in sorted(repo.tags.items())],
                "pullRequests": []}

    def _create_branch(self, repo: Repo, name: str, payload: dict):
        if not BRANCH_NAME.match(name) or ".." in name or name.endswith((".lock", "/")):
            raise HubError(400, f"Invalid branch name {name!r}")
        if name in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{name}")
        start = self._resolve(repo, payload.get("startingPoint") or "main")
        repo.branches[name] = start.oid
        return {}

    def _create_tag(self, repo: Repo, revision: str, payload: dict):
        tag = payload.get("tag") or ""
        if not BRANCH_NAME.match(tag):
            raise HubError(400, f"Invalid tag name {tag!r}")
        if tag in repo.tags:
            raise HubError(409, f"Tag already exists: refs/tags/{tag}")
        repo.tags[tag] = self._resolve(repo, revision).oid
        return {}

    def _delete_ref(self, refs: dict, name: str, protect: Optional[str] = None):
        if name == protect:
            raise HubError(403, f"Cannot delete the default branch {name!r}")
        if name not in refs:
            raise HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
        del refs[name]
        return {}

    # ------------------------------------------------------------------ listing

    def _entries(self, repo: Repo, commit: Commit, prefix: str, recursive: bool, expand: bool) -> list[dict]:
        """Tree entries under `prefix` (direct children, or all descendants when recursive)."""
        folders: dict[str, list[str]] = {}
        files = []
        base = prefix + "/" if prefix else ""
        for path in commit.files:
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):
                folders.setdefault(base + "/".join(parts[:depth]), []).append(path)
            if recursive or len(parts) == 1:
                files.append(path)
        if not recursive:
            folders = {f: v for f, v in folders.items() if "/" not in f[len(base):]}
        entries = [self._folder_entry(commit, f, members) for f, members in folders.items()]
        entries += [self._file_entry(repo, commit, p, expand) for p in files]
        return sorted(entries, key=lambda e: (e["path"].count("/"), e["type"] != "directory", e["path"]))

    def _file_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        data = commit.files[path]
        entry = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
        if expand:
            last = commit
            for older in self._history(repo, commit):
                if older.files.get(path) != data:
                    break
                last = older
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _folder_entry(commit: Commit, folder: str, members: list[str]) -> dict:
        seed = "".join(f"{p}:{git_blob_sha(commit.files[p])}\n" for p in sorted(members))
        return {"type": "directory", "oid": hashlib.sha1(seed.encode()).hexdigest(), "size": 0, "path": folder}

    def _tree(self, repo: Repo, revision: str, path: str, query: dict):
        commit = self._resolve(repo, revision)
        path = path.strip("/")
        if path and not any(p.startswith(path + "/") for p in commit.files):
            raise HubError(404, f"{path} does not exist on \"{revision}\"", code="EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        recursive = query.get("recursive", "").lower() in ("1", "true")
        expand = query.get("expand", "").lower() in ("1", "true")
        return self._entries(repo, commit, path, recursive, expand)

    def _paths_info(self, repo: Repo, revision: str, body: bytes, headers):
        commit = self._resolve(repo, revision)
        if "json" in (headers.get("Content-Type") or ""):
            form = _json_body(body)
            paths, expand = form.get("paths") or [], bool(form.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[-1].lower() == "true"
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_entry(repo, commit, path, expand))
            else:
                members = [p for p in commit.files if p.startswith(path + "/")]
                if members:
                    out.append(self._folder_entry(commit, path, members))
        return out

    def _commits(self, repo: Repo, revision: str):
        return [{"id": c.oid, "authors": [{"user": c.author, "avatar": ""}], "date": c.date,
                 "title": c.title, "message": c.message} for c in self._history(repo, self._resolve(repo, revision))]

    # ------------------------------------------------------------------ writing

    def _branch_head(self, repo: Repo, revision: str, query: dict) -> Commit:
        if query.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "create_pr is not supported by the Hub emulator")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[repo.branches[revision]]

    def _preupload(self, repo: Repo, revision: str, payload: dict, query: dict):
        head = self._branch_head(repo, revision, query)
        files = []
        for item in payload.get("files", []):
            existing = head.files.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha(existing) if existing is not None else None})
        return {"files": files, "commitOid": head.oid}

    def _commit(self, repo: Repo, revision: str, body: bytes, query: dict, caller):
        head = self._branch_head(repo, revision, query)
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError as error:
            raise HubError(400, f"The commit payload is not NDJSON: {error}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line of a commit must be the header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise HubError(412, f"A commit has happened since {header['parentCommit']}: refresh and try again")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = (value.get("path") or "").strip("/")
            if key == "file":
                content = value.get("content", "")
                files[path] = (base64.b64decode(content) if value.get("encoding") == "base64"
                               else content.encode())
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, f"{path}: LFS objects are not stored by the Hub emulator (preupload answers "
                                    "uploadMode 'regular' for every file)")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self._new_commit(repo, head, header.get("summary") or "", header.get("description") or "",
                                  files, caller[0])
        repo.branches[revision] = commit.oid
        return {"success": True, "commitOid": commit.oid, "hookOutput": "", "pullRequestUrl": None,
                "commitUrl": f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"}

    # ------------------------------------------------------------------ downloading

    def _resolve_file(self, kind, repo_id, revision, path, headers, caller):
        repo = self._readable(kind, repo_id, caller)
        commit = self._resolve(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        out = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream", "Content-Disposition": f'inline; filename="{path}"'}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", headers.get("Range") or "")
        if match and data:
            start = int(match[1]) if match[1] else max(0, len(data) - int(match[2] or 0))
            end = min(int(match[2]), len(data) - 1) if match[1] and match[2] else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, out, data[start:end + 1]
        return 200, out, data

    # ------------------------------------------------------------------ card metadata

    def _validate_yaml(self, payload: dict):
        content = payload.get("content")
        if not isinstance(content, str):
            raise HubError(400, "validate-yaml expects {'content': <README text>, 'repoType': ...}")
        try:
            metadata = _card_metadata(content, strict=True)
        except ValueError as error:
            return _json_response(400, {"error": str(error), "errors": [{"message": str(error)}]})
        if metadata is None:
            return {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        problems = metadata_problems(metadata, payload.get("repoType") or "model")
        if problems:
            text = "; ".join(problems)
            return _json_response(400, {"error": text, "errors": [{"message": p} for p in problems]})
        return {"warnings": []}


def metadata_problems(metadata: Any, repo_type: str = "model") -> list[str]:
    """What the Hub would reject in a card's YAML metadata (the subset this emulator checks)."""
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    problems = []

    def is_text_or_texts(value):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))

    license_id = metadata.get("license")
    if license_id is not None and (not isinstance(license_id, str) or license_id not in HUB_LICENSES):
        problems.append(f'"license" must be one of the Hub license ids (e.g. apache-2.0, mit), got {license_id!r}')
    if "tags" in metadata and not (isinstance(metadata["tags"], list)
                                   and all(isinstance(t, str) for t in metadata["tags"])):
        problems.append('"tags" must be a list of strings')
    if "pipeline_tag" in metadata and not isinstance(metadata["pipeline_tag"], str):
        problems.append('"pipeline_tag" must be a string')
    if "library_name" in metadata and not isinstance(metadata["library_name"], str):
        problems.append('"library_name" must be a string')
    for key in ("datasets", "base_model", "language", "metrics"):
        if key in metadata and metadata[key] is not None and not is_text_or_texts(metadata[key]):
            problems.append(f'"{key}" must be a string or a list of strings')
    if "model-index" in metadata:
        problems += _model_index_problems(metadata["model-index"])
    return problems


def _model_index_problems(index: Any) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be a list']
    problems = []
    for i, model in enumerate(index):
        where = f"model-index[{i}]"
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            problems.append(f'{where} must be a mapping with a string "name"')
            continue
        results = model.get("results")
        if not isinstance(results, list):
            problems.append(f'{where}.results must be a list')
            continue
        for j, result in enumerate(results):
            at = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                problems.append(f"{at} must be a mapping")
                continue
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not (isinstance(task, dict) and isinstance(task.get("type"), str)
                    and isinstance(task.get("name", ""), str)):
                problems.append(f'{at}.task must be a mapping with a string "type" (and optional "name")')
            if not (isinstance(dataset, dict) and isinstance(dataset.get("type"), str)
                    and isinstance(dataset.get("name"), str)
                    and all(isinstance(dataset.get(k, ""), str) for k in ("config", "split", "revision"))):
                problems.append(f'{at}.dataset must be a mapping with string "type" and "name" '
                                '(and optional string config/split/revision)')
            if not isinstance(metrics, list):
                problems.append(f"{at}.metrics must be a list")
                continue
            for k, metric in enumerate(metrics):
                if not (isinstance(metric, dict) and isinstance(metric.get("type"), str) and "value" in metric
                        and isinstance(metric.get("name", ""), str)):
                    problems.append(f'{at}.metrics[{k}] must be a mapping with a string "type" and a "value"')
    return problems


def _card_metadata(content: str, strict: bool = False) -> Optional[Any]:
    """The YAML block between the leading '---' lines of a card, parsed; None when there is none."""
    import yaml

    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---(\r?\n|$)", content, flags=re.S)
    if match is None:
        return None
    try:
        return yaml.safe_load(match[1])
    except yaml.YAMLError as error:
        if strict:
            raise ValueError(f"The card metadata is not valid YAML: {error}") from error
        return None


def _json_body(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError as error:
        raise HubError(400, f"Expected a JSON body: {error}") from error
    if not isinstance(value, dict):
        raise HubError(400, "Expected a JSON object")
    return value


def _json_response(status: int, payload: Any, headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, \
        json.dumps(payload).encode()


def _error_response(error: HubError) -> tuple[int, dict, bytes]:
    headers = {"X-Error-Message": error.message, **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return _json_response(error.status, {"error": error.message}, headers)


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0), so a stopped server leaves no kept-alive sockets behind."""

    hub: HubEmulator
    server_version = "HubEmulator/1.0"

    def _serve(self) -> None:
        body = self._read_body()
        status, headers, payload = self.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args) -> None:  # the test output stays quiet
        pass


# ---------------------------------------------------------------------- pointing the client at it

HUB_HOSTS = ("huggingface.co", "hf.co")  # hosts some client code names outright (ModelCard.validate)

_SITECUSTOMIZE = """\
# Written by tests/hub_emulator.py: routes huggingface.co requests of this subprocess to the Hub emulator.
import importlib.util, os, sys
_spec = importlib.util.spec_from_file_location("_lmssl_hub_emulator", {module!r})
_module = sys.modules["_lmssl_hub_emulator"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.route_hub_hosts_to(os.environ["HF_ENDPOINT"])
"""


def route_hub_hosts_to(endpoint: str) -> None:
    """Make huggingface_hub's shared httpx client send requests for huggingface.co / hf.co to `endpoint`.

    Needed because some client code ignores HF_ENDPOINT: ModelCard.validate posts to
    https://huggingface.co/api/validate-yaml. Everything else already goes to HF_ENDPOINT.
    """
    import httpx
    from huggingface_hub.utils import _http

    target = httpx.URL(endpoint)

    class RouteHubHosts(httpx.BaseTransport):
        def __init__(self):
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.host in HUB_HOSTS:
                request.url = request.url.copy_with(scheme=target.scheme, host=target.host, port=target.port)
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    def client_factory() -> httpx.Client:  # mirrors huggingface_hub's default_client_factory
        return httpx.Client(transport=RouteHubHosts(), event_hooks={"request": [_http.hf_request_event_hook]},
                            follow_redirects=True, timeout=None)

    _http.set_client_factory(client_factory)


def point_client_at(emulator: HubEmulator, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub and transformers (this process and its subprocesses) at `emulator`.

    The client reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE... into `huggingface_hub.constants` at
    import time, and the module-level `HfApi` behind `huggingface_hub.create_repo` & co. keeps the endpoint
    it was built with, so both the environment (for subprocesses) and those objects are patched.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, _http

    hub_cache, token_path = home / "hub", home / "token"
    env = {"HF_ENDPOINT": emulator.url, "HF_TOKEN": emulator.token, "HF_HOME": str(home),
           "HF_HUB_CACHE": str(hub_cache), "HF_TOKEN_PATH": str(token_path),
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), emulator.host, "localhost"]))}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)

    # Subprocesses: a sitecustomize on PYTHONPATH routes their huggingface.co requests too.
    site = home / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(module=str(Path(__file__).resolve())))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))

    for name, value in {
        "ENDPOINT": emulator.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": emulator.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {emulator.host},
        "HF_HUB_OFFLINE": False, "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache), "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_TOKEN_PATH": str(token_path), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", emulator.url)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))

    # In-process: the shared httpx client, rebuilt with huggingface.co routed to the emulator; restored after.
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", _http._GLOBAL_CLIENT_FACTORY)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    route_hub_hosts_to(emulator.url)


@pytest.fixture
def hub(tmp_path_factory, monkeypatch) -> Iterator[HubEmulator]:
    """A running HubEmulator that huggingface_hub / transformers talk to, online, for this test only.

    Yields the emulator (url, token, user, requests, fail_next, stop/start, files...). Environment,
    client constants and the shared HTTP client are restored afterwards, so other tests stay offline.
    """
    from huggingface_hub.utils import _http

    emulator = HubEmulator().start()
    try:
        point_client_at(emulator, tmp_path_factory.mktemp("hf-home"), monkeypatch)
        yield emulator
    finally:
        _http.close_session()
        emulator.stop()
        # monkeypatch undoes the environment, constants and client factory after this fixture returns.
