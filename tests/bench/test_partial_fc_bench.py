"""The partial-FC scale benchmark: measured state bytes and counted collectives equal their formulas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kprpe.bench.partial_fc import (
    Setup,
    communication_formula,
    main,
    run_rank,
    state_bytes_formula,
)

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_one_process_state_bytes_equal_the_formula(optimizer):
    setup = Setup(classes=3001, dim=16, sample_rate=0.2, batch_per_rank=4, optimizer=optimizer)
    result = run_rank(setup, steps=1, warmup=1)
    assert result["state_bytes"] == state_bytes_formula(setup, 0)
    per_element = {"adamw": 4 * 4, "sgd": 3 * 4}[optimizer]  # weight + grad + 2 (AdamW) or 1 (SGD) states
    assert sum(result["state_bytes"].values()) == per_element * 3001 * 16
    assert result["collectives"] == [] and communication_formula(setup) == []
    assert result["sampled_classes"] == 600
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["peak_rss_bytes"] >= result["rss_before_head_bytes"] > 0


def test_refuses_what_the_formula_says_cannot_fit(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--classes", str(10**12)]) == 2  # ~20 PB: refused before anything is allocated
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "GiB" in err[0] and "--force" in err[0]
    assert main(["--sample-rate", "0"]) == 2
    assert "--sample-rate must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow  # torchrun + 2 processes importing torch: about a minute on the loaded 2-core CI machine
def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "pfc.json"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kprpe.bench.partial_fc", "--classes", "2001", "--dim", "32", "--batch-per-rank", "4"]
    command += ["--sample-rate", "0.3", "--steps", "2", "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 2,001 | 2 | 0.3 | adamw |" in done.stdout
    payload = json.loads(out.read_text())
    setup = Setup(**payload["setup"])
    assert setup.ranks == 2
    expected = communication_formula(setup)
    # 3 all-gathers (embeddings 4x32 float32, labels int64, flags bool), 4 all-reduces (3 x 8 rows, 8x32 grad)
    assert [c["bytes"] for c in expected] == [512, 32, 4, 32, 32, 32, 1024]
    for rank, result in enumerate(payload["ranks"]):
        assert result["rank"] == rank
        assert result["state_bytes"] == state_bytes_formula(setup, rank)
        assert result["collectives"] == expected  # every collective of a step counted, none missing
        assert len(result["step_seconds"]) == 2
    assert payload["ranks"][0]["losses"] == payload["ranks"][1]["losses"]  # the replicated loss
    assert [r["local_classes"] for r in payload["ranks"]] == [1001, 1000]


def test_formula_table_at_two_million_classes(capsys):
    assert main(["--classes", "2000000", "--formula-ranks", "8,16"]) == 0
    out = capsys.readouterr().out
    # AdamW: 16 bytes per centre element (weight, gradient, two moments); 250,000 x 512 on each of 8 ranks
    assert f"| 2,000,000 | 8 | 0.1 | adamw | {16 * 250_000 * 512 / 2**30:.2f} |" in out
    assert "| 2,000,000 | 16 | 0.1 | adamw | 0.95 |" in out
    assert main(["--formula-ranks", "0"]) == 2
    assert "--formula-ranks must list" in capsys.readouterr().err
