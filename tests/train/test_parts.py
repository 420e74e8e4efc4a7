"""The trainer's seams: a task passes its own dataset, P x K sampler, loss head and rank-based validator."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, Sampler

import kprpe
from kprpe.keypoints import template_keypoints
from kprpe.train import ConfigError, Trainer, config_from_dict

IDENTITIES, PER_IDENTITY, P, K = 6, 8, 4, 4  # batch = P identities x K samples = data.batch_size 16


class ToySequences(Dataset):
    """Stands in for a gait set: the identity is a brightness offset, plus noise."""

    num_classes = IDENTITIES

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(IDENTITIES).repeat_interleave(PER_IDENTITY)
        base = torch.linspace(-0.8, 0.8, IDENTITIES)[self.labels]
        self.images = base[:, None, None, None] + 0.1 * torch.randn(len(self.labels), 3, 32, 32, generator=g)
        self.keypoints = template_keypoints(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return dict(
            image=self.images[i],
            keypoints=self.keypoints[i],
            label=int(self.labels[i]),
            valid=True,
            index=i,
        )


class PKSampler(Sampler):
    """P identities x K samples per micro-batch, the order a function of (seed, epoch) only."""

    def __init__(self, labels: torch.Tensor, seed: int = 0) -> None:
        self.labels, self.seed = labels.numpy(), seed
        self.micro_batches_per_epoch = IDENTITIES * PER_IDENTITY // (P * K)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_micro_batch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for _ in range(self.micro_batches_per_epoch):
            ids = rng.choice(IDENTITIES, P, replace=False)
            batches.append([int(i) for c in ids for i in rng.choice(np.flatnonzero(self.labels == c), K)])
        return batches

    def __iter__(self):
        for batch in self._batches()[self.start :]:
            yield from batch

    def __len__(self) -> int:
        return (self.micro_batches_per_epoch - self.start) * P * K


class TripletCEHead(nn.Module):
    """Batch-hard triplet loss on the embeddings plus cross-entropy on a linear classifier."""

    def __init__(self, dim: int, num_classes: int, margin: float = 0.2) -> None:
        super().__init__()
        self.num_classes, self.margin = num_classes, margin
        self.classifier = nn.Linear(dim, num_classes)
        self.calls = 0

    def extra_state(self) -> dict:
        return {"calls": self.calls}

    def load_extra_state(self, state: dict) -> None:
        self.calls = state["calls"]

    def forward(self, emb, labels, valid):
        self.calls += 1
        unit = F.normalize(emb, dim=1)
        dist = torch.cdist(unit, unit)
        same = labels[:, None] == labels[None, :]
        hardest_pos = (dist * same).max(dim=1).values
        hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
        triplet = F.relu(hardest_pos - hardest_neg + self.margin).mean()
        return triplet + F.cross_entropy(self.classifier(emb), labels), {}


def rank1_validator(data: ToySequences):
    """Rank-1 and a one-gallery-per-identity mAP: the kind of metric a gait protocol reports."""

    def validate(model, device):
        model.eval()
        with torch.no_grad():
            emb = F.normalize(model(data.images.to(device), data.keypoints.to(device)).float(), dim=1)
        model.train()
        gallery = torch.arange(IDENTITIES) * PER_IDENTITY  # first sample of each identity
        probe = torch.tensor([i for i in range(len(data)) if i % PER_IDENTITY])
        scores = emb[probe] @ emb[gallery].T
        truth = data.labels[probe]
        rank1 = float((scores.argmax(1).cpu() == truth).float().mean())
        order = scores.argsort(1, descending=True).cpu()
        rank_of_true = (order == truth[:, None]).float().argmax(1) + 1
        return {"toy_gait": {"rank1": rank1, "mAP": float((1.0 / rank_of_true).mean())}}

    return validate


def _parts():
    torch.manual_seed(1)  # the head is built outside the trainer: its initial weights must repeat too
    data = ToySequences()
    head = TripletCEHead(32, IDENTITIES)
    return dict(dataset=data, sampler=PKSampler(data.labels), head=head, validator=rank1_validator(data))


@pytest.fixture
def toy_config(tiny_config, tmp_path):
    tiny_config["data"]["train"] = str(tmp_path / "unused")  # the dataset is passed in, never read here
    tiny_config["validation"] = {"every": 3}
    tiny_config["train"].update(max_steps=6, checkpoint_every=3)
    return tiny_config


def test_a_trainer_runs_with_passed_in_parts(toy_config, tmp_path):
    parts = _parts()
    trainer = Trainer(config_from_dict(toy_config), **parts)
    assert trainer.head is parts["head"] and trainer.sampler is parts["sampler"]
    final = trainer.run()
    assert parts["head"].calls == 6  # one micro-batch per step
    rows = list(csv.DictReader(open(tmp_path / "run" / "validation.csv")))
    assert [(r["step"], r["set"]) for r in rows] == [("3", "toy_gait"), ("6", "toy_gait")]
    assert all(0 <= float(r["rank1"]) <= 1 and 0 < float(r["mAP"]) <= 1 for r in rows)
    logged = list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))
    assert all(float(r["norm_mean"]) > 0 for r in logged)  # measured by the loop: this head reports none
    assert kprpe.load_official(final).config.img_size == 32


def test_passed_in_parts_resume_exactly(toy_config, tmp_path):
    straight = Trainer(config_from_dict(toy_config), **_parts()).run()
    toy_config["train"]["output_dir"] = str(tmp_path / "crashed")

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        Trainer(config_from_dict(toy_config), step_callback=crash, **_parts()).run()
    parts = _parts()
    resumed = Trainer(config_from_dict(toy_config), resume="latest", **parts)
    assert resumed.step == 3 and parts["head"].calls == 3  # the head's extra state came back
    final = resumed.run()
    a, b = load_file(straight), load_file(final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_head_needs_the_datasets_class_count(toy_config):
    class NoClasses(ToySequences):
        num_classes = property(lambda self: (_ for _ in ()).throw(AttributeError))

    data = NoClasses()
    with pytest.raises(ConfigError, match="num_classes.*pass head="):
        Trainer(config_from_dict(toy_config), dataset=data, sampler=PKSampler(data.labels))
