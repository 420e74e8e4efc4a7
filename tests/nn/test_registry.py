"""Every registered model builds, runs and survives save_model -> load_official; families dispatch by keys."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pytest
import torch
from safetensors import safe_open
from torch import nn

import kprpe
from kprpe.nn import CheckpointError, load_official, registry, save_model
from kprpe.nn.checkpoint import CONFIG_METADATA_KEY

# Small sizes per family so every preset stays fast; a new family must add its own here. Deep presets are
# slow to build (seconds each on 2 shared cores) even at the small size: only the listed ones run by default.
SMALL = {
    "vit": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, output_dim=8),
    "iresnet": dict(img_size=16, output_dim=8),
    "swin": dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=5,
                 output_dim=8),
    "swingait": dict(stem_channels=(4, 8), embed_dim=8, depths=(2, 1), num_heads=(1, 2), part_dim=8,
                     cpb_hidden=8, num_classes=4),
}
# families whose models take something other than face crops: how to run them (output: one tensor)
RUNNERS = {
    "swingait": lambda m, cfg: m(torch.rand(2, 3, *cfg.frame_size), torch.rand(2, 3, 17, 3))["embeddings"],
}
DEEP = {f"{mode}_{depth}" for mode in ("ir", "ir_se") for depth in (34, 50, 100, 101, 152, 200)}


def test_every_family_has_a_small_size():
    assert set(registry.list_families()) <= set(SMALL), "add the new family's small size to SMALL"


MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in kprpe.list_models()]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_runs_and_round_trips(name, tmp_path):
    family = registry.preset_family(name)
    torch.manual_seed(0)
    model = kprpe.create_model(name, **SMALL[family.name]).eval()
    assert registry.family_of_model(model) is family
    cfg = model.config
    if family.name in RUNNERS:
        seed = torch.seed()

        def run(m):
            torch.manual_seed(seed)  # the same random inputs for both calls
            return RUNNERS[family.name](m, cfg)
    else:
        images = torch.rand(2, 3, cfg.img_size, cfg.img_size) * 2 - 1
        keypoints = torch.rand(2, getattr(cfg, "num_keypoints", 5), 2)

        def run(m):
            return m(images, keypoints)
    with torch.no_grad():
        out = run(model)
    assert out.shape[0] == 2 and bool(torch.isfinite(out).all())
    if family.name not in RUNNERS:
        assert out.shape == (2, cfg.output_dim)

    path = save_model(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_METADATA_KEY])["arch"] == family.name
    loaded = load_official(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config.to_dict() == cfg.to_dict()
    with torch.no_grad():
        again = run(loaded)
    # same weights, same config, same CPU kernels: the computation is repeated operation for operation
    assert torch.equal(again, out)


def test_presets_of_each_family_are_listed_by_family():
    for family in registry.list_families():
        names = kprpe.list_models(family)
        assert names and all(registry.preset_family(n).name == family for n in names)
    assert sorted(sum((kprpe.list_models(f) for f in registry.list_families()), [])) == kprpe.list_models()


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model family 'nope'; available: vit, iresnet"):
        kprpe.list_models("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("vit_tiny", {})
    with pytest.raises(ValueError, match="model family 'vit' is already registered"):
        registry.register_family(
            "vit", dict, nn.Identity, recognizes=bool, load=lambda state, **kw: None, signature="-"
        )
    with pytest.raises(ValueError, match="invalid model config"):  # a bad preset fails at registration
        registry.register_model("vit_broken", {"embed_dim": 30, "num_heads": 4})
    assert "vit_broken" not in kprpe.list_models()


def test_save_model_refuses_a_model_of_no_family(tmp_path):
    with pytest.raises(CheckpointError, match="Linear has no .config"):
        save_model(nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_unrecognised_keys_list_every_family():
    with pytest.raises(
        CheckpointError, match=r"no registered model family.*ViT: 'patch_embed.*IResNet: 'input_layer"
    ):
        load_official({"foo": torch.zeros(1)})


def test_saved_family_must_match_the_weights(tmp_path):
    from safetensors.torch import save_file

    state = kprpe.create_model("vit_tiny").state_dict()
    config = kprpe.nn.preset_config("ir_18").to_dict()  # an IResNet config stored with ViT weights
    save_file(state, str(tmp_path / "a.safetensors"), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    with pytest.raises(
        CheckpointError,
        match="weights are of model family 'vit' but the stored kprpe config is for 'iresnet'",
    ):
        load_official(tmp_path / "a.safetensors")
    unknown = dict(kprpe.nn.preset_config("vit_tiny").to_dict(), arch="nope")
    save_file(state, str(tmp_path / "b.safetensors"), metadata={CONFIG_METADATA_KEY: json.dumps(unknown)})
    with pytest.raises(CheckpointError, match="names unknown model family 'nope'"):
        load_official(tmp_path / "b.safetensors")


def test_a_saved_iresnet_config_claiming_a_huge_input_allocates_nothing(tmp_path):
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = kprpe.create_model("ir_18").state_dict()
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    claim = dict(kprpe.nn.preset_config("ir_18").to_dict(), img_size=112 * 400)  # a 4e10-input linear layer
    save_file(state, str(tmp_path / "m.safetensors"), metadata={CONFIG_METADATA_KEY: json.dumps(claim)})
    with pytest.raises(CheckpointError, match="output_layer.3.weight: checkpoint .*nothing was allocated"):
        load_official(tmp_path / "m.safetensors")


def test_a_config_saved_before_families_is_a_vit(tmp_path):
    """Files written before save_model stored "arch" still load (as ViTs)."""
    from safetensors.torch import save_file

    model = kprpe.create_model("vit_tiny").eval()
    legacy = json.dumps(model.config.to_dict())
    assert "arch" not in legacy
    save_file(model.state_dict(), str(tmp_path / "old.safetensors"), metadata={CONFIG_METADATA_KEY: legacy})
    assert load_official(tmp_path / "old.safetensors").config == model.config


# ---------------------------------------------------------------------- a new family plugs in
@dataclass
class _ToyConfig:
    width: int = 4
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)

    def to_dict(self):
        return asdict(self)


class _Toy(nn.Module):
    def __init__(self, config: _ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.toy_layer = nn.Linear(config.width, 2)


def _load_toy(state, *, saved_config, official_config, file_config, where, **overrides):
    values = dict(saved_config or {"width": state["toy_layer.weight"].shape[1]}, **overrides)
    model = _Toy(_ToyConfig.from_dict(values))
    kprpe.nn.load_weights(model, state)
    return model.eval()


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))
    monkeypatch.setattr(registry, "_FAMILY_OF", dict(registry._FAMILY_OF))
    registry.register_family(
        "toy",
        _ToyConfig,
        _Toy,
        recognizes=lambda state: "toy_layer.weight" in state,
        load=_load_toy,
        signature="'toy_layer.weight'",
        names_model=lambda cfg: cfg.get("name") if str(cfg.get("name", "")).startswith("toy") else None,
    )
    registry.register_model("toy_3", {"width": 3}, family="toy")


def test_a_registered_family_is_built_saved_loaded_and_listed(toy_family, tmp_path):
    model = kprpe.create_model("toy_3")
    assert isinstance(model, _Toy) and kprpe.list_models("toy") == ["toy_3"]
    path = save_model(model, tmp_path / "toy.safetensors")
    loaded = load_official(path)
    assert isinstance(loaded, _Toy) and loaded.config.width == 3
    assert torch.equal(loaded.toy_layer.weight, model.toy_layer.weight)
    assert (
        load_official(
            {"net.toy_layer.weight": torch.zeros(2, 5), "toy_layer.bias": torch.zeros(2)}
        ).config.width
        == 5
    )
    with pytest.raises(CheckpointError, match="no registered model family.*toy: 'toy_layer.weight'"):
        load_official({"foo": torch.zeros(1)})


def test_an_official_config_naming_another_family_is_refused(toy_family, tmp_path):
    from safetensors.torch import save_file

    save_file(kprpe.create_model("vit_tiny").state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"name": "toy_big"}))
    with pytest.raises(CheckpointError, match="config names toy 'toy_big', but the weights have no toy keys"):
        load_official(tmp_path / "model.safetensors")
