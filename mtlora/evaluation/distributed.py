"""Evaluation split over processes: ``torchrun`` / ``accelerate launch eval_bbh.py ...``.

Every process loads the model on its own device and runs every ``world_size``-th prompt; the results
are gathered on every process (so scoring code runs unchanged) and only the main process writes files
and prints. With one process (plain ``python``) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def launched() -> bool:
    """True under a launcher that started more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group when launched (NCCL on GPUs, gloo on CPUs; left again at exit); returns this process's
    device."""
    if not launched():
        return device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(release)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def release() -> None:
    """Leave the process group, if this process is in one (a launcher's, or :func:`init`'s), as a script ends: a group
    left to the interpreter's exit can abort a rank after its work is done ("terminate called without an active
    exception"), which the launcher then reports as a failure."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[int]) -> list[int]:
    """This process's share of ``items``: every world_size-th one, starting at its rank."""
    return list(items[rank()::world_size()])


def gather(results: dict[int, object], total: int) -> list:
    """Every process's {index: result} merged into one list of ``total`` results, on every process."""
    if world_size() > 1:
        parts: list[dict[int, object] | None] = [None] * world_size()
        dist.all_gather_object(parts, results)
        results = {index: value for part in parts for index, value in part.items()}
    if sorted(results) != list(range(total)):
        raise RuntimeError(f"gathered {len(results)} results for {total} prompts")
    return [results[index] for index in range(total)]
