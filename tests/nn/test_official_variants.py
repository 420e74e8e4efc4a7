"""Every official KP-RPE context type loads under its official key names, built from its official config;
without a config, shapes that fit several variants are refused with the candidates listed."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from safetensors.torch import save_file

import kprpe
from kprpe.nn import CheckpointError, infer_config, save_model
from kprpe.nn.official_config import CTX_TYPES, SIZES, ctx_type_of, official_vit_fields
from reference_vectors import DATA

LAYOUTS = json.loads((DATA / "official_layouts.json").read_text())["models"]
TINY = SIZES["tiny"]
# ctx types whose tensors (for the tiny size, heads known from it) fit exactly one variant without a config
UNAMBIGUOUS = {
    "rel_keypoint_splithead_unshared",
    "rel_keypoint_unshared",
    "rel_keypoint_splithead",
    "rel_keypoint_v2",
    "rel_keypoint_unshared_v2",
}


def _rpe_config(ctx_type: str) -> dict:
    """An rpe_config as the official configs write it."""
    return {
        "name": "KPRPE_shared",
        "rpe_on": "k",
        "shared_head": True,
        "mode": "ctx",
        "method": "product",
        "ratio": 1.9,
        "ctx_type": ctx_type,
        "num_keypoints": 5,
    }


def _model_yaml(ctx_type: str, name: str = "tiny") -> dict:
    return {
        "input_size": [3, 112, 112],
        "color_space": "RGB",
        "name": name,
        "output_dim": TINY["output_dim"],
        "start_from": "",
        "freeze": False,
        "mask_ratio": 0.0,
        "rpe_config": _rpe_config(ctx_type),
    }


def _random_model(ctx_type: str, **overrides) -> kprpe.nn.VisionTransformer:
    model = kprpe.create_model("vit_tiny_kprpe", **{**CTX_TYPES[ctx_type], **overrides}).eval()
    gen = torch.Generator().manual_seed(len(ctx_type))
    with torch.no_grad():
        for p in model.kprpe.parameters():  # the official init zeroes f: make every table matter
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _inputs(model):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 112, 112, generator=gen) * 2 - 1
    return images, torch.rand(2, 5, 2, generator=gen) * 0.8 + 0.1


def _same_function(a, b) -> None:
    assert a.config.to_dict() == b.config.to_dict()
    images, kp = _inputs(a)
    with torch.no_grad():
        torch.testing.assert_close(b(images, kp), a(images, kp), rtol=0, atol=0)


def _hf_repo(tmp_path, model, config: dict | None):
    """A published-style repo: model.safetensors with 'model.net.' keys, config.json with the model's conf."""
    repo = tmp_path / "hf"
    repo.mkdir()
    tensors = {"model.net." + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(repo / "model.safetensors"))
    if config is not None:
        conf = dict(config, yaml_path="models/vit_kprpe/configs/v1_tiny.yaml")
        (repo / "config.json").write_text(
            json.dumps({"architectures": ["CVLFaceRecognitionModel"], "conf": conf})
        )
    return repo


def _research_dir(tmp_path, model, config: dict):
    """A research run: pretrained_model/model.pt with 'net.' keys beside pretrained_model/model.yaml."""
    folder = tmp_path / "run" / "pretrained_model"
    folder.mkdir(parents=True)
    torch.save({"net." + k: v for k, v in model.state_dict().items()}, folder / "model.pt")
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run"


@pytest.mark.parametrize("ctx_type", sorted(CTX_TYPES))
def test_each_official_ctx_type_loads_from_its_config(tmp_path, ctx_type):
    model = _random_model(ctx_type)
    config = _model_yaml(ctx_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ctx_type 'keypoint' with a non-zero table warns (tested below)
        _same_function(model, kprpe.load_official(_hf_repo(tmp_path, model, config)))
        _same_function(model, kprpe.load_official(_research_dir(tmp_path, model, config)))
    assert official_vit_fields(config)["kp_sharing"] == model.config.kp_sharing
    assert ctx_type_of(model.config.to_dict()) == ctx_type


@pytest.mark.parametrize("ctx_type", sorted(CTX_TYPES))
def test_each_official_ctx_type_without_config_loads_or_lists_candidates(tmp_path, ctx_type):
    model = _random_model(ctx_type)
    repo = _hf_repo(tmp_path, model, None)
    if ctx_type in UNAMBIGUOUS:
        _same_function(model, kprpe.load_official(repo))
        return
    with pytest.raises(CheckpointError) as info:
        kprpe.load_official(repo)
    msg = str(info.value)
    assert "identical tensor shapes" in msg and "official ctx_type 'rel_keypoint'" in msg
    assert "official ctx_type 'keypoint'" in msg and "load_official(path, " in msg and "config.json" in msg
    chosen = kprpe.load_official(repo, kp_input=model.config.kp_input)  # choosing settles it
    _same_function(model, chosen)


def test_official_mlp_keeps_official_key_names():
    model = _random_model("rel_keypoint_unshared_v2")
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("keypoint_")}
    assert keys == {
        "keypoint_linear.0.weight": (256, 10),
        "keypoint_linear.0.bias": (256,),
        "keypoint_linear.2.weight": (256,),  # the LayerNorm
        "keypoint_linear.2.bias": (256,),
        "keypoint_linear.3.weight": (TINY["depth"] * 49, 256),
        "keypoint_linear.3.bias": (TINY["depth"] * 49,),
    }
    mlp = model.kprpe.mlp
    assert isinstance(mlp[1], torch.nn.ReLU) and isinstance(mlp[2], torch.nn.LayerNorm)


def test_per_layer_heads_shared_is_not_read_as_one_head(tmp_path):
    """The bug this fixes: depth * 49 outputs were read as a 1-head per-(layer, head) model."""
    model = _random_model("rel_keypoint_unshared", depth=3)  # depth 3: not a known size, heads unknown
    repo = _hf_repo(tmp_path, model, None)
    with pytest.raises(CheckpointError) as info:
        kprpe.load_official(repo)
    msg = str(info.value)
    assert "kp_sharing='layer_head', num_heads=1" in msg
    assert "kp_sharing='layer', num_heads=? (not in the weights)" in msg
    assert "official ctx_type 'rel_keypoint_unshared'" in msg
    with pytest.raises(CheckpointError, match="shares its tables across heads.*num_heads="):
        kprpe.load_official(repo, kp_sharing="layer")
    _same_function(model, kprpe.load_official(repo, kp_sharing="layer", num_heads=TINY["num_heads"]))
    # with the official config, nothing needs to be passed (no name: the size comes from the shapes)
    config = {k: v for k, v in _model_yaml("rel_keypoint_unshared").items() if k != "name"}
    (repo / "config.json").write_text(json.dumps({"conf": config}))
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):  # heads are still not in it
        kprpe.load_official(repo)
    _same_function(model, kprpe.load_official(repo, num_heads=TINY["num_heads"]))


def _meta_layout(layout: dict, depth: int, out_features: int) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    shapes = {e["key"]: (e["shape"], e["dtype"]) for e in layout["state_dict"]}
    shapes["keypoint_linear.weight"] = ([out_features, 10], "float32")
    shapes["keypoint_linear.bias"] = ([out_features], "float32")
    with torch.device("meta"):
        return {k: torch.empty(s, dtype=dtypes[d]) for k, (s, d) in shapes.items()}


@pytest.mark.parametrize("size", ["small", "base"])
def test_official_sizes_settle_the_head_count(size):
    """At the official sizes the head count is known, so per-layer tables are not ambiguous."""
    layout, dims = LAYOUTS[f"vit_kprpe/{size}"], SIZES[size]
    depth, heads = dims["depth"], dims["num_heads"]
    expected = {
        depth * heads * 49: "layer_head",
        depth * 49: "layer",
        heads * 49: "head",
    }
    for out_features, sharing in expected.items():
        cfg = infer_config(_meta_layout(layout, depth, out_features))
        assert (cfg["kp_sharing"], cfg["num_heads"]) == (sharing, heads)
    with pytest.raises(CheckpointError, match="identical tensor shapes"):  # relative or absolute input?
        infer_config(_meta_layout(layout, depth, 49))
    assert (
        infer_config(_meta_layout(layout, depth, 49), known={"kp_input": "absolute"})["kp_sharing"]
        == "shared"
    )


def test_config_that_contradicts_the_shapes_is_refused_before_allocating(tmp_path):
    model = _random_model("rel_keypoint_unshared")
    repo = _hf_repo(tmp_path, model, _model_yaml("rel_keypoint_splithead_unshared"))
    with pytest.raises(
        CheckpointError, match=r"do not fit the model config.*keypoint_linear.weight: checkpoint"
    ):
        kprpe.load_official(repo)
    (repo / "config.json").write_text(json.dumps({"conf": _model_yaml("rel_keypoint_splithead_unshared_v3")}))
    with pytest.raises(CheckpointError, match="ctx_type 'rel_keypoint_splithead_unshared_v3'.*known: "):
        kprpe.load_official(repo)
    bgr = dict(_model_yaml("rel_keypoint_unshared"), color_space="BGR")
    (repo / "config.json").write_text(json.dumps({"conf": bgr}))
    with pytest.raises(CheckpointError, match="color_space 'BGR'"):
        kprpe.load_official(repo)
    small = _model_yaml("rel_keypoint_unshared", name="small")  # a ViT-S config beside tiny weights
    (repo / "config.json").write_text(json.dumps({"conf": small}))
    with pytest.raises(CheckpointError, match="embed_dim': 512.*wrong shape"):
        kprpe.load_official(repo)


def test_model_yaml_wins_over_config_json(tmp_path):
    model = _random_model("rel_keypoint_splithead")
    run = _research_dir(tmp_path, model, _model_yaml("rel_keypoint_splithead"))
    (run / "config.json").write_text(json.dumps({"conf": _model_yaml("rel_keypoint_splithead_unshared")}))
    _same_function(model, kprpe.load_official(run))


@pytest.mark.parametrize("sharing", ["layer", "head"])
def test_kprpe_saved_checkpoints_load_exactly(tmp_path, sharing):
    model = _random_model("rel_keypoint_unshared_v2", kp_sharing=sharing, depth=3)  # no known size
    loaded = kprpe.load_official(save_model(model, tmp_path / "m.safetensors"))
    assert loaded.config == model.config
    _same_function(model, loaded)


def test_official_keypoint_ctx_warns_when_its_table_is_not_zero(tmp_path):
    """Official ctx_type 'keypoint' reads only the centre bucket (a constant softmax cancels): a non-zero
    table would make kprpe's absolute variant differ from the official output, so loading says so."""
    model = _random_model("keypoint")
    repo = _hf_repo(tmp_path, model, _model_yaml("keypoint"))
    with pytest.warns(UserWarning, match="centre bucket.*zero model.kprpe.linear"):
        kprpe.load_official(repo)
    with torch.no_grad():
        for p in model.kprpe.linear.parameters():
            p.zero_()
    (tmp_path / "zero").mkdir()
    repo2 = _hf_repo(tmp_path / "zero", model, _model_yaml("keypoint"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_function(model, kprpe.load_official(repo2))


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_real_official_configs_map_to_the_presets_and_fit_their_layouts(layout_name):
    """The model.yaml of each official preset (recorded in official_layouts.json) describes its layout."""
    from kprpe.nn.checkpoint import check_fits_before_allocating

    layout = LAYOUTS[layout_name]
    fields = official_vit_fields(layout["config_yaml_content"])
    preset = {"vit": "vit_{}", "vit_irpe": "vit_{}_irpe", "vit_kprpe": "vit_{}_kprpe"}[
        layout_name.split("/")[0]
    ]
    expected = kprpe.nn.preset_config(preset.format(layout_name.split("/")[1])).to_dict()
    assert {k: expected[k] for k in fields} == fields
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    with torch.device("meta"):
        state = {e["key"]: torch.empty(e["shape"], dtype=dtypes[e["dtype"]]) for e in layout["state_dict"]}
    values = {**infer_config(state, known=fields), **fields}
    check_fits_before_allocating(kprpe.nn.ViTConfig.from_dict(values), state, layout_name)
