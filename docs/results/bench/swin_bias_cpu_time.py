"""Cost of forming every block's windowed KP-RPE bias in one Swin-Base forward (batch 8): one gather per block
vs the official per-window loop; and the plain model's CPB bias. Min CPU time over repeats."""

import time

import torch

import kprpe

torch.set_num_threads(1)
torch.manual_seed(0)
kp_model = kprpe.create_model("swin_base_kprpe", drop_path_rate=0.0).eval()
plain = kprpe.create_model("swin_base", drop_path_rate=0.0).eval()
for s in kp_model.kprpe:
    s.linear.weight.data.normal_(0, 0.1)
points = torch.rand(8, 5, 2) * 0.6 + 0.2
blocks = [(kp_model.features[i], w) for i, w in enumerate(kp_model.stage_of) if w is not None]


def kp_bias(impl):
    for s in kp_model.kprpe:
        s.impl = impl
    biases = None
    for block, (stage, j) in blocks:
        if j == 0:
            biases = kp_model.kprpe[stage].window_biases(points)
        biases(j, block.shift)


def cpb_bias():
    for i, w in enumerate(plain.stage_of):
        if w is None:
            continue
        a = plain.features[i].attn
        a.cpb_mlp.bias(a.relative_coords_table, a.relative_position_index, 25)


def best(fn, reps=7):
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


with torch.inference_mode():
    for name, fn in [
        ("cpb", cpb_bias),
        ("gather", lambda: kp_bias("gather")),
        ("loop", lambda: kp_bias("loop")),
    ]:
        fn()
        print("infer", name, f"{best(fn) * 1000:.1f} ms", flush=True)


# training: forward + backward of the bias alone (a sum of every bias as the loss)
def kp_train(impl):
    for s in kp_model.kprpe:
        s.impl = impl
    total = 0
    biases = None
    for block, (stage, j) in blocks:
        if j == 0:
            biases = kp_model.kprpe[stage].window_biases(points)
        total = total + biases(j, block.shift).sum()
    total.backward()


for impl in ("gather", "loop"):
    kp_train(impl)
    print("train", impl, f"{best(lambda impl=impl: kp_train(impl), 5) * 1000:.1f} ms", flush=True)
