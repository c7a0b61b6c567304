"""A ModelScope hub emulator on 127.0.0.1 for tests that drive the real client.

It implements the routes of section 5 of
``/work/shared/reference/modelscope-hub-protocol.md`` (create repo, LFS
pre-sign, blob PUT, commit, tag, revisions, file listing, file GET with
ranges, repo info) over a content-addressed blob store, so the real
``modelscope`` client can push and fetch through it unchanged.

Faults for tests: :meth:`HubState.corrupt_blob` flips bytes of a stored blob
while the listing keeps advertising its true sha256, and
``HubServer(die_after_puts=N)`` drops the connection and stops listening when
blob PUT number N+1 arrives, as a crashed server would; :meth:`HubServer.restart`
brings it back on the same port with the same storage.

Usage (``tests/test_hub.py``)::

    server = HubServer(HubState(str(tmp_path / "hub")), tokens={"tok"}).start()
    os.environ["MODELSCOPE_ENDPOINT"] = server.endpoint  # 'http://127.0.0.1:40123'
"""

import base64
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

EMPTY_TREE: Dict[str, str] = {}
REPO_EXISTS_CODE = 10010101001


class HubError(Exception):
    """An error answered to the client as ``status`` with a legacy JSON envelope."""

    def __init__(self, status: int, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code or status


@dataclass
class Commit:
    id: str
    parent: Optional[str]
    tree: Dict[str, str]  # path -> sha256 of the blob
    message: str
    created: int


@dataclass
class Repo:
    commits: Dict[str, Commit] = field(default_factory=dict)
    branches: Dict[str, str] = field(default_factory=dict)
    tags: Dict[str, Tuple[str, int]] = field(default_factory=dict)  # tag -> (commit id, created)


class HubState:
    """Repos, commits, refs and a content-addressed blob dir; survives server restarts."""

    def __init__(self, root: str):
        self.blob_dir = os.path.join(root, "blobs")
        os.makedirs(self.blob_dir, exist_ok=True)
        self.repos: Dict[str, Repo] = {}
        self.lock = threading.RLock()

    # -- blobs ------------------------------------------------------------
    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.blob_dir, sha256)

    def has_blob(self, sha256: str, size: Optional[int] = None) -> bool:
        path = self.blob_path(sha256)
        return os.path.isfile(path) and (size is None or os.path.getsize(path) == size)

    def store_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256):
            self._publish_blob(sha256, lambda f: f.write(data))
        return sha256

    def store_stream(self, stream, length: int, expected_sha256: str) -> None:
        """Stream ``length`` bytes to the store, refusing content whose hash is not ``expected_sha256``."""
        digest = hashlib.sha256()

        def copy(f):
            left = length
            while left:
                chunk = stream.read(min(left, 1 << 20))
                if not chunk:
                    raise HubError(400, f"body ended {left} bytes short of Content-Length")
                digest.update(chunk)
                f.write(chunk)
                left -= len(chunk)
            if digest.hexdigest() != expected_sha256:
                raise HubError(400, f"sha256 of the body is {digest.hexdigest()}, not the oid {expected_sha256}")

        self._publish_blob(expected_sha256, copy)

    def _publish_blob(self, sha256: str, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, self.blob_path(sha256))
        except BaseException:
            os.unlink(tmp)
            raise

    def corrupt_blob(self, sha256: str) -> None:
        """Flip the first byte of a stored blob, keeping its name (and so its advertised hash)."""
        with open(self.blob_path(sha256), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))

    # -- repos ------------------------------------------------------------
    def repo(self, repo_id: str) -> Repo:
        try:
            return self.repos[repo_id]
        except KeyError:
            raise HubError(404, f"repo {repo_id} does not exist") from None

    def create_repo(self, repo_id: str) -> None:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(400, f"model {repo_id} already exists", REPO_EXISTS_CODE)
            repo = Repo()
            root = self._new_commit(repo, None, dict(EMPTY_TREE), "initial commit")
            repo.branches["master"] = root.id
            self.repos[repo_id] = repo

    def resolve(self, repo_id: str, revision: str) -> Commit:
        """Branch, then tag, then a unique commit-id prefix (at least 7 hex digits)."""
        repo = self.repo(repo_id)
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.tags:
            return repo.commits[repo.tags[revision][0]]
        matches = [c for c in repo.commits if len(revision) >= 7 and c.startswith(revision)]
        if len(matches) == 1:
            return repo.commits[matches[0]]
        raise HubError(404, f"revision {revision!r} not found in {repo_id}")

    def commit(self, repo_id: str, branch: str, message: str, actions: List[dict]) -> Commit:
        with self.lock:
            repo = self.repo(repo_id)
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].tree) if parent else {}
            for action in actions:
                self._apply(tree, action)
            commit = self._new_commit(repo, parent, tree, message)
            repo.branches[branch] = commit.id
            return commit

    def _apply(self, tree: Dict[str, str], action: dict) -> None:
        path, kind = action.get("path") or "", action.get("action")
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"invalid path {path!r}")
        if kind == "delete":
            if tree.pop(path, None) is None:
                raise HubError(400, f"cannot delete {path}: not in the tree")
        elif kind in ("create", "update") and action.get("type") == "lfs":
            if not self.has_blob(action.get("sha256", ""), action.get("size")):
                raise HubError(400, f"LFS object for {path} ({action.get('sha256')}) was never uploaded")
            tree[path] = action["sha256"]
        elif kind in ("create", "update"):
            tree[path] = self.store_bytes(base64.b64decode(action.get("content") or ""))
        else:
            raise HubError(400, f"unknown action {kind!r}")

    def _new_commit(self, repo: Repo, parent: Optional[str], tree: Dict[str, str], message: str) -> Commit:
        seed = json.dumps([parent, tree, message, uuid.uuid4().hex])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, tree, message, int(time.time()))
        repo.commits[commit.id] = commit
        return commit

    def create_tag(self, repo_id: str, tag: str, ref: str) -> None:
        with self.lock:
            repo = self.repo(repo_id)
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag or "") or tag in repo.branches:
                raise HubError(400, f"invalid tag name {tag!r}")
            if tag in repo.tags:
                raise HubError(400, f"tag {tag} already exists")
            repo.tags[tag] = (self.resolve(repo_id, ref).id, int(time.time()))


class HubServer:
    """Serves a :class:`HubState` over HTTP/1.1 on 127.0.0.1; every request is logged."""

    def __init__(self, state: HubState, tokens: Set[str] = frozenset(), die_after_puts: Optional[int] = None,
                 advertise_sha256: bool = True):
        self.state, self.tokens, self.die_after_puts = state, set(tokens), die_after_puts
        # False: listings carry no Sha256, as the real hub may do for small non-LFS files.
        self.advertise_sha256 = advertise_sha256
        self.port = 0  # chosen by the OS at the first start, kept by restarts
        self.requests: List[Tuple[str, str, int]] = []  # (method, path with query, status)
        self.blob_puts = 0  # PUTs admitted, fault-free
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubServer":
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:  # concurrent PUTs may all ask a dying server to stop
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def restart(self) -> "HubServer":
        """Come back on the same port and storage, with no fault armed."""
        self.stop()
        self.die_after_puts = None
        return self.start()

    def admit_put(self) -> bool:
        """Count a blob PUT, or say no when the armed fault is due (atomic: the client PUTs in parallel)."""
        with self._lock:
            if self.die_after_puts is not None and self.blob_puts >= self.die_after_puts:
                return False
            self.blob_puts += 1
            return True

    def die(self) -> None:
        # shutdown() waits for serve_forever, which may be waiting on this
        # very handler thread's peers; do it from a thread of its own.
        threading.Thread(target=self.stop, daemon=True).start()

    def requests_matching(self, method: str, pattern: str) -> List[str]:
        return [path for m, path, _ in self.requests if m == method and re.search(pattern, path)]


_ROUTES = [
    ("POST", r"/api/v1/models", "create_repo"),
    ("POST", r"/api/v1/repos/models/(?P<repo>[^/]+/[^/]+)/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/models/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})", "put_blob"),
    ("POST", r"/api/v1/repos/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<branch>[^/]+)", "commit"),
    ("POST", r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo/tag", "create_tag"),
    ("GET", r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/revisions", "revisions"),
    ("GET", r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo/files", "list_files"),
    ("GET", r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo", "get_file"),
    ("GET", r"/(?:openapi|api)/v1/models/(?P<repo>[^/]+/[^/]+)", "repo_info"),
]
_WRITES = {"create_repo", "lfs_batch", "put_blob", "commit", "create_tag"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, *args) -> None:  # the request log replaces stderr noise
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
        status = 500
        try:
            name, params = self._route(method, unquote(url.path))
            if name in _WRITES and self._token() not in self.hub.tokens:
                raise HubError(401, "a valid access token is required", 10010103009)
            status = getattr(self, "_" + name)(**params) or 200
        except HubError as error:
            # The request body may be unread; the connection cannot be reused.
            status, self.close_connection = error.status, True
            self._send_json(status, {"Code": error.code, "Message": error.message, "Success": False},
                            {"Connection": "close"})
        except ConnectionAbortedError:
            status = 0
            self.close_connection = True
        finally:
            self.hub.requests.append((method, self.path, status))

    def _route(self, method: str, path: str):
        for route_method, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                return name, match.groupdict()
        raise HubError(404, f"no route for {method} {path}")

    def _token(self) -> Optional[str]:
        header = self.headers.get("Authorization", "")
        return header[len("Bearer "):] if header.startswith("Bearer ") else None

    def _body_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise HubError(400, "body is not JSON") from None

    def _send_json(self, status: int, payload, headers: Dict[str, str] = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _ok(self, data, status: int = 200) -> int:
        self._send_json(status, {"Code": 200, "Data": data, "Message": "success",
                                 "RequestId": uuid.uuid4().hex, "Success": True})
        return status

    # -- routes -----------------------------------------------------------
    def _create_repo(self) -> int:
        body = self._body_json()
        owner, name = body.get("Path"), body.get("Name")
        if not owner or not name:
            raise HubError(400, "Path and Name are required")
        self.hub.state.create_repo(f"{owner}/{name}")
        return self._ok({"Path": owner, "Name": name}, status=201)

    def _lfs_batch(self, repo: str) -> int:
        self.hub.state.repo(repo)
        objects = []
        for obj in self._body_json().get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            entry = {"oid": oid, "size": size}
            if not self.hub.state.has_blob(oid, size):
                href = f"{self.hub.endpoint}/lfs-upload/models/{repo}/{oid}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        return self._ok({"objects": objects})

    def _put_blob(self, repo: str, oid: str) -> int:
        if not self.hub.admit_put():
            # A crash: no answer, the socket closes, and the port stops listening.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.hub.die()
            raise ConnectionAbortedError
        self.hub.state.store_stream(self.rfile, int(self.headers["Content-Length"]), oid)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return 200

    def _commit(self, repo: str, branch: str) -> int:
        body = self._body_json()
        commit = self.hub.state.commit(repo, branch, body.get("commit_message", ""), body.get("actions", []))
        return self._ok({"CommitId": commit.id, "Revision": commit.id})

    def _create_tag(self, repo: str) -> int:
        body = self._body_json()
        self.hub.state.create_tag(repo, body.get("TagName"), body.get("Ref") or "master")
        return self._ok({"TagName": body.get("TagName")})

    def _revisions(self, repo: str) -> int:
        state = self.hub.state.repo(repo)
        branches = [{"Revision": name, "CreatedAt": state.commits[cid].created}
                    for name, cid in state.branches.items()]
        tags = [{"Revision": name, "CreatedAt": created, "CommitId": cid}
                for name, (cid, created) in state.tags.items()]
        return self._ok({"RevisionMap": {"Branches": branches, "Tags": tags}})

    def _list_files(self, repo: str) -> int:
        commit = self.hub.state.resolve(repo, self.query.get("Revision") or "master")
        root = (self.query.get("Root") or "").strip("/")
        entries, dirs = [], set()
        for path, sha256 in sorted(commit.tree.items()):
            if root and not path.startswith(root + "/"):
                continue
            parts = path.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append({"CommitId": commit.id, "CommitMessage": commit.message, "CommittedDate": commit.created,
                            "Name": parts[-1], "Path": path, "Revision": commit.id, "Type": "blob",
                            "Sha256": sha256 if self.hub.advertise_sha256 else "",
                            "Size": os.path.getsize(self.hub.state.blob_path(sha256)), "IsLFS": False,
                            "Mode": "33188"})
        entries += [{"Name": d.split("/")[-1], "Path": d, "Type": "tree", "Size": 0, "Sha256": "",
                     "Revision": commit.id, "Mode": "40000", "IsLFS": False} for d in sorted(dirs)]
        return self._ok({"Files": entries, "LatestCommitter": None})

    def _get_file(self, repo: str) -> int:
        commit = self.hub.state.resolve(repo, self.query.get("Revision") or "master")
        path = self.query.get("FilePath", "")
        if path not in commit.tree:
            raise HubError(404, f"{path} not found at {commit.id}")
        blob = self.hub.state.blob_path(commit.tree[path])
        total = os.path.getsize(blob)
        start, end, status = 0, total - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, status = int(match.group(1)), 206
            end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 416
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        with open(blob, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left:
                chunk = f.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                left -= len(chunk)
        return status

    def _repo_info(self, repo: str) -> int:
        self.hub.state.repo(repo)
        owner, name = repo.split("/")
        if self.path.startswith("/openapi/"):
            self._send_json(200, {"success": True, "data": {"id": repo, "path": owner, "name": name}})
            return 200
        return self._ok({"Id": repo, "Path": owner, "Name": name, "Visibility": 5})
