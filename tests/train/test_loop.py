from __future__ import annotations

import csv
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kprpe
from kprpe.cli import main
from kprpe.keypoints import template_keypoints
from kprpe.train import CheckpointState, Trainer, config_from_dict, lr_factor


def _losses(run_dir):
    with open(run_dir / "train_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_short_run_learns_and_writes_a_loadable_model(tiny_config, tmp_path):
    tiny_config["train"].update(max_steps=24, log_every=4)
    final = Trainer(config_from_dict(tiny_config)).run()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    model = kprpe.load_official(final)  # what `kprpe verify --weights` does
    assert model.config.img_size == 32 and model.config.rel_pos == "kprpe"
    out = model(torch.zeros(2, 3, 32, 32), template_keypoints(2))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000024"


def test_killed_and_resumed_run_ends_with_identical_weights(tiny_config, tmp_path):
    """A crash after step 4 (checkpoint at 3), then --resume, must give bit-identical weights to a straight
    run."""
    tiny_config["data"]["augmentation"] = {"photometric_p": 0.5, "cutout_p": 0.3}  # randomness everywhere
    tiny_config["head"]["sample_rate"] = 0.5
    tiny_config["model"]["overrides"]["drop_path_rate"] = 0.1
    tiny_config["data"]["num_workers"] = 2
    tiny_config["train"].update(max_steps=7, checkpoint_every=3)
    straight = Trainer(config_from_dict(tiny_config)).run()

    tiny_config["train"]["output_dir"] = str(tmp_path / "crashed")

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        Trainer(config_from_dict(tiny_config), step_callback=crash).run()
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    with pytest.raises(CheckpointState, match="already holds checkpoints"):
        Trainer(config_from_dict(tiny_config))
    resumed = Trainer(config_from_dict(tiny_config), resume="latest")
    assert resumed.step == 3
    final = resumed.run()
    a, b = load_file(straight), load_file(final)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    head_a = load_file(tmp_path / "run" / "checkpoints" / "step_00000007" / "head.rank0.safetensors")
    head_b = load_file(tmp_path / "crashed" / "checkpoints" / "step_00000007" / "head.rank0.safetensors")
    assert torch.equal(head_a["weight"], head_b["weight"])
    assert torch.equal(head_a["margin.batch_mean"], head_b["margin.batch_mean"])  # AdaFace statistics resumed
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "crashed" / "train_log.csv"))]
    assert steps == [2, 4, 6, 7]  # the log has no duplicated rows from the crashed part


def test_resume_state_holds_only_tensors_and_plain_containers(tiny_config, tmp_path):
    tiny_config["train"].update(max_steps=2)
    Trainer(config_from_dict(tiny_config)).run()
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step_00000002" / "state.rank0.pt", weights_only=True
    )
    assert state["step"] == 2 and "optimizer" in state and state["rng_cpu"].dtype == torch.uint8


def test_fine_tune_from_an_official_style_checkpoint(tiny_config, tmp_path, synthetic_data):
    import shutil

    from kprpe.data.synthetic import make_synthetic_faces

    folder, landmarks = make_synthetic_faces(
        tmp_path / "big", num_identities=4, images_per_identity=4, size=112, progress=False
    )
    ref = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_kprpe.safetensors"
    tiny_config["model"] = {"pretrained": str(ref)}
    tiny_config["data"].update(train=str(folder), landmarks=str(landmarks), batch_size=8)
    tiny_config["train"].update(max_steps=1)
    trainer = Trainer(config_from_dict(tiny_config))
    before = kprpe.load_official(ref).state_dict()
    assert torch.equal(
        trainer.model.state_dict()["patch_embed.proj.weight"], before["patch_embed.proj.weight"]
    )
    final = trainer.run()
    after = kprpe.load_official(final).state_dict()
    assert not torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    face = pytest.importorskip("kprpe.face")
    embedder = face.FaceEmbedder.from_weights(final)  # what `kprpe verify --weights` uses
    unit, _ = embedder.embed_crops(np.zeros((1, 112, 112, 3), np.uint8), template_keypoints(1).numpy())
    assert unit.shape == (1, 32)
    shutil.rmtree(tmp_path / "big")


def test_validation_pairs_and_bad_samples_are_logged(tiny_config, tmp_path, synthetic_data):
    import shutil

    images = [
        cv2.imencode(".jpg", np.full((112, 112, 3), v, np.uint8))[1].tobytes() for v in range(0, 240, 12)
    ]
    with open(tmp_path / "toy.bin", "wb") as f:
        pickle.dump((images, [True, False] * 5), f)
    folder = tmp_path / "imgs"
    shutil.copytree(synthetic_data["folder"], folder)
    (folder / "id_0000" / "img_001.png").write_bytes(b"broken")
    tiny_config["data"].update(train=str(folder), on_bad_sample="replace")
    tiny_config["validation"] = {"pairs": [str(tmp_path / "toy.bin")], "every": 3}
    tiny_config["train"].update(max_steps=12)
    trainer = Trainer(config_from_dict(tiny_config))
    trainer.run()
    rows = list(csv.DictReader(open(tmp_path / "run" / "validation.csv")))
    assert [r["step"] for r in rows] == ["3", "6", "9", "12"] and all(
        0 <= float(r["accuracy"]) <= 1 for r in rows
    )
    # 12 steps x 16 = 192 samples = one epoch: the broken sample was seen exactly once
    assert trainer.bad_samples == 1
    assert (tmp_path / "run" / "bad_samples.txt").read_text().split() == ["1"]


def test_verification_file_refuses_code(tmp_path):
    from kprpe.eval import UnsafePickleError
    from kprpe.train import load_verification_bin

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([Evil()], []), f)
    with pytest.raises(UnsafePickleError, match="refusing to load global 'builtins.print'"):
        load_verification_bin(tmp_path / "evil.bin")


def test_lr_schedules():
    f = lambda s, **kw: lr_factor(s, total_steps=100, **kw)  # noqa: E731
    assert [f(s, warmup_steps=4, schedule="cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, warmup_steps=4, schedule="cosine") == pytest.approx(1.0)
    assert f(100, warmup_steps=4, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert f(52, warmup_steps=4, schedule="cosine") == pytest.approx(0.5)
    assert [
        f(s, warmup_steps=0, schedule="step", milestones=[10, 20], gamma=0.1) for s in (9, 10, 20)
    ] == pytest.approx([1, 0.1, 0.01])


def test_cli_reports_config_errors_by_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: x.rec\noptim:\n  lr: fast\n")
    assert main(["train", str(path)]) == 2
    assert "optim.lr: must be a number, got 'fast'" in capsys.readouterr().err
    path.write_text("data:\n  train: nowhere.rec\n")
    assert main(["train", str(path), f"train.output_dir={tmp_path / 'r'}"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_grad_accumulation_and_clipping_run(tiny_config, tmp_path):
    tiny_config["optim"].update(accumulation_steps=2, grad_clip=0.5, name="sgd", lr=0.05)
    tiny_config["model"]["grad_checkpointing"] = True
    tiny_config["train"].update(max_steps=3, amp="bf16")
    trainer = Trainer(config_from_dict(tiny_config))
    assert trainer.steps_per_epoch == 6  # 192 samples / (16 x 2)
    trainer.run()
    rows = list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))
    assert rows[-1]["step"] == "3" and np.isfinite(float(rows[-1]["loss"]))


def test_a_diverging_run_stops_keeps_its_good_checkpoints_and_saves_nothing_non_finite(
    tiny_config, tmp_path, capsys
):
    """`optim.lr=1e6` once ended with exit 0, NaN weights saved and the good checkpoints pruned."""
    import yaml

    from kprpe.train import TrainingDiverged

    tiny_config["train"].update(
        max_steps=2, log_every=1, checkpoint_every=2, keep_checkpoints=1, progress=False
    )
    Trainer(config_from_dict(tiny_config)).run()  # a good first part of the run
    first_model = (tmp_path / "run" / "model.safetensors").read_bytes()
    tiny_config["train"].update(max_steps=12, nonfinite_patience=1)
    trainer = Trainer(config_from_dict(tiny_config), resume="latest")
    trainer.scheduler.base_lrs = [1e30 for _ in trainer.scheduler.base_lrs]  # the run diverges from here on
    with pytest.raises(TrainingDiverged, match="non-finite"):
        trainer.run()
    kept = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept  # pruning never removed the last checkpoint with finite weights ...
    for folder in kept:  # ... and no checkpoint with NaN/inf weights was written
        tensors = [
            t.flatten().float()
            for t in load_file(folder / "model.safetensors").values()
            if t.is_floating_point()
        ]
        assert torch.isfinite(torch.cat(tensors)).all(), folder
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == first_model  # not replaced by NaN weights
    with open(tmp_path / "run" / "train_log.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["nonfinite_steps"]) >= 1
    # through the command line: a clear one-line error and exit status 2, not exit 0
    tiny_config["optim"]["lr"] = 1e30
    tiny_config["train"].update(output_dir=str(tmp_path / "run2"), checkpoint_every=0)
    config = tmp_path / "diverge.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "training stopped" in err
    assert not (tmp_path / "run2" / "model.safetensors").exists()


def test_an_isolated_non_finite_step_is_skipped_not_applied(tiny_config):
    tiny_config["train"].update(max_steps=3, progress=False)
    trainer = Trainer(config_from_dict(tiny_config))
    loader = iter(trainer.task._loader(trainer.device))
    batch = next(loader)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poisoned = dict(batch, image=batch["image"].clone())
    poisoned["image"][0, 0, 0, 0] = float("nan")
    out = trainer.train_step([poisoned])
    assert not out["finite"] and trainer.nonfinite_streak == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, statistics restored
    out = trainer.train_step([next(loader)])
    assert out["finite"] and trainer.nonfinite_streak == 0
