"""The default model in the Python API, the training-data terms shown once, and which published weights
get the DFA aligner by default. Offline: a hand-laid Hugging Face cache with tiny random weights."""

from __future__ import annotations

import io

import torch
from safetensors.torch import load_file

import kprpe
from kprpe.zoo import DEFAULT_WEIGHTS, default_aligner, show_terms_once, snapshot_origin, trained_aligner
from kprpe.zoo.catalog import DEFAULT_ALIGNER_WEIGHTS
from kprpe.zoo.defaults import terms_marker
from zoo.test_zoo import COMMIT, TINY, make_cached_repo, offline  # noqa: F401 - offline is a fixture


def test_python_api_loads_the_default_without_a_name(offline, capsys):  # noqa: F811 - the imported fixture
    make_cached_repo(offline)
    model = kprpe.load_official()
    for key, value in load_file(str(TINY)).items():
        assert torch.equal(model.state_dict()[key], value), key
    assert "was trained on WebFace4M" in capsys.readouterr().err
    from kprpe.face import FaceEmbedder

    embedder = FaceEmbedder.from_weights()
    assert embedder.fingerprint == kprpe.face.embedder.model_fingerprint(model)
    assert capsys.readouterr().err == ""  # the terms were shown once, by the first load


def test_terms_are_shown_once_per_repo_and_only_for_catalogued_ones(offline):  # noqa: F811 - the imported fixture
    out = io.StringIO()
    assert show_terms_once(DEFAULT_WEIGHTS, stream=out) is True
    assert terms_marker(DEFAULT_WEIGHTS).is_file()
    assert show_terms_once(DEFAULT_WEIGHTS, stream=out) is False
    assert len(out.getvalue().splitlines()) == 1 and "academic research only" in out.getvalue()
    assert show_terms_once("someone/own-model", stream=out) is False
    assert len(out.getvalue().splitlines()) == 1


def test_which_weights_were_trained_on_dfa_crops(offline):  # noqa: F811 - the imported fixture
    folder = make_cached_repo(offline)
    assert snapshot_origin(folder) == (DEFAULT_WEIGHTS, COMMIT)
    assert snapshot_origin(folder / "model.safetensors") == (DEFAULT_WEIGHTS, COMMIT)
    assert snapshot_origin(TINY) is None
    assert trained_aligner(DEFAULT_WEIGHTS) == DEFAULT_ALIGNER_WEIGHTS
    assert trained_aligner(f"{DEFAULT_WEIGHTS}@{COMMIT}") == DEFAULT_ALIGNER_WEIGHTS
    assert trained_aligner(folder) == DEFAULT_ALIGNER_WEIGHTS  # the snapshot of the published repo
    assert trained_aligner("minchul/cvlface_adaface_ir101_webface4m") is None  # not a KP-RPE model
    assert trained_aligner(TINY) is None
    assert default_aligner(TINY).name == "dlib" and default_aligner(TINY).notice is None
    fallback = default_aligner(DEFAULT_WEIGHTS)  # the DFA is not cached and the hub is offline
    assert fallback.name == "dlib" and "\n" not in fallback.notice
    assert f"kprpe fetch {DEFAULT_ALIGNER_WEIGHTS}" in fallback.notice
