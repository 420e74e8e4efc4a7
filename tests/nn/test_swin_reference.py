"""Swin + KP-RPE against the official implementation's vectors (tests/fixtures/swin_kprpe, README there).

Tolerances are the reference README's, derived from the official float32 vs float64 run: the output differs
from float64 by 9.5e-6 (|out| <= 3.1), features by <= 1.6e-4 (|x| <= 9), logits by <= 4.1e-4 (|x| <= 171,
block 7 multiplies cosines by 100), tables and biases by <= 1.4e-6; index tensors are integers: exact.
"""

from __future__ import annotations

import json

import pytest
import torch

import kprpe
from kprpe.nn import bucket_ids, num_buckets, relative_keypoints
from kprpe.nn.swin import relative_coords_table, relative_position_index
from kprpe.nn.windows import partition, shift_mask, window_index
from reference_vectors import DATA

SWIN = DATA / "swin_kprpe"
WEIGHTS = SWIN / "tiny_swin_kprpe.safetensors"
OUTPUT = dict(rtol=1e-4, atol=1e-4)
FEATURES = dict(rtol=1e-4, atol=1e-3)
TABLES = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for part in ("io", "intermediates", "kpctx", "attn"):
        out.update(load_file(str(SWIN / f"tiny_swin_kprpe_{part}.safetensors")))
    return out


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((SWIN / "tiny_swin_kprpe.json").read_text())


def _blocks(meta: dict) -> list[dict]:
    return [row for row in meta["model"]["architecture"] if row["type"] == "block"]


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_output_and_every_stage_match_official(ref, attn_impl):
    model = kprpe.load_official(WEIGHTS, attn_impl=attn_impl)
    assert not model.training and model.config.depths == (2, 1, 2, 2)
    seen = {}
    for i, layer in enumerate(model.features):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    with torch.no_grad():
        out = model(ref["images"], ref["keypoints"])
        head_in = model.forward_features(ref["images"], ref["keypoints"]).flatten(1)
    torch.testing.assert_close(out, ref["output"], **OUTPUT)
    torch.testing.assert_close(head_in, ref["head_in"], **FEATURES)
    for i in range(len(model.features)):
        torch.testing.assert_close(
            seen[i], ref[f"features_out.{i}"], **FEATURES, msg=lambda m, i=i: f"{i}: {m}"
        )


def test_keypoint_tables_biases_and_logits(ref, meta):
    model = kprpe.load_official(WEIGHTS, attn_impl="math")
    kp = ref["keypoints"]
    with torch.no_grad():
        for s, stage in enumerate(model.kprpe):
            size = model.config.map_sizes[s]
            torch.testing.assert_close(
                relative_keypoints(kp, size, size), ref[f"rel_keypoints.{s}"], **TABLES
            )
            torch.testing.assert_close(stage.hidden(kp), ref[f"rel_keypoints.{s}"], **TABLES)
            table = stage.linear(stage.hidden(kp))
            torch.testing.assert_close(table, ref[f"keypoint_linear_out.{s}"], **TABLES)
        for row in _blocks(meta):
            i, s, j = row["index"], row["stage"], row["block_in_stage"]
            stage, block = model.kprpe[s], model.features[i]
            assert block.shift == tuple(row["shift_size_configured"])
            bias = stage.window_biases(kp)(j, block.shift)
            torch.testing.assert_close(bias, ref[f"attn_bias.{i}"], **TABLES, msg=lambda m, i=i: f"{i}: {m}")
            if f"attn_logits.{i}" in ref:  # the first block of each stage: logits from its reference input
                x = ref[f"features_out.{i - 1}"]
                mask = shift_mask(*x.shape[1:3], block.window, block.shift)
                logits = block.attn.scores(partition(x, block.window, block.shift), bias, mask)
                torch.testing.assert_close(logits, ref[f"attn_logits.{i}"], **FEATURES)


def test_window_indices_masks_buckets_and_buffers_exact(ref, meta):
    model = kprpe.load_official(WEIGHTS)
    for row in _blocks(meta):
        i = row["index"]
        size = tuple(row["size"])
        shift = model.features[i].shift
        assert torch.equal(window_index(*size, (5, 5), shift), ref[f"window_index.{i}"])
        mask = shift_mask(*size, (5, 5), shift)
        if f"attn_mask.{i}" in ref:
            assert torch.equal(mask, ref[f"attn_mask.{i}"])
        else:  # unshifted, or the dropped shift of the 5x5 stage
            assert mask is None
    assert torch.equal(bucket_ids(5, 5), ref["bucket_ids_window"])
    assert torch.equal(model.kprpe[0].bucket_ids, ref["bucket_ids_window"])
    assert num_buckets() == int(ref["num_buckets"])
    from safetensors.torch import load_file

    official = load_file(str(WEIGHTS))
    # the CPB left-overs, made by our constructor, equal the official constants bit for bit
    assert torch.equal(relative_coords_table((5, 5)), official["net.features.1.attn.relative_coords_table"])
    assert torch.equal(
        relative_position_index((5, 5)), official["net.features.1.attn.relative_position_index"]
    )


def test_key_third_of_qkv_bias_is_ignored_and_everything_else_counts(ref):
    model = kprpe.load_official(WEIGHTS, attn_impl="math")
    with torch.no_grad():
        before = model(ref["images"], ref["keypoints"])
        bias = model.features[1].attn.qkv.bias
        c = bias.numel() // 3
        bias[c : 2 * c] += 1.0
        assert torch.equal(model(ref["images"], ref["keypoints"]), before)
        bias[:c] += 1e-2  # the query third does count
        assert (model(ref["images"], ref["keypoints"]) - before).abs().max() > 1e-3


def test_keypoints_move_the_output(ref):
    model = kprpe.load_official(WEIGHTS)
    with torch.no_grad():
        before = model(ref["images"], ref["keypoints"])
        moved = ref["keypoints"].clone()
        moved[:, 2, 0] += 0.01
        # the reference measured >= 0.034 for any coordinate moved by 0.01
        assert (model(ref["images"], moved) - before).abs().max() > 0.01


@pytest.mark.parametrize("size", ["small", "base"])
def test_presets_match_official_layouts(meta, size):
    official = meta["official_layouts"]["models"][size]
    with torch.device("meta"):
        model = kprpe.create_model(f"swin_{size}_kprpe")
    assert kprpe.nn.num_parameters(model) == official["num_parameters"]
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(e["key"].removeprefix("net."), e["shape"]) for e in official["state_dict"]]
    assert ours == theirs
    assert {"swin_small_kprpe": 94_652_064, "swin_base_kprpe": 113_618_208}[f"swin_{size}_kprpe"] == (
        official["num_parameters"]
    )
