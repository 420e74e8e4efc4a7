"""Hugging Face repo ids -> trusted local files: published checkpoints by name, weights and configs only.

A published CVLface repo holds the weights (``model.safetensors``, ``pretrained_model/*.pt``), configs
(``config.json``, ``pretrained_model/*.yaml``) and the Python wrapper that ``trust_remote_code`` would run. We
fetch only weights and configs (never ``*.py``) into the standard Hugging Face cache, and check every file we
hand out: against the content hash the Hub names the blob by, and against the sha256 recorded on first use in
a small registry (``$KPRPE_CACHE/zoo/sha256.json``), so a truncated or modified file is refused with a message
naming it. Everything here reads the environment at call time (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
``HF_HOME``, ``KPRPE_CACHE``), since huggingface_hub itself freezes some of them at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from fnmatch import fnmatch
from pathlib import Path

from ..errors import KprpeError

__all__ = [
    "ZooError",
    "KINDS",
    "resolve",
    "snapshot",
    "parse_repo_id",
    "hub_cache_dir",
    "hub_offline",
    "kprpe_cache_dir",
    "registry_path",
    "snapshot_origin",
    "cached_snapshot",
    "verify_snapshot",
]

KINDS = ("recognition", "aligner")
EXAMPLES = {
    "recognition": "minchul/cvlface_adaface_vit_base_kprpe_webface4m",
    "aligner": "minchul/cvlface_DFA_mobilenet",
}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx")

# What is fetched: configs always, then safetensors weights; pickled .pt/.pth only when a repo has no
# safetensors (they are read with torch.load(weights_only=True)). Code and other pickles are never fetched.
CONFIG_PATTERNS = ["config.json", "*.yaml", "*.yml", "README.md"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
PICKLE_PATTERNS = ["*.pt", "*.pth"]
NEVER_PATTERNS = [
    "*.py",
    "*.pyc",
    "*.so",
    "*.dll",
    "*.dylib",
    "*.ipynb",
    "*.sh",
    "*.cu",
    "*.cpp",
    "*.bin",
    "*.pkl",
    "*.pickle",
    "*.whl",
    "*.exe",
]
FETCH_HINT_PATTERNS = "'config.json' '*.yaml' '*.safetensors'"

_REPO_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@(?P<revision>[\w./-]+))?$"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_TRUTHY = {"1", "on", "yes", "true"}


class ZooError(KprpeError, ValueError):
    """A model name or cache that cannot give trustworthy local files; the message names it and what to do."""


# ---------------------------------------------------------------------- environment (read at call time)
def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def kprpe_cache_dir() -> Path:
    """kprpe's own cache folder: ``KPRPE_CACHE``, else ``~/.cache/kprpe``."""
    return Path(os.environ.get("KPRPE_CACHE") or "~/.cache/kprpe").expanduser()


def registry_path() -> Path:
    """The JSON file holding the sha256 of every zoo file on its first use."""
    return kprpe_cache_dir() / "zoo" / "sha256.json"


# ---------------------------------------------------------------------- names
def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision_or_None)`` for ``owner/name`` or ``owner/name@revision``; None when ``text``
    cannot be a Hugging Face model repo id (or plainly names a weights file, e.g.
    ``runs/model.safetensors``)."""
    match = _REPO_ID.match(text)
    if match is None:
        return None
    repo = match["repo"]
    if "--" in repo or ".." in repo or repo.lower().endswith(WEIGHT_SUFFIXES):
        return None
    revision = match["revision"]
    if revision is not None and not _safe_revision(revision):
        return None
    return repo, revision


def _safe_revision(revision: str) -> bool:
    """A branch, tag or commit name that stays a name: huggingface_hub joins it to ``refs/`` and
    ``snapshots/`` in the cache, so ``..``, an empty part or one starting with a dot would leave the cache
    (git refuses those names too)."""
    parts = revision.split("/")
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in parts) and (
        ".." not in revision
    )


def _check_kind(repo: str, kind: str) -> None:
    """Refuse a catalogued aligner where a recognition model is expected, and the reverse."""
    from .catalog import find_entry

    entry = find_entry(repo)
    if entry is not None and entry.kind != kind:
        use = (
            "kprpe.load_aligner / --aligner" if entry.kind == "aligner" else "kprpe.load_official / --weights"
        )
        raise ZooError(
            f"{repo} is a published {entry.kind} model ({entry.architecture}), not "
            f"{'an' if kind == 'aligner' else 'a'} "
            f"{kind} model; use it through {use}"
        )


def resolve(source, kind: str = "recognition", *, offline: bool | None = None) -> Path:
    """A local file or folder for ``source``: an existing path is returned as is; otherwise a Hugging Face
    repo id (``owner/name[@revision]``) is fetched (weights and configs only) or found in the cache, checked
    against its recorded sha256, and its snapshot folder returned. ``offline`` defaults to
    ``HF_HUB_OFFLINE``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
    else:
        raise ZooError(
            f"{kind} weights must be a path or a Hugging Face repo id, got {type(source).__name__}"
        )
    path = Path(text).expanduser()
    try:
        exists = path.exists()  # a file or folder wins over a repo id spelled the same way
    except OSError as exc:  # a name too long for the file system: neither a path nor a repo id
        shown = text[:80] + ("..." if len(text) > 80 else "")
        raise ZooError(f"{kind} weights {shown!r} cannot be a path here ({exc.strerror or exc})") from None
    if exists:
        if not (path.is_file() or path.is_dir()):
            raise ZooError(f"{kind} weights {text!r} exist but are neither a regular file nor a folder")
        return path
    parsed = parse_repo_id(text)
    named, at, revision = text.partition("@")
    if parsed is None and at and parse_repo_id(named) is not None:
        raise ZooError(
            f"revision {revision!r} of {named} is not a branch, tag or commit name (no '..', no empty part, "
            "no part starting with a dot)"
        )
    if parsed is None:
        raise ZooError(
            f"{kind} weights not found: {text!r} is neither an existing checkpoint file (.safetensors, .pt, "
            ".pth), "
            f"a checkpoint folder, nor a Hugging Face repo id (owner/name, e.g. {EXAMPLES[kind]})"
        )
    repo, revision = parsed
    _check_kind(repo, kind)
    return snapshot(repo, revision=revision, offline=offline)


# ---------------------------------------------------------------------- fetching
def _hub():
    try:
        import huggingface_hub
    except ImportError as exc:  # a core dependency, but say so clearly if an environment lacks it
        raise ZooError(
            "resolving a Hugging Face repo id needs the huggingface_hub package: pip install "
            "'huggingface_hub>=0.20'"
        ) from exc
    return huggingface_hub


def _has(folder: Path, pattern: str) -> bool:
    return any(fnmatch(p.name, pattern) and p.is_file() for p in _snapshot_files(folder))


def _snapshot_files(folder: Path) -> list[Path]:
    """Every file under a snapshot, sorted. The loader follows links, so a linked folder (which rglob and
    os.walk do not enter) is refused, and so is a file linking outside the repo's cache folder (the Hub's
    own links go to ``../../blobs/``): what is hashed is all that can be read."""
    repo_dir = folder.resolve().parent.parent
    found = []
    for directory, subfolders, files in os.walk(folder):  # followlinks=False
        for sub in subfolders:
            if (Path(directory) / sub).is_symlink():
                raise ZooError(
                    f"{Path(directory) / sub} is a link to a folder in the Hugging Face cache; the Hub "
                    "writes none, so its files would be read unchecked: delete the repo's cache folder "
                    "and fetch it again"
                )
        for name in files:
            path = Path(directory) / name
            if path.is_symlink() and not path.resolve().is_relative_to(repo_dir):
                raise ZooError(
                    f"{path} links outside its repo's cache folder {repo_dir} (to {path.resolve()}); the "
                    "Hub links only into blobs/: delete the repo's cache folder and fetch it again"
                )
            found.append(path)
    return sorted(found)


def snapshot(repo: str, *, revision: str | None = None, offline: bool | None = None) -> Path:
    """Fetch (or find in the cache, when offline) the weights and configs of ``repo`` and verify them; returns
    the snapshot folder ``<cache>/models--owner--name/snapshots/<commit>``."""
    if revision is not None and not _safe_revision(revision):  # also for direct callers of snapshot()
        raise ZooError(f"revision {revision!r} of {repo} is not a branch, tag or commit name")
    hub = _hub()
    cache = hub_cache_dir()
    offline = hub_offline() if offline is None else offline
    common = dict(
        repo_id=repo,
        revision=revision,
        cache_dir=str(cache),
        local_files_only=offline,
        ignore_patterns=NEVER_PATTERNS,
    )
    try:
        folder = Path(hub.snapshot_download(allow_patterns=CONFIG_PATTERNS + SAFETENSORS_PATTERNS, **common))
        if not _has(folder, "*.safetensors"):
            folder = Path(hub.snapshot_download(allow_patterns=CONFIG_PATTERNS + PICKLE_PATTERNS, **common))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one message; unknown ones are re-raised
        explained = _explain(exc, repo, revision, cache, offline)
        if explained is exc:
            raise
        raise explained from exc
    _check_inside_cache(repo, folder, cache)
    if not any(_has(folder, f"*{suffix}") for suffix in (".safetensors", ".pt", ".pth")):
        raise ZooError(
            f"{repo} (commit {folder.name}) has no weights in the cache at {folder}: expected "
            "model.safetensors or "
            f"pretrained_model/model.pt; run `kprpe fetch {repo}` on a connected machine"
        )
    verify_snapshot(repo, folder)
    from .defaults import show_terms_once

    show_terms_once(repo)  # a published checkpoint's training-data terms, the first time it is used here
    return folder


def snapshot_origin(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, commit)`` when ``path`` is (or lies in) a snapshot folder of the Hugging Face cache,
    ``<cache>/models--owner--name/snapshots/<commit>``; None for any other path (or a repo id)."""
    try:
        real = Path(path).expanduser().absolute()
        snapshots_root = hub_cache_dir().expanduser().absolute()
        relative = real.relative_to(snapshots_root).parts
    except (ValueError, OSError):
        return None
    if len(relative) < 3 or relative[1] != "snapshots" or not _HEX40.fullmatch(relative[2]):
        return None
    kind, _, name = relative[0].partition("--")
    owner, _, model = name.partition("--")
    if kind != "models" or not owner or not model:
        return None
    return f"{owner}/{model}", relative[2]


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The snapshot folder the Hugging Face cache holds for ``repo`` at ``revision`` (a commit, or a branch
    or tag its ``refs/`` names; default main), read from the cache alone: no download, no hashing. None when
    it is not cached."""
    owner, name = repo.split("/", 1)
    repo_dir = hub_cache_dir() / f"models--{owner}--{name}"
    revision = revision or "main"
    if _HEX40.fullmatch(revision):
        commit = revision
    else:
        try:
            commit = (repo_dir / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    if not _HEX40.fullmatch(commit):
        return None
    folder = repo_dir / "snapshots" / commit
    return folder if folder.is_dir() else None


def _check_inside_cache(repo: str, folder: Path, cache: Path) -> None:
    """The snapshot folder huggingface_hub names must be ``<cache>/models--owner--name/snapshots/<commit>``:
    a ref file whose content is a relative path (``../../..``) would otherwise hand out any folder."""
    owner, name = repo.split("/", 1)
    snapshots = (cache / f"models--{owner}--{name}" / "snapshots").resolve()
    real = folder.resolve()
    if real.parent != snapshots or not _HEX40.fullmatch(real.name):
        raise ZooError(
            f"the Hugging Face cache entry of {repo} points outside its snapshots folder ({folder} is "
            f"{real}, expected {snapshots}/<40-hex commit>): its refs/ file was tampered with; "
            f"delete {snapshots.parent} and run `kprpe fetch {repo}` again"
        )


def _fetch_hint(repo: str, cache: Path) -> str:
    owner, name = repo.split("/", 1)
    return (
        f"on a connected machine run `kprpe fetch {repo}` (or `hf download {repo} --include "
        f"{FETCH_HINT_PATTERNS}`), "
        f"then copy its cache folder models--{owner}--{name} into {cache} (or point HF_HUB_CACHE at a copy)"
    )


def _explain(exc: Exception, repo: str, revision: str | None, cache: Path, offline: bool) -> Exception:
    """One clear :class:`ZooError` for a huggingface_hub failure (class names, so any hub version works)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    where = f"{repo}@{revision}" if revision else repo
    if "RevisionNotFoundError" in names:
        return ZooError(f"revision {revision!r} of Hugging Face repo {repo} does not exist")
    if "GatedRepoError" in names:
        return ZooError(
            f"Hugging Face repo {repo} is gated: accept its terms on huggingface.co and log in (hf auth "
            "login)"
        )
    if "RepositoryNotFoundError" in names:
        return ZooError(
            f"{where!r} is neither a local file or folder nor an existing Hugging Face repo (not found, or "
            "private: "
            f"log in with `hf auth login`); known published checkpoints: kprpe models --zoo"
        )
    if "IncompleteSnapshotError" in names:
        return ZooError(f"the cached copy of {where} is incomplete ({exc}); {_fetch_hint(repo, cache)}")
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        return ZooError(
            f"{where} is not in the Hugging Face cache {cache} and {reason}; {_fetch_hint(repo, cache)}"
        )
    if "HFValidationError" in names:
        return ZooError(f"{where!r} is not a valid Hugging Face repo id: {exc}")
    if "HfHubHTTPError" in names:
        return ZooError(f"downloading {where} from the Hugging Face Hub failed: {exc}")
    if isinstance(exc, OSError):
        return ZooError(f"could not write {where} into the Hugging Face cache {cache}: {exc}")
    return exc


# ---------------------------------------------------------------------- integrity
def _wanted(relative: str) -> bool:
    """Files of a snapshot that kprpe reads (other tools may have put the repo's code beside them)."""
    name = relative.rsplit("/", 1)[-1]
    if any(fnmatch(relative, p) or fnmatch(name, p) for p in NEVER_PATTERNS):
        return False
    patterns = CONFIG_PATTERNS + SAFETENSORS_PATTERNS + PICKLE_PATTERNS
    return any(fnmatch(relative, p) for p in patterns)


def _digests(path: Path) -> tuple[str, str, int]:
    """sha256, git blob sha1 and size of a file, in one read."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 - git's object id, not a security hash
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return sha256.hexdigest(), git_sha1.hexdigest(), size


def _read_registry(path: Path) -> dict:
    if not path.is_file():
        return {"version": 1, "files": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ZooError(f"the zoo sha256 registry {path} is unreadable ({exc}); fix or delete it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ZooError(
            f"the zoo sha256 registry {path} is not a kprpe registry (no 'files' table); fix or delete it"
        )
    return data


def verify_snapshot(repo: str, folder: Path) -> dict[str, str]:
    """Check every weights/config file of a snapshot; returns ``{relative path: sha256}``.

    A blob the Hub names by its sha256 (LFS files) or git sha1 (small files) must hash to that name; a file
    seen before must hash to what was recorded on first use. New files are recorded (atomically) only when
    every file passed, so a failed check writes nothing."""
    from ..files import atomic_write_text

    commit = folder.name
    registry_file = registry_path()
    registry = _read_registry(registry_file)
    recorded = registry["files"]
    found: dict[str, str] = {}
    new: dict[str, dict] = {}
    refetch = f"delete {folder.parent.parent} and run `kprpe fetch {repo}` again"
    for file in _snapshot_files(folder):
        relative = file.relative_to(folder).as_posix()
        if not _wanted(relative):
            continue
        if not file.is_file():
            raise ZooError(
                f"{file} is a broken link in the Hugging Face cache (its blob is missing); {refetch}"
            )
        sha256, git_sha1, size = _digests(file)
        blob = file.resolve().name
        if (_HEX64.fullmatch(blob) and blob != sha256) or (_HEX40.fullmatch(blob) and blob != git_sha1):
            raise ZooError(
                f"{relative} of {repo} (commit {commit}) is corrupt: its {size} bytes do not hash to the "
                "content "
                f"id {blob} the Hub published (truncated or modified download); {refetch}"
            )
        key = f"{repo}@{commit}/{relative}"
        entry = recorded.get(key)
        if entry is None:
            new[key] = {"sha256": sha256, "size": size}
        elif entry.get("sha256") != sha256:
            raise ZooError(
                f"{file} changed since its first use: sha256 {sha256} ({size} bytes), but "
                f"{entry.get('sha256')} "
                f"({entry.get('size')} bytes) was recorded in {registry_file}; the cached file is truncated "
                "or "
                f"modified: {refetch} (if you replaced it on purpose, delete the entry {key!r} from the "
                "registry)"
            )
        found[relative] = sha256
    if new:
        latest = _read_registry(registry_file)  # merge with entries another process may have added meanwhile
        latest["files"].update(new)
        latest["files"] = dict(sorted(latest["files"].items()))
        atomic_write_text(registry_file, json.dumps(latest, indent=2) + "\n")
    return found
