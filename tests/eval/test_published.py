"""The authors' numbers are put beside ours only for a checkpoint that can be the published model (issue 31:
a tiny model cached under a repo id got ViT-Base's numbers with no warning)."""

from __future__ import annotations

from kprpe.eval.published import attach_published, published_parameters
from kprpe.eval.report import markdown_summary

REPO_ID = "minchul/cvlface_adaface_vit_base_kprpe_webface4m"


def _results(parameters: int | None) -> dict:
    lfw = {"kfold": {"accuracy_mean": 0.995, "accuracy_std": 0.001}}
    return {"protocol": "verification", "model": REPO_ID, "parameters": parameters, "sets": {"lfw": lfw}}


def test_published_numbers_only_for_the_published_architecture():
    expected = published_parameters("ViT-Base + KP-RPE (official KP-RPE model; keypoints from DFA)")
    assert expected is not None and expected > 50_000_000  # ViT-Base size, built on the meta device
    rows = attach_published(results := _results(expected))
    assert [(r["set"], r["metric"], r["published"]) for r in rows] == [("lfw", "LFW", 99.83)]
    assert abs(rows[0]["difference"] - (99.5 - 99.83)) < 1e-9 and "published_not_compared" not in results


def test_a_tiny_model_under_the_repo_id_is_not_compared_and_the_summary_says_why():
    results = _results(123_456)
    assert attach_published(results) == []
    assert "published" not in results["sets"]["lfw"]
    reason = results["published_not_compared"]
    assert "123,456 parameters" in reason and "ViT-Base + KP-RPE" in reason
    assert f"published numbers: not compared — {reason}" in markdown_summary(results)


def test_unknown_size_onnx_is_not_compared():
    results = _results(None)
    assert attach_published(results) == [] and "size is unknown" in results["published_not_compared"]
