"""Helpers for tests that run several gloo processes on CPU (spawned: everything passed must pickle)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give rank ``rank`` of ``world`` (one thread: the cores are shared)."""
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def train_as_rank(rank: int, world: int, port: int, load_config: Callable) -> None:
    """Run one rank of a Trainer job: ``load_config()`` builds the config (e.g. a functools.partial)."""
    import torch.distributed as dist

    from kprpe.train import Trainer

    join_group(rank, world, port)
    try:
        Trainer(load_config()).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
