"""Gait training: the losses, SwinGait's parameter groups, the schedule, `kprpe train` with a gait config,
exact resume and `kprpe eval gait`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from kprpe.gait.synthetic import SyntheticConfig, make_synthetic
from kprpe.nn import create_model
from kprpe.train import Trainer
from kprpe.train.config import ConfigError
from kprpe.train.gait import (
    batch_all_triplet,
    cosine_factor,
    load_gait_config,
    parameter_groups,
    part_cross_entropy,
)

SMALL = {
    "stem_channels": [4, 8],
    "embed_dim": 8,
    "depths": [2, 1],
    "num_heads": [1, 2],
    "part_dim": 8,
    "cpb_hidden": 8,
}


@pytest.fixture(scope="module")
def walkers(tmp_path_factory):
    root = tmp_path_factory.mktemp("walkers") / "w"
    make_synthetic(root, SyntheticConfig(ids=6, sequences_per_id=3, frames=(6, 9), occluder_probability=0.0))
    return root


def write_config(tmp_path, walkers, **changes):
    cfg = {
        "task": "gait",
        "model": {"name": "swingait_2d_kprpe", "overrides": dict(SMALL)},
        "data": {
            "root": str(walkers),
            "partition": str(walkers / "partition.json"),
            "frames": 6,
            "skip": 2,
            "ids_per_batch": 2,
            "seqs_per_id": 2,
        },
        "optim": {"lr": 2e-3, "stem_lr_scale": 1.0},
        "train": {"max_steps": 4, "log_every": 1, "checkpoint_every": 2, "output_dir": str(tmp_path / "run")},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "gait.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_batch_all_triplet_by_hand():
    # 1 part, 4 samples on a line: labels 0 0 1 1 at x = 0, 1, 1.5, 3
    x = torch.tensor([0.0, 1.0, 1.5, 3.0])[:, None, None]
    labels = torch.tensor([0, 0, 1, 1])
    loss, share = batch_all_triplet(x, labels, margin=0.2)
    d = (x[:, 0, 0][:, None] - x[:, 0, 0][None]).abs().tolist()
    labels_list = labels.tolist()
    terms = []
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if a != p and labels_list[a] == labels_list[p] and labels_list[a] != labels_list[n]:
                    terms.append(max(d[a][p] - d[a][n] + 0.2, 0.0))
    nonzero = [t for t in terms if t > 0]
    assert loss.item() == pytest.approx(sum(nonzero) / len(nonzero), rel=1e-5)
    assert share.item() == pytest.approx(len(nonzero) / len(terms))
    assert batch_all_triplet(torch.tensor([0.0, 0.0, 9.0, 9.0])[:, None, None], labels)[0].item() < 1e-5


def test_triplet_gradient_is_finite_with_duplicate_samples():
    x = torch.zeros(4, 3, 2, requires_grad=True)  # identical embeddings: zero distances everywhere
    batch_all_triplet(x, torch.tensor([0, 0, 1, 1]))[0].backward()
    assert torch.isfinite(x.grad).all()


def test_part_cross_entropy_smooths_and_repeats_the_label():
    logits = torch.zeros(2, 3, 4)
    logits[0, 1] = 1.0
    labels = torch.tensor([1, 2])
    expected = torch.nn.functional.cross_entropy(
        16 * logits.permute(0, 2, 1).reshape(8, 3), labels.repeat_interleave(4), label_smoothing=0.1
    )
    assert part_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_parameter_groups_cover_every_parameter_once():
    model = create_model("swingait_2d_kprpe", **SMALL, num_classes=5)
    groups = parameter_groups(model, 1e-3, 0.02, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # none left unoptimised (NOTES 1.3)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert any("kprpe" in n for n in by_group["transformer_no_decay"])
    assert (
        any(n.startswith("stem.") for n in by_group["stem_and_heads"]) and "fcs" in by_group["stem_and_heads"]
    )
    assert all(".qkv.weight" not in n for n in by_group["transformer_no_decay"])
    assert groups[2]["lr"] == pytest.approx(1e-4) and groups[0]["weight_decay"] == 0


def test_cosine_factor():
    assert cosine_factor(0, 100, 0.01) == 1.0
    assert cosine_factor(50, 100, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cosine_factor(100, 100, 0.01) == cosine_factor(500, 100, 0.01) == pytest.approx(0.01)
    assert cosine_factor(999, 2000, 0.0, update_every=1000) == 1.0  # held between updates
    assert cosine_factor(1000, 2000, 0.0, update_every=1000) == pytest.approx(0.5)  # cos(pi / 2) = 0


def test_train_learns_and_resumes_exactly(tmp_path, walkers):
    path = write_config(tmp_path, walkers)
    full = Trainer(load_gait_config(path))
    full.run()
    reference = {k: v.clone() for k, v in full.model.state_dict().items()}
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert any(v.abs().sum() > 0 for k, v in reference.items() if "kprpe" in k)  # the tables trained
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["probes"] == 3 and 0 <= results["mAP"] <= 100

    class Crash(Exception):
        pass

    def crash(step):
        if step == 3:
            raise Crash

    other = tmp_path / "other"
    path2 = write_config(other.parent, walkers, train__output_dir=str(other))
    with pytest.raises(Crash):
        Trainer(load_gait_config(path2), step_callback=crash).run()
    with pytest.raises(Exception, match="already holds checkpoints"):
        Trainer(load_gait_config(path2))
    resumed = Trainer(load_gait_config(path2), resume="latest")
    assert resumed.step == 2
    resumed.run()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    rows2 = [json.loads(line) for line in (other / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows2] == [r["loss"] for r in rows]


def test_bad_gait_configs_are_named(tmp_path, walkers):
    with pytest.raises(ConfigError, match="data.keypoints"):
        load_gait_config(write_config(tmp_path, walkers, data__keypoints="wrong"))
    with pytest.raises(ConfigError, match="data.ids_per_batch"):
        Trainer(load_gait_config(write_config(tmp_path, walkers, data__ids_per_batch=10)))
    with pytest.raises(ConfigError, match="contains the input"):
        Trainer(load_gait_config(write_config(tmp_path, walkers, train__output_dir=str(walkers.parent))))
    with pytest.raises(ConfigError, match="optim.accumulation_steps"):
        load_gait_config(write_config(tmp_path, walkers, optim__accumulation_steps=2))
    with pytest.raises(ConfigError, match="frmes"):
        load_gait_config(write_config(tmp_path, walkers, data__frmes=3))


@pytest.mark.slow
def test_cli_train_then_eval_gait(tmp_path, walkers):
    path = write_config(tmp_path, walkers, train__max_steps=2)
    env_cmd = [sys.executable, "-m", "kprpe"]
    done = subprocess.run([*env_cmd, "train", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "eval"
    done = subprocess.run(
        [
            *env_cmd,
            "eval",
            "gait",
            "--data",
            str(walkers),
            "--partition",
            str(walkers / "partition.json"),
            "--weights",
            str(tmp_path / "run" / "model.safetensors"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    train_results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["mAP"] == pytest.approx(train_results["mAP"], abs=1e-6)
    bad = subprocess.run(
        [
            *env_cmd,
            "eval",
            "gait",
            "--data",
            str(walkers),
            "--partition",
            str(walkers / "partition.json"),
            "--weights",
            str(tmp_path / "nope.safetensors"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error: weights not found" in bad.stderr and "Traceback" not in bad.stderr
    inside = subprocess.run(
        [
            *env_cmd,
            "eval",
            "gait",
            "--data",
            str(walkers),
            "--partition",
            str(walkers / "partition.json"),
            "--weights",
            str(tmp_path / "run" / "model.safetensors"),
            "-o",
            str(walkers.parent),
        ],
        capture_output=True,
        text=True,
    )
    assert inside.returncode == 2 and "contains the input" in inside.stderr


def test_shipped_gait_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    paths = [p for p in sorted(root.glob("*.yaml")) if "task: gait" in p.read_text()]
    assert {p.name for p in paths} >= {"gait_tiny.yaml", "gait3d_swingait_kprpe.yaml"}
    for path in paths:
        cfg = load_gait_config(path)
        assert cfg.model.name in ("swingait_2d", "swingait_2d_kprpe")
    paper = load_gait_config(root / "gait3d_swingait_kprpe.yaml")
    assert (paper.optim.lr, paper.optim.weight_decay, paper.train.max_steps) == (3e-4, 2e-2, 60000)
    assert (paper.data.ids_per_batch, paper.data.seqs_per_id, paper.data.frames) == (32, 4, 30)


def test_sync_batchnorm_converts_the_stems_batchnorm2d_as_well_as_the_bnneck(tmp_path, walkers):
    """train.sync_batchnorm: every BatchNorm of SwinGait takes its statistics over all processes, the conv
    stem's BatchNorm2d included (they used to keep per-process statistics); the checkpoint keys stay."""
    from torch import nn

    from kprpe.train.gait import GaitTask

    def norms(sync):
        (tmp_path / str(sync)).mkdir()
        cfg = load_gait_config(write_config(tmp_path / str(sync), walkers, train__sync_batchnorm=sync))
        model = GaitTask(cfg).build_model()
        kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        found = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, kinds)}
        return found, model.state_dict().keys()

    synced, keys = norms(True)
    plain, plain_keys = norms(False)
    assert synced.keys() == plain.keys() and keys == plain_keys
    stem = {name: kind for name, kind in synced.items() if name.startswith("stem.")}
    assert stem and set(stem.values()) == {"DistributedBatchNorm2d"}, stem
    assert set(synced.values()) == {"DistributedBatchNorm2d", "DistributedBatchNorm1d"}, synced
    assert set(plain.values()) == {"BatchNorm2d", "BatchNorm1d"}  # off by default: torch's own


def test_two_gloo_processes_take_the_one_process_gait_step(tmp_path, walkers):
    """torchrun for gait comes from the shared Trainer: each process keeps half of the P x K batch, the
    triplet sees the gathered batch, and with train.sync_batchnorm every BatchNorm (the conv stem's and the
    BNNeck) normalises with the statistics of both processes' frames. Step 1 (the same weights, the same
    global batch) then equals one process's step to float32 rounding."""
    from functools import partial

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from process_group import free_port, train_as_rank

    def config(name):
        return write_config(
            tmp_path / name,
            walkers,
            train__max_steps=2,
            train__checkpoint_every=1,
            train__output_dir=str(tmp_path / name / "run"),
            train__sync_batchnorm=True,
            data__flip_p=0.5,
        )

    for name in ("single", "ddp"):
        (tmp_path / name).mkdir()
    Trainer(load_gait_config(config("single"))).run()
    load = partial(load_gait_config, str(config("ddp")))
    mp.start_processes(train_as_rank, args=(2, free_port(), load), nprocs=2, join=True, start_method="spawn")
    single = load_file(tmp_path / "single" / "run" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "run" / "model.safetensors")
    assert single.keys() == ddp.keys() and all(torch.isfinite(t).all() for t in ddp.values())
    torch.manual_seed(0)
    initial = create_model("swingait_2d_kprpe", **SMALL, num_classes=3).state_dict()
    moved = max((ddp[k].double() - initial[k].double()).abs().max().item() for k in ddp)
    assert moved > 1e-3  # the two processes trained
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "run" / "log.jsonl").read_text().splitlines()]
    reference = [
        json.loads(line) for line in (tmp_path / "single" / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # Step 1 differs only in float32 summation order (two shares, gathered embeddings): seen under 3e-6 of
    # the loss and 3e-5 of the gradient norm (6 seeds). Per-process stem statistics moved the loss by 7 % and
    # the gradient norm by 60 %.
    for key in ("loss", "triplet", "ce"):
        assert rows[0][key] == pytest.approx(reference[0][key], rel=1e-4), key
    assert rows[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-3)
    # the running statistics after step 1 come from its forward alone: every BatchNorm, the stem's included,
    # saw the whole batch (seen under 1e-6 of each tensor's scale; per-process statistics: 4e-2)
    step1 = [
        load_file(tmp_path / n / "run" / "checkpoints" / "step_00000001" / "model.safetensors")
        for n in ("single", "ddp")
    ]
    stats = [k for k in step1[0] if k.endswith(("running_mean", "running_var"))]
    assert any(k.startswith("stem.") for k in stats) and any(k.startswith("bnneck.") for k in stats)
    for key in stats:
        scale = step1[0][key].abs().max().item()
        assert (step1[1][key] - step1[0][key]).abs().max().item() <= 1e-4 * scale, key
    # Nothing after the update is compared: AdamW's first step is lr * sign(g), which turns rounding-level
    # differences of near-zero gradient entries into steps 2 lr apart (seen in stem convs; the final
    # LayerNorm's bias has zero gradient in theory), so step 2 depends on the CPU's kernels, not only on the
    # code: its loss agreed to 4e-4 on AVX2 kernels and differed by 8.5e-3 under ATEN_CPU_CAPABILITY=default.
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_the_0_3_spelling_train_keep_still_works_with_a_warning(tmp_path, walkers):
    with pytest.warns(FutureWarning, match="train.keep is deprecated"):
        cfg = load_gait_config(write_config(tmp_path, walkers, train__keep=3))
    assert cfg.train.keep_checkpoints == 3
    with pytest.raises(ConfigError, match="keep_checkpoints only"):
        load_gait_config(write_config(tmp_path, walkers, train__keep=3, train__keep_checkpoints=2))
