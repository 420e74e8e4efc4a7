"""Partial FC at scale, simulated on CPU: per-rank memory, one step's communication and the step time.

Run under torchrun (gloo on CPU, NCCL on GPUs); without torchrun it is one process holding every class:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m kprpe.bench.partial_fc \\
        --classes 500000 --sample-rate 0.1 -o runs/bench/partial_fc_500k_r2.json

Each process builds :class:`kprpe.train.heads.PartialFC` (ArcFace margin) over its shard of the classes and
the trainer's optimiser over it, then takes ``--warmup`` + ``--steps`` steps on random embeddings (the same
global batch whatever the number of processes). It reports, per rank:

- the bytes of the class centres, their gradient and the optimiser state, measured from the tensors and
  compared with :func:`state_bytes_formula` (they must be equal);
- the process's resident memory before the head and at its peak (``VmHWM``), against
  :func:`peak_bytes_formula`;
- every collective of one step, counted by wrapping ``torch.distributed`` (:func:`count_collectives`), against
  :func:`communication_formula`; bytes are the payload each rank contributes, and ``ring_bytes_sent`` what a
  ring algorithm sends per rank for it;
- the median step time (forward, backward, optimiser step), wall clock and this process's CPU time (the
  latter is less disturbed by other load on the machine).

Memory is checked before anything is allocated: a run that cannot fit in the machine's available memory is
refused (``--force`` runs it anyway). The backbone (whose gradients DDP all-reduces as well) is left out:
this measures what partial FC adds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

__all__ = [
    "Setup",
    "state_bytes_formula",
    "peak_bytes_formula",
    "communication_formula",
    "count_collectives",
    "formula_table",
    "run_rank",
    "main",
]

FLOAT32 = 4
INT64 = 8
# Tensors the optimiser keeps per parameter element: AdamW exp_avg + exp_avg_sq; SGD the momentum buffer.
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}
# Temporaries of that size inside ``optimizer.step()`` (PyTorch's CPU for-loop implementations): AdamW's
# ``exp_avg_sq.sqrt() / c`` makes two at once; SGD's weight decay ``grad.add(param)`` one.
OPTIMIZER_TEMPORARIES = {"adamw": 2, "sgd": 1}


@dataclass(frozen=True)
class Setup:
    classes: int
    dim: int = 512
    ranks: int = 1
    sample_rate: float = 0.1
    batch_per_rank: int = 128
    optimizer: str = "adamw"
    scale: float = 64.0

    def local_classes(self, rank: int) -> int:
        from ..train.heads import class_shard

        return class_shard(self.classes, self.ranks, rank)[1]

    def sampled_classes(self, rank: int) -> int:
        """Centres one step uses on ``rank`` (PartialFC's rule; positives of a random batch fit easily)."""
        return max(1, int(round(self.sample_rate * self.local_classes(rank))))


def state_bytes_formula(setup: Setup, rank: int) -> dict[str, int]:
    """Persistent bytes on ``rank``: ``L x D`` float32 for the centres, as much for their (dense) gradient,
    and ``OPTIMIZER_STATES[optimizer]`` times that for the optimiser (``L`` = the rank's classes)."""
    centres = setup.local_classes(rank) * setup.dim * FLOAT32
    return {
        "centres": centres,
        "gradient": centres,
        "optimizer": OPTIMIZER_STATES[setup.optimizer] * centres,
    }


def peak_bytes_formula(setup: Setup, rank: int) -> int:
    """Persistent state + the largest transients of a step: the optimiser's temporaries
    (:data:`OPTIMIZER_TEMPORARIES` ``L x D`` tensors), 4 ``k x D``
    copies of the sampled centres (gathered, normalised, their two gradients) and about 8 ``B x k``
    logit-sized tensors (cosines, clamp, margin shift, scaled logits, exp; their gradients), ``k`` =
    sampled centres, ``B`` = the global batch. Not counted: the allocator's slack."""
    state = sum(state_bytes_formula(setup, rank).values())
    centres = setup.local_classes(rank) * setup.dim * FLOAT32
    k, batch = setup.sampled_classes(rank), setup.batch_per_rank * setup.ranks
    return (
        state
        + OPTIMIZER_TEMPORARIES[setup.optimizer] * centres
        + 4 * k * setup.dim * FLOAT32
        + 8 * batch * k * FLOAT32
    )


def communication_formula(setup: Setup) -> list[dict]:
    """The collectives of one PartialFC step, in order, with the payload each rank contributes.

    Forward: all-gather the embeddings (``b x D`` float32), labels (int64) and valid flags (bool); all-reduce
    the row maxima, the softmax denominators and the target logits (``B`` float32 each). Backward: the
    embeddings' gradient (``B x D``) is all-reduced so each rank keeps its rows. ``b`` = batch per rank,
    ``B`` = global batch. Nothing with one process."""
    if setup.ranks == 1:
        return []
    b, batch, d = setup.batch_per_rank, setup.batch_per_rank * setup.ranks, setup.dim
    calls = [
        ("all_gather", b * d * FLOAT32),
        ("all_gather", b * INT64),
        ("all_gather", b * 1),
        ("all_reduce", batch * FLOAT32),
        ("all_reduce", batch * FLOAT32),
        ("all_reduce", batch * FLOAT32),
        ("all_reduce", batch * d * FLOAT32),
    ]
    return [_record(op, nbytes, setup.ranks) for op, nbytes in calls]


def _record(op: str, nbytes: int, ranks: int) -> dict:
    # ring all-gather: each rank forwards the other R-1 pieces; ring all-reduce: reduce-scatter + all-gather
    # of n/R pieces, 2 n / R bytes per rank
    ring = (ranks - 1) * nbytes if op == "all_gather" else 2 * (ranks - 1) * nbytes // ranks
    return {"op": op, "bytes": nbytes, "ring_bytes_sent": ring}


@contextlib.contextmanager
def count_collectives() -> Iterator[list[dict]]:
    """Record every ``torch.distributed.all_gather`` / ``all_reduce`` made inside the block (op, payload
    bytes of this rank's tensor, ring bytes sent). Other collectives are refused so nothing goes uncounted."""
    import torch.distributed as dist

    records: list[dict] = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}
    ranks = dist.get_world_size()

    def all_gather(tensor_list, tensor, *args, **kwargs):
        records.append(_record("all_gather", tensor.numel() * tensor.element_size(), ranks))
        return originals["all_gather"](tensor_list, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        records.append(_record("all_reduce", tensor.numel() * tensor.element_size(), ranks))
        return originals["all_reduce"](tensor, *args, **kwargs)

    def uncounted(name):
        def refuse(*args, **kwargs):
            raise RuntimeError(f"count_collectives does not count torch.distributed.{name}")

        return refuse

    others = ("all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "all_to_all")
    saved = {name: getattr(dist, name) for name in others if hasattr(dist, name)}
    try:
        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        for name in saved:
            setattr(dist, name, uncounted(name))
        yield records
    finally:
        for name, fn in {**originals, **saved}.items():
            setattr(dist, name, fn)


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak; unlike ``ru_maxrss``, never below VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def global_batch(setup: Setup, seed: int):
    """The same random global batch (embeddings ``(B, D)``, labels ``(B,)``) for any number of processes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = setup.batch_per_rank * setup.ranks
    return torch.randn(batch, setup.dim, generator=g), torch.randint(0, setup.classes, (batch,), generator=g)


def _state_bytes(head, optimizer) -> dict[str, int]:
    import torch

    def nbytes(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    return {
        "centres": nbytes(head.weight),
        "gradient": nbytes(head.weight.grad),
        "optimizer": sum(
            nbytes(t)
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.numel() > 1  # not AdamW's scalar step counter
        ),
    }


def run_rank(setup: Setup, *, steps: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Build the head on this process (its rank and world from ``torch.distributed``), take the steps and
    return this rank's measurements."""
    from ..train.distributed import rank as dist_rank

    rank = dist_rank()
    # one step on a tiny head first, so that code loaded on first use (kernels, gloo buffers) is not counted
    small = Setup(setup.ranks * 64, setup.dim, setup.ranks, 1.0, setup.batch_per_rank, setup.optimizer)
    small_head, small_optimizer = _head_and_optimizer(small, rank, seed)
    _step(small_head, small_optimizer, small, rank, seed)
    del small_head, small_optimizer
    rss_before = _status_bytes("VmRSS")
    head, optimizer = _head_and_optimizer(setup, rank, seed)
    times, cpu_times, losses, collectives, state = [], [], [], [], {}
    for step in range(warmup + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss, records, step_state = _step(head, optimizer, setup, rank, seed)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        losses.append(loss)
        if step >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
            collectives, state = records, step_state
    return {
        "rank": rank,
        "local_classes": setup.local_classes(rank),
        "sampled_classes": setup.sampled_classes(rank),
        "state_bytes": state,
        "state_bytes_formula": state_bytes_formula(setup, rank),
        "rss_before_head_bytes": rss_before,
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "peak_above_start_bytes": _status_bytes("VmHWM") - rss_before,
        "peak_bytes_formula": peak_bytes_formula(setup, rank),
        "collectives": collectives,
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "step_cpu_seconds": cpu_times,
        "median_step_cpu_seconds": statistics.median(cpu_times),
        "losses": losses,
    }


def _head_and_optimizer(setup: Setup, rank: int, seed: int):
    import torch

    from ..train.heads import PartialFC, build_margin

    head = PartialFC(
        setup.dim,
        setup.classes,
        build_margin("arcface", scale=setup.scale),
        sample_rate=setup.sample_rate,
        rank=rank,
        world_size=setup.ranks,
        seed=seed,
    )
    if setup.optimizer == "adamw":  # the trainer's default optimiser (weight decay on the centres)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    else:
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head, optimizer


def _step(head, optimizer, setup: Setup, rank: int, seed: int) -> tuple[float, list[dict], dict[str, int]]:
    """One step (forward, backward, optimiser) on this rank's part of the global batch: the loss, the
    collectives counted during it and the state bytes before ``zero_grad`` frees the gradient."""
    embeddings, labels = global_batch(setup, seed)
    rows = slice(rank * setup.batch_per_rank, (rank + 1) * setup.batch_per_rank)
    x = embeddings[rows].clone().requires_grad_(True)  # stands in for the backbone's output
    with count_collectives() if setup.ranks > 1 else contextlib.nullcontext([]) as records:
        loss, _ = head(x, labels[rows])
        loss.backward()
    optimizer.step()
    state = _state_bytes(head, optimizer)
    optimizer.zero_grad(set_to_none=True)  # as the trainer does
    return float(loss.detach()), records, state


def format_row(setup: Setup, per_rank: list[dict]) -> str:
    """A Markdown row: classes, ranks, sample rate, state per rank (GiB), peak RSS above start, step time,
    communication per rank (MiB)."""
    gib, mib = 2**30, 2**20
    worst = max(per_rank, key=lambda r: sum(r["state_bytes"].values()))
    comm = sum(c["bytes"] for c in worst["collectives"])
    return (
        f"| {setup.classes:,} | {setup.ranks} | {setup.sample_rate} | {setup.optimizer} | "
        f"{sum(worst['state_bytes'].values()) / gib:.2f} | "
        f"{sum(worst['state_bytes_formula'].values()) / gib:.2f} | "
        f"{max(r['peak_above_start_bytes'] for r in per_rank) / gib:.2f} | "
        f"{max(r['peak_bytes_formula'] for r in per_rank) / gib:.2f} | "
        f"{max(r['median_step_seconds'] for r in per_rank):.2f} | "
        f"{max(r['median_step_cpu_seconds'] for r in per_rank):.2f} | {comm / mib:.2f} |"
    )


TABLE_HEADER = (
    "| classes | ranks | sample rate | optimiser | state/rank GiB (measured) | (formula) | "
    "peak RSS above start GiB | (formula) | step s (wall) | step s (CPU) | comm/rank MiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def formula_table(setup: Setup, ranks: list[int]) -> str:
    """Markdown rows of the formulas alone (nothing allocated): the largest rank's state and peak, and the
    communication per rank, for each number of processes."""
    gib, mib = 2**30, 2**20
    rows = [
        "| classes | ranks | sample rate | optimiser | state/rank GiB | peak/rank GiB | comm/rank MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        s = Setup(setup.classes, setup.dim, r, setup.sample_rate, setup.batch_per_rank, setup.optimizer)
        comm = sum(c["bytes"] for c in communication_formula(s))
        rows.append(
            f"| {s.classes:,} | {r} | {s.sample_rate} | {s.optimizer} | "
            f"{sum(state_bytes_formula(s, 0).values()) / gib:.2f} | {peak_bytes_formula(s, 0) / gib:.2f} | "
            f"{comm / mib:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # options only when spelled out, as kprpe's own
        prog="torchrun --nproc_per_node R -m kprpe.bench.partial_fc", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--classes", type=int, default=2_000_000, help="identities (default 2,000,000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (default 512)")
    parser.add_argument("--sample-rate", type=float, default=0.1, help="partial-FC sample rate (default 0.1)")
    parser.add_argument(
        "--batch-per-rank", type=int, default=128, help="embeddings per process (default 128)"
    )
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), default="adamw")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run even if the formula says it will not fit")
    parser.add_argument(
        "--formula-ranks",
        help="only print the formulas for these process counts, e.g. 8,16,32 (nothing allocated)",
    )
    parser.add_argument("-o", "--output", help="write every rank's measurements as JSON here (rank 0)")
    args = parser.parse_args(argv)
    prog = "kprpe.bench.partial_fc"
    if args.formula_ranks:
        try:
            counts = [int(x) for x in args.formula_ranks.split(",") if x]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1 or max(counts) > args.classes:
            print(
                f"{prog}: error: --formula-ranks must list process counts from 1 to --classes, got "
                f"{args.formula_ranks!r}",
                file=sys.stderr,
            )
            return 2
        base = Setup(args.classes, args.dim, 1, args.sample_rate, args.batch_per_rank, args.optimizer)
        print(formula_table(base, counts))
        return 0
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    for name, value, low in (
        ("--classes", args.classes, ranks),
        ("--dim", args.dim, 1),
        ("--batch-per-rank", args.batch_per_rank, 1),
        ("--steps", args.steps, 1),
    ):
        if value < low:
            print(f"{prog}: error: {name} must be at least {low}, got {value}", file=sys.stderr)
            return 2
    if not 0.0 < args.sample_rate <= 1.0:
        print(f"{prog}: error: --sample-rate must be in (0, 1], got {args.sample_rate}", file=sys.stderr)
        return 2
    setup = Setup(
        classes=args.classes,
        dim=args.dim,
        ranks=ranks,
        sample_rate=args.sample_rate,
        batch_per_rank=args.batch_per_rank,
        optimizer=args.optimizer,
    )
    needed = sum(peak_bytes_formula(setup, r) for r in range(ranks))
    available = _available_bytes()
    if available is not None and needed > available and not args.force:
        # every rank computes the same numbers, so all refuse together before the process group exists
        print(
            f"{prog}: error: {args.classes:,} classes x {args.dim} on {ranks} process(es) with "
            f"{args.optimizer} need about {needed / 2**30:.1f} GiB on this machine (formula), "
            f"{available / 2**30:.1f} GiB available: use fewer classes, more machines, or --force",
            file=sys.stderr,
        )
        return 2
    import torch
    import torch.distributed as dist

    from ..files import write_json
    from ..train.distributed import init_distributed

    info = init_distributed("cpu")
    try:
        result = run_rank(setup, steps=args.steps, warmup=args.warmup, seed=args.seed)
        per_rank = [result]
        if ranks > 1:
            per_rank = [None] * ranks
            dist.all_gather_object(per_rank, result)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if info.is_main:
        payload = {
            "setup": asdict(setup),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "communication_formula": communication_formula(setup),
            "ranks": per_rank,
        }
        print(TABLE_HEADER)
        print(format_row(setup, per_rank))
        if args.output:
            write_json(args.output, payload)
            print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
