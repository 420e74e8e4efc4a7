"""The official CVLface model config in :class:`~kprpe.nn.vit.ViTConfig` terms: one table per kind of value.

The published repos carry the model's config twice: ``pretrained_model/model.yaml`` (the training run's model
section) and the ``conf`` object of ``config.json``. Both hold ``name`` (``small`` / ``base``: the official
``from_config`` fixes every size from it), ``output_dim``, ``input_size``, ``color_space`` and, for the
relative encodings, ``rpe_config``. For KP-RPE, ``rpe_config.ctx_type`` names what f is — which tables it
makes and what it reads (docs/models.md, "KP-RPE variants"). Facts from the official ``rpe_options`` (CVLface
commit d3d09c9); the code here is written from those facts, not copied.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config_file import config_bool, config_int, config_number, config_text

__all__ = [
    "SIZES",
    "CTX_TYPES",
    "RPE_NAMES",
    "OFFICIAL_METHODS",
    "OFFICIAL_MLP_WIDTH",
    "official_vit_fields",
    "ctx_type_of",
]

# Sizes of the official face ViTs by their official name (docs/models.md, "Presets"), and the tiny size of the
# reference test vectors; the ViT presets (nn/vit_family.py) are these sizes times the position encodings.
SIZES = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, output_dim=32),
    "small": dict(embed_dim=512, depth=12, num_heads=8, mlp_ratio=5.0, output_dim=512),
    "base": dict(embed_dim=512, depth=24, num_heads=16, mlp_ratio=3.0, output_dim=512),
}
# Width of the official MLP f (the "_v2" context types): Linear(2K, 256) -> ReLU -> LayerNorm -> Linear.
OFFICIAL_MLP_WIDTH = 256

# rpe_config.ctx_type -> the ViTConfig fields that build the same f. Output features of f (nb = 49 buckets):
#   rel_keypoint_splithead_unshared  depth * heads * nb   a table per layer and head (the published models)
#   rel_keypoint_unshared            depth * nb           a table per layer, shared by its heads
#   rel_keypoint_splithead           heads * nb           a table per head, shared by the layers
#   rel_keypoint                     nb                   one table for every layer and head
#   keypoint                         nb                   absolute keypoints: one table for every query too
#   rel_keypoint_v2                  nb                   `rel_keypoint` with the official MLP before it
#   rel_keypoint_unshared_v2         depth * nb           `rel_keypoint_unshared` with the official MLP
_MLP = dict(kp_hidden=OFFICIAL_MLP_WIDTH, kp_mlp="relu_layernorm")
CTX_TYPES: dict[str, dict] = {
    "rel_keypoint_splithead_unshared": dict(kp_input="relative", kp_sharing="layer_head", kp_hidden=0),
    "rel_keypoint_unshared": dict(kp_input="relative", kp_sharing="layer", kp_hidden=0),
    "rel_keypoint_splithead": dict(kp_input="relative", kp_sharing="head", kp_hidden=0),
    "rel_keypoint": dict(kp_input="relative", kp_sharing="shared", kp_hidden=0),
    "keypoint": dict(kp_input="absolute", kp_sharing="shared", kp_hidden=0),
    "rel_keypoint_v2": dict(kp_input="relative", kp_sharing="shared", **_MLP),
    "rel_keypoint_unshared_v2": dict(kp_input="relative", kp_sharing="layer", **_MLP),
}
# rpe_config.name -> ViTConfig.rel_pos (without an rpe_config the tensors tell the encoding)
RPE_NAMES = {"KPRPE_shared": "kprpe", "iRPE": "irpe"}
# rpe_config.method -> ViTConfig.rpe_method (the official "cross" sums rows and cols: not a kprpe method)
OFFICIAL_METHODS = {"product": "product", "euc": "euclidean", "quant": "quantized"}
# The official from_config fixes these for every named size (patch 8 on a 112 x 112 input).
_FIXED = dict(img_size=112, patch_size=8, in_chans=3)
# Bounds of the values a config may state: far above any face model, low enough that nothing overflows.
MAX_OUTPUT_DIM = 1 << 16
MAX_IMAGE_SIDE = 4096
MAX_KEYPOINTS = 1024


def _model_node(config: Mapping) -> Mapping | None:
    """The mapping that describes the network: the first one, breadth first (so model.yaml's top level wins
    over config.json's ``conf``), that names an official size or holds an ``rpe_config``."""
    queue, seen = [config], {id(config)}
    while queue:  # each mapping once: YAML aliases share mappings, and a tree walk of them is exponential
        node = queue.pop(0)
        name = node.get("name")
        if (isinstance(name, str) and name in SIZES) or isinstance(node.get("rpe_config"), Mapping):
            return node
        for value in node.values():
            if isinstance(value, Mapping) and id(value) not in seen:
                seen.add(id(value))
                queue.append(value)
    return None


def official_vit_fields(config: Mapping | None) -> dict:
    """ViTConfig fields an official config states (empty when it names no ViT). Raises ValueError naming
    the key when a value has no kprpe equivalent (an unknown ``ctx_type``, a BGR ViT, ...)."""
    node = _model_node(config) if isinstance(config, Mapping) else None
    if node is None:
        return {}
    fields: dict = {}
    name = node.get("name")
    if name is not None and config_text(name, "name") in SIZES:
        size = SIZES[name]
        fields.update(_FIXED, **{k: size[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")})
    if node.get("output_dim") is not None:
        fields["output_dim"] = config_int(node["output_dim"], "output_dim", 1, MAX_OUTPUT_DIM)
    size_in = node.get("input_size")
    if size_in is not None:
        if not isinstance(size_in, (list, tuple)) or len(size_in) not in (2, 3):
            raise ValueError(f"input_size should be [channels, height, width], got {size_in!r:.80}")
        sides = [config_int(v, f"input_size[{i}]", 1, MAX_IMAGE_SIDE) for i, v in enumerate(size_in)]
        if len(sides) == 3:
            if sides[1] != sides[2]:
                raise ValueError(f"input_size {sides}: only square inputs are supported")
            fields["in_chans"], fields["img_size"] = sides[0], sides[1]
    color_space = config_text(node.get("color_space", "RGB"), "color_space")
    if color_space.upper() != "RGB":
        raise ValueError(
            f"color_space {color_space!r}: kprpe's ViT takes RGB input and has no channel flip; "
            "reverse the channels of the images yourself, or remove the key if the model was trained on RGB"
        )
    rpe = node.get("rpe_config")
    if rpe is None:
        # the official family (vit, vit_kprpe, ...) is the config's folder, not a key: the tensors tell it
        return fields
    if not isinstance(rpe, Mapping):
        raise ValueError(f"rpe_config should be a mapping, got {type(rpe).__name__}")
    rpe_name = rpe.get("name")
    if not isinstance(rpe_name, str) or rpe_name not in RPE_NAMES:  # a list is unhashable: kind first
        raise ValueError(f"rpe_config.name {rpe_name!r:.60} is not one of {sorted(RPE_NAMES)}")
    fields["rel_pos"] = RPE_NAMES[rpe_name]
    if "method" in rpe:
        method = config_text(rpe["method"], "rpe_config.method").lower()
        if method not in OFFICIAL_METHODS:
            raise ValueError(
                f"rpe_config.method {rpe['method']!r} is not supported (known: {sorted(OFFICIAL_METHODS)})"
            )
        fields["rpe_method"] = OFFICIAL_METHODS[method]
    if "ratio" in rpe:
        fields["rpe_ratio"] = config_number(rpe["ratio"], "rpe_config.ratio", 1e-6, 1e6)
    if fields["rel_pos"] == "irpe":
        if "rpe_on" in rpe:
            fields["irpe_on"] = config_text(rpe["rpe_on"], "rpe_config.rpe_on")
        if "shared_head" in rpe:
            fields["irpe_shared_head"] = config_bool(rpe["shared_head"], "rpe_config.shared_head")
        return fields
    rpe_on = config_text(rpe.get("rpe_on", "k"), "rpe_config.rpe_on")
    if rpe_on != "k":
        raise ValueError(f"rpe_config.rpe_on {rpe_on!r}: KP-RPE acts on keys only ('k')")
    ctx = rpe.get("ctx_type")
    if not isinstance(ctx, str) or ctx not in CTX_TYPES:
        raise ValueError(
            f"rpe_config.ctx_type {ctx!r:.60} is not an official KP-RPE context type "
            f"(known: {', '.join(CTX_TYPES)})"
        )
    fields.update(CTX_TYPES[ctx])
    if "num_keypoints" in rpe:
        fields["num_keypoints"] = config_int(
            rpe["num_keypoints"], "rpe_config.num_keypoints", 1, MAX_KEYPOINTS
        )
    return fields


def ctx_type_of(fields: Mapping) -> str | None:
    """The official ``ctx_type`` of a KP-RPE config (ViTConfig fields), None when it has none."""
    wanted = {
        "kp_input": fields.get("kp_input", "relative"),
        "kp_sharing": fields.get("kp_sharing", "layer_head"),
        "kp_hidden": fields.get("kp_hidden", 0),
    }
    if wanted["kp_hidden"]:
        wanted["kp_mlp"] = fields.get("kp_mlp", "gelu")
    for ctx, values in CTX_TYPES.items():
        if all(values.get(k) == v for k, v in wanted.items()):
            return ctx
    return None
