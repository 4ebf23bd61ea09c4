"""Several train.py runs in one process group: what tests/test_distributed.py launches with torchrun.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py SPEC.json

SPEC is ``{"results": folder, "runs": [{"name": ..., "argv": [train.py flags], "kill_at_step": k, "cli": bool}]}``
(``cli``: run ``train.py ARGV`` itself, recording nothing).
Runs go in order, in the same processes (paying the start-up once). Each run writes ``NAME.rankR.json`` to the
results folder: the logged losses and learning rates, the largest difference between this rank's adapter
weights and rank 0's after every step, how many adapter files this rank wrote, and the optimizer and schedule
the Trainer ended up with. ``kill_at_step`` SIGKILLs every rank at the end of that step, as ``kill -9`` would.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback


import mtlora.checkpoint
from mtlora.evaluation.distributed import release
from mtlora.injection import adapter_state_dict
from mtlora.training import run_training
from mtlora.train_cli import main as train_main
from mtlora.train_cli import parse_arguments


class RunRecord(TrainerCallback):
    """What one rank saw of one run."""

    def __init__(self, kill_at_step: int | None):
        self.kill_at_step = kill_at_step
        self.values = {"rank_differences": []}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        chain, inner, stepping = [], optimizer, None
        while inner is not None:  # the wrappers around the optimizer that steps (DeepSpeed's, accelerate's)
            chain.append(f"{type(inner).__module__}.{type(inner).__name__}")
            stepping, inner = inner, getattr(inner, "optimizer", None)
        self.values["optimizer"] = chain
        self.values["fused"] = getattr(stepping, "defaults", {}).get("fused")
        self.values["lr_scheduler"] = f"{type(lr_scheduler).__module__}.{type(lr_scheduler).__name__}"

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not args.deepspeed:  # DeepSpeed partitions the weights; DDP keeps a whole copy on every rank
            self.values["rank_differences"].append(rank_difference(model))
        if state.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def rank_difference(model) -> float:
    """Largest |weight - rank 0's weight| over the adapter parameters (0.0 when every rank agrees)."""
    weights = torch.cat([t.detach().float().flatten() for t in adapter_state_dict(model).values()])
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def counting_adapter_writes(save_file):
    """The safetensors writer every adapter file goes through, counting this rank's calls."""
    def counted(*args, **kwargs):
        counted.calls += 1
        return save_file(*args, **kwargs)

    counted.calls = 0
    return counted


def without_shared_memory_allreduce() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op on first use (a minute of C++);
    gloo does the same reductions without it."""
    if importlib.util.find_spec("deepspeed") is not None:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = Path(spec["results"])
    without_shared_memory_allreduce()
    mtlora.checkpoint.save_file = writes = counting_adapter_writes(mtlora.checkpoint.save_file)
    for run in spec["runs"]:
        if run.get("cli"):  # exactly what `torchrun train.py ARGV` does
            train_main(run["argv"])
            continue
        record, writes_before = RunRecord(run.get("kill_at_step")), writes.calls
        summary = run_training(*parse_arguments(run["argv"]), callbacks=[record])
        record.values["adapter_writes"] = writes.calls - writes_before
        record.values["log"] = [{k: entry[k] for k in ("step", "loss", "learning_rate", "balance_loss", "spectral_loss")
                                 if k in entry} for entry in summary["log_history"] if "loss" in entry]
        (results / f"{run['name']}.rank{dist.get_rank()}.json").write_text(json.dumps(record.values, indent=1))
    release()  # as train.py does when it ends


if __name__ == "__main__":
    main(sys.argv[1])
