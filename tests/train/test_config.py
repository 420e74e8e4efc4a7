from __future__ import annotations

import pytest

from kprpe.train.config import ConfigError, apply_overrides, config_from_dict, load_config


def test_errors_name_the_key():
    cases = [
        ({"data": {"train": "x", "batchsize": 3}}, r"^data.batchsize: unknown key"),
        ({"data": {"train": "x", "batch_size": "many"}}, r"^data.batch_size: must be an integer"),
        ({"data": {"train": "x"}, "optim": {"lr": -1}}, r"^optim.lr: must be positive"),
        ({"data": {"train": "x"}, "head": {"sample_rate": 1.5}}, r"^head.sample_rate: must be in \(0, 1\]"),
        ({"data": {"train": "x"}, "train": {"amp": "fp8"}}, r"^train.amp: must be none or bf16"),
        ({"data": {"train": "x"}, "head": {"margin_gradient": "textbook"}},
         r"^head.margin_gradient: must be straight_through or exact, got 'textbook'"),
        ({"data": {"train": "x"}, "schedule": "cosine"}, r"^schedule: must be a mapping"),
        ({"data": {}}, r"^data.train: is required"),
        (
            {"data": {"train": "x", "augmentation": {"rotation_p": 3}}},
            r"data.augmentation.rotation_p is a probability",
        ),
        ({"data": {"train": "x"}, "trian": {}}, r"^trian: unknown key"),
    ]
    for values, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            config_from_dict(values)


def test_overrides_and_yaml_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: data.rec\noptim:\n  lr: 1e-4\n")
    (tmp_path / "data.rec").write_bytes(b"")
    cfg = load_config(
        path, ["optim.lr=3e-4", "head.type=arcface", "data.augmentation.flip_p=0", "validation.pairs=[a.bin]"]
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.head.type == "arcface"
    assert cfg.data.augmentation.flip_p == 0.0 and cfg.validation.pairs == ["a.bin"]
    assert cfg.data.train == str(tmp_path / "data.rec")  # resolved beside the config file
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="optim.lr: is a value, not a section"):
        apply_overrides({"optim": {"lr": 1}}, ["optim.lr.x=2"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        if "task: gait" in path.read_text():
            continue  # kprpe.train.gait's configs: tests/train/test_gait_train.py
        cfg = load_config(path)
        assert cfg.data.train
