"""Every preset builds, runs forward and backward without NaN; encodings behave as the method says."""

from __future__ import annotations

import pytest
import torch

import kprpe
from kprpe.keypoints import template_keypoints
from kprpe.nn import ViTConfig, list_models, num_parameters, preset_config

# Official parameter counts (reference official_layouts.json).
OFFICIAL_PARAMS = {
    "vit_small_kprpe": 96_004_128,
    "vit_base_kprpe": 115_076_736,
    "vit_base_irpe": 114_982_656,
    "vit_base": 114_869_760,
    "vit_small": 95_952_384,
}


def _inputs(model, batch=2):
    cfg = model.config
    images = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size) * 2 - 1
    kp = torch.rand(batch, cfg.num_keypoints, 2) * 0.8 + 0.1
    return images, kp


def test_required_presets_exist():
    names = set(list_models())
    assert {"vit_small", "vit_base", "vit_small_kprpe", "vit_base_kprpe", "vit_base_irpe"} <= names


@pytest.mark.parametrize("name", list_models("vit"))
def test_preset_forward_backward(name):
    model = kprpe.create_model(name)
    if model.kprpe is not None:  # make the keypoint path carry gradient-relevant values
        with torch.no_grad():
            model.keypoint_linear.weight.normal_(0, 0.1)
    model.train()
    images, kp = _inputs(model)
    out = model(images, kp)
    assert out.shape == (2, model.config.output_dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if model.kprpe is not None:
        assert model.keypoint_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,count", sorted(OFFICIAL_PARAMS.items()))
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = kprpe.create_model(name)
    assert num_parameters(model) == count


def test_zero_keypoint_table_equals_plain_vit():
    kp_model = kprpe.create_model("vit_tiny_kprpe").eval()  # fresh: f(P) is zero-initialised
    assert kp_model.keypoint_linear.weight.abs().sum() == 0
    plain = kprpe.create_model("vit_tiny").eval()
    state = {k: v for k, v in kp_model.state_dict().items() if not k.startswith("keypoint_linear")}
    plain.load_state_dict(state, strict=True)
    images, kp = _inputs(kp_model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(kp_model(images, kp), plain(images), rtol=1e-5, atol=1e-5)


def test_keypoints_do_not_receive_gradient():
    model = kprpe.create_model("vit_tiny_kprpe")
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
    images, kp = _inputs(model)
    kp.requires_grad_(True)
    model(images, kp).sum().backward()
    assert kp.grad is None


@pytest.mark.parametrize(
    "overrides",
    [
        dict(kp_sharing="head"),
        dict(kp_sharing="layer"),
        dict(kp_sharing="shared"),
        dict(kp_input="absolute"),
        dict(kp_input="query_position"),
        dict(kp_hidden=16),
        dict(kp_hidden=16, kp_mlp="relu_layernorm", kp_sharing="layer"),
        dict(abs_pos=False),
        dict(num_keypoints=3),
        dict(head="mean"),
    ],
)
def test_kprpe_variants_run_and_use_their_input(overrides):
    model = kprpe.create_model("vit_tiny_kprpe", **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("kprpe."):
                p.normal_(0, 0.5)
    images, kp = _inputs(model)
    with torch.no_grad():
        out = model(images, kp)
        moved_out = model(images, kp + 0.1)
        bias = model.kprpe.layer_bias(model.kprpe.hidden(kp), 0)
        moved_bias = model.kprpe.layer_bias(model.kprpe.hidden(kp + 0.1), 0)
    assert torch.isfinite(out).all()
    assert bias.shape[1:] == (model.config.num_heads, model.num_tokens, model.num_tokens)
    if overrides.get("kp_input") == "query_position":
        assert not model.uses_keypoints
        torch.testing.assert_close(out, moved_out)  # the keypoint-free control ignores keypoints
        torch.testing.assert_close(bias, moved_bias)
    else:
        assert (bias - moved_bias).abs().max() > 1e-2
        assert (out - moved_out).abs().max() > 0


def test_absolute_kp_input_gives_same_bias_for_every_query():
    model = kprpe.create_model("vit_tiny_kprpe", kp_input="absolute")
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
        table = model.kprpe.table(model.kprpe.hidden(template_keypoints(2)), 0)
    assert table.shape[2] == 1


@pytest.mark.parametrize("sharing", ["layer_head", "layer", "head", "shared"])
def test_linear_f_decomposes_into_position_and_sample_terms(sharing):
    # docs/models.md (KP-RPE): with linear f, T[b] - T[b'] does not depend on the query token.
    model = kprpe.create_model("vit_tiny_kprpe", kp_sharing=sharing)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
        model.keypoint_linear.bias.normal_()
        kp = torch.rand(2, 5, 2)
        table = model.kprpe.table(model.kprpe.hidden(kp), 1)
    diff = table[0] - table[1]  # (H, N, nb)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sharing", ["layer_head", "layer", "head", "shared"])
def test_table_layout_of_every_sharing(sharing):
    """f's output feature of (layer, head, bucket): (layer * H + head) * nb + bucket, leaving out the
    dimensions the mode shares (the official ctx types' layouts, docs/models.md "KP-RPE variants")."""
    model = kprpe.create_model("vit_tiny_kprpe", kp_sharing=sharing)
    cfg, nb = model.config, model.num_buckets
    per_layer, per_head = sharing in ("layer_head", "layer"), sharing in ("layer_head", "head")
    heads_in_f = cfg.num_heads if per_head else 1
    assert model.keypoint_linear.out_features == nb * heads_in_f * (cfg.depth if per_layer else 1)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
        model.keypoint_linear.bias.normal_()
        kp = torch.rand(2, 5, 2)
        full = model.keypoint_linear(kprpe.nn.relative_keypoints(kp, model.grid, model.grid))
        for layer in range(cfg.depth):
            table = model.kprpe.table(model.kprpe.hidden(kp), layer)
            assert table.shape == (2, cfg.num_heads, model.num_tokens, nb)
            for head in range(cfg.num_heads):
                start = ((layer if per_layer else 0) * heads_in_f + (head if per_head else 0)) * nb
                torch.testing.assert_close(table[:, head], full[..., start : start + nb], rtol=0, atol=0)


def test_official_mlp_is_linear_relu_layernorm_linear():
    model = kprpe.create_model("vit_tiny_kprpe", kp_hidden=8, kp_mlp="relu_layernorm", kp_sharing="layer")
    with torch.no_grad():
        for p in model.kprpe.parameters():
            p.normal_()
        kp = torch.rand(2, 5, 2)
        rel = kprpe.nn.relative_keypoints(kp, model.grid, model.grid)
        first, norm = model.kprpe.mlp[0], model.kprpe.mlp[2]
        hidden = torch.nn.functional.layer_norm(first(rel).clamp_min(0), (8,), norm.weight, norm.bias, 1e-5)
        torch.testing.assert_close(model.kprpe.hidden(kp), hidden)


def _layer_sharing_model(**overrides):
    model = kprpe.create_model("vit_tiny_kprpe", kp_sharing="layer", img_size=48, **overrides)
    torch.manual_seed(0)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0, 0.5)
        model.keypoint_linear.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@pytest.mark.parametrize("impl", ["naive", "gather", "index", "onehot", "decomposed"])
def test_layer_sharing_every_bias_path_forward_backward(impl, attn_impl):
    """Per-layer tables shared by the heads: every bias path and attention gives the reference's output and
    gradients (decomposed: the linear-f identity holds per layer)."""
    ref = _layer_sharing_model(kp_bias_impl="gather", attn_impl="math").train()
    model = _layer_sharing_model(kp_bias_impl=impl, attn_impl=attn_impl).train()
    model.load_state_dict(ref.state_dict())
    images, kp = _inputs(ref)
    outs, grads = [], []
    for m in (ref, model):
        out = m(images, kp)
        out.square().mean().backward()
        outs.append(out)
        grads.append(m.keypoint_linear.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # inference (decomposed: the cached position term)
        torch.testing.assert_close(model.eval()(images, kp), ref.eval()(images, kp), rtol=1e-4, atol=1e-4)


def test_layer_sharing_flex_attention_reads_the_table():
    # FlexAttention has no backward on CPU (its eager reference runs here); on CUDA the same path is compiled
    ref = _layer_sharing_model(kp_bias_impl="gather", attn_impl="math").eval()
    model = _layer_sharing_model(attn_impl="flex").eval()
    model.load_state_dict(ref.state_dict())
    images, kp = _inputs(ref)
    assert isinstance(model.kprpe.layer_biases(kp)(1), kprpe.nn.position.BucketBias)
    with torch.no_grad():
        torch.testing.assert_close(model(images, kp), ref(images, kp), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_tiny_rpe", "vit_tiny_irpe", "vit_tiny_kprpe"])
def test_bf16_autocast_cpu(name):
    model = kprpe.create_model(name).eval()
    images, kp = _inputs(model)
    with torch.no_grad():
        ref = model(images, kp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, kp)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1)
    assert (cos > 0.98).all()


def test_sdpa_matches_math_in_training_graph():
    a = kprpe.create_model("vit_tiny_kprpe", attn_impl="math")
    b = kprpe.create_model("vit_tiny_kprpe", attn_impl="sdpa")
    with torch.no_grad():
        a.keypoint_linear.weight.normal_()
    b.load_state_dict(a.state_dict())
    images, kp = _inputs(a)
    a.eval(), b.eval()
    torch.testing.assert_close(a(images, kp), b(images, kp), rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_same_gradients():
    model = kprpe.create_model("vit_tiny_kprpe", drop_path_rate=0.0)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0, 0.1)
    images, kp = _inputs(model)
    model.train()
    model(images, kp).sum().backward()
    g_ref = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images, kp).sum().backward()
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, g_ref, rtol=1e-5, atol=1e-6)


def test_keyword_construction_any_size():
    model = kprpe.create_model(
        "vit_small_kprpe",
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=3,
        mlp_ratio=1.5,
        output_dim=16,
    ).eval()
    assert model.grid == 8 and model.keypoint_linear.out_features == 3 * 3 * 49
    out = model(torch.zeros(1, 3, 64, 64), torch.full((1, 5, 2), 0.5))
    assert out.shape == (1, 16)


def test_normalize_embedding():
    emb = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    unit, norm = kprpe.normalize_embedding(emb)
    torch.testing.assert_close(unit[0], torch.tensor([0.6, 0.8]))
    assert norm.flatten().tolist() == [5.0, 0.0]
    assert torch.isfinite(unit).all()


def test_config_roundtrip_and_validation():
    cfg = preset_config("vit_base_kprpe")
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ViTConfig.from_dict({"depht": 3})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        kprpe.create_model("vit_tiny", num_heads=5)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        kprpe.create_model("vit_tiny", img_size=100)
    with pytest.raises(ValueError, match="rel_pos"):
        kprpe.create_model("vit_tiny", rel_pos="alibi")
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        kprpe.create_model("vit_huge")


@pytest.mark.parametrize("impl", ["naive", "gather", "index", "onehot", "decomposed"])
def test_caches_filled_in_inference_mode_serve_training(impl):
    from kprpe.nn import buckets

    buckets._DEVICE_CACHE.clear()
    buckets._bucket_ids_cpu.cache_clear()
    model = kprpe.create_model("vit_tiny_kprpe", kp_bias_impl=impl, img_size=48)
    images, kp = _inputs(model)
    with torch.inference_mode():
        model.eval()(images, kp)
    model.train()(images, kp).sum().backward()
    assert model.keypoint_linear.weight.grad is not None


def test_kprpe_module_owns_its_index_buffers_and_keeps_official_names():
    model = kprpe.create_model("vit_tiny_kprpe", kp_bias_impl="onehot")
    buffers = dict(model.named_buffers())
    assert {"kprpe.bucket_ids", "kprpe.flat_index", "kprpe.one_hot"} <= set(buffers)
    keys = list(model.state_dict())
    assert "keypoint_linear.weight" in keys and not any(
        k.startswith("kprpe.") for k in keys
    )  # no buffers saved
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
    other = kprpe.create_model("vit_tiny_kprpe")
    other.load_state_dict(model.state_dict())  # official names load into the module
    assert torch.equal(other.kprpe.linear.weight, model.kprpe.linear.weight)
