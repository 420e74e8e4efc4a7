"""Reading the official config files (``model.yaml``, ``config.json``) without trusting them.

A checkpoint folder can come from anywhere, so its configs are bounded before anything walks them: size,
nesting depth and the number of nodes once YAML aliases are expanded (a 1 KB file of nested anchors names
2^40 nodes; the "billion laughs"), and a recursive alias is refused. The published files are plain
OmegaConf dumps that use no anchors at all, so these limits are far above anything real. The typed getters
below turn a value of the wrong kind (a list where a name goes, ``.inf`` where a count goes) into a
ValueError that names the key; the loaders wrap it as a CheckpointError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
    "check_config_tree",
    "read_config_yaml",
    "config_int",
    "config_number",
    "config_text",
    "config_bool",
]

MAX_CONFIG_BYTES = 1 << 20  # the published model.yaml files are under 1 KB
MAX_CONFIG_DEPTH = 64  # they nest 3 levels deep
MAX_CONFIG_NODES = 100_000  # they hold about 40 values


def _too_many(where: str) -> ValueError:
    return ValueError(
        f"{where} holds more than {MAX_CONFIG_NODES} values once its YAML aliases are expanded; "
        "not a model config"
    )


def _check_node_graph(root, where: str) -> None:
    """Refuse a recursive alias and a document whose alias expansion exceeds MAX_CONFIG_NODES. Linear in the
    distinct nodes: each node's expanded size is computed once (aliases share node objects)."""
    import yaml

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            children = _yaml_children(node, yaml)
            total = 1 + sum(sizes[id(child)] for child in children)
            if total > MAX_CONFIG_NODES:
                raise _too_many(where)
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError(f"{where} has a recursive YAML alias (a value that contains itself)")
        on_path.add(key)
        stack.append((node, True))
        for child in _yaml_children(node, yaml):
            if id(child) in on_path:
                raise ValueError(f"{where} has a recursive YAML alias (a value that contains itself)")
            if id(child) not in sizes:
                stack.append((child, False))


def _yaml_children(node, yaml) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _bounded_loader(where: str):
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that stops at MAX_CONFIG_DEPTH (PyYAML composes recursively: 20,000 levels would be a
        RecursionError) and checks the composed node graph before any Python object is built."""

        _depth = 0

        def compose_node(self, parent, index):
            self._depth += 1
            try:
                if self._depth > MAX_CONFIG_DEPTH:
                    raise ValueError(
                        f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels; not a model config"
                    )
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def compose_document(self):
            node = super().compose_document()
            _check_node_graph(node, where)
            return node

    return BoundedLoader


def read_config_yaml(path: str | Path):
    """The parsed content of a small YAML config file; ValueError (naming the file and the problem) for a file
    too large, not UTF-8, not YAML, too deep, recursive or expanding past MAX_CONFIG_NODES."""
    import yaml

    path = Path(path)
    with open(path, "rb") as stream:
        data = stream.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; not a model config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc})") from None
    try:
        loaded = yaml.load(text, Loader=_bounded_loader(str(path)))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    check_config_tree(loaded, str(path))
    return loaded


def check_config_tree(config, where: str) -> None:
    """Refuse a parsed config (JSON or YAML) that nests deeper than MAX_CONFIG_DEPTH, holds more than
    MAX_CONFIG_NODES values counted with repeats, or contains itself. Iterative, so depth cannot overflow the
    Python stack."""
    count = 0
    stack = [(config, 0, frozenset())]
    while stack:
        node, depth, ancestors = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise _too_many(where)
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels; not a model config")
        if isinstance(node, Mapping):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        if id(node) in ancestors:
            raise ValueError(f"{where} contains itself (a recursive value)")
        inner = ancestors | {id(node)}
        stack.extend((child, depth + 1, inner) for child in children)


# ---------------------------------------------------------------------- typed values
def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def config_text(value, key: str) -> str:
    """A config value that must be text (a name, a mode)."""
    if not isinstance(value, str):
        raise ValueError(f"{key} should be text, got {_kind(value)} {value!r:.60}")
    return value


def config_bool(value, key: str) -> bool:
    """A config value that must be a YAML/JSON boolean (the string "false" is not one)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} should be true or false, got {_kind(value)} {value!r:.60}")
    return value


def config_int(value, key: str, low: int, high: int) -> int:
    """A config value that must be a whole number in ``[low, high]`` (1e26, .inf, 2.5 and true are not)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} should be a whole number, got {_kind(value)} {value!r:.60}")
    if not low <= value <= high:
        raise ValueError(f"{key} should lie in [{low}, {high}], got {value}")
    return value


def config_number(value, key: str, low: float, high: float) -> float:
    """A config value that must be a finite number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} should be a number, got {_kind(value)} {value!r:.60}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{key} should be a finite number in [{low}, {high}], got {value}")
    return float(value)


def check_field_types(values: Mapping, config_class) -> None:
    """Each value of ``values`` (config fields found loose in a config.json) of the kind its dataclass default
    has: a bool for a bool field, a whole number for an int field, a finite number for a float field, text for
    a text field. Fields without a plain default are left to the config's own validation."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            config_bool(value, key)
        elif isinstance(default, int):
            config_int(value, key, -(2**31), 2**31)
        elif isinstance(default, float):
            config_number(value, key, -1e30, 1e30)
        elif isinstance(default, str):
            config_text(value, key)
