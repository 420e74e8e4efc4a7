"""KP-RPE attention with its own backward: equal outputs and gradients to autograd through the dense bias,
no (B, H, N, N) tensor kept for the backward pass, and ``auto``'s timed choice of bias path."""

from __future__ import annotations

import pytest
import torch

import kprpe
from float_tolerance import assert_float32_close, assert_float64_close
from kprpe.nn import bucket_ids, kprpe_attention
from kprpe.nn import keypoint_rpe as kprpe_module
from kprpe.nn.kprpe_attention import BucketAttention, bucket_autograd


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One thread keeps the reduction order fixed within a run. The comparisons of algorithms run in float64
    (tolerances in tests/float_tolerance.py), so they hold on every CPU, whatever its float32 kernels do."""


def _reference(q, k, v, table, ids, scale):
    """The definition: explicit softmax over ``s q k^T + table[..., ids]``."""
    b, h, n, _ = q.shape
    bias = torch.gather(table.expand(b, h, n, table.shape[-1]), 3, ids.expand(b, h, n, n))
    return ((q @ k.transpose(-2, -1)) * scale + bias).softmax(-1) @ v


def _inputs(table_shape, dtype=torch.float64, grid=3, heads=2, dim=4):
    gen = torch.Generator().manual_seed(0)
    ids = bucket_ids(grid)
    n = ids.shape[0]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)

    q, k, v = (rand(2, heads, n, dim) for _ in range(3))
    return q, k, v, rand(*table_shape(n)), ids


@pytest.mark.parametrize(
    "table_shape",
    [lambda n: (2, 2, n, 49), lambda n: (2, 2, 1, 49), lambda n: (1, 2, n, 49)],
    ids=["per-query", "per-sample", "batch-shared"],
)
def test_gradcheck_float64(table_shape, monkeypatch):
    monkeypatch.setattr(kprpe_attention, "BACKWARD_CHUNK", 3)  # several chunks, one partial
    q, k, v, table, ids = _inputs(table_shape)
    fn = lambda q, k, v, t: BucketAttention.apply(q, k, v, t, ids, 0.5, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, table), eps=1e-6, atol=1e-7)
    torch.testing.assert_close(fn(q, k, v, table), _reference(q, k, v, table, ids, 0.5), rtol=0, atol=1e-12)


def test_gradients_equal_reference_float32(monkeypatch):
    monkeypatch.setattr(kprpe_attention, "BACKWARD_CHUNK", 5)
    """Float32 (what training runs): within a few times the reference's own float32 rounding error, measured
    against the same reference in float64 on this CPU."""
    inputs = _inputs(lambda n: (2, 3, n, 49), torch.float32, grid=4, heads=3, dim=8)
    q, k, v, table, ids = inputs
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    grad = torch.randn(2, 3, 16, 8)
    got = BucketAttention.apply(q, k, v, table, ids, 0.3, None)
    ref = _reference(q, k, v, table, ids, 0.3)
    ref64 = _reference(*wide, ids, 0.3)
    assert_float32_close(got, ref, ref64, msg="output")
    g_got = torch.autograd.grad(got, (q, k, v, table), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v, table), grad)
    g_ref64 = torch.autograd.grad(ref64, wide, grad.double())
    for name, a, b, c in zip("qkvt", g_got, g_ref, g_ref64, strict=True):
        assert_float32_close(a, b, c, msg=f"d{name}")


def _saved_shapes(fn) -> list[tuple]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def _tiny(impl="auto", attn_impl="sdpa", **kw):
    torch.manual_seed(0)
    model = kprpe.create_model("vit_tiny_kprpe", kp_bias_impl=impl, attn_impl=attn_impl, img_size=48, **kw)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0, 0.3)
        model.keypoint_linear.bias.normal_(0, 0.3)
    return model.train()


def _batch(model, b=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    size = model.config.img_size
    images, kp = torch.rand(b, 3, size, size, generator=gen) * 2 - 1, torch.rand(b, 5, 2, generator=gen)
    return images.to(dtype), kp.to(dtype)


def test_training_keeps_no_token_by_token_tensor():
    model = _tiny("gather")
    images, kp = _batch(model)
    n = model.num_tokens
    new = _saved_shapes(lambda: model(images, kp).sum())
    with bucket_autograd(False):
        old = _saved_shapes(lambda: model(images, kp).sum())
    per_pair = [s for s in new if len(s) == 4 and s[-2:] == (n, n)]  # (B, H, N, N); the (N, N) index is not
    assert any(len(s) == 4 and s[-2:] == (n, n) for s in old)  # the dense path keeps the probabilities
    assert not per_pair, per_pair


def _grads(model, images, kp) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(images, kp).square().sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["gather", "index", "onehot", "naive", "decomposed", "auto"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_every_bias_path_has_the_reference_gradients(impl, checkpointing, monkeypatch):
    """In float64 (the custom backward runs there too): an algorithm comparison that holds on every CPU.
    In float32 the gradients of a 4-layer ViT differ between CPUs' kernels by ~1e-4 of their scale
    (AVX2 vs AVX-512), which would hide nothing but fail everywhere but the machine that set a fixed atol."""
    monkeypatch.setattr(kprpe_attention, "FORWARD_CHUNK_BYTES", 1)  # forward one sample at a time
    # reference: the explicit softmax (math) with autograd through the dense bias, same weights
    reference = _tiny(impl, attn_impl="math").double()
    model = _tiny(impl).double()
    model.load_state_dict(reference.state_dict())
    model.set_grad_checkpointing(checkpointing)
    images, kp = _batch(model, dtype=torch.float64)
    got, ref = _grads(model, images, kp), _grads(reference, images, kp)
    assert set(got) == set(ref) and "kprpe.linear.weight" in got
    scale = max(float(g.abs().max()) for g in ref.values())  # one scale: some are zero up to rounding
    for name in ref:
        assert_float64_close(got[name], ref[name], scale=scale, msg=name)


@pytest.mark.parametrize("impl", ["gather", "index", "onehot", "naive", "decomposed"])
@pytest.mark.parametrize("overrides", [{}, {"kp_input": "query_position"}, {"kp_sharing": "shared"}])
def test_inference_in_sample_chunks_equals_one_pass(impl, overrides, monkeypatch):
    """In float64, so the comparison is of the algorithm (chunking, the path's formula), not of how one CPU's
    float32 kernels block a batch of 5 against a batch of 1."""
    model = _tiny(impl, **overrides).eval().double()
    images, kp = _batch(model, b=5, dtype=torch.float64)
    with torch.no_grad():
        whole = model(images, kp)
        monkeypatch.setattr(kprpe_attention, "FORWARD_CHUNK_BYTES", 1)  # one sample per chunk
        chunked = model(images, kp)
        reference = _tiny(impl, attn_impl="math", **overrides).eval().double()
        reference.load_state_dict(model.state_dict())
        expected = reference(images, kp)
    assert_float64_close(chunked, whole, msg="chunked vs one pass")
    assert_float64_close(chunked, expected, msg="chunked vs the explicit softmax")


def test_sdpa_training_uses_the_custom_function_and_dense_switch_does_not(monkeypatch):
    model = _tiny("gather")
    images, kp = _batch(model)
    calls = []
    original = BucketAttention.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(BucketAttention, "apply", spy)
    model(images, kp).sum().backward()
    assert len(calls) == model.config.depth
    calls.clear()
    with bucket_autograd(False):
        model(images, kp).sum().backward()
    assert not calls
    with torch.no_grad():
        model(images, kp)
    assert not calls  # inference needs no backward


def test_dropout_and_bfloat16_fall_back_to_the_dense_path():
    model = _tiny("gather", attn_drop_rate=0.1)
    images, kp = _batch(model)
    model(images, kp).sum().backward()  # dropout on the probabilities: autograd through the dense bias
    assert model.keypoint_linear.weight.grad is not None
    model = _tiny("gather")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, kp)
    out.float().sum().backward()
    assert model.keypoint_linear.weight.grad is not None


def test_auto_times_the_paths_once_per_shape_and_matches_gather():
    kprpe_module.AUTO_CHOICES.clear()
    auto, gather = _tiny("auto").eval(), _tiny("gather").eval()
    images, kp = _batch(auto)
    with torch.no_grad():
        out = auto(images, kp)
        wide = _tiny("gather").eval().double()  # the same weights (same seed) in float64
        assert_float32_close(
            out, gather(images, kp), wide(images.double(), kp.double()), msg="auto vs gather"
        )
        assert len(kprpe_module.AUTO_CHOICES) == 1
        ((choice, seconds),) = kprpe_module.AUTO_CHOICES.values()
        assert set(seconds) == {"gather", "index", "onehot", "decomposed"} and choice in seconds
        assert all(s > 0 for s in seconds.values())
        assert auto.kprpe.last_impl == choice
        auto(images, kp)
        assert len(kprpe_module.AUTO_CHOICES) == 1  # cached: not timed again
        auto(images[:2], kp[:2])
        assert len(kprpe_module.AUTO_CHOICES) == 2  # a new batch size is a new shape
    auto.train()(images, kp).sum().backward()
    assert auto.kprpe.last_impl == "gather"  # training: the table's gather, gradient by the custom backward


def test_auto_keeps_gather_on_near_ties():
    choose = kprpe_module.choose_bias_path
    assert choose({"gather": 1.0, "index": 0.97, "onehot": 1.2}) == "gather"  # within the margin: noise
    assert choose({"gather": 1.0, "index": 0.97, "decomposed": 0.6}) == "decomposed"
    assert choose({"gather": 1.0, "onehot": 0.3}) == "onehot"


def test_pinned_bias_path_replaces_the_timed_choice():
    kprpe_module.AUTO_CHOICES.clear()
    auto = _tiny("auto").eval()
    images, kp = _batch(auto)
    with torch.no_grad():
        with kprpe_module.pinned_bias_path("onehot"):
            pinned = auto(images, kp)
            assert auto.kprpe.last_impl == "onehot" and not kprpe_module.AUTO_CHOICES  # nothing timed
        auto(images, kp)
        assert len(kprpe_module.AUTO_CHOICES) == 1  # outside the block: timed again
    assert torch.equal(pinned, _tiny("onehot").eval()(images, kp))
    with pytest.raises(ValueError, match="pinned bias path 'decomposed'"):
        kprpe_module.pinned_bias_path("decomposed").__enter__()
