"""`kprpe experiment gait --quick` end to end at a tiny size (CI), its table, and bad options."""

from __future__ import annotations

import json

import numpy as np

from kprpe.cli import main
from kprpe.experiments.gait import VARIANTS, summarise, table
from kprpe.gait.augment import KeypointControl, draw_keypoints


def test_quick_experiment_runs_end_to_end(tmp_path, capsys, terminal):
    out = tmp_path / "exp"
    argv = ["experiment", "gait", "--quick", "--steps", "2", "--ids", "8", "--sequences", "3", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "NOT a result" in printed and "| kprpe | misaligned | 1 |" in printed
    results = json.loads((out / "gait_results.json").read_text())
    assert [r["variant"] for r in results["runs"]] == ["baseline", "kprpe"]
    for run in results["runs"]:
        for test in ("aligned", "misaligned"):
            assert run["test"][test]["probes"] == 4 and 0 <= run["test"][test]["mAP"] <= 100
        losses = [r["loss"] for r in run["curve"] if "loss" in r]  # validation-only rows have no loss
        assert losses and all(np.isfinite(losses)) and any("mAP" in r for r in run["curve"])
    assert "smoke test" in (out / "gait_table.md").read_text()
    # a second call reuses the finished runs (nothing retrained: same numbers, fast)
    assert main(argv) == 0
    again = json.loads((out / "gait_results.json").read_text())
    assert again["runs"] == results["runs"]
    # --collect trains nothing: the finished runs are tabulated and the missing ones named
    collect = [*argv, "--collect", "--variants", "baseline,kprpe,kprpe_mask"]
    assert main(collect) == 0
    collected = json.loads((out / "gait_results.json").read_text())
    assert collected["runs"] == results["runs"] and collected["missing"] == ["kprpe_mask_seed0"]
    assert "**Not finished** (not in the table): kprpe_mask_seed0." in (out / "gait_table.md").read_text()
    assert not (out / "runs" / "kprpe_mask_seed0").exists()
    assert main([*argv, "--seed", "1"]) == 2 and "--seed must be in 0..0" in capsys.readouterr().err


def test_bad_options_are_named(capsys):
    assert main(["experiment", "gait", "--variants", "kprpe,nope", "-o", "x"]) == 2
    assert "--variants" in capsys.readouterr().err
    assert main(["experiment", "gait", "--ids", "1", "-o", "x"]) == 2
    assert "--ids must be at least 2" in capsys.readouterr().err


def test_summary_and_table():
    runs = [
        dict(
            variant="kprpe",
            seed=s,
            test={
                t: {"Rank-1": 10.0 * s, "Rank-5": 50.0, "mAP": 30.0 + s, "mINP": 20.0}
                for t in ("aligned", "misaligned")
            },
        )
        for s in range(3)
    ]
    summary = summarise(runs)
    assert summary["kprpe"]["aligned"]["Rank-1"] == {"mean": 10.0, "std": float(np.std([0, 10, 20])), "n": 3}
    text = table({"config": {"ids": 4, "sequences": 2, "steps": 1, "seeds": 3}, "summary": summary})
    assert "| kprpe | aligned | 3 | 10.0 +- 8.2 | 50.0 +- 0.0 | 31.0 +- 0.8 | 20.0 +- 0.0 |" in text
    assert set(VARIANTS) == {
        "baseline",
        "kprpe",
        "kprpe_mask",
        "kprpe_shuffled",
        "kprpe_noise",
        "baseline_drawn",
    }


def test_keypoint_controls():
    rng = np.random.default_rng(0)
    pose = np.stack([np.full((17, 3), t, np.float32) for t in range(6)])  # frame t holds the value t
    item = {"sils": np.zeros((6, 64, 44), np.uint8), "pose": pose}
    shuffled = KeypointControl("shuffled")(item, rng)["pose"]
    assert sorted(shuffled[:, 0, 0]) == list(range(6)) and not np.array_equal(shuffled, pose)
    noise = KeypointControl("noise")(item, rng)["pose"]
    assert noise[..., 0].max() <= 43 and noise[..., 1].max() <= 63 and noise.std() > 1
    assert KeypointControl("real")(item, rng) is item
    one = np.zeros((1, 17, 3), np.float32)
    one[0, 5] = (10, 20, 0.9)
    one[0, 6] = (30, 40, 0.1)  # below the drawing threshold
    drawn = draw_keypoints(np.zeros((1, 64, 44), np.uint8), one)
    assert drawn[0, 19:22, 9:12].min() == 128 and drawn[0, 40, 30] == 0 and drawn.sum() == 9 * 128
