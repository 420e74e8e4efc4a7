"""Official checkpoint formats and layouts load; mismatches are explained key by key."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import kprpe
from kprpe.nn import CheckpointError, infer_config, load_weights, save_model
from reference_vectors import DATA, load_vectors

LAYOUTS = json.loads((DATA / "official_layouts.json").read_text())["models"]
PRESET_OF_LAYOUT = {
    "vit_kprpe/small": "vit_small_kprpe",
    "vit_kprpe/base": "vit_base_kprpe",
    "vit_irpe/base": "vit_base_irpe",
    "vit/base": "vit_base",
    "vit/small": "vit_small",
}


def _meta_state(layout: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    with torch.device("meta"):
        return {
            prefix + e["key"]: torch.empty(e["shape"], dtype=dtypes[e["dtype"]]) for e in layout["state_dict"]
        }


@pytest.mark.parametrize("layout_name,preset", sorted(PRESET_OF_LAYOUT.items()))
def test_official_layouts_match_presets(layout_name, preset):
    layout = LAYOUTS[layout_name]
    with torch.device("meta"):
        model = kprpe.create_model(preset)
    own = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    official = {e["key"]: (tuple(e["shape"]), e["dtype"]) for e in layout["state_dict"]}
    assert own == official
    assert len(own) == layout["num_state_dict_keys"]


@pytest.mark.parametrize("layout_name,preset", sorted(PRESET_OF_LAYOUT.items()))
def test_architecture_inferred_from_official_shapes(layout_name, preset):
    inferred = infer_config(_meta_state(LAYOUTS[layout_name]))
    expected = kprpe.nn.preset_config(preset).to_dict()
    for key, value in inferred.items():
        assert expected[key] == value, key
    assert "num_heads" in inferred


@pytest.fixture(scope="module")
def tiny_state():
    return load_file(str(DATA / "tiny_kprpe.safetensors"))


@pytest.fixture(scope="module")
def tiny_ref():
    return load_vectors("kprpe")


def _check_output(model, ref):
    with torch.no_grad():
        torch.testing.assert_close(
            model(ref["images"], ref["keypoints"]), ref["output"], rtol=1e-4, atol=1e-4
        )


def test_huggingface_safetensors_prefix_and_directory(tmp_path, tiny_state, tiny_ref):
    repo = tmp_path / "hf_repo"
    repo.mkdir()
    save_file({"model.net." + k: v for k, v in tiny_state.items()}, str(repo / "model.safetensors"))
    (repo / "config.json").write_text(json.dumps({"architectures": ["CVLFaceRecognitionModel"]}))
    _check_output(kprpe.load_official(repo), tiny_ref)
    _check_output(kprpe.load_official(repo / "model.safetensors"), tiny_ref)


def test_research_pt_with_net_prefix(tmp_path, tiny_state, tiny_ref):
    folder = tmp_path / "pretrained_model"
    folder.mkdir()
    torch.save({"net." + k: v for k, v in tiny_state.items()}, folder / "model.pt")
    _check_output(kprpe.load_official(tmp_path), tiny_ref)
    _check_output(kprpe.load_official(folder / "model.pt"), tiny_ref)


def test_in_memory_state_dict_and_half_precision_cast(tiny_state, tiny_ref):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_state.items()}
    model = kprpe.load_official(half)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(tiny_ref["images"], tiny_ref["keypoints"])
    assert torch.nn.functional.cosine_similarity(out, tiny_ref["output"]).min() > 0.999


def test_plain_vit_heads_from_known_size_or_config_json(tmp_path):
    state = load_file(str(DATA / "tiny_vit.safetensors"))
    ref = load_vectors("vit")
    with torch.no_grad():  # the tiny size is a registered preset: its head count is known
        torch.testing.assert_close(
            kprpe.load_official(state)(ref["images"]), ref["output"], rtol=1e-4, atol=1e-4
        )
    one_block = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}  # a size no preset has
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):
        kprpe.load_official(one_block)
    save_file(one_block, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"num_heads": 2, "output_dim": 32}}))
    model = kprpe.load_official(tmp_path)
    assert (model.config.depth, model.config.num_heads) == (1, 2)
    assert kprpe.load_official(one_block, num_heads=8).config.num_heads == 8


def test_save_model_roundtrip_is_atomic_and_self_describing(tmp_path):
    model = kprpe.create_model("vit_tiny_kprpe", kp_sharing="head", num_keypoints=4).eval()
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
    path = save_model(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    loaded = kprpe.load_official(path)
    assert loaded.config == model.config
    x, kp = torch.rand(2, 3, 112, 112), torch.rand(2, 4, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x, kp), model(x, kp))


def test_kprpe_checkpoint_into_plain_model_is_explained(tiny_state):
    plain = kprpe.create_model("vit_tiny")
    with pytest.raises(CheckpointError) as info:
        load_weights(plain, tiny_state)
    msg = str(info.value)
    assert "unexpected in checkpoint (2)" in msg and "keypoint_linear.weight" in msg and "hint" in msg
    with pytest.raises(CheckpointError, match="keypoint_linear"):
        kprpe.load_official(tiny_state, rel_pos="none")


def test_shape_mismatch_lists_keys(tiny_state):
    model = kprpe.create_model("vit_tiny_kprpe", output_dim=16)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)shape mismatch .*feature.2.weight: checkpoint \(32, 64\) vs model \(16, 64\)",
    ):
        load_weights(model, tiny_state)


def test_missing_keys_are_listed(tiny_state):
    partial = {k: v for k, v in tiny_state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"missing from checkpoint \(11\)"):
        load_weights(kprpe.create_model("vit_tiny_kprpe"), partial)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"net.pos_embed": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        kprpe.load_official(path)
    assert not marker.exists()


def test_unreadable_sources(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        kprpe.load_official(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        kprpe.load_official(bad)
    with pytest.raises(CheckpointError, match="unsupported checkpoint format '.onnx'"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        kprpe.load_official(tmp_path / "m.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights found in directory"):
        kprpe.load_official(empty)
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        kprpe.load_official({"foo": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="path or a state dict"):
        kprpe.load_official(42)


def _allocated_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_config_claiming_a_huge_model_is_refused_before_allocating(tmp_path, tiny_state):
    """A few-MB file whose embedded config claims embed_dim 2048 / depth 24 once allocated ~7 GB."""
    from kprpe.nn.checkpoint import CONFIG_METADATA_KEY

    huge = dict(kprpe.nn.preset_config("vit_base_kprpe").to_dict(), embed_dim=2048, depth=24, num_heads=16)
    path = tmp_path / "claims_huge.safetensors"
    save_file(tiny_state, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(huge)})
    before = _allocated_mb()
    with pytest.raises(CheckpointError, match="do not fit the model config.*nothing was allocated"):
        kprpe.load_official(path)
    assert _allocated_mb() - before < 500  # peak RSS did not grow by gigabytes


def test_zero_element_tensors_cannot_claim_a_size(tiny_state):
    state = dict(tiny_state)
    state["patch_embed.proj.weight"] = torch.zeros(2048, 3, 8, 0)  # 0 bytes, claims embed_dim 2048
    with pytest.raises(CheckpointError, match="identical tensor shapes"):  # no longer a known size
        kprpe.load_official(state)
    with pytest.raises(CheckpointError, match="wrong shape"):
        kprpe.load_official(state, num_heads=4)


def test_a_stray_block_key_does_not_build_thousands_of_blocks(tiny_state):
    state = dict(tiny_state)
    state["blocks.3000.norm1.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError, match="not contiguous"):
        kprpe.load_official(state)


def test_only_the_config_that_belongs_to_the_checkpoint_is_read(tmp_path, tiny_state):
    # a config.json two folders up (say, a project's own) must not change the model
    nested = tmp_path / "project" / "weights"
    nested.mkdir(parents=True)
    save_file(tiny_state, str(nested / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 1, "output_dim": 7}))
    (tmp_path / "project" / "config.json").write_text(json.dumps({"num_heads": 1, "output_dim": 7}))
    model = kprpe.load_official(nested / "model.safetensors")
    assert model.config.num_heads == 4
    # the published layout: <repo>/pretrained_model/model.* with <repo>/config.json — that one belongs to it
    repo = tmp_path / "repo" / "pretrained_model"
    repo.mkdir(parents=True)
    save_file(tiny_state, str(repo / "model.safetensors"))
    (tmp_path / "repo" / "config.json").write_text(json.dumps({"attn_impl": "math"}))
    assert kprpe.load_official(repo / "model.safetensors").config.attn_impl == "math"


@pytest.mark.parametrize("embedded", ["[1, 2]", "{not json", '"text"'])
def test_embedded_config_of_the_wrong_type_is_a_checkpoint_error(tmp_path, tiny_state, embedded):
    from kprpe.nn.checkpoint import CONFIG_METADATA_KEY

    path = tmp_path / "bad_config.safetensors"
    save_file(tiny_state, str(path), metadata={CONFIG_METADATA_KEY: embedded})
    with pytest.raises(CheckpointError, match=CONFIG_METADATA_KEY):
        kprpe.load_official(path)


def test_an_oversized_config_json_is_refused_before_it_is_read(tmp_path):
    from kprpe.nn.checkpoint import MAX_CONFIG_BYTES

    state = load_file(str(DATA / "tiny_vit.safetensors"))
    save_file(state, str(tmp_path / "model.safetensors"))
    # valid JSON, just far larger than any model config: it must not be parsed into memory
    (tmp_path / "config.json").write_text('{"pad": "' + "x" * MAX_CONFIG_BYTES + '"}')
    with pytest.raises(CheckpointError, match="more than any model config"):
        kprpe.load_official(tmp_path / "model.safetensors")
