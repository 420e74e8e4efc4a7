"""Speed and memory of plain ViT, KP-RPE (every bias path) and iRPE, inference and training step.

Each measurement runs in a fresh child process so its peak memory is its own (CPU: peak resident set size
from the kernel; CUDA: ``torch.cuda.max_memory_allocated``). The memory of one step (``step_mem_mb``) is the
peak of the tensor bytes it holds above what was live when it started: on CUDA from the allocator, on CPU
from the profiler's allocation events of one extra, untimed step (the RSS cannot say it: the allocator keeps
freed pages, so after warm-up the RSS no longer grows and the delta read 0). Times are medians over
``repeats`` after ``warmup`` untimed runs. Nothing here is a test: it prints what it measured and on what.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Case", "machine_info", "run_case", "run_suite", "format_table", "format_engine_table"]


@dataclass(frozen=True)
class Case:
    """One measurement: a model variant, a mode and a batch size."""

    model: str  # preset name, e.g. vit_base_kprpe
    mode: str  # infer | train
    batch_size: int
    bias_impl: str = "auto"  # KP-RPE only
    attn_impl: str = "sdpa"
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    overrides: dict = field(default_factory=dict, hash=False)
    engine: str = "torch"  # torch (eager) | onnx (the model exported by kprpe export, run by ONNX Runtime)
    # False: KP-RPE training through autograd of the dense bias (the path before kprpe.nn.kprpe_attention)
    bucket_backward: bool = True

    @property
    def label(self) -> str:
        name = self.model
        if "kprpe" in self.model and self.engine == "torch":  # an exported graph always uses the gather path
            name += f"[{self.bias_impl}]"
        if self.attn_impl != "sdpa":
            name += f"({self.attn_impl})"
        if self.engine != "torch":
            name += f" ({self.engine})"
        if not self.bucket_backward:
            name += "{dense-bwd}"
        return name


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cpu_step_peak_bytes(step) -> int:
    """Peak tensor bytes allocated by one call of ``step`` above its start (torch's CPU profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in allocations:  # frees are negative
        live += nbytes
        peak = max(peak, live)
    return peak


def run_case(case: Case, warmup: int = 1, repeats: int = 3) -> dict:
    """Measure one case in this process (use :func:`run_suite` for isolated peak memory)."""

    from kprpe.nn.kprpe_attention import bucket_autograd

    with bucket_autograd(case.bucket_backward):
        return _measure(case, warmup, repeats)


def _measure(case: Case, warmup: int, repeats: int) -> dict:
    import torch

    import kprpe

    device = torch.device(case.device)
    torch.manual_seed(0)
    overrides = dict(case.overrides)
    overrides["attn_impl"] = case.attn_impl
    if "kprpe" in case.model:
        overrides["kp_bias_impl"] = case.bias_impl
    model = kprpe.create_model(case.model, **overrides).to(device)
    if model.kprpe is not None:  # a zero table would make every path trivially cheap to get right
        tables = model.keypoint_linear  # one Linear (ViT) or one per stage (Swin)
        with torch.no_grad():
            for table in tables if isinstance(tables, torch.nn.ModuleList) else [tables]:
                table.weight.normal_(0, 0.1)
    cfg = model.config
    images = torch.rand(case.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device) * 2 - 1
    keypoints = torch.rand(case.batch_size, cfg.num_keypoints, 2, device=device) * 0.6 + 0.2
    if case.engine == "onnx":
        return _run_onnx_case(case, model, images, keypoints, warmup, repeats)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.dtype == "bfloat16")
    if case.mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with autocast:
                out = model(images, keypoints)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif case.mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(images, keypoints)
    else:
        raise ValueError(f"mode must be infer or train, got {case.mode!r}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        step_mem = max(peak - base_mem, 0)
    else:
        peak = _peak_rss_bytes()
        step_mem = _cpu_step_peak_bytes(step)  # after the timed steps: profiling slows the step it watches
    median = statistics.median(times)
    return {
        **asdict(case),
        "label": case.label,
        "median_s": median,
        "times_s": times,
        "images_per_s": case.batch_size / median,
        "peak_mem_mb": peak / 2**20,
        "step_mem_mb": step_mem / 2**20,
        "bias_impl_used": getattr(model.kprpe, "last_impl", case.bias_impl)
        if model.kprpe is not None
        else None,
        "auto_timings_s": _auto_timings(),
    }


def _auto_timings() -> dict:
    """What ``auto`` timed in this process (path -> seconds per shape), for the JSON record."""
    from kprpe.nn.keypoint_rpe import AUTO_CHOICES

    return {str(key): {"chosen": choice, **seconds} for key, (choice, seconds) in AUTO_CHOICES.items()}


def _onnx_file(case: Case, model) -> Path:
    """The case's model exported once per (model, overrides, kprpe version) into a temporary folder."""
    import hashlib

    import kprpe
    from kprpe.export import export_onnx

    key = json.dumps([case.model, case.overrides, kprpe.__version__], sort_keys=True, default=str)
    folder = Path(tempfile.gettempdir()) / "kprpe-bench-onnx"
    path = folder / f"{case.model}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.onnx"
    if not path.is_file():
        export_onnx(model, path, check=False, source=f"bench:{case.model}")
    return path


def _run_onnx_case(case: Case, model, images, keypoints, warmup: int, repeats: int) -> dict:
    import torch

    from kprpe.export import OnnxEngine

    if case.mode != "infer" or case.device != "cpu" or case.dtype != "float32":
        raise ValueError("the onnx engine is benchmarked for CPU float32 inference only")
    threads = torch.get_num_threads()
    engine = OnnxEngine(_onnx_file(case, model), threads=threads)
    x = images.numpy()
    kp = keypoints.numpy() if engine.uses_keypoints else None
    for _ in range(warmup):
        engine.run(x, kp)
    base_mem = _rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run(x, kp)
        times.append(time.perf_counter() - start)
    peak = _peak_rss_bytes()
    median = statistics.median(times)
    return {
        **asdict(case),
        "label": case.label,
        "median_s": median,
        "times_s": times,
        "images_per_s": case.batch_size / median,
        "peak_mem_mb": peak / 2**20,
        "step_mem_mb": max(peak - base_mem, 0) / 2**20,
        "bias_impl_used": "gather (exported graph)",
        "threads": threads,
    }


def _run_isolated(case: Case, warmup: int, repeats: int, threads: int | None) -> dict:
    payload = json.dumps({"case": asdict(case), "warmup": warmup, "repeats": repeats, "threads": threads})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "kprpe.bench.runner", payload, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {
                **asdict(case),
                "label": case.label,
                "error": (proc.stderr or proc.stdout).strip()[-2000:],
            }
        return json.loads(out.read_text())


def run_suite(
    cases: list[Case],
    *,
    warmup: int = 1,
    repeats: int = 3,
    rounds: int = 1,
    threads: int | None = None,
    isolated: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Measure every case, ``rounds`` times in a rotating order (each time in a fresh process when
    ``isolated``), so slow drifts of the machine spread over all cases instead of biasing a few. A case's time
    is the median of all its timed steps; its memory the median over rounds."""
    from tqdm import tqdm

    runs: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    order = [(r, (i + r) % len(cases)) for r in range(rounds) for i in range(len(cases))]
    bar = tqdm(order, desc="bench", unit="run", disable=not progress)
    for _, i in bar:
        case = cases[i]
        bar.set_postfix_str(f"{case.label} {case.mode} b={case.batch_size}")
        result = (
            _run_isolated(case, warmup, repeats, threads) if isolated else run_case(case, warmup, repeats)
        )
        runs[i].append(result)
    results = [_merge_rounds(runs[i]) for i in range(len(cases))]
    _add_ratios(results)
    return results


def _merge_rounds(rounds: list[dict]) -> dict:
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    merged = dict(rounds[0])
    times = [t for r in rounds for t in r["times_s"]]
    merged["times_s"] = times
    merged["median_s"] = statistics.median(times)
    merged["images_per_s"] = merged["batch_size"] / merged["median_s"]
    merged["rounds"] = len(rounds)
    for key in ("peak_mem_mb", "step_mem_mb"):
        merged[key] = statistics.median(r[key] for r in rounds)
    return merged


def _add_ratios(results: list[dict]) -> None:
    """Ratio of each row to the plain model of its family (ViT, Swin) of the same size, mode, batch, device
    and dtype."""

    def key(r: dict) -> tuple:
        family, size = r["model"].split("_")[:2]
        return family, size, r["mode"], r["batch_size"], r["device"], r["dtype"], r.get("engine", "torch")

    plain = {key(r): r for r in results if "error" not in r and r["model"].count("_") == 1}
    for r in results:
        base = plain.get(key(r))
        if base and "error" not in r:
            r["time_vs_vit"] = r["median_s"] / base["median_s"]
            r["step_mem_vs_vit"] = r["step_mem_mb"] / base["step_mem_mb"] if base["step_mem_mb"] > 0 else None
    # each ONNX Runtime row against eager PyTorch running the same model (default bias path) and batch
    eager = {
        (r["model"], r["mode"], r["batch_size"]): r
        for r in results
        if "error" not in r and r.get("engine", "torch") == "torch" and r.get("bias_impl") == "auto"
    }
    for r in results:
        base = eager.get((r["model"], r["mode"], r["batch_size"]))
        if r.get("engine") == "onnx" and base and "error" not in r:
            r["speedup_vs_torch"] = r["images_per_s"] / base["images_per_s"]


def format_engine_table(results: list[dict]) -> str:
    """ONNX Runtime vs eager PyTorch: one row per model and batch (empty when no ONNX row was measured)."""
    rows = [r for r in results if r.get("engine") == "onnx" and "speedup_vs_torch" in r]
    if not rows:
        return ""
    eager = {
        (r["model"], r["batch_size"]): r
        for r in results
        if r.get("engine", "torch") == "torch" and r.get("bias_impl") == "auto" and "error" not in r
    }
    lines = [
        "| model | batch | threads | torch ms | onnx ms | torch img/s | onnx img/s | onnx x torch | "
        "onnx x ViT (onnx) | torch x ViT (torch) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = eager[(r["model"], r["batch_size"])]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r.get('threads', '')} | {t['median_s'] * 1000:.1f} | "
            f"{r['median_s'] * 1000:.1f} | {t['images_per_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['speedup_vs_torch']:.2f} | {r.get('time_vs_vit', 1.0):.3f} | "
            f"{t.get('time_vs_vit', 1.0):.3f} |"
        )
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| model | mode | batch | dtype | median ms | img/s | x ViT | peak MB | step MB | step mem x ViT |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['label']} | {r['mode']} | {r['batch_size']} | {r['dtype']} | error: "
                f"{r['error'].splitlines()[-1][:60]} |||||"
            )
            continue
        ratio = f"{r['time_vs_vit']:.3f}" if r.get("time_vs_vit") is not None else ""
        mem_ratio = f"{r['step_mem_vs_vit']:.2f}" if r.get("step_mem_vs_vit") is not None else ""
        lines.append(
            f"| {r['label']} | {r['mode']} | {r['batch_size']} | {r['dtype']} | {r['median_s'] * 1000:.1f} | "
            f"{r['images_per_s']:.1f} | {ratio} | {r['peak_mem_mb']:.0f} | {r['step_mem_mb']:.0f} | "
            f"{mem_ratio} |"
        )
    return "\n".join(lines)


def _child_main(argv: list[str]) -> int:
    payload = json.loads(argv[0])
    if payload.get("threads"):
        import torch

        torch.set_num_threads(int(payload["threads"]))
    result = run_case(Case(**payload["case"]), payload["warmup"], payload["repeats"])
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
