"""A tampered model cache is refused, never loaded (issue 32 items 9, 13 and 14): every file the loader can
read is hashed, revisions and refs cannot lead outside the cache, odd names are one ZooError."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import kprpe
from kprpe.zoo import ZooError, parse_repo_id, resolve
from kprpe.zoo.hub import snapshot
from zoo.test_zoo import COMMIT, REPO, TINY, make_cached_repo, offline  # noqa: F401 - offline is a fixture


def test_overlong_name_is_a_zoo_error():
    with pytest.raises(ZooError, match="cannot be a path here"):
        resolve("x" * 300)


@pytest.mark.parametrize("revision", ["../../../evil_ref", "a/../../b", ".hidden", "main/", "a//b", "x/.."])
def test_revision_that_would_leave_the_cache_is_refused(offline, revision):  # noqa: F811
    make_cached_repo(offline)
    assert parse_repo_id(f"{REPO}@{revision}") is None
    with pytest.raises(ZooError, match="is not a branch, tag or commit name"):
        resolve(f"{REPO}@{revision}")
    with pytest.raises(ZooError, match="is not a branch, tag or commit name"):
        snapshot(REPO, revision=revision)


def test_ordinary_revisions_still_parse():
    for revision in ("main", "v1.0", "refs/pr/1", COMMIT):
        assert parse_repo_id(f"{REPO}@{revision}") == (REPO, revision)


def test_ref_naming_a_folder_outside_the_cache_is_refused(offline, tmp_path):  # noqa: F811
    """refs/<name> holding a relative path: huggingface_hub would hand out that folder as the snapshot."""
    folder = make_cached_repo(offline)
    repo_dir = folder.parent.parent
    outside = tmp_path / "outside" / "snapshot"
    shutil.copytree(folder, outside)  # real files, self-consistent: nothing but the location is wrong
    (repo_dir / "refs" / "evil").write_text(os.path.relpath(outside, repo_dir / "snapshots"))
    with pytest.raises(ZooError, match="points outside its snapshots folder"):
        resolve(f"{REPO}@evil")
    with pytest.raises(kprpe.CheckpointError, match="points outside its snapshots folder"):
        kprpe.load_official(f"{REPO}@evil")
    assert resolve(REPO) == folder  # the honest ref still works


def _foreign_weights(path) -> None:
    """Weights of the same shapes, other values: what an attacker would swap in."""
    state = {f"net.{k}": torch.full_like(v, 0.5) for k, v in load_file(str(TINY)).items()}
    torch.save(state, path)


def test_weights_in_a_linked_folder_are_refused(offline, tmp_path):  # noqa: F811
    """pretrained_model/ linked outside the cache beside a decoy .safetensors: rglob never entered the link,
    so the weights the loader read were never hashed."""
    folder = make_cached_repo(offline, layout="pt")
    decoy = b"decoy"
    (folder / "decoy.safetensors").write_bytes(decoy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _foreign_weights(elsewhere / "model.pt")
    (elsewhere / "model.yaml").write_bytes((folder / "pretrained_model" / "model.yaml").read_bytes())
    shutil.rmtree(folder / "pretrained_model")
    (folder / "pretrained_model").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ZooError, match="pretrained_model is a link to a folder"):
        resolve(REPO)
    with pytest.raises(kprpe.CheckpointError, match="link to a folder"):
        kprpe.load_official(REPO)


def test_file_linking_outside_the_repo_folder_is_refused(offline, tmp_path):  # noqa: F811
    folder = make_cached_repo(offline)
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / "model.safetensors", target)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(target)
    with pytest.raises(ZooError, match="links outside its repo's cache folder"):
        resolve(REPO)


def test_blob_links_of_the_hub_layout_still_verify(offline, tmp_path):  # noqa: F811
    """The Hub's own links (snapshots/<commit>/x -> ../../blobs/<hash>) are followed and hashed."""
    folder = make_cached_repo(offline)
    assert (folder / "model.safetensors").is_symlink()
    assert resolve(REPO) == folder
    blob = (folder / "model.safetensors").resolve()
    assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert resolve(f"{REPO}@{COMMIT}") == folder
