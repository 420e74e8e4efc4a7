"""Swin-V2 / Swin-KP-RPE: windowed KP-RPE properties, any size by keyword, checkpoints in and out."""

from __future__ import annotations

import json

import pytest
import torch

import kprpe
from kprpe.nn import KeypointRPE, bucket_ids
from kprpe.nn.checkpoint import CheckpointError
from kprpe.nn.swin import SwinTransformer, swin_config_from_state_dict
from kprpe.nn.windows import merge, partition, window_index
from reference_vectors import DATA

WEIGHTS = DATA / "swin_kprpe" / "tiny_swin_kprpe.safetensors"
# a small Swin for plumbing: 32 px, patch 2 -> 16 x 16 -> 8 x 8 -> 4 x 4 with 4 x 4 windows
TINY = dict(
    img_size=32,
    patch_size=2,
    embed_dim=16,
    depths=(2, 2, 1),
    num_heads=(1, 2, 4),
    window_size=4,
    output_dim=8,
)


def _random_tables(rpe: KeypointRPE) -> None:
    with torch.no_grad():
        rpe.linear.weight.normal_(0, 0.5)
        rpe.linear.bias.normal_(0, 0.5)


def _naive_window_bias(table: torch.Tensor, height, width, window, shift) -> torch.Tensor:
    """The official way, written plainly: pad/roll/cut the per-token table map, one window at a time."""
    b, h, n, nb = table.shape
    wh, ww = window
    ids = bucket_ids(wh, ww)
    ph, pw = -(-height // wh) * wh, -(-width // ww) * ww
    grid = torch.zeros(b, h, ph, pw, nb)
    grid[:, :, :height, :width] = table.view(b, h, height, width, nb)
    sh = 0 if wh >= ph else shift[0]
    sw = 0 if ww >= pw else shift[1]
    grid = torch.roll(grid, shifts=(-sh, -sw), dims=(2, 3))
    out = []
    for bi in range(b):
        for r in range(ph // wh):
            for c in range(pw // ww):
                rows = grid[bi, :, r * wh : (r + 1) * wh, c * ww : (c + 1) * ww].reshape(h, wh * ww, nb)
                out.append(torch.stack([rows[:, i, ids[i]] for i in range(wh * ww)], dim=1))
    return torch.stack(out)


@pytest.mark.parametrize(
    "grid, window, shift",
    [
        ((15, 10), (3, 5), (1, 2)),
        ((15, 10), (3, 5), (0, 0)),
        ((7, 9), (5, 5), (2, 2)),
        ((5, 5), (5, 5), (2, 2)),
    ],
)
@pytest.mark.parametrize("sharing", ["layer_head", "layer", "head", "shared"])
def test_window_bias_equals_naive_per_window_reference(grid, window, shift, sharing):
    rpe = KeypointRPE(grid=grid, num_heads=3, depth=2, window=window, sharing=sharing)
    loop = KeypointRPE(grid=grid, num_heads=3, depth=2, window=window, sharing=sharing, bias_impl="loop")
    _random_tables(rpe)
    loop.load_state_dict(rpe.state_dict())
    kp = torch.rand(2, 5, 2) * 1.4 - 0.2  # on and outside the border
    hidden = rpe.hidden(kp)
    for layer in range(2):
        table = rpe.table(hidden, layer)
        got = rpe.window_biases(kp)(layer, shift)
        assert torch.equal(got, _naive_window_bias(table, *grid, window, shift))
        assert torch.equal(loop.window_biases(kp)(layer, shift), got)  # the benchmark's official-style loop


def test_partition_and_merge_are_inverse_on_padded_shifted_maps():
    x = torch.randn(2, 15, 10, 3)
    for shift in [(0, 0), (1, 2)]:
        windows = partition(x, (3, 5), shift)
        index = window_index(15, 10, (3, 5), shift)
        flat = torch.cat([x.reshape(2, 150, 3), torch.zeros(2, 1, 3)], 1)
        expected = flat[:, torch.where(index < 0, 150, index)].reshape(-1, 15, 3)
        assert torch.equal(windows, expected)  # the token order is the index's
        assert torch.equal(merge(windows, 15, 10, (3, 5), shift), x)


def test_shifting_keypoints_by_whole_windows_shifts_the_window_biases():
    # 20 x 20 map, 5 x 5 windows: moving every keypoint by 5/20 in x moves each window's offsets onto the next
    # window's. The patch centres are float32 linspace midpoints (not exactly uniform, <= 6e-8 off), times
    # table weights of size ~0.5 over 10 inputs: differences of a few 1e-7 at most.
    rpe = KeypointRPE(grid=20, num_heads=2, depth=1, window=(5, 5))
    _random_tables(rpe)
    kp = torch.rand(2, 5, 2) * 0.5 + 0.1
    moved = kp + torch.tensor([0.25, 0.0])
    before = rpe.window_biases(kp)(0).view(2, 4, 4, 2, 25, 25)
    after = rpe.window_biases(moved)(0).view(2, 4, 4, 2, 25, 25)
    torch.testing.assert_close(after[:, :, 1:], before[:, :, :-1], rtol=0, atol=2e-6)
    assert (after[:, :, 1:] - before[:, :, 1:]).abs().max() > 0.1  # the biases do depend on the keypoints


def test_zero_tables_give_exactly_the_plain_windowed_attention():
    torch.manual_seed(1)
    kp_model = SwinTransformer(**TINY, rel_pos="kprpe", attn_impl="math").eval()
    plain = SwinTransformer(**TINY, rel_pos="none", attn_impl="math").eval()
    state = {k: v for k, v in kp_model.state_dict().items() if not k.startswith("keypoint_linear")}
    plain.load_state_dict(state)
    images, kp = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 5, 2)
    with torch.no_grad():
        assert torch.equal(kp_model(images, kp), plain(images))
        _random_tables(kp_model.kprpe[0])
        assert not torch.equal(kp_model(images, kp), plain(images))


def test_any_size_by_keyword_and_rectangular_windows():
    model = kprpe.create_model("swin_small_kprpe", **TINY).eval()
    assert model.config.map_sizes == [16, 8, 4]
    rect = SwinTransformer(
        img_size=30,
        patch_size=2,
        embed_dim=8,
        depths=(2, 1),
        num_heads=(1, 2),
        window_size=(3, 5),
        output_dim=4,
        rel_pos="kprpe",
    ).eval()
    for stage in rect.kprpe:
        _random_tables(stage)
    with torch.no_grad():
        out = rect(torch.rand(3, 3, 30, 30), torch.rand(3, 5, 2))
        assert out.shape == (3, 4) and torch.isfinite(out).all()
        out = model(torch.rand(2, 3, 32, 32), torch.rand(2, 5, 2))
        assert out.shape == (2, 8)
    assert "swin_small_kprpe" in kprpe.list_models() and "swin_base" in kprpe.list_models(family="swin")


def test_sdpa_and_math_paths_agree_and_train():
    torch.manual_seed(0)
    model = SwinTransformer(**TINY, rel_pos="kprpe")
    for stage in model.kprpe:
        _random_tables(stage)
    images, kp = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 5, 2)
    model.eval()
    with torch.no_grad():
        a = model(images, kp)
        for block in model.modules():
            if hasattr(block, "attn_impl"):
                block.attn_impl = "math"
        b = model(images, kp)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # float32 rounding of two softmax kernels
    model.train()
    model(images, kp).square().mean().backward()
    assert model.kprpe[0].linear.weight.grad.abs().sum() > 0


def test_training_after_inference_mode_evaluation():
    # the per-shift window index is cached on first use: filled under inference_mode, it must serve training
    model = SwinTransformer(**TINY, rel_pos="kprpe").eval()
    images, kp = torch.rand(2, 3, 32, 32), torch.rand(2, 5, 2)
    with torch.inference_mode():
        model(images, kp)
    model.train()
    model(images, kp).square().mean().backward()
    assert model.kprpe[1].linear.weight.grad is not None


def test_bad_inputs_are_named():
    model = SwinTransformer(**TINY, rel_pos="kprpe").eval()
    with pytest.raises(ValueError, match="needs keypoints"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="keypoints must have shape"):
        model(torch.rand(1, 3, 32, 32), torch.rand(1, 4, 2))
    with pytest.raises(ValueError, match="must be 32x32"):
        model(torch.rand(1, 3, 30, 30), torch.rand(1, 5, 2))
    with pytest.raises(ValueError, match="not divisible"):
        SwinTransformer(**{**TINY, "num_heads": (3, 2, 4)})


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("rel_pos", ["kprpe", "cpb", "none"])
def test_save_model_load_official_round_trip(tmp_path, rel_pos):
    model = SwinTransformer(**TINY, rel_pos=rel_pos, attn_impl="math").eval()
    if model.kprpe is not None:
        for stage in model.kprpe:
            _random_tables(stage)
    path = kprpe.save_model(model, tmp_path / "swin.safetensors")
    loaded = kprpe.load_official(path)
    assert loaded.config == model.config
    images, kp = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 5, 2)
    with torch.no_grad():
        assert torch.equal(loaded(images, kp), model(images, kp))
    # and without kprpe's metadata: the architecture comes back from the shapes alone
    from safetensors.torch import load_file

    bare = kprpe.load_official(dict(load_file(str(path))), img_size=32, attn_impl="math")
    assert bare.config.depths == (2, 2, 1) and bare.config.num_heads == (1, 2, 4)
    with torch.no_grad():
        assert torch.equal(bare(images, kp), model(images, kp))


def test_official_wrapper_and_hugging_face_prefixes(tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(WEIGHTS))
    assert any(k.startswith("keypoint_linear.0") for k in state)
    model = kprpe.load_official(state)
    hf = {f"model.{k}": v for k, v in state.items()}
    save_file(hf, str(tmp_path / "model.safetensors"))
    again = kprpe.load_official(tmp_path)
    images, kp = torch.rand(1, 3, 112, 112) * 2 - 1, torch.rand(1, 5, 2)
    with torch.no_grad():
        assert torch.equal(model(images, kp), again(images, kp))


def test_official_config_is_read_and_checked(tmp_path):
    import shutil

    import yaml

    shutil.copy(WEIGHTS, tmp_path / "model.safetensors")
    rpe = dict(
        name="KPRPE_shared",
        rpe_on="k",
        method="product",
        ratio=1.9,
        num_keypoints=5,
        ctx_type="rel_keypoint_splithead_unshared",
    )
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(dict(color_space="RGB", rpe_config=rpe)))
    assert kprpe.load_official(tmp_path).config.rel_pos == "kprpe"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(dict(name="small", rpe_config=rpe)))
    with pytest.raises(CheckpointError, match="config says embed_dim 128 but the tensor shapes say 16"):
        kprpe.load_official(tmp_path)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(dict(rpe_config={**rpe, "ctx_type": "keypoint"})))
    with pytest.raises(CheckpointError, match="ctx_type 'keypoint' is not supported for Swin"):
        kprpe.load_official(tmp_path)
    (tmp_path / "model.yaml").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"conf": {"name": "base", "color_space": "BGR"}}))
    with pytest.raises(CheckpointError, match="color_space 'BGR'"):
        kprpe.load_official(tmp_path)


def test_ambiguous_shapes_are_refused_with_the_candidates():
    from safetensors.torch import load_file

    state = {k.removeprefix("net."): v for k, v in load_file(str(WEIGHTS)).items()}
    no_table = {k: v for k, v in state.items() if not k.endswith("relative_coords_table")}
    with pytest.raises(ValueError, match=r"fits windows \[\(1, 25\), \(5, 5\), \(25, 1\)\]"):
        swin_config_from_state_dict(no_table)
    assert swin_config_from_state_dict(no_table, known={"window_size": (5, 5)})["window_size"] == (5, 5)
    with pytest.raises(CheckpointError, match="pass window_size"):
        kprpe.load_official(no_table)
    # depth 2 = heads 2 in both stages: per-layer and per-head tables have the same shape
    model = SwinTransformer(
        img_size=20,
        patch_size=2,
        embed_dim=8,
        depths=(2, 2),
        num_heads=(2, 2),
        window_size=5,
        output_dim=4,
        rel_pos="kprpe",
        kp_sharing="layer",
    )
    with pytest.raises(CheckpointError, match=r"fit kp_sharing \['layer', 'head'\]: pass kp_sharing"):
        kprpe.load_official(model.state_dict(), img_size=20)
    loaded = kprpe.load_official(model.state_dict(), img_size=20, kp_sharing="layer")
    assert loaded.config.kp_sharing == "layer"
    with pytest.raises(CheckpointError, match="pass img_size"):
        kprpe.load_official(model.state_dict(), kp_sharing="layer")


def test_models_command_lists_the_swin_family(capsys):
    from kprpe.cli import main

    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["swin_small_kprpe"]["rel_pos"] == "kprpe" and rows["swin_base"]["rel_pos"] == "cpb"
    assert rows["swin_base_kprpe"]["depth"] == 24 and list(rows["swin_base"]["num_heads"]) == [4, 8, 16, 32]
