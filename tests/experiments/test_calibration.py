"""The Abs-PE calibration (``kprpe experiment digits --calibrate-abs``): the regime a candidate trains under,
and that the committed calibration trainings stay reusable by ``--resume``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kprpe.cli import main
from kprpe.experiments import calibration
from kprpe.experiments.calibration import _slug, candidate_config
from kprpe.experiments.digits import _JOB_LIST_FIELDS, DigitsConfig, JobStore

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "results" / "mnist_calibration"


def _calibrated_configs(monkeypatch, argv: list[str]) -> list[DigitsConfig]:
    """The candidate configs the command would train, without training (calibrate_abs is stubbed)."""
    seen: list[DigitsConfig] = []

    def fake(base, candidates, out_dir, progress=True):
        seen.extend(candidate_config(base, cand) for cand in candidates)
        return []

    monkeypatch.setattr(calibration, "calibrate_abs", fake)
    base = ["experiment", "digits", "--data", "uci", "-q", "--json"]
    assert main([*base, *argv]) == 0
    return seen


def test_a_candidate_without_regime_trains_under_the_commands_regime(monkeypatch, tmp_path, capsys):
    out = ["-o", str(tmp_path)]
    configs = _calibrated_configs(monkeypatch, [*out, "--regimes", "wide", "--calibrate-abs", "depth=2"])
    assert [c.regimes for c in configs] == [("wide",)]
    # a candidate's own regime= still wins
    argv = [*out, "--regimes", "wide", "--calibrate-abs", "depth=2,regime=none"]
    assert [c.regimes for c in _calibrated_configs(monkeypatch, argv)] == [("none",)]
    # without --regimes: mild, as every committed calibration trained (not the comparison's none + mild)
    assert DigitsConfig().regimes == ("none", "mild")
    configs = _calibrated_configs(monkeypatch, [*out, "--calibrate-abs", "depth=2;width=8"])
    assert [c.regimes for c in configs] == [("mild",), ("mild",)]


def test_several_regimes_and_a_candidate_without_one_are_refused(monkeypatch, tmp_path, capsys):
    def must_not_train(*args, **kwargs):
        raise AssertionError("trained despite the refusal")

    monkeypatch.setattr(calibration, "calibrate_abs", must_not_train)
    argv = ["experiment", "digits", "--data", "uci", "-q", "-o", str(tmp_path), "--regimes", "none,mild"]
    assert main([*argv, "--calibrate-abs", "depth=2,regime=wide;width=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trains under one regime" in err and "regime=" in err and "--regimes" in err
    assert "'width=8'" in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="trains under one regime"):
        candidate_config(DigitsConfig(regimes=("none", "mild")), {"depth": 2})
    # every candidate names its regime: nothing to choose, so several --regimes are fine
    configs = _calibrated_configs(monkeypatch, [*argv[4:], "--calibrate-abs", "regime=wide;regime=none"])
    assert [c.regimes for c in configs] == [("wide",), ("none",)]


def _committed_base() -> DigitsConfig:
    d = json.loads((COMMITTED / "calibration.json").read_text(encoding="utf-8"))["base_config"]
    d.pop("model_heads")  # derived, not a field
    d["sweeps"] = {k: tuple(v) for k, v in d["sweeps"].items()}
    for key in (*_JOB_LIST_FIELDS, "keypoint_noise_levels", "keypoint_shift_levels"):
        d[key] = tuple(d[key])
    return DigitsConfig(**d)


def test_committed_calibration_trainings_are_still_reused_by_resume():
    """Every committed candidate's config still names its job files and matches their fingerprints (what
    JobStore.load checks before reusing a training), so --resume does not train them again."""
    base = _committed_base()
    rows = json.loads((COMMITTED / "calibration.json").read_text(encoding="utf-8"))["candidates"]
    assert len(rows) == 9
    for row in rows:
        cfg = candidate_config(base, row["candidate"])
        store = JobStore(COMMITTED / "calibration" / _slug(row["candidate"]) / "jobs", cfg)
        files = store.finished_files()
        assert files, store.folder
        for path in files:
            assert json.loads(path.read_text(encoding="utf-8"))["fingerprint"] == store.fingerprint, path
        jobs = cfg.jobs()
        assert set(store.load(jobs)) == set(jobs), store.folder  # seed 0 of every candidate is reused
