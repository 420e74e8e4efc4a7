"""A micro end-to-end run of the digits experiment: a few steps, two models, tiny data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kprpe.cli import main
from kprpe.experiments.digits import DigitsConfig, build_protocol, run_digits, run_job
from kprpe.experiments.digits_models import MODEL_SPECS, build_classifier, resolve_models
from kprpe.experiments.report import aggregate, markdown_table, write_outputs

MICRO = dict(
    epochs=1,
    seeds=(0, 1),
    models=("abs", "kprpe"),
    mean_head_models=("kprpe",),
    mean_head_regimes=("none", "mild"),
    regimes=("none", "mild"),
    affnist_draws=1,
    train_limit=64,
    test_limit=20,
    test_draws=1,
    width=16,
    depth=1,
    heads=2,
    workers=1,
    sweeps={"rotation": (30.0,), "translation": (4.0,)},
)


# MICRO's sizes as command-line options (one epoch of a one-block, 16-wide model on 40 UCI digits; the
# command's default data set is MNIST where it is installed).
MICRO_CLI = [
    "--data",
    "uci",
    "--epochs",
    "1",
    "--train-limit",
    "40",
    "--test-limit",
    "10",
    "--width",
    "16",
    "--depth",
    "1",
    "--workers",
    "1",
    "-q",
]


def test_micro_run_writes_table_json_and_plots(tmp_path):
    cfg = DigitsConfig(**MICRO)
    results = run_digits(cfg, progress=False)
    assert len(results["jobs"]) == 2 * 2 * 2 + 1 * 2 * 2
    paths = write_outputs(results, tmp_path, command="kprpe experiment digits (micro)")
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "kprpe experiment digits (micro)"
    assert set(data["summary"]) == {"flatten", "mean"}
    cell = data["summary"]["flatten"]["mild"]["kprpe"]
    assert cell["affnist"]["n"] == 2 and len(cell["affnist"]["values"]) == 2
    assert 0.0 <= cell["clean"]["mean"] <= 100.0
    kp_sets = {f"kpnoise@{s:g}" for s in (1, 2, 4, 8)} | {"kpshift@4", "kpshift@8"}
    assert set(data["jobs"][0]["accuracy"]) == {"clean", "affnist", "rotation@30", "translation@4"} | kp_sets
    assert (
        len(data["jobs"][0]["curve"]["train_loss"]) == 1 and data["jobs"][0]["stop_reason"] == "fixed epochs"
    )
    assert data["protocol"]["test_digits"] == 20 and data["protocol"]["train_digits"] == 64
    table = paths["table"].read_text()
    assert "KP-RPE (`kprpe`)" in table and "Abs-PE (`abs`)" in table and "±" in table
    assert "Head `mean`" in table and "98.1%" in table  # the paper's numbers sit next to ours
    assert "noise σ=8 px" in table  # the bad-keypoints block, for the models that read keypoints
    for key in (
        "plot_flatten_none",
        "plot_flatten_mild",
        "plot_mean_none",
        "plot_mean_mild",
        "curves_mean_mild",
        "kpnoise_flatten_none",
    ):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_training_is_deterministic_per_seed():
    cfg = DigitsConfig(**dict(MICRO, regimes=("mild",)))
    proto = build_protocol(cfg)
    a = run_job(cfg, proto, "kprpe", "mild", "flatten", 0)
    b = run_job(cfg, proto, "kprpe", "mild", "flatten", 0)
    assert a["accuracy"] == b["accuracy"] and a["final_train_loss"] == b["final_train_loss"]


@pytest.mark.slow
def test_training_is_identical_beside_a_busy_loop():
    """Same config and seed, same numbers whatever the load: one run alone, one while another process keeps a
    core busy. Training uses one thread, a fixed data stream and the gather (never a timed choice), so load
    may change the speed only."""
    cfg = DigitsConfig(**dict(MICRO, regimes=("mild",), test_limit=10, sweeps={"rotation": (30.0,)}))
    proto = build_protocol(cfg)
    quiet = run_job(cfg, proto, "kprpe_noabs", "mild", "mean", 0)
    # bounded: the loop ends itself after 120 s even if this test dies before stopping it
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 120\nwhile time.time() < end: pass"]
    )
    try:
        loaded = run_job(cfg, proto, "kprpe_noabs", "mild", "mean", 0)
    finally:
        busy.kill()
        busy.wait()
    for key in ("accuracy", "curve", "final_train_loss"):
        assert loaded[key] == quiet[key], key


def test_experiments_never_time_the_bias_paths(monkeypatch):
    """The BatchNorm recalibration and the tests run without gradients, where ``auto`` would time the paths:
    the experiment pins it, so its numbers cannot follow the machine's load."""
    from kprpe.nn.keypoint_rpe import KeypointRPE

    def timed(self, keypoints):
        raise AssertionError("the experiment timed the bias paths")

    monkeypatch.setattr(KeypointRPE, "_time_paths", timed)
    cfg = DigitsConfig(**dict(MICRO, regimes=("mild",), test_limit=10, sweeps={"rotation": (30.0,)}))
    assert run_job(cfg, build_protocol(cfg), "kprpe_noabs", "mild", "mean", 0)["accuracy"]


def test_every_model_builds_from_the_core_and_runs():
    import torch

    for spec in resolve_models(None):
        model = build_classifier(
            spec, canvas=32, patch=4, width=16, depth=2, heads=2, mlp_ratio=2.0, head="flatten"
        )
        x = torch.zeros(3, 2 if spec.marks else 1, 32, 32)
        out = model(x, torch.rand(3, 5, 2))
        assert out.shape == (3, 10), spec.name
        cfg = model.backbone.config
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (16, 2, 2)
    assert MODEL_SPECS["qpos_rpe"].overrides["kp_input"] == "query_position"
    assert MODEL_SPECS["kprpe_mlp"].overrides["kp_hidden"] > 0


def test_bad_options_are_clear_errors(capsys):
    with pytest.raises(ValueError, match="unknown model"):
        DigitsConfig(models=("abs", "vit9")).validate()
    with pytest.raises(ValueError, match="regimes"):
        DigitsConfig(regimes=("heavy",)).validate()
    assert main(["experiment", "digits", "--data", "uci", "--models", "nope", "-q"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["experiment", "digits", "--data", "uci", "--canvas", "30"]) == 2
    assert "multiple of patch" in capsys.readouterr().err


def test_cli_micro_run(tmp_path, capsys, terminal):
    code = main(
        [
            "experiment",
            "digits",
            "--output",
            str(tmp_path),
            "--models",
            "abs,rpe",
            "--mean-head-models",
            "none",
            "--regimes",
            "none",
            "--seeds",
            "1",
            *MICRO_CLI,
            "--no-plots",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| RPE (`rpe`) |" in out
    assert (tmp_path / "digits_table.md").exists() and (tmp_path / "digits_results.json").exists()
    assert not list(tmp_path.glob("*.png"))
    recorded = json.loads((tmp_path / "digits_results.json").read_text())
    assert recorded["command"].startswith("kprpe experiment digits")
    assert [j["model"] for j in recorded["jobs"]] == ["abs", "rpe"]


def test_markdown_table_marks_best_per_column():
    cfg = DigitsConfig(**MICRO).to_dict()
    jobs = []
    for model, acc in (("abs", 50.0), ("kprpe", 70.0)):
        for seed in (0, 1):
            jobs.append(
                dict(
                    model=model,
                    regime="none",
                    head="flatten",
                    seed=seed,
                    train_seconds=1.0,
                    accuracy={
                        "clean": acc,
                        "affnist": acc - 10 + seed,
                        "rotation@30": acc,
                        "translation@4": acc,
                    },
                )
            )
    results = dict(config=dict(cfg, regimes=["none"], model_heads=["flatten"]), jobs=jobs)
    table = markdown_table(results, aggregate(results))
    kp_row = next(line for line in table.splitlines() if "`kprpe`" in line)
    assert "**60.5 ± 0.7**" in kp_row and "**70.0 ± 0.0**" in kp_row


def test_rerender_from_results(tmp_path, capsys):
    first = tmp_path / "first"
    assert (
        main(
            [
                "experiment",
                "digits",
                "--output",
                str(first),
                "--models",
                "abs",
                "--mean-head-models",
                "none",
                "--regimes",
                "none",
                "--seeds",
                "2",
                *MICRO_CLI,
            ]
        )
        == 0
    )
    again = tmp_path / "again"
    assert (
        main(
            [
                "experiment",
                "digits",
                "--from-results",
                str(first / "digits_results.json"),
                "--output",
                str(again),
            ]
        )
        == 0
    )
    assert (again / "digits_table.md").read_text() == (first / "digits_table.md").read_text()
    assert (again / "digits_flatten_none.png").exists()
    capsys.readouterr()
    assert main(["experiment", "digits", "--from-results", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["experiment", "digits", "--from-results", str(tmp_path / "bad.json")]) == 2
    assert "not a digits results file" in capsys.readouterr().err


def test_convergence_rule_stops_keeps_best_weights_and_reports(tmp_path):
    cfg = DigitsConfig(
        **dict(
            MICRO,
            regimes=("mild",),
            mean_head_models=(),
            converge=True,
            max_epochs=4,
            patience=1,
            lr_drops=1,
            seeds=(0,),
        )
    )
    proto = build_protocol(cfg)
    assert len(proto.val_idx) > 0 and not set(proto.val_idx) & set(proto.train_idx)
    assert not set(proto.val_idx) & set(proto.test_idx)  # validation comes from the training split only
    results = run_digits(cfg, progress=False)
    for job in results["jobs"]:
        curve = job["curve"]
        assert job["epochs_used"] == len(curve["val_accuracy"]) <= 4
        assert job["stop_reason"] in ("plateau", "max_epochs")
        # the tested epoch is the best of the last learning-rate phase
        last_phase = [e for e, lr in enumerate(curve["lr"], 1) if lr <= curve["lr"][-1] * (1 + 1e-9)][0]
        assert job["best_epoch"] >= last_phase
        assert curve["val_accuracy"][job["best_epoch"] - 1] == max(curve["val_accuracy"][last_phase - 1 :])
        assert job["best_val_accuracy"] == pytest.approx(
            curve["val_accuracy"][job["best_epoch"] - 1], abs=1e-3
        )
    paths = write_outputs(results, tmp_path, command="micro converge")
    table = paths["table"].read_text()
    assert "Training length: train until the clean accuracy on a held-out" in table
    assert "epochs used (best)" in table
    assert paths["curves_flatten_mild"].read_bytes()[:4] == b"\x89PNG"


def _replay(rule, accuracies, losses=None):
    actions = []
    for i, acc in enumerate(accuracies):
        new_best, action = rule.update(acc, 1.0 if losses is None else losses[i])
        actions.append(action)
        if action == "stop":
            break
    return actions


def test_convergence_rule_is_not_ended_by_one_lucky_epoch():
    from kprpe.experiments.digits import ConvergenceRule

    # a real validation curve of the first full run (KP-RPE, flatten head, mild augmentation, seed 1): a
    # lucky 95.3 at epoch 5, then 10 noisy epochs; the plain best-so-far rule dropped the learning rate at
    # epoch 15 and stopped at 25 with the epoch-5 weights (training accuracy 78%)
    noisy = [64.5, 81.1, 86.4, 92.3, 95.3, 83.4, 94.1, 87.6, 91.7, 93.5, 94.7, 88.2, 92.3, 91.7, 94.1, 91.1]
    unsmoothed = ConvergenceRule(patience=10, lr_drops=1, smooth_epochs=1)
    assert _replay(unsmoothed, noisy)[14] == "drop"
    smoothed = ConvergenceRule(patience=10, lr_drops=1, smooth_epochs=5)
    assert "drop" not in _replay(smoothed, noisy)  # the 5-epoch mean keeps rising: still learning

    # a real plateau is still found, and the next one stops
    rule = ConvergenceRule(patience=3, lr_drops=1, smooth_epochs=2)
    actions = _replay(rule, [50, 70, 90, 90, 90, 90, 90, 95, 95, 95, 95, 95, 95, 95, 95])
    assert actions.index("drop") == 6 and actions[-1] == "stop"
    assert rule.drops_done == 1 and rule.best_epoch == 8  # the best epoch of the last phase


def test_convergence_rule_tests_the_best_epoch_of_the_last_phase_ties_by_loss():
    from kprpe.experiments.digits import ConvergenceRule

    rule = ConvergenceRule(patience=2, lr_drops=1, smooth_epochs=1)
    # phase 1: a 99 at epoch 2 that the low-learning-rate phase never reaches again
    accs = [80, 99, 90, 90, 96, 97, 97, 97, 97]
    losses = [1.0, 0.5, 0.6, 0.6, 0.4, 0.30, 0.20, 0.25, 0.3]
    actions = _replay(rule, accs, losses)
    assert actions[3] == "drop" and actions[-1] == "stop"
    assert rule.best_epoch == 7 and rule.best_accuracy == 97  # last phase; 97 tie broken by the lower loss


def test_keypoint_noise_training_changes_only_the_keypoint_stream():
    cfg = DigitsConfig(**dict(MICRO, regimes=("mild",), seeds=(0,), epochs=3, train_limit=128, lr=1e-2))
    proto = build_protocol(cfg)
    plain = run_job(cfg, proto, "kprpe_noabs", "mild", "flatten", 0)
    noisy = run_job(cfg, proto, "kprpe_noabs_kpnoise", "mild", "flatten", 0)
    # same images and order; only the keypoints the model sees differ, so what f learns differs
    assert plain["curve"]["train_loss"][1:] != noisy["curve"]["train_loss"][1:]
    assert MODEL_SPECS["kprpe_noabs_kpnoise"].train_keypoint_noise > 0


def test_keypoint_noise_test_sets_move_keypoints_not_images():
    import numpy as np

    cfg = DigitsConfig(**MICRO)
    sets = {ts.name: ts for ts in build_protocol(cfg).test_sets}
    clean = sets["clean"]
    for name in ("kpnoise@1", "kpnoise@8", "kpshift@4", "kpshift@8"):
        assert np.array_equal(sets[name].images, clean.images)
    moved = np.linalg.norm(sets["kpshift@8"].keypoints - clean.keypoints, axis=-1)
    assert np.allclose(np.sort(moved, axis=1)[:, -1], 8.0, atol=1e-3) and np.allclose(
        np.sort(moved, axis=1)[:, :-1], 0
    )
    spread = [np.std(sets[f"kpnoise@{s}"].keypoints - clean.keypoints) for s in (1, 8)]
    assert 0.5 < spread[0] < 1.5 and 6 < spread[1] < 10


def test_learned_keypoints_model_is_listed_and_trains(capsys, terminal):
    assert main(["experiment", "digits", "--list-models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("kprpe_learned_noabs"))
    assert "[learned-keypoints model]" in line
    cfg = DigitsConfig(**dict(MICRO, regimes=("none",), seeds=(0,)))
    job = run_job(cfg, build_protocol(cfg), "kprpe_learned_noabs", "none", "mean", 0)
    assert job["accuracy"]["kpnoise@8"] == job["accuracy"]["clean"]  # it never reads the given keypoints


def test_quick_path_prints_that_it_is_a_short_run(tmp_path, capsys, terminal):
    from kprpe.experiments.digits import quick_config

    cfg = quick_config()
    assert not cfg.converge and cfg.epochs == 30 and cfg.lr > DigitsConfig().lr
    assert {j[2] for j in cfg.jobs()} == {"mean"}
    assert sorted(j[0] for j in cfg.jobs()) == ["abs", "kprpe_noabs", "rpe_noabs"]
    code = main(
        [
            "experiment",
            "digits",
            "--quick",
            "--data",
            "uci",
            "-o",
            str(tmp_path),
            "--epochs",
            "1",
            "--train-limit",
            "40",
            "--test-limit",
            "10",
            "--width",
            "16",
            "--depth",
            "1",
            "--workers",
            "1",
            "-q",
            "--no-plots",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "SHORT RUN (--quick)" in out and "1 epochs each, cosine schedule from learning rate 0.003" in out
    assert "Reference:" in out or "No reference results found" in out


def _resumable_run(out, *extra: str) -> int:
    args = ["experiment", "digits", "-o", str(out), "--models", "abs,rpe", "--mean-head-models", "none"]
    return main([*args, "--regimes", "none", "--seeds", "1", *MICRO_CLI, "--no-plots", *extra])


def test_interrupted_run_keeps_finished_trainings_and_resumes(tmp_path, capsys, monkeypatch):
    import kprpe.experiments.digits as digits

    real_run_job = digits.run_job
    calls = []

    def dies_on_second_job(cfg, proto, model, *rest, **kw):
        calls.append(model)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while training the second model
        return real_run_job(cfg, proto, model, *rest, **kw)

    monkeypatch.setattr(digits, "run_job", dies_on_second_job)
    assert _resumable_run(tmp_path) == 130  # the CLI reports the interrupt
    saved = sorted(p.name for p in (tmp_path / "jobs").iterdir())
    assert saved == [f"{calls[0]}__none__flatten__seed0.json"]

    # rerunning into the same folder without --resume is refused, naming the folder and the option
    assert _resumable_run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "1 finished training run(s)" in err and "--resume" in err and str(tmp_path / "jobs") in err

    # --resume trains only the missing model; the finished one is read back unchanged
    calls.clear()
    monkeypatch.setattr(
        digits,
        "run_job",
        lambda cfg, proto, model, *rest, **kw: (
            calls.append(model),
            real_run_job(cfg, proto, model, *rest, **kw),
        )[1],
    )
    first = json.loads((tmp_path / "jobs" / saved[0]).read_text())["result"]
    assert _resumable_run(tmp_path, "--resume") == 0
    assert len(calls) == 1 and calls[0] != first["model"]
    recorded = json.loads((tmp_path / "digits_results.json").read_text())
    assert recorded["resumed_jobs"] == 1 and sorted(j["model"] for j in recorded["jobs"]) == ["abs", "rpe"]
    assert [j for j in recorded["jobs"] if j["model"] == first["model"]] == [first]
    assert "1 of 2 trainings reused" in (tmp_path / "digits_table.md").read_text()


def test_resume_refuses_trainings_made_with_other_settings(tmp_path, capsys):
    assert _resumable_run(tmp_path) == 0
    capsys.readouterr()
    # a different model width changes every result: the saved trainings must not be mixed in
    assert _resumable_run(tmp_path, "--resume", "--width", "8") == 2
    err = capsys.readouterr().err
    assert "made with other settings (differ in: width)" in err
    # scheduling options (workers, more seeds) do not invalidate finished trainings
    assert _resumable_run(tmp_path, "--resume", "--seeds", "2") == 0
    assert json.loads((tmp_path / "digits_results.json").read_text())["resumed_jobs"] == 2
    # --restart discards them and trains everything again (make demo uses it)
    assert _resumable_run(tmp_path, "--restart") == 0
    assert json.loads((tmp_path / "digits_results.json").read_text())["resumed_jobs"] == 0
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 2
    assert _resumable_run(tmp_path, "--restart", "--resume") == 2


def test_quick_notice_ranks_only_the_blocks_the_quick_run_trained(tmp_path, monkeypatch):
    import kprpe.experiments.report as report

    full = run_digits(DigitsConfig(**dict(MICRO, seeds=(0,), regimes=("mild",))), progress=False)
    reference = tmp_path / "digits_results.json"
    reference.write_text(json.dumps(full))
    monkeypatch.setattr(report, "_find_reference", lambda data="uci": reference)
    quick = dict(full, jobs=[j for j in full["jobs"] if j["head"] == "mean"])
    notice = report.quick_run_notice(quick, wall_seconds=1.0)
    assert "Reference ranking on the AffNIST-style mix (head mean, mild aug.)" in notice
    assert "(head flatten" not in notice
    assert "1 epochs each, cosine schedule" in notice and "Epochs used (best)" not in notice
    plateau = dict(quick, config=dict(quick["config"], converge=True, max_epochs=7, patience=2))
    notice = report.quick_run_notice(plateau, wall_seconds=1.0)
    assert "the convergence rule capped at 7 epochs (patience 2)" in notice and "Epochs used (best)" in notice


def _quick_results(**accuracies) -> dict:
    """The committed quick run with some accuracies replaced: model -> (clean, AffNIST-style)."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[2] / "docs" / "results" / "quick" / "digits_results.json"
    results = json.loads(committed.read_text())
    results.pop("summary", None)
    for job in results["jobs"]:
        if job["model"] in accuracies:
            clean, mix = accuracies[job["model"]]
            job["accuracy"] = dict(job["accuracy"], clean=clean, affnist=mix)
    return results


def test_quick_notice_flags_only_what_lies_outside_the_measured_spread(tmp_path, monkeypatch):
    import kprpe.experiments.report as report

    spread = tmp_path / "quick_spread.json"
    runs = [  # two CPU kinds, seed 0 (the committed AVX-512 run and the AVX2 run of issue 23)
        dict(
            cpu="avx512",
            seed=0,
            accuracy=dict(
                abs=dict(clean=94.9, affnist=63.7),
                kprpe_noabs=dict(clean=93.2, affnist=84.9),
                rpe_noabs=dict(clean=85.6, affnist=79.7),
            ),
        ),
        dict(
            cpu="avx2",
            seed=0,
            accuracy=dict(
                abs=dict(clean=95.2, affnist=66.3),
                kprpe_noabs=dict(clean=89.6, affnist=79.6),
                rpe_noabs=dict(clean=87.8, affnist=77.5),
            ),
        ),
    ]
    spread.write_text(json.dumps(dict(runs=runs)))
    monkeypatch.setattr(report, "_find_spread", lambda data="uci": spread)
    lo, hi, n = report.quick_spread_bands(json.loads(spread.read_text()))["kprpe_noabs"]["clean"]
    assert n == 2 and lo == pytest.approx(89.6 - 1.8) and hi == pytest.approx(93.2 + 1.8)  # half the range

    # the AVX2 machine's numbers: within the spread, so no warning; RPE is short of its reference in every
    # measured quick run (by design of a 30-epoch run), KP-RPE is not (it was flagged on AVX2 before)
    notice = report.quick_run_notice(_quick_results(kprpe_noabs=(89.6, 79.6), rpe_noabs=(87.8, 77.5)), 1.0)
    assert "WARNING" not in notice, notice
    assert "NOT CONVERGED BY DESIGN: every measured quick run of RPE, no Abs-PE" in notice
    assert "quick run of KP-RPE" not in notice
    assert "the same seed repeats exactly on one machine" in notice

    notice = report.quick_run_notice(_quick_results(kprpe_noabs=(80.0, 79.6)), 1.0)
    assert "WARNING: KP-RPE, no Abs-PE clean 80.0 (expected 87.8-95.0) lies outside the spread" in notice
    assert notice.count("WARNING") == 1

    # another schedule than the measured one: the spread does not apply, only this run's own gap
    short = _quick_results(kprpe_noabs=(80.0, 79.6))
    short["config"]["epochs"] = 3
    notice = report.quick_run_notice(short, 1.0)
    assert "Expected range" not in notice and "WARNING: KP-RPE, no Abs-PE is 17.7 points below" in notice


class _RecordingBar:
    """Stands in for tqdm: records the total and every update."""

    made: list = []

    def __init__(self, total, initial=0, **kw):
        self.total, self.updates = total, [initial]
        _RecordingBar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_progress_moves_every_epoch(workers, monkeypatch):
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _RecordingBar.made.clear()
    cfg = DigitsConfig(
        **dict(
            MICRO,
            epochs=3,
            seeds=(0,),
            models=("abs", "kprpe"),
            mean_head_models=(),
            regimes=("none",),
            workers=workers,
        )
    )
    run_digits(cfg, progress=True)
    (bar,) = _RecordingBar.made
    assert bar.total == 2 * 3 and sum(bar.updates) == bar.total
    assert bar.updates.count(1) >= 2 * 3  # one step per epoch, not one per model
