"""SwinGait-2D (+ KP-RPE): zero tables are the baseline, the separable bias equals the per-token table,
variable lengths, shapes, the registry, save/load and bad input."""

from __future__ import annotations

import pytest
import torch

from kprpe.nn import create_model, list_models, save_model
from kprpe.nn.checkpoint import CheckpointError
from kprpe.nn.swingait import SwinGait, SwinGaitConfig, load_swingait

SMALL = dict(stem_channels=(8, 16), embed_dim=16, depths=(2, 2), num_heads=(2, 4), part_dim=16,
             num_classes=6, cpb_hidden=16)


def inputs(n=2, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sils = (torch.rand(n, t, 64, 44, generator=g) > 0.5).float()
    kp = torch.rand(n, t, 17, 3, generator=g)
    return sils, kp


def randomise_tables(model: SwinGait, std: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.transformer.kprpe.parameters():
            p.normal_(0, std)


@pytest.mark.parametrize("mode", ["ignore", "input", "mask"])
def test_zero_tables_equal_the_baseline_exactly(mode):
    torch.manual_seed(0)
    base = SwinGait(SwinGaitConfig(**SMALL)).eval()
    kprpe = SwinGait(SwinGaitConfig(**SMALL, kprpe=True, kp_confidence=mode)).eval()
    missing, unexpected = kprpe.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".kprpe." in k for k in missing)
    sils, kp = inputs()
    with torch.no_grad():
        a, b = base(sils), kprpe(sils, kp)
        assert torch.equal(a["embeddings"], b["embeddings"]) and torch.equal(a["logits"], b["logits"])
        randomise_tables(kprpe)  # the check can fail: non-zero tables change the output
        assert not torch.allclose(kprpe(sils, kp)["embeddings"], a["embeddings"])


def test_same_seed_builds_the_same_non_kprpe_weights():
    torch.manual_seed(3)
    base = SwinGait(SwinGaitConfig(**SMALL))
    torch.manual_seed(3)
    kprpe = SwinGait(SwinGaitConfig(**SMALL, kprpe=True))
    own = kprpe.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(value, own[key]), key


@pytest.mark.parametrize("mode", ["ignore", "input", "mask"])
def test_separable_bias_equals_the_per_token_table(mode):
    torch.manual_seed(1)
    model = SwinGait(SwinGaitConfig(**SMALL, kprpe=True, kp_confidence=mode))
    randomise_tables(model)
    kp = torch.rand(6, 17, 3)
    kp[0, 3, 2] = 0.1  # below the mask threshold
    for stage in model.transformer.kprpe:
        fast, naive = stage.window_biases(kp), stage.naive_window_biases(kp)
        for layer in range(stage.rpe.depth):
            for shift in [(0, 0), (1, 2)]:
                a, b = fast(layer, shift), naive(layer, shift)
                assert a.shape == b.shape == (6 * 10, stage.rpe.num_heads, 15, 15)
                # float32 sums of 34 products of O(1) terms, in a different order: ~1e-6 relative
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_separable_bias_matches_the_shared_keypoint_rpe_path():
    # "ignore" uses exactly the shared KeypointRPE's features: compare with its own window path
    model = SwinGait(SwinGaitConfig(**SMALL, kprpe=True, kp_confidence="ignore"))
    randomise_tables(model)
    kp = torch.rand(3, 17, 3)
    stage = model.transformer.kprpe[1]
    shared = stage.rpe.window_biases(kp[..., :2])
    torch.testing.assert_close(stage.window_biases(kp)(1, (1, 2)), shared(1, (1, 2)), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_tables_in_both_forms():
    model = SwinGait(SwinGaitConfig(**SMALL, kprpe=True, kp_confidence="input"))
    randomise_tables(model, 0.1)
    sils, kp = inputs(n=2, t=3)
    grads = []
    for naive in (False, True):
        model.zero_grad()
        model(sils, kp, naive_kprpe=naive)["embeddings"].square().sum().backward()
        grads.append([p.grad.clone() for p in model.transformer.kprpe.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_variable_lengths_ignore_padding_frames():
    torch.manual_seed(2)
    model = SwinGait(SwinGaitConfig(**SMALL, kprpe=True)).eval()
    randomise_tables(model)
    sils, kp = inputs(n=2, t=6)
    with torch.no_grad():
        batch = model(sils, kp, torch.tensor([6, 3]))["embeddings"]
        alone = model(sils[1:, :3], kp[1:, :3])["embeddings"]
        sils[1, 3:] = 1.0  # garbage in the padding changes nothing
        again = model(sils, kp, torch.tensor([6, 3]))["embeddings"]
    torch.testing.assert_close(batch[1:], alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch, again)


def test_output_shapes_and_parts():
    model = SwinGait(SwinGaitConfig(**SMALL))
    out = model(*inputs(n=3, t=4))
    assert out["embeddings"].shape == (3, 16, 15) and out["logits"].shape == (3, 6, 15)
    assert out["logits"].abs().max() <= 1 + 1e-5  # cosine logits


def test_registered_presets():
    assert {"swingait_2d", "swingait_2d_kprpe"} <= set(list_models("swingait"))
    model = create_model("swingait_2d_kprpe", **SMALL)
    assert model.config.kprpe and isinstance(model, SwinGait)
    assert not create_model("swingait_2d", **SMALL).config.kprpe


def test_save_and_load_round_trip(tmp_path):
    model = SwinGait(SwinGaitConfig(**SMALL, kprpe=True)).eval()
    randomise_tables(model)
    path = save_model(model, tmp_path / "gait.safetensors")
    loaded = load_swingait(path)
    sils, kp = inputs()
    with torch.no_grad():
        assert torch.equal(model(sils, kp)["embeddings"], loaded(sils, kp)["embeddings"])


def test_bad_input_is_named(tmp_path):
    model = SwinGait(SwinGaitConfig(**SMALL, kprpe=True))
    sils, kp = inputs()
    with pytest.raises(ValueError, match="keypoints must be"):
        model(sils)
    with pytest.raises(ValueError, match="sils must be"):
        model(sils[:, :, :32], kp)
    with pytest.raises(ValueError, match="lengths must be"):
        model(sils, kp, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="kp_confidence"):
        SwinGaitConfig(kp_confidence="weights").validate()
    with pytest.raises(CheckpointError, match="not found"):
        load_swingait(tmp_path / "missing.safetensors")


def test_models_command_lists_the_gait_presets(capsys, terminal):
    from kprpe.cli import main

    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "swingait_2d " in listed and "swingait_2d_kprpe" in listed and "rel_pos=kprpe" in listed
