"""Two gloo processes on CPU must take the same step as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import kprpe
from kprpe.train import Trainer, config_from_dict
from process_group import free_port, train_as_rank


def _config(tiny_config, out: Path, batch: int, head: str) -> dict:
    tiny_config = {k: dict(v) if isinstance(v, dict) else v for k, v in tiny_config.items()}
    tiny_config["data"] = dict(tiny_config["data"], batch_size=batch)
    tiny_config["head"] = {"type": head, "scale": 16}
    tiny_config["optim"] = {
        "name": "sgd",
        "lr": 0.1,
        "grad_clip": 1.0,
    }  # SGD: no Adam normalisation hiding errors
    tiny_config["train"] = dict(tiny_config["train"], max_steps=2, output_dir=str(out), sync_batchnorm=True)
    return tiny_config


@pytest.mark.parametrize("head", ["adaface", "arcface"])
def test_two_gloo_processes_match_one_process(tiny_config, tmp_path, head):
    single_cfg = _config(tiny_config, tmp_path / "single", batch=16, head=head)
    Trainer(config_from_dict(single_cfg)).run()
    ddp_cfg = _config(tiny_config, tmp_path / "ddp", batch=8, head=head)
    mp.start_processes(
        train_as_rank,
        args=(2, free_port(), partial(config_from_dict, ddp_cfg)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )

    single = load_file(tmp_path / "single" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    torch.manual_seed(0)
    initial = kprpe.create_model("vit_tiny_kprpe", img_size=32, patch_size=4).state_dict()
    moved = max((single[k].float() - initial[k].float()).abs().max().item() for k in single)
    worst = max((single[k].double() - ddp[k].double()).abs().max().item() for k in single)
    assert moved > 1e-3 and worst < 1e-5, (
        moved,
        worst,
    )  # the step moved weights; both runs agree to rounding
    ckpt = "checkpoints/step_00000002"
    head_single = load_file(tmp_path / "single" / ckpt / "head.rank0.safetensors")
    shards = [load_file(tmp_path / "ddp" / ckpt / f"head.rank{r}.safetensors") for r in range(2)]
    assert shards[0]["weight"].shape[0] == shards[1]["weight"].shape[0] == 12  # 24 classes over 2 processes
    assert torch.allclose(head_single["weight"], torch.cat([s["weight"] for s in shards]), atol=2e-6)
    for key in [k for k in head_single if k.startswith("margin.")]:  # AdaFace statistics: the global batch's
        assert torch.allclose(head_single[key], shards[0][key]) and torch.allclose(
            shards[0][key], shards[1][key]
        )
    loss_single = (tmp_path / "single" / "train_log.csv").read_text().splitlines()[1].split(",")[3]
    loss_ddp = (tmp_path / "ddp" / "train_log.csv").read_text().splitlines()[1].split(",")[3]
    assert float(loss_single) == pytest.approx(float(loss_ddp), rel=1e-4)


@pytest.mark.slow
def test_example_config_under_torchrun(tmp_path):
    """The shipped example config, shortened, as `torchrun --nproc_per_node 2 -m kprpe train ...`."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "kprpe", "make-example-data", "-o", str(tmp_path / "data"), "--quiet"],
        check=True,
        env=env,
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "kprpe",
        "train",
        str(root / "configs" / "example_tiny.yaml"),
        f"data.train={tmp_path / 'data' / 'train.rec'}",
        f"data.landmarks={tmp_path / 'data' / 'landmarks.csv'}",
        "data.batch_size=16",
        "train.max_steps=40",
        "train.log_every=10",
        "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = kprpe.load_official(tmp_path / "run" / "model.safetensors")
    assert model.config.img_size == 32
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # one result per run, printed by the main process only (a pipe: one line of JSON, docs/cli.md)
    import json

    assert result.stdout.count("\n") == 1 and json.loads(result.stdout)["steps"] == 40
