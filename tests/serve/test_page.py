"""The page's server side: the files at ``/``, ``visual=true`` crops, the KP-RPE bias rows (checked against
the bias the model's own forward pass adds to attention), and the API key on gallery writes.
Over real HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("dlib")

from kprpe.serve import FaceService, ServeLimits, create_app  # noqa: E402

from .conftest import RunningServer  # noqa: E402

LIMITS = ServeLimits(max_upload_bytes=2 * 2**20, max_pixels=4_000_000, request_timeout_s=60)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    import torch

    import kprpe
    from kprpe.face import FaceEmbedder

    model = kprpe.create_model("vit_tiny_kprpe")
    torch.manual_seed(0)
    torch.nn.init.normal_(model.kprpe.linear.weight, std=0.5)  # a new model's f is zero: no bias to see
    path = kprpe.save_model(model, tmp_path_factory.mktemp("w") / "tiny.safetensors")
    return FaceEmbedder.from_weights(path, batch_size=2)


def service_with_gallery(embedder, tmp_path, **options) -> FaceService:
    from kprpe.gallery.index import GalleryIndex

    index = GalleryIndex(embedder.output_dim, metadata={"model_fingerprint": embedder.fingerprint})
    index.add({"someone": np.random.default_rng(0).standard_normal((1, embedder.output_dim))})
    path = index.save(tmp_path / "gallery.npz")
    return FaceService(
        embedder, index=GalleryIndex.load(path), index_path=path, threshold=0.3,
        threshold_source="default (test)", **options,
    )


@pytest.fixture(scope="module")
def server(embedder, tmp_path_factory):
    service = service_with_gallery(embedder, tmp_path_factory.mktemp("g"))
    with RunningServer(create_app(service, LIMITS), LIMITS) as running:
        yield running


def test_page_files_are_served_with_a_strict_policy(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/page/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    script = httpx.get(server.url + "/page/app.js")
    assert script.status_code == 200 and "textContent" in script.text and "innerHTML" not in script.text
    assert httpx.get(server.url + "/page/style.css").headers["content-type"].startswith("text/css")
    missing = httpx.get(server.url + "/page/..%2Fapp.py")
    assert missing.status_code == 404 and "error" in missing.json()


def test_verify_adds_crops_only_when_asked(server, astronaut):
    files = {"a": ("a.png", png(astronaut)), "b": ("b.png", png(np.ascontiguousarray(astronaut[:, ::-1])))}
    compact = httpx.post(server.url + "/verify", files=files, timeout=60).json()
    assert "crop_png" not in compact["faces"]["a"]
    visual = httpx.post(server.url + "/verify?visual=true", files=files, timeout=60).json()
    import base64

    from PIL import Image

    header, data = visual["faces"]["b"]["crop_png"].split(",", 1)
    assert header == "data:image/png;base64"
    crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert crop.shape == (112, 112, 3) and crop.std() > 10  # a real crop, not a blank
    assert visual["similarity"] == pytest.approx(compact["similarity"], abs=1e-6)  # same answer otherwise


def captured_bias(model, keypoints: np.ndarray, layer: int):
    """The dense bias the forward pass hands attention of ``layer`` (caught on its way into the block)."""
    import torch

    from kprpe.nn.position import BucketBias

    caught = {}

    def hook(module, args):
        bias = args[1]
        caught["bias"] = bias.dense() if isinstance(bias, BucketBias) else bias

    handle = model.blocks[layer].register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, 112, 112), torch.as_tensor(keypoints[None], dtype=torch.float32))
    finally:
        handle.remove()
    return caught["bias"][0].float().numpy()  # (H, N, N)


def test_bias_rows_are_the_forward_pass_bias_and_follow_the_keypoints(server, embedder):
    from kprpe.keypoints import ARCFACE_TEMPLATE_112

    info = httpx.get(server.url + "/kprpe").json()
    assert info == {"available": True, "grid": 14, "layers": 2, "heads": 4}
    points = np.asarray(ARCFACE_TEMPLATE_112) / 112 + [[0.02, -0.01]] * 5
    request = {"keypoints": points.tolist(), "query": 100, "layer": 1, "head": 2}
    body = httpx.post(server.url + "/kprpe/bias", json=request).json()
    expected = captured_bias(embedder.model, points, 1)
    # float32 sums of ~10 products of O(1) terms: 1e-5 covers the rounding of a different batch/path order
    np.testing.assert_allclose(np.asarray(body["kprpe"]).ravel(), expected[2, 100], atol=1e-5)
    template = captured_bias(embedder.model, np.asarray(ARCFACE_TEMPLATE_112) / 112, 1)
    np.testing.assert_allclose(np.asarray(body["rpe"]).ravel(), template[2, 100], atol=1e-5)
    mean = httpx.post(server.url + "/kprpe/bias", json={**request, "head": None}).json()
    np.testing.assert_allclose(np.asarray(mean["kprpe"]).ravel(), expected[:, 100].mean(0), atol=1e-5)
    moved = points.copy()
    moved[2] += [0.15, 0.1]  # the nose
    after = httpx.post(server.url + "/kprpe/bias", json={**request, "keypoints": moved.tolist()}).json()
    assert np.abs(np.asarray(after["kprpe"]) - np.asarray(body["kprpe"])).max() > 1e-3
    assert after["rpe"] == body["rpe"]  # the template row does not depend on the face's keypoints


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"query": 196}, "query patch must be in [0, 196)"),
        ({"layer": 2}, "layer must be in [0, 2)"),
        ({"head": 4}, "head must be in [0, 4)"),
        ({"keypoints": [[0.1, 0.2]]}, "expected 5 finite [x, y] points"),
    ],
)
def test_bias_request_errors_name_the_problem(server, change, fragment):
    request = {"keypoints": [[0.3, 0.4]] * 5, "query": 0, "layer": 0, "head": None, **change}
    response = httpx.post(server.url + "/kprpe/bias", json=request)
    assert response.status_code == 422 and fragment in response.json()["error"]


def test_a_model_without_kprpe_says_the_view_needs_one(tmp_path, astronaut):
    import kprpe
    from kprpe.face import FaceEmbedder

    path = kprpe.save_model(kprpe.create_model("vit_tiny"), tmp_path / "plain.safetensors")
    service = FaceService(FaceEmbedder.from_weights(path), threshold=0.3, threshold_source="test")
    with RunningServer(create_app(service, LIMITS), LIMITS) as running:
        info = httpx.get(running.url + "/kprpe").json()
        assert info["available"] is False and "needs a ViT KP-RPE model" in info["reason"]
        response = httpx.post(running.url + "/kprpe/bias", json={"keypoints": [[0.3, 0.4]] * 5, "query": 0})
        assert response.status_code == 400 and "KP-RPE" in response.json()["error"]


def test_gallery_writes_need_the_key_and_are_saved(embedder, tmp_path, astronaut):
    from kprpe.gallery.index import GalleryIndex

    service = service_with_gallery(embedder, tmp_path, api_key="s3cret")
    photo = {"image": ("e.png", png(astronaut))}
    with RunningServer(create_app(service, LIMITS, host="0.0.0.0"), LIMITS) as running:
        enrol = running.url + "/gallery/enrol"
        refused = httpx.post(enrol, files=photo, data={"identity": "eileen"}, timeout=60)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        wrong = httpx.post(enrol, files=photo, data={"identity": "eileen"}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        assert "eileen" not in GalleryIndex.load(tmp_path / "gallery.npz")
        key = {"X-API-Key": "s3cret"}
        done = httpx.post(enrol, files=photo, data={"identity": "eileen"}, headers=key, timeout=60)
        assert done.status_code == 200 and done.json()["faces"] == 1, done.text
        assert "eileen" in GalleryIndex.load(tmp_path / "gallery.npz")  # saved for the next start
        hits = httpx.post(running.url + "/search", files=photo, data={"k": "1"}, timeout=60).json()
        assert hits["matches"][0]["identity"] == "eileen"
        assert httpx.post(running.url + "/gallery/remove", data={"identity": "eileen"}).status_code == 401
        gone = httpx.post(running.url + "/gallery/remove", data={"identity": "eileen"}, headers=key)
        assert gone.status_code == 200 and "eileen" not in GalleryIndex.load(tmp_path / "gallery.npz")
        unknown = httpx.post(running.url + "/gallery/remove", data={"identity": "eileen"}, headers=key)
        assert unknown.status_code == 404
        bad = httpx.post(enrol, files=photo, data={"identity": "a\x01b"}, headers=key)
        assert bad.status_code == 422 and "printable" in bad.json()["error"]


def test_enrolled_crops_are_kept_as_thumbnails_by_identity_and_removed_with_it(
    embedder, tmp_path, astronaut
):
    import base64

    from PIL import Image

    from kprpe.gallery.thumbnails import ThumbnailStore

    store = ThumbnailStore(tmp_path / "thumbs")
    service = service_with_gallery(embedder, tmp_path, thumbnails=store)
    name = "<img src=x>/../../etc"  # neither markup nor a path: the store keys identities by a hash
    photo = {"image": ("e.png", png(astronaut))}
    with RunningServer(create_app(service, LIMITS), LIMITS) as running:
        done = httpx.post(running.url + "/gallery/enrol", files=photo, data={"identity": name}, timeout=60)
        assert done.status_code == 200, done.text
        (url,) = done.json()["thumbnails"]
        assert url == f"/gallery/thumbnail/{store.key(name)}/0"
        listing = httpx.get(running.url + "/gallery").json()
        assert listing["thumbnails"] == {"someone": [], name: [url]} and listing["keeps_thumbnails"] is True
        assert listing["saved_to"] == "file" and listing["saved_to_file"] is True
        picture = httpx.get(running.url + url)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        thumb = np.asarray(Image.open(io.BytesIO(picture.content)))
        assert thumb.shape == (56, 56, 3)
        # it is the crop the model saw, made small: JPEG quality 90 moves a 56x56 astronaut face 3.3 grey
        # levels on average (measured), another picture (scikit-image's cat) is 66 away
        crop_png = base64.b64decode(done.json()["face"]["crop_png"].split(",", 1)[1])
        crop = np.asarray(Image.open(io.BytesIO(crop_png)).resize((56, 56), Image.LANCZOS))
        assert np.abs(thumb.astype(float) - crop.astype(float)).mean() < 6
        visual = running.url + "/search?visual=true"
        hits = httpx.post(visual, files=photo, data={"k": "2"}, timeout=60).json()
        assert hits["matches"][0] == {**hits["matches"][0], "identity": name, "thumbnails": [url]}
        compact = httpx.post(running.url + "/search", files=photo, data={"k": "1"}, timeout=60).json()
        assert "thumbnails" not in compact["matches"][0]  # API clients get the compact answer
        for bad in ("/gallery/thumbnail/..%2F..%2Fgallery.npz/0", f"/gallery/thumbnail/{store.key(name)}/9",
                    "/gallery/thumbnail/" + "0" * 32 + "/0"):
            missing = httpx.get(running.url + bad)
            assert missing.status_code in (404, 422) and "error" in missing.json()
        assert httpx.post(running.url + "/gallery/remove", data={"identity": name}).status_code == 200
        assert httpx.get(running.url + url).status_code == 404
        assert store.numbers(name) == [] and list((tmp_path / "thumbs").iterdir()) == []


def test_a_public_server_without_a_key_refuses_writes(embedder, tmp_path):
    service = service_with_gallery(embedder, tmp_path)
    with RunningServer(create_app(service, LIMITS, host="0.0.0.0"), LIMITS) as running:
        response = httpx.post(running.url + "/gallery/remove", data={"identity": "someone"})
        assert response.status_code == 403 and "--api-key" in response.json()["error"]
        assert httpx.get(running.url + "/gallery").json()["identities"] == ["someone"]
    with RunningServer(create_app(service, LIMITS), LIMITS) as running:  # loopback: allowed without a key
        assert httpx.post(running.url + "/gallery/remove", data={"identity": "someone"}).status_code == 200


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("192.168.1.5", False), ("example.org", False)],
)
def test_only_loopback_hosts_allow_keyless_writes(host, loopback):
    from kprpe.serve.routes import is_loopback

    assert is_loopback(host) is loopback


def test_serve_takes_the_key_from_the_option_or_the_environment(monkeypatch, embedder, tmp_path):
    import argparse

    from kprpe.cli.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--weights", "w", "--api-key", "k1"])
    assert args.api_key == "k1"
    from kprpe.cli import serve as commands

    monkeypatch.setenv("KPRPE_API_KEY", "from-env")
    monkeypatch.setattr("kprpe.face.embedder.FaceEmbedder.from_weights", lambda *a, **k: embedder)
    monkeypatch.setattr("kprpe.zoo.resolve", lambda weights, kind: tmp_path / "w.safetensors")
    service = commands.build_service(parser.parse_args(["serve", "--weights", "w", "--aligner", "supplied"]))
    assert service.api_key == "from-env"
    service = commands.build_service(
        parser.parse_args(["serve", "--weights", "w", "--aligner", "supplied", "--api-key", "k1"])
    )
    assert service.api_key == "k1"
