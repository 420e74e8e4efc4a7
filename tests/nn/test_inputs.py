"""Bad input is refused with an error that says what was expected and what was received."""

from __future__ import annotations

import pytest
import torch

import kprpe


@pytest.fixture(scope="module")
def kp_model():
    return kprpe.create_model("vit_tiny_kprpe").eval()


@pytest.fixture(scope="module")
def plain_model():
    return kprpe.create_model("vit_tiny").eval()


IMAGES = torch.zeros(2, 3, 112, 112)
KP = torch.full((2, 5, 2), 0.5)


@pytest.mark.parametrize(
    "images,error,pattern",
    [
        (torch.zeros(2, 3, 96, 96), ValueError, r"must be 112x112.*got 96x96"),
        (torch.zeros(2, 1, 112, 112), ValueError, r"3 channels.*got 1 channels"),
        (torch.zeros(2, 112, 112, 3), ValueError, r"3 channels.*got 112 channels"),
        (torch.zeros(3, 112, 112), ValueError, r"shape \(B, 3, 112, 112\), got \(3, 112, 112\)"),
        (torch.zeros(2, 3, 112, 112, dtype=torch.uint8), TypeError, r"floating-point.*torch.uint8"),
        ([[0.0]], TypeError, r"torch.Tensor.*got list"),
    ],
)
def test_bad_images(kp_model, images, error, pattern):
    with pytest.raises(error, match=pattern):
        kp_model(
            images, KP[: images.shape[0]] if isinstance(images, torch.Tensor) and images.ndim == 4 else KP
        )


@pytest.mark.parametrize(
    "keypoints,error,pattern",
    [
        (None, ValueError, r"needs keypoints.*\(B, 5, 2\)"),
        (torch.zeros(2, 68, 2), ValueError, r"shape \(2, 5, 2\).*got \(2, 68, 2\)"),
        (torch.zeros(2, 10), ValueError, r"shape \(2, 5, 2\).*got \(2, 10\)"),
        (torch.zeros(3, 5, 2), ValueError, r"shape \(2, 5, 2\).*got \(3, 5, 2\)"),
        (torch.zeros(2, 5, 2, dtype=torch.long), TypeError, r"floating point.*torch.int64"),
        (torch.tensor(KP.numpy()), None, None),
    ],
)
def test_bad_keypoints(kp_model, keypoints, error, pattern):
    if error is None:
        assert kp_model(IMAGES, keypoints).shape == (2, 32)
        return
    with pytest.raises(error, match=pattern):
        kp_model(IMAGES, keypoints)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_keypoints(kp_model, value):
    kp = KP.clone()
    kp[1, 3, 0] = value
    with pytest.raises(ValueError, match=r"NaN or inf \(samples \[1\]\)"):
        kp_model(IMAGES, kp)


def test_keypoints_outside_unit_square_are_legal(kp_model):
    kp = KP.clone()
    kp[0, 0] = torch.tensor([-0.3, 1.4])
    assert torch.isfinite(kp_model(IMAGES, kp)).all()


def test_plain_model_ignores_keypoints(plain_model):
    with torch.no_grad():
        torch.testing.assert_close(plain_model(IMAGES, KP), plain_model(IMAGES))


@pytest.mark.parametrize("name", ["vit_tiny_kprpe", "vit_tiny", "ir_18"])
def test_float64_images_and_empty_batches(name):
    """float64 batches (NumPy's default) and empty batches once ended in tracebacks from deep inside torch."""
    import torch

    import kprpe
    from kprpe.keypoints import template_keypoints

    model = kprpe.create_model(name).eval()
    with torch.no_grad():
        ref = model(torch.zeros(2, 3, 112, 112), template_keypoints(2))
        got = model(torch.zeros(2, 3, 112, 112, dtype=torch.float64), template_keypoints(2).double())
        assert got.dtype == torch.float32 and torch.equal(got, ref)
        empty = model(torch.zeros(0, 3, 112, 112), template_keypoints(0))
    assert empty.shape == (0, ref.shape[1])
