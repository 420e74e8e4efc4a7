"""``kprpe train`` with a Swin-KP-RPE model: it learns, its tables train, a resumed run is bit-identical."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kprpe
from kprpe.keypoints import template_keypoints
from kprpe.train import Trainer, config_from_dict

SWIN = {
    "name": "swin_small_kprpe",
    # 32 px, patch 2: 16x16 -> 8x8 maps; 5x5 windows pad both maps and the odd blocks shift
    "overrides": {
        "img_size": 32,
        "patch_size": 2,
        "embed_dim": 16,
        "depths": [2, 2],
        "num_heads": [1, 2],
        "window_size": 5,
        "output_dim": 32,
        "drop_path_rate": 0.1,
    },
}


@pytest.fixture
def swin_config(tiny_config):
    tiny_config["model"] = SWIN
    return tiny_config


def test_swin_kprpe_trains_and_writes_a_loadable_model(swin_config, tmp_path):
    swin_config["train"].update(max_steps=12, log_every=4)
    final = Trainer(config_from_dict(swin_config)).run()
    with open(tmp_path / "run" / "train_log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model = kprpe.load_official(final)
    assert model.config.rel_pos == "kprpe" and model.config.depths == (2, 2)
    assert model.kprpe[0].linear.weight.abs().max() > 0  # the zero-initialised tables have learned
    out = model(torch.zeros(2, 3, 32, 32), template_keypoints(2))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_example_swin_config_builds(tmp_path):
    import yaml

    from kprpe.train.config import config_from_dict

    values = yaml.safe_load((Path(__file__).parents[2] / "configs" / "example_tiny_swin.yaml").read_text())
    cfg = config_from_dict(values)
    model = kprpe.create_model(cfg.model.name, **cfg.model.overrides)
    assert model.uses_keypoints and model.config.map_sizes == [16, 8]


def test_swin_resumed_run_is_bit_identical(swin_config, tmp_path):
    swin_config["train"].update(max_steps=5, checkpoint_every=2)
    straight = Trainer(config_from_dict(swin_config)).run()
    swin_config["train"]["output_dir"] = str(tmp_path / "crashed")

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        Trainer(config_from_dict(swin_config), step_callback=crash).run()
    resumed = Trainer(config_from_dict(swin_config), resume="latest")
    assert resumed.step == 2
    a, b = load_file(straight), load_file(resumed.run())
    assert a.keys() == b.keys() and any(k.startswith("keypoint_linear.1") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
