from __future__ import annotations

import numpy as np
import pytest
import torch

from kprpe import load_official
from kprpe.eval.ijb import read_ijb_meta, read_template_pairs, template_features, template_pair_scores
from kprpe.eval.images import crop_face
from kprpe.eval.landmarks import LandmarkFileError
from kprpe.eval.metrics import tar_at_far
from kprpe.eval.runs import EvalSettings, ModelHandle, evaluate_ijb
from kprpe.images import load_image
from kprpe.inference import embed, to_model_input

from .conftest import TINY_KPRPE, synthetic_photo, write_rgb


def test_template_features_hand_computed():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    tids = np.array([7, 7, 7, 3])
    mids = np.array([1, 1, 2, 5])
    norms = np.array([2.0, 2.0, 1.0, 1.0])
    scores = np.array([1.0, 0.5, 1.0, 1.0])
    feats, templates = template_features(emb, tids, mids, norms=norms, detector_scores=scores)
    np.testing.assert_array_equal(templates, [3, 7])
    # template 7: media 1 = mean([2,0], [0,1]) = [1, .5]; media 2 = [1, 0]; sum = [2, .5]
    np.testing.assert_allclose(feats[1], np.array([2.0, 0.5]) / np.hypot(2.0, 0.5))
    np.testing.assert_allclose(feats[0], [0.6, 0.8])
    np.testing.assert_allclose(template_pair_scores(feats, templates, np.array([3]), np.array([7])),
                               [(0.6 * 2 + 0.8 * 0.5) / np.hypot(2.0, 0.5)])
    with pytest.raises(ValueError, match="template id 9"):
        template_pair_scores(feats, templates, np.array([9]), np.array([7]))


def test_synthetic_ijb_gives_the_expected_tar():
    """20 identities x 2 templates; identity directions orthogonal, so genuine=1 and impostor=0 except
    two planted impostor pairs that score 1: TAR@FAR is known exactly."""
    rng = np.random.default_rng(0)
    n_id, dim = 20, 32
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_id]
    emb, tids, mids = [], [], []
    for ident in range(n_id):
        for template in (2 * ident, 2 * ident + 1):
            for media in range(2):
                emb.append(basis[ident])
                tids.append(template)
                mids.append(100 * template + media)
    feats, templates = template_features(np.array(emb), np.array(tids), np.array(mids))
    t1 = [2 * i for i in range(n_id)] + [2 * i for i in range(n_id) for j in range(n_id) if j != i][:180]
    t2 = [2 * i + 1 for i in range(n_id)] + [2 * j + 1 for i in range(n_id) for j in range(n_id) if j != i][
        :180
    ]
    labels = np.r_[np.ones(n_id, bool), np.zeros(180, bool)]
    scores = template_pair_scores(feats, templates, np.array(t1), np.array(t2))
    np.testing.assert_allclose(scores[:n_id], 1.0, atol=1e-12)
    np.testing.assert_allclose(scores[n_id:], 0.0, atol=1e-12)
    scores = np.round(scores, 9)  # exact ties between genuine pairs and the planted impostors
    scores[n_id:n_id + 2] = 1.0  # two impostors as similar as genuine pairs
    scores[:5] = 0.5  # five genuine pairs weaker than those impostors
    rows = {r["far_target"]: r for r in tar_at_far(scores, labels, (1e-3, 1e-2, 1e-1), convention="at_most")}
    assert rows[1e-3]["tar"] == 0.0 and not rows[1e-3]["resolvable"]
    assert rows[1e-2]["tar"] == 0.0 and rows[1e-2]["far"] == 0.0  # 2/180 > 1e-2: the top score is off-limits
    assert rows[1e-1]["tar"] == 1.0 and rows[1e-1]["far"] == pytest.approx(2 / 180)


def _write_ijb(tmp_path, n_templates=6, faces_per_template=2):
    rng = np.random.default_rng(1)
    images = tmp_path / "loose_crop"
    tid_lines, lm_lines = [], []
    k = 0
    for t in range(1, n_templates + 1):
        for f in range(faces_per_template):
            k += 1
            name = f"{k}.jpg"
            image, lm = synthetic_photo(rng, size=140)
            write_rgb(images / name, image)
            tid_lines.append(f"{name} {t} {1000 + t * 10 + f // 2}")
            lm_lines.append(
                name + " " + " ".join(f"{v:.2f}" for v in lm.reshape(-1)) + f" {0.5 + 0.05 * f:.2f}"
            )
    pair_lines = [f"{a} {b} {int((a + b) % 3 == 0)}" for a in range(1, n_templates + 1)
                  for b in range(a + 1, n_templates + 1)]
    (tmp_path / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (tmp_path / "ijbc_name_5pts_score.txt").write_text("\n".join(lm_lines) + "\n")
    (tmp_path / "ijbc_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return images


def test_evaluate_ijb_matches_a_manual_computation(tmp_path):
    images = _write_ijb(tmp_path)
    settings = EvalSettings(progress=False, cache_dir=tmp_path / "cache", far_targets=(1e-1, 3e-1))
    res = evaluate_ijb(ModelHandle(TINY_KPRPE), name="IJBC", tid_mid=tmp_path / "ijbc_face_tid_mid.txt",
                       pairs=tmp_path / "ijbc_template_pair_label.txt",
                       landmarks=tmp_path / "ijbc_name_5pts_score.txt", images_dir=images, settings=settings)
    r = res["sets"]["IJBC"]
    assert r["num_faces"] == 12 and r["num_templates"] == 6 and r["num_pairs"] == 15
    # manual: align each face, embed with flip, weight by norm x detector score, pool, cosine
    meta = read_ijb_meta(tmp_path / "ijbc_face_tid_mid.txt", tmp_path / "ijbc_template_pair_label.txt",
                         tmp_path / "ijbc_name_5pts_score.txt")
    crops, kps = zip(*(crop_face(load_image(images / n), meta.landmarks[n]) for n in meta.names), strict=True)
    model = load_official(TINY_KPRPE)
    unit, norm = embed(
        model, to_model_input(np.stack(crops)), torch.tensor(np.stack(kps), dtype=torch.float32), flip=True
    )
    feats, templates = template_features(unit.numpy(), meta.template_ids, meta.media_ids, norms=norm.numpy(),
                                         detector_scores=meta.detector_scores)
    scores = template_pair_scores(feats, templates, meta.pair_t1, meta.pair_t2)
    expected = tar_at_far(scores, meta.pair_labels, (1e-1, 3e-1))
    for got, want in zip(r["tar_at_far"], expected, strict=True):
        assert got["tar"] == pytest.approx(want["tar"], abs=1e-6)
        assert got["far"] == pytest.approx(want["far"])
    assert not r["embeddings_from_cache"]
    again = evaluate_ijb(
        ModelHandle(TINY_KPRPE),
        name="IJBC",
        tid_mid=tmp_path / "ijbc_face_tid_mid.txt",
        pairs=tmp_path / "ijbc_template_pair_label.txt",
        landmarks=tmp_path / "ijbc_name_5pts_score.txt",
        images_dir=images,
        settings=settings,
    )
    assert again["sets"]["IJBC"]["embeddings_from_cache"]
    assert again["sets"]["IJBC"]["tar_at_far"] == r["tar_at_far"]


def test_malformed_meta_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("1 2 1\n3 4\n")
    with pytest.raises(LandmarkFileError, match=r"pairs\.txt:2: expected 3 fields"):
        read_template_pairs(bad)
    bad.write_text("1 2 1\n3 x 0\n")
    with pytest.raises(LandmarkFileError, match=r"pairs\.txt:2: template id 'x'"):
        read_template_pairs(bad)
    bad.write_text("1 2 7\n")
    with pytest.raises(LandmarkFileError, match=r"pairs\.txt:1: label 7"):
        read_template_pairs(bad)


def test_meta_cross_checks(tmp_path):
    _write_ijb(tmp_path)
    pairs = tmp_path / "ijbc_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "1 99 0\n")
    with pytest.raises(LandmarkFileError, match="template ids have no face.*99"):
        read_ijb_meta(tmp_path / "ijbc_face_tid_mid.txt", pairs, tmp_path / "ijbc_name_5pts_score.txt")
    lm = tmp_path / "ijbc_name_5pts_score.txt"
    lm.write_text("\n".join(lm.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(LandmarkFileError, match="no landmarks for 1 of 12 faces.*'1.jpg'"):
        read_ijb_meta(tmp_path / "ijbc_face_tid_mid.txt", tmp_path / "ijbc_template_pair_label.txt", lm)


def test_ijb_image_names_cannot_leave_the_image_folder(tmp_path):
    from kprpe.eval.images import DataFormatError

    images = _write_ijb(tmp_path)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((images / sorted(p.name for p in images.iterdir())[0]).read_bytes())
    for bad in ("../secret.jpg", str(secret)):
        text = (tmp_path / "ijbc_face_tid_mid.txt").read_text().splitlines()
        first = text[0].split(" ")
        old = first[0]
        text[0] = " ".join([bad, *first[1:]])
        (tmp_path / "ijbc_face_tid_mid.txt").write_text("\n".join(text) + "\n")
        lm = (tmp_path / "ijbc_name_5pts_score.txt").read_text().replace(old, bad, 1)
        (tmp_path / "ijbc_name_5pts_score.txt").write_text(lm)
        with pytest.raises(DataFormatError, match="outside the image folder"):
            evaluate_ijb(ModelHandle(TINY_KPRPE), name="IJBC", tid_mid=tmp_path / "ijbc_face_tid_mid.txt",
                         pairs=tmp_path / "ijbc_template_pair_label.txt",
                         landmarks=tmp_path / "ijbc_name_5pts_score.txt", images_dir=images,
                         settings=EvalSettings(progress=False, cache_dir=None))
        _write_ijb(tmp_path)
