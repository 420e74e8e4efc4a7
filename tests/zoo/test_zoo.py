"""Model zoo by name: Hugging Face repo ids resolve from a hand-made offline cache, files are checked by
sha256, and every bad input is one clear error that writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kprpe
from kprpe.cli import main
from kprpe.zoo import CATALOG, KINDS, ZooError, find_entry, parse_repo_id, resolve
from kprpe.zoo.catalog import METRICS
from kprpe.zoo.hub import _explain
from reference_vectors import DATA

REPO = "minchul/cvlface_adaface_vit_base_kprpe_webface4m"
COMMIT = "6530d73fb0af4d1d8287f31d559780c648ebd22a"
TINY = DATA / "tiny_kprpe.safetensors"


def _official_state() -> dict[str, torch.Tensor]:
    """The tiny reference weights with the keys of a published repo's model.safetensors (``model.net.``)."""
    return {f"model.net.{k}": v for k, v in load_file(str(TINY)).items()}


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _put(repo_dir: Path, commit: str, relative: str, data: bytes, *, blob: str | None) -> Path:
    """One file of a cached snapshot: a link into blobs/ named ``blob`` (as the Hub does), or a plain file."""
    target = repo_dir / "snapshots" / commit / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if blob is None:
        target.write_bytes(data)
    else:
        blob_path = repo_dir / "blobs" / blob
        blob_path.parent.mkdir(parents=True, exist_ok=True)
        blob_path.write_bytes(data)
        target.symlink_to(os.path.relpath(blob_path, target.parent))
    return target


def make_cached_repo(
    hub: Path,
    repo: str = REPO,
    commit: str = COMMIT,
    *,
    weights: bytes | None = None,
    weights_blob: str | None = "sha256",
    layout: str = "safetensors",
) -> Path:
    """A repo in the Hugging Face cache layout (refs/main, snapshots/<commit>, blobs/), as the Hub writes
    it."""
    owner, name = repo.split("/")
    repo_dir = hub / f"models--{owner}--{name}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    config = json.dumps({"model_type": "cvlface"}).encode()
    _put(repo_dir, commit, "config.json", config, blob=_git_sha1(config))
    _put(repo_dir, commit, "pretrained_model/model.yaml", b"name: tiny\n", blob=None)
    _put(
        repo_dir, commit, "wrapper.py", b"raise SystemExit('never run')\n", blob=None
    )  # as another tool left it
    if layout == "safetensors":
        if weights is None:
            tmp = hub / "_w.safetensors"
            save_file(_official_state(), str(tmp))
            weights = tmp.read_bytes()
            tmp.unlink()
        blob = hashlib.sha256(weights).hexdigest() if weights_blob == "sha256" else weights_blob
        _put(repo_dir, commit, "model.safetensors", weights, blob=blob)
    else:  # research layout: pretrained_model/model.pt with ``net.`` keys, no safetensors
        tmp = hub / "_w.pt"
        torch.save({f"net.{k}": v for k, v in load_file(str(TINY)).items()}, tmp)
        data = tmp.read_bytes()
        tmp.unlink()
        _put(repo_dir, commit, "pretrained_model/model.pt", data, blob=hashlib.sha256(data).hexdigest())
    return repo_dir / "snapshots" / commit


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with HF_HUB_CACHE and KPRPE_CACHE in tmp_path, set after huggingface_hub was
    imported."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("KPRPE_CACHE", str(tmp_path / "kprpe"))
    return hub


def _tree(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))
    }


def _registry(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "kprpe" / "zoo" / "sha256.json").read_text())["files"]


# ---------------------------------------------------------------------- resolving
def test_repo_id_loads_from_offline_cache_and_records_sha256(offline, tmp_path):
    folder = make_cached_repo(offline)
    assert resolve(REPO) == folder
    model = kprpe.load_official(REPO)
    reference = load_file(str(TINY))
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    recorded = _registry(tmp_path)
    weights = folder / "model.safetensors"
    assert recorded[f"{REPO}@{COMMIT}/model.safetensors"] == {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "size": weights.stat().st_size,
    }
    assert f"{REPO}@{COMMIT}/config.json" in recorded
    assert not any(key.endswith(".py") for key in recorded)  # code is never part of what we read


def test_revision_pinned_by_commit(offline):
    folder = make_cached_repo(offline)
    assert resolve(f"{REPO}@{COMMIT}") == folder


def test_research_layout_uses_weights_only_pickle(offline):
    make_cached_repo(offline, layout="pt")
    model = kprpe.load_official(REPO)
    assert torch.equal(
        model.state_dict()["keypoint_linear.weight"], load_file(str(TINY))["keypoint_linear.weight"]
    )


def test_local_path_wins_and_is_returned_unchanged(tmp_path):
    assert resolve(TINY) == TINY
    assert resolve(str(DATA)) == DATA


# ---------------------------------------------------------------------- bad input
def test_repo_not_cached_offline_names_repo_and_fix(offline, tmp_path):
    make_cached_repo(offline)
    before = _tree(tmp_path)
    with pytest.raises(ZooError) as info:
        resolve("minchul/no_such_model")
    message = str(info.value)
    assert "minchul/no_such_model" in message and "HF_HUB_OFFLINE" in message
    assert "kprpe fetch minchul/no_such_model" in message and str(offline) in message
    assert _tree(tmp_path) == before


def test_truncated_blob_is_refused_on_first_use(offline, tmp_path):
    good = make_cached_repo(offline, repo="minchul/good")
    data = (good / "model.safetensors").read_bytes()
    make_cached_repo(offline, weights=data[: len(data) // 2], weights_blob=hashlib.sha256(data).hexdigest())
    with pytest.raises(ZooError, match="model.safetensors of .* is corrupt.*kprpe fetch"):
        resolve(REPO)
    with pytest.raises(kprpe.CheckpointError, match="corrupt"):
        kprpe.load_official(REPO)
    assert not (tmp_path / "kprpe" / "zoo" / "sha256.json").exists()  # a failed check records nothing
    assert resolve("minchul/good") == good


def test_changed_bytes_after_first_use_are_refused(offline, tmp_path):
    folder = make_cached_repo(offline, weights_blob=None)  # a plain file: only the registry can tell
    resolve(REPO)
    registry = (tmp_path / "kprpe" / "zoo" / "sha256.json").read_bytes()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ZooError) as info:
        resolve(REPO)
    assert str(weights) in str(info.value) and "changed since its first use" in str(info.value)
    assert (tmp_path / "kprpe" / "zoo" / "sha256.json").read_bytes() == registry


def test_truncated_safetensors_without_any_record_fails_to_parse(offline):
    folder = make_cached_repo(offline, weights_blob=None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(kprpe.CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        kprpe.load_official(REPO)


@pytest.mark.parametrize("source", ["nope.safetensors", "runs/model.safetensors", "./a/b", "a//b", "-x"])
def test_neither_file_folder_nor_repo_id(source, offline, tmp_path):
    before = _tree(tmp_path)
    with pytest.raises(ZooError, match=r"weights not found: .* Hugging Face repo id \(owner/name"):
        resolve(source)
    assert _tree(tmp_path) == before


def test_aligner_and_recognition_repos_are_not_interchangeable(offline):
    with pytest.raises(ZooError, match="cvlface_DFA_mobilenet is a published aligner model"):
        resolve("minchul/cvlface_DFA_mobilenet", kind="recognition")
    with pytest.raises(ZooError, match="is a published recognition model .* not an aligner model"):
        resolve(REPO, kind="aligner")
    with pytest.raises(ZooError, match="path or a Hugging Face repo id"):
        resolve(3)


def test_hub_failures_become_one_clear_message(tmp_path):
    """huggingface_hub's errors, matched by class name so any hub version maps the same way."""

    def hub_error(name: str) -> Exception:
        return type(name, (Exception,), {})("details")

    cache = tmp_path / "hub"
    cases = {
        "RepositoryNotFoundError": "neither a local file or folder nor an existing Hugging Face repo",
        "GatedRepoError": "is gated",
        "RevisionNotFoundError": "revision 'v9' of Hugging Face repo",
        "LocalEntryNotFoundError": "cannot be reached; on a connected machine run `kprpe fetch",
    }
    for name, expected in cases.items():
        explained = _explain(hub_error(name), "minchul/x", "v9", cache, offline=False)
        assert isinstance(explained, ZooError) and expected in str(explained), name
    surprise = KeyError("bug")
    assert (
        _explain(surprise, "minchul/x", None, cache, offline=False) is surprise
    )  # bugs keep their traceback


def test_online_fetch_never_asks_for_code(tmp_path, monkeypatch):
    """With a network, only weights and configs are requested (checked with huggingface_hub's own filter)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    published = [
        "README.md",
        "files.txt",
        "config.json",
        "wrapper.py",
        "model.safetensors",
        "pretrained_model/model.pt",
        "pretrained_model/model.yaml",
        "pretrained_model/aligner.pt",
        "models/__init__.py",
        "models/vit_kprpe/vit.py",
        "models/vit_kprpe/RPE/rpe_ops/setup.py",
    ]
    hub = tmp_path / "hub"
    snapshot = make_cached_repo(hub)
    requested: list[str] = []

    def fake_snapshot_download(
        *, repo_id, revision, cache_dir, local_files_only, allow_patterns, ignore_patterns
    ):
        assert (repo_id, cache_dir, local_files_only) == (REPO, str(hub), False)
        requested.extend(
            filter_repo_objects(published, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("KPRPE_CACHE", str(tmp_path / "kprpe"))
    assert resolve(REPO) == snapshot
    assert sorted(requested) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "pretrained_model/model.yaml",
    ]


# ---------------------------------------------------------------------- names and catalog
def test_parse_repo_id():
    assert parse_repo_id(REPO) == (REPO, None)
    assert parse_repo_id(f"{REPO}@main") == (REPO, "main")
    for bad in ("model.safetensors", "a/b/c", "/abs/path", "a--b/c", "a/b.pt", "", "a/"):
        assert parse_repo_id(bad) is None, bad


def test_catalog_is_well_formed():
    assert find_entry(REPO.upper()).training_data == "WebFace4M"
    assert find_entry("minchul/unknown") is None
    for entry in CATALOG:
        assert parse_repo_id(entry.repo_id) == (entry.repo_id, None)
        assert entry.kind in KINDS and entry.source and entry.licence
        assert set(entry.reported) <= set(METRICS)
        assert all(0 < v <= 100 for v in entry.reported.values())
        if entry.kind == "recognition":
            assert set(entry.reported) == set(METRICS), entry.repo_id


# ---------------------------------------------------------------------- command line
def test_models_zoo_lists_every_checkpoint(capsys):
    assert main(["models", "--zoo"]) == 0
    out = capsys.readouterr().out
    assert all(entry.repo_id in out for entry in CATALOG) and "WebFace260M" in out
    assert main(["models", "--zoo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["repo_id"] for r in rows] == [e.repo_id for e in CATALOG]
    assert rows[1]["reported"]["IJBC@0.01"] == 97.13 and "CVLface" in rows[1]["source"]


def test_fetch_prints_verified_files(offline, capsys, terminal):
    folder = make_cached_repo(offline)
    assert main(["fetch", REPO]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert str(folder) in out and f"{sha}  model.safetensors" in out and "wrapper.py" not in out


def test_cli_errors_are_one_line_and_write_nothing(offline, tmp_path, capsys):
    before = _tree(tmp_path)
    assert main(["fetch", "minchul/no_such_model"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "kprpe fetch: error: minchul/no_such_model is not in the Hugging Face cache" in err
    )
    assert _tree(tmp_path) == before
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a.png,b.png,1\n")
    before = _tree(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "pairs",
                "--weights",
                "minchul/no_such_model",
                "--pairs",
                str(pairs),
                "-o",
                str(out),
                "--no-cache",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_docs_table_matches_catalog():
    """docs/models.md shows the catalog's numbers (no second copy that can drift)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in docs.splitlines()
        if line.startswith("| `minchul/")
    }
    assert set(rows) == {entry.repo_id for entry in CATALOG}
    for entry in CATALOG:
        cells = [c.strip() for c in rows[entry.repo_id].strip().strip("|").split("|")]
        shown = [None if c == "—" else float(c) for c in cells[-len(METRICS) :]]
        assert shown == [entry.reported.get(m) for m in METRICS], entry.repo_id


def test_eval_on_a_zoo_checkpoint_prints_the_published_number_beside_ours(
    offline, tmp_path, capsys, monkeypatch, terminal
):
    import cv2
    import numpy as np

    from kprpe.eval import published as published_module
    from kprpe.eval.binfile import write_verification_bin

    make_cached_repo(offline)
    rng = np.random.default_rng(0)
    images = [
        cv2.imencode(".jpg", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
        for _ in range(20)
    ]
    write_verification_bin(tmp_path / "lfw.bin", images, [k % 2 == 0 for k in range(10)])

    def run_on_repo(out):
        args = ["eval", "verify", "--weights", REPO, "--bin", str(tmp_path / "lfw.bin"), "--keypoints"]
        assert main([*args, "template", "-o", str(out), "--no-cache", "--quiet"]) == 0
        return json.loads((out / "results.json").read_text()), capsys.readouterr().out

    # tiny weights cached under the repo id are not the published ViT-Base: no comparison, and why (issue 31)
    results, stdout = run_on_repo(tmp_path / "tiny_under_repo_id")
    assert "published" not in results["sets"]["lfw"] and "published 9" not in stdout
    assert f"these weights have {results['parameters']:,} parameters" in results["published_not_compared"]
    assert "published numbers: not compared" in stdout
    # weights of the published architecture's size are compared (the size is what is checked)
    monkeypatch.setattr(published_module, "published_parameters", lambda architecture: results["parameters"])
    out = tmp_path / "run"
    results, stdout = run_on_repo(out)
    (row,) = results["sets"]["lfw"]["published"]
    published = find_entry(REPO).reported["LFW"]
    ours = 100 * results["sets"]["lfw"]["kfold"]["accuracy_mean"]
    assert row["metric"] == "LFW" and row["published"] == published
    assert row["ours"] == pytest.approx(ours) and row["difference"] == pytest.approx(ours - published)
    assert f"published {published:.2f}" in stdout and "difference" in stdout and "CVLface README" in stdout
    assert "published (ours − published)" in (out / "summary.md").read_text()
    # a local path is not a catalogued checkpoint: no published column
    code = main(
        [
            "eval",
            "verify",
            "--weights",
            str(TINY),
            "--bin",
            str(tmp_path / "lfw.bin"),
            "--keypoints",
            "template",
            "-o",
            str(tmp_path / "run2"),
            "--no-cache",
            "--quiet",
        ]
    )
    assert (
        code == 0
        and "published" not in json.loads((tmp_path / "run2" / "results.json").read_text())["sets"]["lfw"]
    )
