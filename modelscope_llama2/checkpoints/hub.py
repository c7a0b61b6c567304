"""Publish a checkpoint as a tagged hub revision and fetch exactly that revision back.

Both directions go through the real ModelScope client (``modelscope_hub``),
so ``MODELSCOPE_ENDPOINT``, ``MODELSCOPE_CACHE`` and the usual credentials
(``token=``, ``MODELSCOPE_API_TOKEN`` or a ``modelscope login``) apply. What
this module adds is what the client leaves out: the tag really gets created,
pinned to the commit just made; the revision holds exactly the local files
(removed files are deleted); and every transfer is checked file by file,
size and sha256, against the server's listing.

Example (the doctests run it against the test suite's hub emulator, see
``conftest.py``; ``tests/test_hub.py`` has the rest):

    >>> from modelscope_llama2 import fetch_checkpoint, push_checkpoint
    >>> commit = push_checkpoint("out/Llama-2-7b-chat-ms", "me/Llama-2-7b-chat-ms", "v1.0.2", progress=False)
    >>> local = fetch_checkpoint("me/Llama-2-7b-chat-ms", "v1.0.2")
    >>> sorted(os.listdir(local)) == sorted(os.listdir("out/Llama-2-7b-chat-ms"))
    True

Bad arguments fail before any request, naming the field:

    >>> push_checkpoint(DEMO_DIR, "no-owner", "v1")
    Traceback (most recent call last):
    ...
    ValueError: repo_id: expected 'owner/name', got 'no-owner'
"""

import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import requests
from modelscope_hub.api import HubApi
from modelscope_hub.errors import AlreadyExistsError, FileDownloadError, HubError, NotExistError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

REPO_TYPE = "model"
# Paths the client's upload_folder always skips (modelscope_hub DEFAULT_IGNORE_PATTERNS).
_NEVER_UPLOADED = {".git", ".cache"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HASH_CHUNK = 1 << 20


class TransferError(RuntimeError):
    """The client could not finish an upload or download; a re-run resumes it."""


class CheckpointIntegrityError(TransferError):
    """Files on one side of a transfer differ from the other side's listing."""


class RevisionNotFoundError(ValueError):
    """The repo or the revision does not exist on the hub."""


class TagExistsError(ValueError):
    """The tag is already published; tags are immutable releases."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: Optional[str]  # None: the server's listing did not say


Manifest = Dict[str, FileEntry]  # repo-relative posix path -> entry


def push_checkpoint(
    local_dir: str,
    repo_id: str,
    tag: str,
    *,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    branch: str = "master",
    progress: bool = True,
) -> str:
    """Publish ``local_dir`` as revision ``tag`` of ``repo_id``; return the tagged commit id.

    The repo is created when missing. ``branch`` then receives exactly the
    files of ``local_dir`` (remote files absent locally are deleted, nothing is
    written into ``local_dir``), the server's listing of the new commit is
    checked against local sizes and sha256, and only then is ``tag`` created on
    that commit and checked again. A failed run creates no tag and can simply
    be re-run. An existing ``tag`` raises :class:`TagExistsError` before
    anything is uploaded: published releases are never moved.

    Example:
        >>> commit = push_checkpoint("ckpt", "me/Llama-2-7b-chat-ms", "v1.0.3", commit_message="fix rope",
        ...                          progress=False)
        >>> len(commit)  # the tagged commit's id
        40
        >>> push_checkpoint(DEMO_DIR, "me/Llama-2-7b-chat-ms", "master")
        Traceback (most recent call last):
        ...
        ValueError: tag: 'master' is a branch name, not a release tag
    """
    _check_name("repo_id", repo_id, _REPO_ID, "'owner/name'")
    _check_name("tag", tag, _TAG, "letters, digits, '.', '_' or '-'")
    _check_name("branch", branch, _TAG, "a branch name")
    if tag in ("master", "main", branch):
        raise ValueError(f"tag: {tag!r} is a branch name, not a release tag")
    local = local_manifest(local_dir, progress=progress)
    api = HubApi(token=token)
    tagged = _existing_tag_manifest(api, repo_id, tag)
    if tagged is not None:
        held = "other files" if _differences(local, tagged) else f"exactly the files of {local_dir}"
        raise TagExistsError(f"tag: {repo_id}@{tag} is already published (with {held}); publish a new tag")
    commit = _upload(api, local_dir, repo_id, branch, commit_message or f"Release {tag}", progress)
    _verify_remote(api, repo_id, commit, local, "upload")
    try:
        api.create_repo_tag(repo_id, REPO_TYPE, tag, revision=commit)
    except HubError as error:
        raise TransferError(f"creating tag {tag} on {repo_id}@{commit} failed: {error}") from error
    _verify_remote(api, repo_id, tag, local, "tag")
    return commit


def fetch_checkpoint(
    repo_id: str, revision: str, *, cache_dir: Optional[str] = None, token: Optional[str] = None
) -> str:
    """Download revision ``revision`` of ``repo_id`` and return a local dir holding exactly it.

    The download is the client's ``snapshot_download`` (resumable, shared with
    ``Model.from_pretrained(repo_id, revision=...)``); the returned directory
    is then checked against the server's listing: same file set, sizes and
    sha256. Stale files of an earlier download of the same revision name are
    removed. A corrupted or partial download raises
    :class:`CheckpointIntegrityError`; an unknown repo or revision raises
    :class:`RevisionNotFoundError`.

    Example:
        >>> commit = push_checkpoint("ckpt", "me/Llama-2-7b-chat-ms", "v1.0.2", progress=False)
        >>> fetch_checkpoint("me/Llama-2-7b-chat-ms", "v1.0.2", cache_dir="ms-cache")
        'ms-cache/models/me--Llama-2-7b-chat-ms/snapshots/v1.0.2'
        >>> fetch_checkpoint("me/Llama-2-7b-chat-ms", "")
        Traceback (most recent call last):
        ...
        ValueError: revision: expected a tag, branch or commit id, got ''
    """
    from modelscope import snapshot_download  # the same entry point Model.from_pretrained uses

    _check_name("repo_id", repo_id, _REPO_ID, "'owner/name'")
    if not isinstance(revision, str) or not revision:
        raise ValueError(f"revision: expected a tag, branch or commit id, got {revision!r}")
    remote = _remote_manifest(HubApi(token=token), repo_id, revision)
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token)
    except requests.HTTPError as error:  # how the compat layer reports NotExist/Auth/Permission
        if getattr(error.response, "status_code", None) == 404:
            raise RevisionNotFoundError(f"revision: {repo_id}@{revision} does not exist on the hub") from error
        raise TransferError(f"download of {repo_id}@{revision} was refused: {error}") from error
    except FileDownloadError as error:
        raise CheckpointIntegrityError(
            f"download of {repo_id}@{revision} failed verification and was not returned: {error}"
        ) from error
    except HubError as error:
        raise TransferError(f"download of {repo_id}@{revision} failed (re-run to resume): {error}") from error
    _remove_stale_files(path, remote)
    problems = _differences(local_manifest(path, progress=False), remote)
    if problems:
        raise CheckpointIntegrityError(
            f"download of {repo_id}@{revision} in {path} does not match the hub's listing: " + "; ".join(problems)
        )
    return path


def local_manifest(directory: str, progress: bool = False) -> Manifest:
    """Size and sha256 of every file under ``directory``, keyed by posix relative path."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"local_dir: expected a path, got {type(directory).__name__}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"local_dir: no directory {directory}")
    paths = _relative_files(directory)
    if not paths:
        raise ValueError(f"local_dir: {directory} holds no files")
    total = sum(os.path.getsize(os.path.join(directory, p)) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Hashing", disable=not progress) as bar:
        return {p: FileEntry(os.path.getsize(os.path.join(directory, p)),
                             _sha256(os.path.join(directory, p), bar.update)) for p in paths}


def _relative_files(directory: str) -> List[str]:
    paths = []
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            if name in _NEVER_UPLOADED:
                raise ValueError(f"local_dir: {os.path.join(root, name)} would be skipped by the hub client; "
                                 "a checkpoint dir must not contain .git or .cache")
        paths += [os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/") for f in files]
    return sorted(paths)


def _sha256(path: str, advance=lambda n: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def _check_name(field: str, value: object, pattern: "re.Pattern[str]", expected: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected a string, got {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


def _upload(api: HubApi, local_dir: str, repo_id: str, branch: str, message: str, progress: bool) -> str:
    """Make ``branch`` hold exactly ``local_dir``; return the id of the last commit made."""
    try:
        _ensure_repo(api, repo_id)
        # use_cache=False: the client's resume tracker would otherwise be written
        # into local_dir and, keyed without the endpoint, make a push of the
        # same folder to a fresh repo commit nothing. Blobs the server already
        # holds are still not re-sent, so a re-run resumes cheaply.
        # The client prints an upload report on stdout: it goes to stderr with the progress bars, so that
        # stdout holds only what the caller prints (`push` prints the tagged commit there).
        with contextlib.redirect_stdout(sys.stderr):
            result = api.upload_folder(repo_id, REPO_TYPE, local_dir, commit_message=message, revision=branch,
                                       sync_remote_repo=True, use_cache=False, disable_tqdm=not progress)
    except HubError as error:
        raise TransferError(f"upload of {local_dir} to {repo_id} failed; no tag was created, re-run to resume: "
                            f"{error}") from error
    commits = result if isinstance(result, list) else [result]
    commit_id = _commit_id(commits[-1])
    if commit_id is None:
        # The commit response shape of the real hub is undocumented. Tagging
        # the branch instead is racy against other writers; the check of the
        # tag's listing after tagging catches that.
        logger.warning("the hub did not return a commit id; tagging the head of %s", branch)
        return branch
    return commit_id


def _ensure_repo(api: HubApi, repo_id: str) -> None:
    try:
        api.create_repo(repo_id, REPO_TYPE)
    except AlreadyExistsError:
        pass


def _commit_id(commit_info: object) -> Optional[str]:
    if not isinstance(commit_info, dict):
        return None
    for key in ("CommitId", "commit_id", "Revision", "Id", "Sha"):
        value = commit_info.get(key)
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{7,64}", value):
            return value
    return None


def _existing_tag_manifest(api: HubApi, repo_id: str, tag: str) -> Optional[Manifest]:
    try:
        revisions = api.list_repo_revisions(repo_id, REPO_TYPE)
    except NotExistError:
        return None
    except HubError as error:
        raise TransferError(f"listing the revisions of {repo_id} failed: {error}") from error
    if tag not in {entry.get("Revision") for entry in revisions}:
        return None
    return _remote_manifest(api, repo_id, tag)


def _remote_manifest(api: HubApi, repo_id: str, revision: str) -> Manifest:
    try:
        entries = api.list_repo_files(repo_id, REPO_TYPE, revision=revision)
    except NotExistError as error:
        raise RevisionNotFoundError(f"revision: {repo_id}@{revision} does not exist on the hub") from error
    except HubError as error:
        raise TransferError(f"listing {repo_id}@{revision} failed: {error}") from error
    return {e.path: FileEntry(int(e.size), e.sha256 or None) for e in entries if e.type != "tree"}


def _verify_remote(api: HubApi, repo_id: str, revision: str, local: Manifest, stage: str) -> None:
    """Compare the server's listing of ``revision`` with ``local``; hash unlisted digests by download."""
    remote = _remote_manifest(api, repo_id, revision)
    unhashed = [p for p, entry in remote.items() if entry.sha256 is None and p in local]
    if unhashed:
        remote.update(_download_hashes(repo_id, revision, unhashed, remote))
    problems = _differences(local, remote)
    if problems:
        raise CheckpointIntegrityError(
            f"after the {stage}, {repo_id}@{revision} does not hold the local files: " + "; ".join(problems)
            + ("" if stage == "tag" else "; no tag was created, re-run to retry")
        )


def _download_hashes(repo_id: str, revision: str, paths: List[str], remote: Manifest) -> Manifest:
    """Entries for ``paths`` with the sha256 of their served bytes, for listings that omit it."""
    from modelscope.hub.file_download import model_file_download

    with tempfile.TemporaryDirectory(prefix="ms-verify-") as scratch:
        return {p: FileEntry(remote[p].size, _sha256(model_file_download(repo_id, p, revision=revision,
                                                                         cache_dir=scratch)))
                for p in paths}


def _differences(local: Manifest, remote: Manifest) -> List[str]:
    problems = [f"{p} is missing" for p in sorted(set(local) - set(remote))]
    problems += [f"{p} should not be there" for p in sorted(set(remote) - set(local))]
    for path in sorted(set(local) & set(remote)):
        mine, theirs = local[path], remote[path]
        if mine.size != theirs.size:
            problems.append(f"{path} has {theirs.size} bytes, expected {mine.size}")
        elif theirs.sha256 is not None and mine.sha256 != theirs.sha256:
            problems.append(f"{path} has sha256 {theirs.sha256}, expected {mine.sha256}")
    return problems


def _remove_stale_files(path: str, remote: Manifest) -> None:
    """Drop files the revision does not have: the client never prunes a snapshot dir."""
    for relative in set(_relative_files(path)) - set(remote):
        logger.warning("removing %s from %s: not part of the revision", relative, path)
        os.remove(os.path.join(path, relative))
