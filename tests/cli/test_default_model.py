"""No ``--weights``: face commands and ``kprpe serve`` use the published KP-RPE ViT-Base through the zoo
(:func:`kprpe.cli.options.apply_model_defaults`), with the DFA as the landmark backend when it can be had and
dlib with a one-line notice when it cannot. Offline throughout: the Hugging Face cache is laid by hand, with
tiny random weights under the real repo ids (no trained weights exist here, none are faked)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kprpe.cli import main
from kprpe.zoo import DEFAULT_WEIGHTS
from kprpe.zoo.catalog import DEFAULT_ALIGNER_WEIGHTS
from reference_vectors import DATA
from zoo.test_zoo import _put, make_cached_repo, offline  # noqa: F401 - offline is a fixture

pytest.importorskip("dlib")
DFA_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cached_dfa(hub: Path) -> Path:
    """The reference (random) DFA weights as the published aligner repo lays them out:
    pretrained_model/model.pt with ``net.`` keys, in the Hugging Face cache layout."""
    owner, name = DEFAULT_ALIGNER_WEIGHTS.split("/")
    repo_dir = hub / f"models--{owner}--{name}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(DFA_COMMIT)
    tmp = hub / "_dfa.pt"
    torch.save(load_file(DATA / "dfa" / "dfa_weights.safetensors"), tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    _put(repo_dir, DFA_COMMIT, "pretrained_model/model.pt", data, blob=hashlib.sha256(data).hexdigest())
    return repo_dir / "snapshots" / DFA_COMMIT


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def test_verify_without_weights_uses_the_default_and_shows_its_terms_once(capsys, offline, photos):  # noqa: F811 - the imported fixture
    make_cached_repo(offline)  # tiny random weights under the default's repo id; no DFA cached
    code, payload, err = run(capsys, "verify", *photos, "-q")
    assert code == 0, err
    assert payload["aligner"] == "dlib" and payload["flip"] is True  # the offline fallback, as dlib runs
    lines = err.strip().splitlines()
    terms = [line for line in lines if "was trained on WebFace4M" in line]
    assert len(terms) == 1 and DEFAULT_WEIGHTS in terms[0] and "no commercial use" in terms[0]
    notice = [line for line in lines if "using dlib landmarks" in line]
    assert len(notice) == 1 and f"kprpe fetch {DEFAULT_ALIGNER_WEIGHTS}" in notice[0]
    # the same model as naming it: the default is the published repo, not something else
    code, named, _ = run(capsys, "verify", *photos, "--weights", DEFAULT_WEIGHTS, "--aligner", "dlib", "-q")
    assert code == 0 and named["similarity"] == payload["similarity"]
    code, again, err = run(capsys, "verify", *photos, "-q")
    assert code == 0 and again["similarity"] == payload["similarity"]
    assert "was trained on" not in err  # shown once per machine (the marker is in kprpe's cache)
    assert "using dlib landmarks" in err  # the fallback is said every time: it changes the results


def test_default_model_uses_the_dfa_when_it_is_cached(capsys, offline, photos):  # noqa: F811 - the imported fixture
    make_cached_repo(offline)
    make_cached_dfa(offline)
    code, payload, err = run(capsys, "verify", *photos, "-q")
    assert code == 0, err
    assert payload["aligner"] == "dfa" and payload["flip"] is False  # the official pipeline: no flip TTA
    assert "using dlib" not in err
    # an explicit --aligner is kept
    code, payload, _ = run(capsys, "verify", *photos, "--aligner", "dlib", "-q")
    assert code == 0 and payload["aligner"] == "dlib"


def test_own_weights_keep_dlib_and_no_notice(capsys, offline, photos):  # noqa: F811 - the imported fixture
    code, payload, err = run(capsys, "verify", *photos, "--weights", DATA / "tiny_kprpe.safetensors", "-q")
    assert code == 0, err
    assert payload["aligner"] == "dlib" and err.strip() == ""


def test_offline_and_not_cached_is_one_line_naming_kprpe_fetch(capsys, offline, photos):  # noqa: F811
    pairs = offline.parent / "pairs.csv"
    pairs.write_text("a,b,label\n")
    commands = (
        ["verify", *photos],
        ["embed", photos[0], "-o", offline.parent / "out.npz"],
        ["serve"],
        ["eval", "pairs", "--pairs", pairs, "-o", offline.parent / "runs"],
    )
    for argv in commands:
        code, payload, err = run(capsys, *argv, *(["-q"] if argv[0] in ("verify", "embed") else []))
        assert code == 2 and payload is None, argv
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"kprpe {argv[0]}") and ": error: " in err
        assert f"kprpe fetch {DEFAULT_WEIGHTS}" in err and "HF_HUB_OFFLINE is set" in err
    assert not (offline.parent / "out.npz").exists()


def test_onnx_engine_needs_weights(capsys, offline, photos):  # noqa: F811 - the imported fixture
    code, _, err = run(capsys, "verify", *photos, "--engine", "onnx", "-q")
    assert code == 2 and "--engine onnx needs --weights" in err and len(err.strip().splitlines()) == 1


def test_serve_without_weights_builds_the_default_service(capsys, offline):  # noqa: F811 - the imported fixture
    pytest.importorskip("fastapi")
    from kprpe.cli import build_parser
    from kprpe.cli.serve import build_service

    make_cached_repo(offline)
    make_cached_dfa(offline)
    service = build_service(build_parser().parse_args(["serve"]))
    assert service.aligner == "dfa" and service.embedder.flip is False
    import kprpe

    reference = kprpe.load_official(DEFAULT_WEIGHTS)
    assert service.embedder.fingerprint == kprpe.face.embedder.model_fingerprint(reference)
    assert "was trained on WebFace4M" in capsys.readouterr().err
