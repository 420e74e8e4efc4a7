"""IResNet: official reference outputs through the public loader, colour order, key layout, presets.

The reference weights are not stored: ``weight_rule`` in tests/fixtures/iresnet/iresnet.json defines them in
closed form (splitmix64 hash of the tensor index and element index), reproduced here by :func:`rule_tensor`.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import kprpe
from kprpe.nn import CheckpointError, load_weights, save_model
from kprpe.nn.iresnet import IResNet, IResNetConfig, checkpoint_filter_fn, config_from_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "iresnet"
REFERENCE = json.loads((FIXTURES / "iresnet.json").read_text())
TOLERANCE = 1e-4


# ---------------------------------------------------------------------- the reference's closed-form weights
def splitmix_uniform(k: int, numel: int) -> np.ndarray:
    """s(i) for i < numel of tensor k: splitmix64 -> u in [0, 1) -> (2u - 1) * sqrt(3), float64."""
    with np.errstate(over="ignore"):
        z = np.arange(numel, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64(((k + 1) * 0xD1B54A32D192ED03) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / 2.0**53
    return (2.0 * u - 1.0) * math.sqrt(3.0)


def rule_tensor(k: int, key: str, shape: list[int], kind: str) -> torch.Tensor:
    numel = math.prod(shape)
    s = splitmix_uniform(k, numel)
    leaf = key.rsplit(".", 1)[1]
    if kind in ("conv", "linear") and leaf == "weight":
        values = s * math.sqrt(2.0 / (numel / shape[0]))
    elif leaf == "bias":  # linear/conv and BatchNorm biases share the rule
        values = 0.05 * s
    elif kind == "batchnorm" and leaf == "weight":
        values = 1.0 + 0.1 * s
    elif kind == "prelu":
        values = 0.25 + 0.05 * s
    else:
        raise AssertionError(f"no rule for {key} ({kind})")
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


@functools.cache
def reference_state(name: str) -> dict[str, torch.Tensor]:
    """The official state dict of reference model ``name`` (ir18 / ir50), in official key order (cached:
    callers must not modify it)."""
    bn = load_file(str(FIXTURES / "iresnet_bn.safetensors"))
    state = {}
    for k, (key, shape, _dtype, kind) in enumerate(REFERENCE["models"][name]["layout"]):
        if key.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked"):
            state[key] = bn[f"{name}.{key}"]
        else:
            state[key] = rule_tensor(k, key, shape, kind)
    return state


def reference_input(phase: float = REFERENCE["phase"]) -> torch.Tensor:
    b, c, h, w = np.meshgrid(np.arange(2), np.arange(3), np.arange(112), np.arange(112), indexing="ij")
    x = np.sin(0.05 * (w + 1) * (c + 1) + 0.07 * (h + 1) + 0.9 * b + phase) * 0.9
    return torch.from_numpy(x.astype(np.float32))


def test_weight_rule_matches_its_description():
    s = splitmix_uniform(3, 200_000)
    assert abs(s.mean()) < 0.01 and abs(s.var() - 1.0) < 0.01 and np.abs(s).max() <= math.sqrt(3.0)
    assert not np.array_equal(splitmix_uniform(0, 16), splitmix_uniform(1, 16))  # keyed by tensor index
    assert REFERENCE["input_rule"].startswith("x[b, c, h, w] = sin(0.05 * (w + 1) * (c + 1) + 0.07 * (h + 1)")


@pytest.fixture(scope="module")
def official_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each reference state dict saved as the zoo saves it: ``model.safetensors`` with ``model.net.`` keys."""
    out = {}
    for name in REFERENCE["models"]:
        folder = tmp_path_factory.mktemp(name)
        state = {f"model.net.{k}": v for k, v in reference_state(name).items()}
        save_file(state, str(folder / "model.safetensors"))
        out[name] = folder
    return out


def _load(folder: Path, yaml_text: str | None, **overrides):
    if yaml_text is not None:
        (folder / "pretrained_model").mkdir(exist_ok=True)
        (folder / "pretrained_model" / "model.yaml").write_text(yaml_text)
    return kprpe.load_official(folder / "model.safetensors", **overrides)


# ---------------------------------------------------------------------- reference outputs
@pytest.mark.parametrize("name,depth", [("ir18", 18), ("ir50", 50)])
def test_reference_output_through_load_official(official_checkpoints, name, depth):
    ref = REFERENCE["models"][name]
    model = _load(official_checkpoints[name], f"name: {name}\noutput_dim: 512\ncolor_space: RGB\n")
    assert isinstance(model, IResNet) and not model.training
    assert (model.config.num_layers, model.config.mode, model.config.color_space) == (depth, "ir", "RGB")
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    x = reference_input()
    with torch.no_grad():
        out = model(x)
        stem = model.input_layer(x)
    expected = torch.tensor(ref["output"])
    assert out.shape == expected.shape == (2, 512)
    assert (out - expected).abs().max().item() <= TOLERANCE
    assert torch.allclose(out.norm(dim=1), torch.tensor(ref["output_norm"]), atol=1e-3)
    assert (stem[0, :4, :3, :3] - torch.tensor(ref["stem_sample"])).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["ir18", "ir50"])
def test_bgr_config_reverses_channels(official_checkpoints, name):
    """``color_space: BGR`` in the official model.yaml: the RGB input is reversed before the network."""
    folder = official_checkpoints[name]
    try:
        model = _load(folder, f"name: {name}\ncolor_space: BGR\n")
    finally:
        (folder / "pretrained_model" / "model.yaml").unlink()
    assert model.config.color_space == "BGR"
    with torch.no_grad():
        out = model(reference_input())
    expected = torch.tensor(REFERENCE["models"][name]["output_bgr_flip"])
    assert (out - expected).abs().max().item() <= TOLERANCE
    assert (out - torch.tensor(REFERENCE["models"][name]["output"])).abs().max().item() > 100 * TOLERANCE


def test_hf_repo_layout_with_unrelated_config_json(official_checkpoints):
    """A published repo: config.json (the HF wrapper's, nothing on the net) + pretrained_model/model.yaml."""
    folder = official_checkpoints["ir18"]
    wrapper_config = {"name": "CVLFaceRecognitionModel", "model_type": "cvlface"}
    (folder / "config.json").write_text(json.dumps(wrapper_config))
    try:
        model = _load(folder, "name: ir18\noutput_dim: 512\ncolor_space: BGR\n")
    finally:
        (folder / "config.json").unlink()
        (folder / "pretrained_model" / "model.yaml").unlink()
    assert (model.config.num_layers, model.config.color_space) == (18, "BGR")


def test_research_layout_and_keypoints_ignored(official_checkpoints, tmp_path):
    """``net.``-prefixed ``pretrained_model/model.pt`` beside its model.yaml; keypoints change nothing."""
    state = {f"net.{k}": v for k, v in reference_state("ir18").items()}
    (tmp_path / "pretrained_model").mkdir()
    torch.save(state, tmp_path / "pretrained_model" / "model.pt")
    (tmp_path / "pretrained_model" / "model.yaml").write_text(
        "name: ir18\noutput_dim: 512\ncolor_space: RGB\n"
    )
    model = kprpe.load_official(tmp_path)
    x = reference_input()
    with torch.no_grad():
        out = model(x, torch.rand(2, 5, 2))
    assert (out - torch.tensor(REFERENCE["models"]["ir18"]["output"])).abs().max().item() <= TOLERANCE


def test_no_config_assumes_rgb_with_a_warning(official_checkpoints):
    folder = official_checkpoints["ir18"]
    with pytest.warns(UserWarning, match="colour order"):
        model = kprpe.load_official(folder / "model.safetensors")
    assert model.config.color_space == "RGB"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = kprpe.load_official(folder / "model.safetensors", color_space="BGR")
    assert explicit.config.color_space == "BGR"


def test_saved_model_round_trips(official_checkpoints, tmp_path):
    model = _load(official_checkpoints["ir18"], None, color_space="BGR")
    path = save_model(model, tmp_path / "mine.safetensors")
    again = kprpe.load_official(path)
    assert again.config == model.config
    x = reference_input()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ---------------------------------------------------------------------- layouts and architecture inference
def _layout_of(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


@pytest.mark.parametrize(
    "layout_name,preset",
    [("ir18", "ir_18"), ("ir50", "ir_50"), ("ir101", "ir_101"), ("ir101", "ir_100")],
)
def test_official_key_layout_in_order(layout_name, preset):
    layout = (
        REFERENCE["layout_ir101"] if layout_name == "ir101" else REFERENCE["models"][layout_name]["layout"]
    )
    with torch.device("meta"):
        model = kprpe.create_model(preset)
    assert _layout_of(model) == [(key, shape, dtype) for key, shape, dtype, _ in layout]


@pytest.mark.parametrize(
    "preset", ["ir_18", "ir_34", "ir_50", "ir_100", "ir_152", "ir_200", "ir_se_50", "ir_se_152"]
)
def test_architecture_inferred_from_shapes(preset):
    with torch.device("meta"):
        model = kprpe.create_model(preset)
    inferred = config_from_state_dict(model.state_dict())
    cfg = model.config
    assert inferred == dict(num_layers=cfg.num_layers, mode=cfg.mode, img_size=112, output_dim=512)


def test_ir101_loads_from_layout_with_official_name(tmp_path):
    """The zoo's IR-101 layout with its model.yaml: built as ir_101 (the 100-layer table), BGR."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {
        f"model.net.{key}": torch.zeros(shape, dtype=dtypes[dtype])
        for key, shape, dtype, _ in REFERENCE["layout_ir101"]
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "pretrained_model").mkdir()
    (tmp_path / "pretrained_model" / "model.yaml").write_text(
        "name: ir101\noutput_dim: 512\ncolor_space: BGR\n"
    )
    model = kprpe.load_official(tmp_path)
    assert (model.config.num_layers, model.config.color_space, len(model.body)) == (101, "BGR", 49)


def test_checkpoint_filter_strips_official_prefixes():
    bare = checkpoint_filter_fn(
        {"model.net.body.0.x": torch.zeros(1), "net.input_layer.0.weight": torch.ones(1)}
    )
    assert sorted(bare) == ["body.0.x", "input_layer.0.weight"]


# ---------------------------------------------------------------------- bad input
def test_config_contradicting_shapes_is_refused(official_checkpoints):
    folder = official_checkpoints["ir18"]
    try:
        with pytest.raises(CheckpointError, match=r"config says architecture .*'ir101'.*tensor shapes say"):
            _load(folder, "name: ir101\ncolor_space: BGR\n")
        with pytest.raises(CheckpointError, match="config names model 'base'"):
            _load(folder, "name: base\n")
        with pytest.raises(CheckpointError, match="output_dim 256"):
            _load(folder, "name: ir18\noutput_dim: 256\n")
    finally:
        (folder / "pretrained_model" / "model.yaml").unlink()


def test_iresnet_config_beside_vit_weights_is_refused(tmp_path):
    save_model(kprpe.create_model("vit_tiny"), tmp_path / "vit.safetensors")
    state = load_file(str(tmp_path / "vit.safetensors"))
    save_file(state, str(tmp_path / "model.safetensors"))  # without kprpe's metadata
    (tmp_path / "model.yaml").write_text("name: ir101\ncolor_space: BGR\n")
    with pytest.raises(CheckpointError, match="names IResNet 'ir101'.*no IResNet keys"):
        kprpe.load_official(tmp_path / "model.safetensors")


def test_unknown_unit_count_is_refused():
    with torch.device("meta"):
        state = kprpe.create_model("ir_34").state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("body.15.")}  # drop the last unit
    with pytest.raises(CheckpointError, match=r"\[3, 4, 6, 2\] units do not form a known IResNet"):
        kprpe.load_official(state, color_space="RGB")


def test_wrong_model_gets_a_keyed_mismatch_message():
    with torch.device("meta"):
        state = kprpe.create_model("ir_18").state_dict()
    with pytest.raises(CheckpointError, match=r"(?s)IResNet\(ir_50.*missing from checkpoint"):
        load_weights(IResNet(num_layers=50), state)


def test_bad_images_are_named():
    model = IResNet(num_layers=18).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\).*\(1, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


def test_invalid_config_values_are_named():
    with pytest.raises(ValueError, match="num_layers must be one of"):
        IResNetConfig(num_layers=42).validate()
    with pytest.raises(ValueError, match="color_space"):
        kprpe.create_model("ir_18", color_space="YUV")


# ---------------------------------------------------------------------- presets
# Build + forward: 1.3-1.7 s on an idle 2-core CPU (4-5 s when busy); the 100-layer presets take <= 1.1 s.
DEEP = {"ir_152", "ir_200", "ir_se_152", "ir_se_200"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in kprpe.list_models("iresnet")],
)
def test_every_preset_forward(name):
    """Real forward of one image (building the weights dominates the time)."""
    start = time.perf_counter()
    model = kprpe.create_model(name).eval()
    assert isinstance(model, IResNet)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 112, 112) * 2 - 1)
    seconds = time.perf_counter() - start
    assert out.shape == (1, 512) and torch.isfinite(out).all()
    assert seconds < 60, f"{name} build + forward took {seconds:.1f} s"


@pytest.mark.parametrize(
    "name,img_size",
    [(n, 112) for n in kprpe.list_models("iresnet")] + [("ir_18", 224), ("ir_se_50", 224), ("ir_200", 224)],
)
def test_every_preset_output_shape(name, img_size):
    """Shapes only (meta tensors: no compute): every preset at 112, a few at the other official size, 224."""
    with torch.device("meta"):
        model = kprpe.create_model(name, img_size=img_size).eval()
        feats = model.forward_features(torch.empty(3, 3, img_size, img_size))
        out = model.forward_head(feats)
    channels = 2048 if model.config.num_layers in (152, 200) else 512
    assert tuple(feats.shape) == (3, channels, img_size // 16, img_size // 16)
    assert tuple(out.shape) == (3, 512)


def test_preset_list_has_every_family():
    names = set(kprpe.list_models())
    assert {
        "ir_18",
        "ir_34",
        "ir_50",
        "ir_100",
        "ir_101",
        "ir_152",
        "ir_200",
        "ir_se_50",
        "ir_se_101",
    } <= names
    families = ("vit", "iresnet", "swin", "swingait")
    assert set().union(*(kprpe.list_models(family) for family in families)) == names


def test_embeds_like_a_vit_through_the_inference_helper():
    """Pipelines call ``model(images, keypoints)`` and flip-average: an IResNet takes part unchanged."""
    from kprpe.inference import embed

    model = kprpe.create_model("ir_18").eval()
    images, keypoints = torch.rand(3, 3, 112, 112) * 2 - 1, torch.rand(3, 5, 2)
    units, norms = embed(model, images, keypoints, flip=True, batch_size=2)
    with torch.no_grad():
        summed = model(images) + model(images.flip(-1))
    assert torch.allclose(units, summed / summed.norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(norms, summed.norm(dim=1), rtol=1e-5)


def test_training_mode_backward_reaches_the_se_gate():
    model = kprpe.create_model("ir_se_18", output_dim=128).train()
    out = model(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert out.shape == (2, 128)
    out.square().mean().backward()
    assert model.body[0].res_layer.se_block.fc1.weight.grad.abs().sum() > 0
