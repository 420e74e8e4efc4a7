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
from safetensors.torch import load_file, save_file

import kprpe
from kprpe.train import Trainer, config_from_dict
from process_group import free_port, join_group, train_as_rank


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


# ------------------------------------------------- DistributedBatchNorm1d / 2d / 3d against nn.BatchNorm
BN_WORLD, BN_STEPS, BN_CHANNELS = 2, 2, 3
BN_CASES = {  # name: (torch class, each rank's input shape (uneven shares), momentum)
    "1d": ("BatchNorm1d", [(5, 3), (3, 3)], 0.1),
    "1d_sequence": ("BatchNorm1d", [(3, 3, 4), (2, 3, 4)], 0.1),
    "2d": ("BatchNorm2d", [(3, 3, 5, 4), (2, 3, 5, 4)], 0.1),
    "3d": ("BatchNorm3d", [(2, 3, 2, 4, 3), (1, 3, 2, 4, 3)], None),  # None: the cumulative average
}


def _bn_batch(name: str, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each rank's share of one step's input and of the loss weights (dL/dy). The shares have other scales
    and offsets, so per-process statistics would be far from the whole batch's."""
    g = torch.Generator().manual_seed(100 * step + list(BN_CASES).index(name))
    xs, rs = [], []
    for r, shape in enumerate(BN_CASES[name][1]):
        xs.append(torch.randn(shape, generator=g) * (1 + 2 * r) + 3 * r)
        rs.append(torch.randn(shape, generator=g))
    return xs, rs


def _bn_module(name: str) -> torch.nn.Module:
    kind, _, momentum = BN_CASES[name]
    bn = getattr(torch.nn, kind)(BN_CHANNELS, momentum=momentum)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.randn(BN_CHANNELS, generator=g))
        bn.bias.copy_(0.5 * torch.randn(BN_CHANNELS, generator=g))
    return bn.train()


def _bn_run(bn: torch.nn.Module, name: str, pick) -> dict[str, torch.Tensor]:
    """BN_STEPS training steps of loss sum(y * r) on ``pick(shares)``: outputs, gradients, running stats."""
    out = {}
    dtype = bn.weight.dtype
    for step in range(BN_STEPS):
        xs, rs = _bn_batch(name, step)
        x = pick(xs).to(dtype).requires_grad_(True)
        y = bn(x)
        (y * pick(rs).to(dtype)).sum().backward()
        out.update({f"{step}.y": y.detach(), f"{step}.x_grad": x.grad})
        out.update({f"{step}.weight_grad": bn.weight.grad.clone(), f"{step}.bias_grad": bn.bias.grad.clone()})
        bn.zero_grad()
    out.update(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())
    out["num_batches_tracked"] = bn.num_batches_tracked.clone()
    return out


def _bn_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from kprpe.train.distributed import use_distributed_batchnorm

    join_group(rank, BN_WORLD, port)
    dist.init_process_group("gloo", rank=rank, world_size=BN_WORLD)
    try:
        saved = {}
        for name in BN_CASES:
            bn = use_distributed_batchnorm(_bn_module(name))
            assert type(bn).__name__ == "Distributed" + BN_CASES[name][0]
            mine = _bn_run(bn, name, lambda shares: shares[rank])
            saved.update({f"{name}.{key}": value for key, value in mine.items()})
        save_file(saved, os.path.join(out, f"bn{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _bn_bounds(name: str) -> dict[str, torch.Tensor]:
    """Worst-case float32 errors of any correct BatchNorm on the whole batch, from float64 values.

    u = 2^-24; every statistic is a sum of m values per channel, and a sum of m terms in any order (AVX2 or
    AVX-512 lanes, two-pass, Welford, a combination of shares) is off by at most about m u sum|terms|
    (Higham, 4.2): the mean by (m + 2) u mean|x|, the biased variance by 2 (m + 8) u mean(x^2) (this covers
    the cancellation of E[x^2] - E[x]^2 too), and 1/sqrt(var + eps) relatively by half that over var + eps.
    Those errors then propagate linearly through y = (x - mean) w / sqrt(var + eps) + b and through its
    gradient, each element-wise operation adding a few u of its operands."""
    u = 2.0**-24
    bn = _bn_module(name).double()
    shape = (1, BN_CHANNELS) + (1,) * (len(BN_CASES[name][1][0]) - 2)
    w, b = bn.weight.detach().view(shape).abs(), bn.bias.detach().view(shape).abs()
    momentum = BN_CASES[name][2]
    bounds = {"running_mean": 0.0, "running_var": 0.0}
    for step in range(BN_STEPS):
        xs, rs = _bn_batch(name, step)
        x, g = torch.cat(xs).double(), torch.cat(rs).double()
        m = x.numel() // BN_CHANNELS

        def total(t):  # per channel: over every other dim
            return t.sum([0, *range(2, t.dim())], keepdim=True)

        mean = total(x) / m
        var = total((x - mean) ** 2) / m
        inv = (var + bn.eps) ** -0.5
        d_mean = (m + 2) * u * total(x.abs()) / m
        d_var = 2 * (m + 8) * u * total(x * x) / m
        rel_inv = d_var / (2 * (var + bn.eps)) + 2 * u
        xhat = (x - mean) * inv
        d_xhat = inv * d_mean + xhat.abs() * rel_inv + 2 * u * xhat.abs()
        bounds[f"{step}.y"] = w * d_xhat + 4 * u * (w * inv * (x.abs() + mean.abs()) + b)
        s1, s2 = total(g), total(g * xhat)
        d_s1 = (m + 2) * u * total(g.abs())
        d_s2 = (m + 2) * u * total((g * xhat).abs()) + total(g.abs() * d_xhat)
        x_grad = w * inv * (g - s1 / m - xhat * s2 / m)
        bounds[f"{step}.x_grad"] = (
            w * inv * (d_s1 + d_xhat * s2.abs() + xhat.abs() * d_s2) / m
            + 4 * u * w * inv * (g.abs() + s1.abs() / m + (xhat * s2).abs() / m)
            + x_grad.abs() * rel_inv
        )
        # the ranks' partial sums add up in one more rounding
        bounds[f"{step}.weight_grad"] = (d_s2 + 2 * u * s2.abs()).flatten()
        bounds[f"{step}.bias_grad"] = (d_s1 + 2 * u * s1.abs()).flatten()
        a = momentum if momentum is not None else 1.0 / (step + 1)
        unbiased = var * m / (m - 1)
        bounds["running_mean"] = (1 - a) * bounds["running_mean"] + a * d_mean.flatten()
        bounds["running_mean"] = bounds["running_mean"] + 4 * u * mean.abs().flatten()
        bounds["running_var"] = (1 - a) * bounds["running_var"] + a * d_var.flatten() * m / (m - 1)
        bounds["running_var"] = bounds["running_var"] + 4 * u * (unbiased.flatten() + 1)
    return bounds


def _assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    excess = ((got.double() - ref.double()).abs() / bound.expand_as(ref)).max().item()
    assert excess <= 1.0, f"{what}: off by {excess:.3g} x the float32 bound"


def test_distributed_batchnorm_on_two_gloo_processes_is_one_process_on_the_whole_batch(tmp_path):
    """1d (both input shapes), 2d and 3d, uneven shares: outputs, input gradients, weight and bias
    gradients (summed over processes, as the Trainer's DDP hook does) and the running statistics of two
    training steps equal nn.BatchNorm on the concatenated batch, within the float32 bounds."""
    mp.start_processes(
        _bn_worker, args=(free_port(), str(tmp_path)), nprocs=BN_WORLD, join=True, start_method="spawn"
    )
    ranks = [load_file(tmp_path / f"bn{r}.safetensors") for r in range(BN_WORLD)]
    for name in BN_CASES:
        ref64 = _bn_run(_bn_module(name).double(), name, torch.cat)
        ref32 = _bn_run(_bn_module(name), name, torch.cat)
        bounds = _bn_bounds(name)
        for key, bound in bounds.items():
            parts = [got[f"{name}.{key}"] for got in ranks]
            if key.startswith("running_"):  # replicated: every process holds the whole batch's statistics
                for part in parts:
                    _assert_within(part, ref64[key], bound, f"{name} {key}")
                got = parts[0]
            elif key.endswith(("weight_grad", "bias_grad")):
                got = parts[0] + parts[1]
            else:
                got = torch.cat(parts)
            _assert_within(got, ref64[key], bound, f"{name} {key}")
            _assert_within(ref32[key], ref64[key], bound, f"{name} {key} (nn.BatchNorm itself)")
        for got in ranks:
            assert int(got[f"{name}.num_batches_tracked"]) == int(ref64["num_batches_tracked"]) == BN_STEPS
        # per-process statistics (what the stem's BatchNorm2d used to do) are far outside the bounds
        local = _bn_run(_bn_module(name), name, lambda shares: shares[0])
        rows = BN_CASES[name][1][0][0]
        excess = ((local["0.y"] - ref64["0.y"][:rows]).abs() / bounds["0.y"][:rows]).max().item()
        assert excess > 1e3, (name, excess)
