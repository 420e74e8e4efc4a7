"""Exactness against the official implementation's vectors, loaded through ``load_official``."""

from __future__ import annotations

import pytest
import torch

import kprpe
from float_tolerance import assert_float64_close
from kprpe.nn import bucket_ids, gather_bias, num_buckets, relative_keypoints
from reference_vectors import DATA, load_vectors

TOL = dict(rtol=1e-4, atol=1e-4)
TIGHT = dict(rtol=1e-5, atol=1e-5)


def _capture(model, images, keypoints):
    """Run the model with hooks that record the patch embedding and each block's output."""
    seen = {}
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patch_embed_out", o))]
    for idx, blk in enumerate(model.blocks):
        hooks.append(
            blk.register_forward_hook(lambda m, i, o, idx=idx: seen.__setitem__(f"block_out.{idx}", o))
        )
    with torch.no_grad():
        seen["output"] = model(images, keypoints)
        seen["forward_features"] = model.forward_features(images, keypoints).flatten(1)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["kprpe", "irpe", "vit"])
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_output_and_intermediates_match_official(name, attn_impl):
    ref = load_vectors(name)
    overrides = (
        {"num_heads": 4} if name == "vit" else {}
    )  # a plain tiny ViT's head count is not in its shapes
    model = kprpe.load_official(DATA / f"tiny_{name}.safetensors", attn_impl=attn_impl, **overrides)
    assert not model.training
    got = _capture(model, ref["images"], ref.get("keypoints"))
    for key in ("output", "forward_features", "patch_embed_out", "block_out.0", "block_out.1"):
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=lambda m, key=key: f"{name}/{key}: {m}")


def test_math_path_follows_official_arithmetic_for_kprpe_and_vit():
    # The explicit softmax with the gathered bias follows the official arithmetic step for step: bit for bit
    # on the machine that made the vectors, float32 rounding (BLAS kernels differ between CPUs) elsewhere.
    for name, kw in (("kprpe", {"kp_bias_impl": "gather"}), ("vit", {"num_heads": 4})):
        ref = load_vectors(name)
        model = kprpe.load_official(DATA / f"tiny_{name}.safetensors", attn_impl="math", **kw)
        with torch.no_grad():
            out = model(ref["images"], ref.get("keypoints"))
        torch.testing.assert_close(
            out, ref["output"], rtol=0, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("name", ["kprpe", "irpe"])
def test_bucket_ids_bit_for_bit(name):
    ref = load_vectors(name)
    ids = bucket_ids(14)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, ref["bucket_ids"])
    assert num_buckets("product", 1.9) == int(ref["num_buckets"]) == 49


def test_kprpe_keypoint_path_intermediates():
    ref = load_vectors("kprpe")
    model = kprpe.load_official(DATA / "tiny_kprpe.safetensors")
    kp = ref["keypoints"]
    with torch.no_grad():
        rel = relative_keypoints(kp, 14, 14)
        torch.testing.assert_close(rel, ref["rel_keypoints"], **TIGHT)
        torch.testing.assert_close(model.keypoint_linear(rel), ref["keypoint_linear_out"], **TIGHT)
        hidden = model.kprpe.hidden(kp)
        table = model.kprpe.table(hidden, 0)
        torch.testing.assert_close(table[:1], ref["kp_ctx.layer0"], **TIGHT)
        bias = model.kprpe.layer_bias(hidden, 0)
        torch.testing.assert_close(bias[:1], ref["attn_bias.layer0"], **TIGHT)


def test_irpe_layer0_terms():
    ref = load_vectors("irpe")
    model = kprpe.load_official(DATA / "tiny_irpe.safetensors")
    attn = model.blocks[0].attn
    ids = bucket_ids(14)
    with torch.no_grad():
        x = model.patch_embed(ref["images"][:1]) + model.pos_embed
        x = model.blocks[0].norm1(x)
        b, n, d = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q_s, k_s = q * attn.scale, k * attn.scale
        k_term = attn.rpe_k(q_s, ids)
        torch.testing.assert_close(k_term, ref["rpe_k_out.layer0"], **TIGHT)
        total = k_term + attn.rpe_q(k_s, ids).transpose(2, 3)
        torch.testing.assert_close(total, ref["attn_bias.layer0"], **TIGHT)
        probs = (q_s @ k.transpose(-2, -1) + total).softmax(-1)
        torch.testing.assert_close(attn.rpe_v(probs, ids), ref["rpe_v_out.layer0"], **TIGHT)


def test_gather_bias_definition():
    table = torch.randn(2, 3, 5, 7)
    ids = torch.randint(0, 7, (5, 5))
    bias = gather_bias(table, ids)
    for i in range(5):
        for j in range(5):
            assert torch.equal(bias[:, :, i, j], table[:, :, i, ids[i, j]])


def test_keypoints_change_kprpe_output_but_not_other_samples():
    ref = load_vectors("kprpe")
    model = kprpe.load_official(DATA / "tiny_kprpe.safetensors")
    kp = ref["keypoints"].clone()
    kp[1, 2, 0] += 0.05
    with torch.no_grad():
        out = model(ref["images"], kp)
    assert (out[1] - ref["output"][1]).abs().max() > 1e-3
    torch.testing.assert_close(out[[0, 2]], ref["output"][[0, 2]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "gather", "index", "onehot", "decomposed", "auto"])
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_every_kprpe_bias_path_matches_official(impl, attn_impl):
    ref = load_vectors("kprpe")
    model = kprpe.load_official(DATA / "tiny_kprpe.safetensors", kp_bias_impl=impl, attn_impl=attn_impl)
    with torch.no_grad():
        out = model(ref["images"], ref["keypoints"])
        again = model(
            ref["images"], ref["keypoints"]
        )  # decomposed: second call uses the cached position term
        biases = model.kprpe.layer_biases(ref["keypoints"])
        torch.testing.assert_close(biases(0)[:1], ref["attn_bias.layer0"], **TIGHT)
    torch.testing.assert_close(out, ref["output"], **TOL)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["naive", "gather", "index", "onehot", "decomposed"])
def test_bias_paths_have_equal_gradients(impl):
    """In float64: the paths are one formula computed differently, so they agree to float64 rounding on any
    CPU (in float32 the gap depends on the CPU's kernels; tests/README.md)."""
    ref = load_vectors("kprpe")
    grads = {}
    for name in ("gather", impl):
        model = kprpe.load_official(DATA / "tiny_kprpe.safetensors", kp_bias_impl=name).train().double()
        model(ref["images"].double(), ref["keypoints"].double()).square().sum().backward()
        grads[name] = model.keypoint_linear.weight.grad
    assert_float64_close(grads[impl], grads["gather"], msg=impl)


def test_decomposed_cache_follows_weight_updates():
    ref = load_vectors("kprpe")
    model = kprpe.load_official(DATA / "tiny_kprpe.safetensors", kp_bias_impl="decomposed")
    with torch.no_grad():
        model(ref["images"], ref["keypoints"])
        model.keypoint_linear.bias.add_(0.5)  # in-place update must invalidate the cached position term
        out = model(ref["images"], ref["keypoints"])
    fresh = kprpe.load_official(model.state_dict(), kp_bias_impl="gather")
    with torch.no_grad():
        torch.testing.assert_close(out, fresh(ref["images"], ref["keypoints"]), **TOL)


def test_flex_attention_reads_the_table_and_matches_official():
    # On CPU FlexAttention runs PyTorch's eager reference; on CUDA the same path is compiled.
    ref = load_vectors("kprpe")
    model = kprpe.load_official(DATA / "tiny_kprpe.safetensors", attn_impl="flex")
    biases = model.kprpe.layer_biases(ref["keypoints"])
    assert isinstance(biases(0), kprpe.nn.position.BucketBias)  # no dense (B, H, N, N) bias is built
    with torch.no_grad():
        out = model(ref["images"], ref["keypoints"])
    torch.testing.assert_close(out, ref["output"], **TOL)
