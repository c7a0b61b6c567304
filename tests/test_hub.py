"""push_checkpoint / fetch_checkpoint through the real modelscope client, over HTTP to tests/hub_server.py."""

import os
import subprocess
import sys

import pytest
import torch
from modelscope_hub.config import set_default_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from modelscope_llama2.checkpoints.save import save_checkpoint
from modelscope_llama2.cli import main
from modelscope_llama2.checkpoints.hub import (
    CheckpointIntegrityError,
    RevisionNotFoundError,
    TagExistsError,
    TransferError,
    fetch_checkpoint,
    local_manifest,
    push_checkpoint,
)
from modelscope_llama2.tokenizer import Llama2Tokenizer
from tests.hub_server import HubServer, HubState
from tests.helpers import REPO_ROOT, tiny_config

TOKEN = "ms-test-token"
REPO = "modelscope/Llama-2-13b-chat-ms"
PROMPT = torch.tensor([[1, 5, 17, 42, 99, 7]])


def _use_hub(monkeypatch, server: HubServer, home) -> None:
    """Point the client at ``server`` with a fresh cache and config dir (its config is read lazily, once)."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.endpoint)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "home"))
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    set_default_config(None)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = HubServer(HubState(str(tmp_path / "hub")), tokens={TOKEN}).start()
    _use_hub(monkeypatch, server, tmp_path)
    yield server
    server.stop()
    set_default_config(None)


def _checkpoint(directory, tiny_dir, seed: int, max_shard_size: str) -> str:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(Llama2Tokenizer.from_pretrained(tiny_dir).vocab_size))
    return save_checkpoint(model, str(directory), tokenizer=Llama2Tokenizer.from_pretrained(tiny_dir),
                           max_shard_size=max_shard_size)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tiny_dir):
    """v1.0.2: 3 shards plus notes/changes.txt; v1.0.3: new weights, one shard, no notes."""
    root = tmp_path_factory.mktemp("releases")
    first = _checkpoint(root / "v1.0.2", tiny_dir, seed=1, max_shard_size="200KB")
    os.makedirs(os.path.join(first, "notes"))
    with open(os.path.join(first, "notes", "changes.txt"), "w") as f:
        f.write("first release\n")
    second = _checkpoint(root / "v1.0.3", tiny_dir, seed=2, max_shard_size="1GB")
    return first, second


def _logits(directory: str) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(PROMPT).logits


def test_two_tagged_revisions_round_trip_byte_and_logit_identical(hub, releases):
    first, second = releases
    assert len([n for n in os.listdir(first) if n.endswith(".safetensors")]) == 3
    before = sorted(os.listdir(first))
    commit_1 = push_checkpoint(first, REPO, "v1.0.2", commit_message="first", progress=False)
    commit_2 = push_checkpoint(second, REPO, "v1.0.3", progress=False)

    assert sorted(os.listdir(first)) == before  # no upload tracker or anything else left behind
    repo = hub.state.repos[REPO]
    assert repo.tags["v1.0.2"][0] == commit_1 and repo.tags["v1.0.3"][0] == commit_2 != commit_1
    for tag, source in (("v1.0.2", first), ("v1.0.3", second)):
        fetched = fetch_checkpoint(REPO, tag)
        assert os.path.basename(fetched) == tag
        assert local_manifest(fetched) == local_manifest(source)  # same paths, sizes, sha256
        assert torch.equal(_logits(fetched), _logits(source))
    assert "notes/changes.txt" in local_manifest(fetch_checkpoint(REPO, "v1.0.2"))
    assert not torch.equal(_logits(first), _logits(second))


def test_model_from_pretrained_loads_a_tagged_revision(hub, releases):
    from modelscope import Model

    from modelscope_llama2 import Llama2ForChat  # importing the package registers it with ModelScope

    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    push_checkpoint(releases[1], REPO, "v1.0.3", progress=False)
    model = Model.from_pretrained(REPO, revision="v1.0.2")
    assert isinstance(model, Llama2ForChat)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, _logits(releases[0]))


def test_fetch_unknown_tag_or_repo_is_a_clear_error(hub, releases):
    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    with pytest.raises(RevisionNotFoundError, match="v9.9.9"):
        fetch_checkpoint(REPO, "v9.9.9")
    with pytest.raises(RevisionNotFoundError, match="nobody/nothing"):
        fetch_checkpoint("nobody/nothing", "v1.0.2")


def test_corrupted_blob_is_never_returned_and_a_refetch_recovers(hub, releases):
    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    shard = local_manifest(releases[0])["model-00002-of-00003.safetensors"]
    hub.state.corrupt_blob(shard.sha256)
    with pytest.raises(CheckpointIntegrityError, match="Hash mismatch|failed verification"):
        fetch_checkpoint(REPO, "v1.0.2")

    hub.state.corrupt_blob(shard.sha256)  # flipping the byte back repairs the server
    fetched = fetch_checkpoint(REPO, "v1.0.2")
    assert local_manifest(fetched) == local_manifest(releases[0])


def test_stale_files_in_the_snapshot_dir_are_removed(hub, releases):
    push_checkpoint(releases[1], REPO, "v1.0.3", progress=False)
    fetched = fetch_checkpoint(REPO, "v1.0.3")
    with open(os.path.join(fetched, "model-00001-of-00003.safetensors"), "wb") as f:
        f.write(b"left over from an earlier download")
    assert fetch_checkpoint(REPO, "v1.0.3") == fetched
    assert local_manifest(fetched) == local_manifest(releases[1])


def test_existing_tag_is_refused_before_uploading(hub, releases):
    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    commits = len(hub.state.repos[REPO].commits)
    with pytest.raises(TagExistsError, match="v1.0.2.*other files"):
        push_checkpoint(releases[1], REPO, "v1.0.2", progress=False)
    with pytest.raises(TagExistsError, match="exactly the files"):
        push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    assert len(hub.state.repos[REPO].commits) == commits
    assert local_manifest(fetch_checkpoint(REPO, "v1.0.2")) == local_manifest(releases[0])


def test_server_dying_mid_upload_creates_no_tag_and_a_rerun_completes(hub, releases):
    hub.die_after_puts = 1
    env = dict(os.environ, PYTHONPATH=REPO_ROOT,
               # Read at import by the client: give up fast instead of retrying for minutes.
               MODELSCOPE_API_MAX_RETRIES="1", MODELSCOPE_UPLOAD_BLOB_MAX_ATTEMPTS="1",
               MODELSCOPE_UPLOAD_COMMIT_MAX_ATTEMPTS="1", MODELSCOPE_UPLOAD_RECOVERY_ENABLED="false",
               MODELSCOPE_UPLOAD_FAILED_FILE_MAX_RETRY_ROUNDS="1")
    run = subprocess.run([sys.executable, "-m", "modelscope_llama2", "push", releases[0], REPO, "--tag", "v1.0.2",
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "no tag was created" in run.stderr
    assert hub.blob_puts == 1 and hub.state.repos[REPO].tags == {}

    hub.restart()
    puts_before = len(hub.requests_matching("PUT", "/lfs-upload/"))
    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    lfs_files = [p for p in local_manifest(releases[0]) if p.endswith((".safetensors", ".model"))]
    # The blob that landed before the crash is not sent again.
    assert len(hub.requests_matching("PUT", "/lfs-upload/")) - puts_before == len(lfs_files) - 1
    assert local_manifest(fetch_checkpoint(REPO, "v1.0.2")) == local_manifest(releases[0])


def test_token_comes_from_the_argument_and_is_required(hub, releases, monkeypatch):
    monkeypatch.delenv("MODELSCOPE_API_TOKEN")
    set_default_config(None)
    with pytest.raises(TransferError, match="401|token"):
        push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    push_checkpoint(releases[0], REPO, "v1.0.2", token=TOKEN, progress=False)
    assert "v1.0.2" in hub.state.repos[REPO].tags


def test_listing_without_sha256_is_verified_by_downloading(hub, releases):
    hub.advertise_sha256 = False
    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    downloaded = hub.requests_matching("GET", r"/repo\?.*FilePath=")
    assert len(downloaded) >= 2 * len(local_manifest(releases[0]))  # after the upload and after tagging


def test_download_command_prints_the_verified_dir(hub, releases, tmp_path, capsys):
    push_checkpoint(releases[0], REPO, "v1.0.2", progress=False)
    assert main(["download", REPO, "--revision", "v1.0.2", "--dir", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(str(tmp_path / "d"))
    assert local_manifest(printed) == local_manifest(releases[0])
    assert main(["download", REPO, "--revision", "v0"]) == 1
    assert "v0" in capsys.readouterr().err


@pytest.mark.parametrize("args, error, field", [
    (("{dir}", "no-slash", "v1"), ValueError, "repo_id"),
    (("{dir}", REPO, "master"), ValueError, "tag"),
    (("{dir}", REPO, "v 1"), ValueError, "tag"),
    (("{dir}/missing", REPO, "v1"), FileNotFoundError, "local_dir: no directory"),
    ((42, REPO, "v1"), TypeError, "local_dir"),
])
def test_push_rejects_bad_arguments_before_any_request(releases, args, error, field):
    args = tuple(a.format(dir=releases[0]) if isinstance(a, str) else a for a in args)
    with pytest.raises(error, match=field):
        push_checkpoint(*args)
