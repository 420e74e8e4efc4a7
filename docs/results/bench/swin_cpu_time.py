"""Swin-Base (CPB) vs Swin-Base-KP-RPE (one gather; the official per-window loop), CPU fp32, batch 8.
Models built once; cases interleaved (A B C A B C ...) so the shared machine's load spreads evenly; median."""

import json
import statistics
import sys
import time

import torch

import kprpe

torch.set_num_threads(1)  # CPU time of one thread: robust to the shared machine's load
torch.manual_seed(0)
mode = sys.argv[1]
reps = int(sys.argv[2])
plain = kprpe.create_model("swin_base", drop_path_rate=0.0)
kp = kprpe.create_model("swin_base_kprpe", drop_path_rate=0.0)
with torch.no_grad():
    for stage in kp.kprpe:
        stage.linear.weight.normal_(0, 0.1)
images = torch.rand(8, 3, 112, 112) * 2 - 1
points = torch.rand(8, 5, 2) * 0.6 + 0.2


def set_impl(impl):
    for stage in kp.kprpe:
        stage.impl = impl


cases = {
    "swin_base": (plain, None),
    "swin_base_kprpe[gather]": (kp, "gather"),
    "swin_base_kprpe[loop]": (kp, "loop"),
}
opts = {
    name: torch.optim.AdamW(m.parameters(), lr=1e-4)
    for name, (m, _) in cases.items()
    if name != "swin_base_kprpe[loop]"
}
opts["swin_base_kprpe[loop]"] = opts["swin_base_kprpe[gather]"]


def step(name):
    model, impl = cases[name]
    if impl:
        set_impl(impl)
    if mode == "infer":
        model.eval()
        with torch.inference_mode():
            model(images, points)
    else:
        model.train()
        out = model(images, points)
        out.square().mean().backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)


times = {n: [] for n in cases}
for r in range(reps + 1):
    for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
        t = time.process_time()
        step(name)
        dt = time.process_time() - t
        if r:
            times[name].append(dt)
        print(mode, r, name, f"{dt:.2f}s", flush=True)
med = {n: statistics.median(v) for n, v in times.items()}
res = {n: {"median_s": med[n], "times_s": times[n], "x_plain": med[n] / med["swin_base"]} for n in cases}
print(json.dumps({"mode": mode, "results": res}, indent=1))
