"""One place for a checkpoint's calibration file (kprpe.thresholds.calibration_path): a published checkpoint
named by repo id (verify, search query, eval --calibrate) and by its snapshot folder in the Hugging Face cache
(serve, after resolving it) find the same file, in kprpe's cache, never a path made of the repo id."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from kprpe.cli import build_parser, main
from kprpe.thresholds import CalibrationError, calibration_path, write_calibration
from zoo.test_zoo import COMMIT, REPO, TINY, make_cached_repo, offline  # noqa: F401 - offline is a fixture


def test_repo_id_and_its_snapshot_name_the_same_calibration_file(offline, tmp_path, monkeypatch):  # noqa: F811 - the imported fixture
    monkeypatch.chdir(tmp_path)
    folder = make_cached_repo(offline)
    cache = tmp_path / "kprpe" / "thresholds" / f"models--{REPO.replace('/', '--')}"
    expected = cache / f"{COMMIT}.threshold.json"
    assert calibration_path(REPO) == expected
    assert calibration_path(f"{REPO}@{COMMIT}") == expected
    assert calibration_path(folder) == expected
    assert calibration_path(folder / "model.safetensors") == expected
    # local weights keep their file beside them, a checkpoint folder inside it
    assert calibration_path(TINY) == TINY.with_name(TINY.name + ".threshold.json")
    assert calibration_path(tmp_path) == tmp_path / "threshold.json"


def test_a_repo_id_not_in_the_cache_has_no_calibration_yet(offline):  # noqa: F811 - the imported fixture
    with pytest.raises(CalibrationError, match="not in the Hugging Face cache"):
        calibration_path("someone/not-cached")


def test_verify_and_serve_use_the_calibration_of_a_published_checkpoint(
    offline, tmp_path, monkeypatch, capsys  # noqa: F811 - the imported fixture
):
    pytest.importorskip("dlib")
    pytest.importorskip("fastapi")
    from skimage import data

    import kprpe
    from kprpe.cli.serve import build_service
    from kprpe.face.embedder import model_fingerprint

    monkeypatch.chdir(tmp_path)  # the old code wrote and read <cwd>/minchul/...threshold.json
    make_cached_repo(offline)
    fingerprint = model_fingerprint(kprpe.load_official(REPO))
    calibration = {"threshold": 0.4321, "far_target": 0.001, "far": 0.001, "tar": 0.9}
    written = write_calibration(
        REPO, calibration, model_fingerprint=fingerprint, dataset="pairs", protocol="test", flip=True
    )
    photo = tmp_path / "a.png"
    Image.fromarray(data.astronaut()).save(photo)
    code = main(["verify", str(photo), str(photo), "--weights", REPO, "--aligner", "dlib", "-q"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["threshold"] == pytest.approx(0.4321)
    assert str(written) in payload["threshold_source"]
    service = build_service(build_parser().parse_args(["serve", "--weights", REPO, "--aligner", "dlib"]))
    assert service.threshold == pytest.approx(0.4321) and str(written) in service.threshold_source
    assert written.is_relative_to(tmp_path / "kprpe")  # kprpe's cache, not the HF cache or the cwd
