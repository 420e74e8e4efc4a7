"""Official config files from an untrusted checkpoint folder: bounded YAML, linear walks, and a value of the
wrong kind is a CheckpointError naming the key (issue 32 items 3 and 9)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import warnings

import pytest

import kprpe
from kprpe.nn import CheckpointError
from kprpe.nn.iresnet import official_fields
from kprpe.nn.official_config import official_vit_fields
from reference_vectors import DATA

GOOD_YAML = """name: tiny
output_dim: 32
input_size: [3, 112, 112]
color_space: RGB
rpe_config:
  name: KPRPE_shared
  rpe_on: k
  method: product
  ratio: 1.9
  ctx_type: rel_keypoint_splithead_unshared
  num_keypoints: 5
"""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the old config walk never finished on these inputs."""

    def expired(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _folder(tmp_path, *, model_yaml: bytes | str | None = None, config_json: str | None = None):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(DATA / "tiny_kprpe.safetensors", folder / "model.safetensors")
    if model_yaml is not None:
        data = model_yaml.encode() if isinstance(model_yaml, str) else model_yaml
        (folder / "model.yaml").write_bytes(data)
    if config_json is not None:
        (folder / "config.json").write_text(config_json)
    return folder


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with deadline(20):
            return kprpe.load_official(folder)


def test_good_official_yaml_still_loads(tmp_path):
    assert _load(_folder(tmp_path, model_yaml=GOOD_YAML)).config.rpe_ratio == 1.9


def _anchor_bomb(levels: int) -> str:
    lines = ["a0: &a0 {name: x, v: 1}"]
    lines += [f"a{i}: &a{i} {{l: *a{i - 1}, r: *a{i - 1}}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_nested_yaml_anchors_are_refused_quickly(tmp_path):
    """~1 KB of anchors nested 40 levels names 2^40 values: refused from its node graph, not walked."""
    text = _anchor_bomb(40)
    assert len(text) < 1500
    with pytest.raises(CheckpointError, match="aliases are expanded"):
        _load(_folder(tmp_path, model_yaml=text))


def test_config_walks_are_linear_in_shared_mappings():
    """The walks visit a mapping shared by many parents once (a tree walk of 60 shared levels is 2^60)."""
    node: dict = {"name": "ir50", "output_dim": 512}
    for _ in range(60):
        node = {"l": node, "r": node}
    with deadline(5):
        assert official_fields({"conf": node})["num_layers"] == 50
        assert official_vit_fields({"conf": node}) == {}


BAD_YAML = {
    "name as a list": (GOOD_YAML.replace("name: tiny", "name: [a, b]"), "name should be text"),
    "ctx_type as a list": (
        GOOD_YAML.replace("ctx_type: rel_keypoint_splithead_unshared", "ctx_type: [x]"),
        r"rpe_config.ctx_type \['x'\] is not an official KP-RPE context type",
    ),
    "rpe_config.name as a list": (
        GOOD_YAML.replace("name: KPRPE_shared", "name: [KPRPE_shared]"),
        r"rpe_config.name \['KPRPE_shared'\] is not one of",
    ),
    "num_keypoints .inf": (
        GOOD_YAML.replace("num_keypoints: 5", "num_keypoints: .inf"),
        "rpe_config.num_keypoints should be a whole number",
    ),
    "ratio as a list": (GOOD_YAML.replace("ratio: 1.9", "ratio: [1]"), "rpe_config.ratio should be a number"),
    "ratio NaN": (GOOD_YAML.replace("ratio: 1.9", "ratio: .nan"), "rpe_config.ratio should be a finite"),
    "input_size with null": (
        GOOD_YAML.replace("input_size: [3, 112, 112]", "input_size: [null, 112, 112]"),
        r"input_size\[0\] should be a whole number",
    ),
    "output_dim 1e26": (
        GOOD_YAML.replace("output_dim: 32", "output_dim: 1.0e+26"),
        "output_dim should be a whole number",
    ),
    "20,000 levels": ("a: " + "[" * 20000 + "]" * 20000 + "\n" + GOOD_YAML, "nests deeper than"),
    "recursive alias": ("loop: &a {inner: *a}\n" + GOOD_YAML, "recursive YAML alias"),
    "non-UTF-8 bytes": (GOOD_YAML.encode() + b"note: \xff\xfe\n", "not UTF-8"),
    "shared_head a string": (
        GOOD_YAML.replace("name: KPRPE_shared", "name: iRPE\n  shared_head: 'false'").replace(
            "  ctx_type: rel_keypoint_splithead_unshared\n", ""
        ),
        "rpe_config.shared_head should be true or false",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_model_yaml_values_of_the_wrong_kind_are_checkpoint_errors(tmp_path, case):
    text, message = BAD_YAML[case]
    with pytest.raises(CheckpointError, match=message):
        _load(_folder(tmp_path, model_yaml=text))


BAD_JSON = {
    "conf name as a list": ({"conf": {"name": ["a"], "rpe_config": {}}}, "name should be text"),
    "loose depth 1e26": ({"depth": 1e26}, "depth should be a whole number"),
    "loose rpe_ratio NaN": ({"rpe_ratio": float("nan")}, "rpe_ratio should be a finite number"),
    "loose num_keypoints null": ({"num_keypoints": None}, "num_keypoints should be a whole number"),
    "conf output_dim 1e26": ({"conf": {"output_dim": 1e26}}, "output_dim should be a whole number"),
    "dropout NaN": ({"conf": {"dropout": float("nan")}}, "dropout should be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_config_json_values_of_the_wrong_kind_are_checkpoint_errors(tmp_path, case):
    config, message = BAD_JSON[case]
    with pytest.raises(CheckpointError, match=message):
        _load(_folder(tmp_path, config_json=json.dumps(config)))


def test_deep_config_json_is_a_checkpoint_error(tmp_path):
    """900 levels parse as JSON but would overflow the recursive config walks."""
    deep = '{"a": ' * 900 + "1" + "}" * 900
    with pytest.raises(CheckpointError, match="nests deeper than"):
        _load(_folder(tmp_path, config_json=deep))


@pytest.mark.parametrize(
    "text,message",
    [
        ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nests deeper than"),
        (_anchor_bomb(40), "aliases are expanded"),
        ("arch: mobile0.25\ninput_padding_ratio: .nan\n", "input_padding_ratio must be a number"),
    ],
)
def test_the_aligner_model_yaml_is_bounded_too(tmp_path, text, message):
    """The DFA aligner's model.yaml comes from the same untrusted folders (20,000 levels: RecursionError)."""
    from safetensors.torch import load_file, save_file

    from kprpe.face.dfa import AlignerCheckpointError, load_aligner

    state = load_file(str(DATA / "dfa" / "dfa_weights.safetensors"))
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.yaml").write_text(text)
    with pytest.raises(AlignerCheckpointError, match=message):
        with deadline(20):
            load_aligner(tmp_path)
