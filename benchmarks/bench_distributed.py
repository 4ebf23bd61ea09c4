"""Training on several GPUs: DDP, DeepSpeed ZeRO-2 and ZeRO-3 against one GPU, and DeepSpeed with CPU offload.

One invocation runs everything below through ``train.py``'s own code (launched by torchrun, the deepspeed launcher
or ``accelerate launch``, as a user would) on random-weight models of SmolLM2-135M and LLaMA-2-7B shape, with
synthetic instruction records that fill every sequence (no padding, so tokens/step is exact):

1. ``scaling`` (2 GPUs), the mtLoRA row (block FFN + fine-grained routing, g = d/2, + balance loss) and the
   HydraLoRA row (q_proj, v_proj + balance loss), r = 16, E = 16: one GPU at the global batch, then DDP,
   ZeRO-2 and ZeRO-3 over two GPUs at half the batch each. SmolLM2 shape: 50 steps of 16 x 512 tokens;
   LLaMA-2-7B shape: 6 steps of 8 x 512 with gradient checkpointing.
2. ``offload`` (one GPU): every method with configs/ds_zero3_offload.json (accelerate launch) at SmolLM2 and
   LLaMA-2-7B shape, and with configs/ds_zero2_offload.json (deepspeed launcher) at 7B shape, against the plain
   one-GPU run.

For each run: the loss at step 1 and at the last step against the one-GPU run (bf16; agreement within
1e-2 relative is rounding), whether the learning rate equals the one-GPU run's at every step, throughput
(tokens/s; scaling = 2 GPUs over 1 GPU), peak GPU memory per rank (what the run allocated on top of what the
process held before it), the optimizer the Trainer stepped, and whether the saved adapter is whole and loads
back strictly (with its largest relative difference from the one-GPU adapter).

Single-GPU jobs run two at a time, one per GPU; the runs of a job share its processes. Results are written
after every job (``benchmarks/results/distributed_<tag>.json`` and ``.md``), so a run stopped by
``--budget_minutes`` keeps what it measured and lists what it skipped.

    PYTHONPATH=.:/tmp/site python benchmarks/bench_distributed.py        # on 2 GPUs (deepspeed importable)
    PYTHONPATH=.:/tmp/site python benchmarks/bench_distributed.py --only 'llama-2-7b-.*(1gpu|offload)$'  # one GPU
    python benchmarks/bench_distributed.py --quick                        # CPU: tiny model, DDP on 2 gloo ranks
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, TrainerCallback

REPO = Path(__file__).resolve().parents[1]

from benchmarks.bench_adapters import TINY_MODEL, build_model, command_and_date
from mtlora.checkpoint import load_adapter
from mtlora.config import AdapterConfig
from mtlora.loading import build_meta_model
from mtlora.training import run_training
from mtlora.training_data import tokenize_records
from mtlora.train_cli import parse_arguments

SCRIPT = Path(__file__).resolve()
TOKENIZER_DIR = REPO / "configs" / "models" / "smollm2-135m"
STEP1_RTOL = 1e-2  # bf16: one rounding of the logits already moves the loss by ~1e-3 relative
LAST_STEP_RTOL = 2e-2
WARMUP_STEPS = 2  # not timed: allocation, NCCL and DeepSpeed set-up happen in the first steps


@dataclass
class Run:
    """One training run: what it trains, how it is distributed, and at what size."""

    model: str  # a folder name under the work dir: smollm2-135m | llama-2-7b | tiny
    method: str  # lora | hydralora | mmoelora | mtlora
    mode: str  # 1gpu | ddp | zero2 | zero3 | zero2_offload | zero3_offload
    steps: int
    global_batch: int
    seq_len: int
    checkpointing: bool = False

    @property
    def name(self) -> str:
        return f"{self.model}-{self.method}-{self.mode}"

    @property
    def world_size(self) -> int:
        return 2 if self.mode in ("ddp", "zero2", "zero3") else 1


@dataclass
class Job:
    """Runs that share one launch: ``launcher`` is python | torchrun | deepspeed | accelerate."""

    launcher: str
    gpus: int
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.launcher}:{','.join(run.name for run in self.runs)}"


# ------------------------------------------------------------------------------------------------ plans

METHODS = ("lora", "hydralora", "mmoelora", "mtlora")
METHOD_FLAGS = {
    "lora": ["--method", "lora"],
    "hydralora": ["--method", "hydralora"],
    "mmoelora": ["--method", "mmoelora"],
    "mtlora": ["--method", "mtlora", "--enable_block_adapter", "--block_adapter_type", "ffn",
               "--enable_fine_grained_routing"],
}
DEEPSPEED_CONFIGS = {"zero2": "ds_zero2", "zero3": "ds_zero3", "zero2_offload": "ds_zero2_offload",
                     "zero3_offload": "ds_zero3_offload"}


def gpu_plan() -> list[Job]:
    """One-GPU jobs first, in the order a one-GPU --only selection needs them (each method's plain run before its
    offloaded runs; ZeRO-3 + offload at SmolLM2 shape for every method, then one job per method at 7B shape, so a
    slow one cannot take the others' results with it), then the 2-GPU scaling runs."""
    rows = ("mtlora", "hydralora")
    small = dict(model="smollm2-135m", steps=50, global_batch=16, seq_len=512)
    large = dict(model="llama-2-7b", steps=6, global_batch=8, seq_len=512, checkpointing=True)
    scaling = [Run(method=m, mode=mode, **size) for mode in ("ddp", "zero2", "zero3") for size in (small, large)
               for m in rows]  # DDP first, ZeRO-3 last: each run leaves the process as the next one needs it
    return [
        Job("python", 1, [Run(method=m, mode="1gpu", **small) for m in METHODS]),
        Job("accelerate", 1, [Run(method=m, mode="zero3_offload", **small) for m in METHODS]),
        Job("python", 1, [Run(method=m, mode="1gpu", **large) for m in METHODS]),
        *(Job("accelerate", 1, [Run(method=m, mode="zero3_offload", **large)])
          for m in ("mtlora", "hydralora", "lora", "mmoelora")),
        Job("deepspeed", 1, [Run(method=m, mode="zero2_offload", **large) for m in METHODS]),
        Job("torchrun", 2, scaling),
    ]


def quick_plan() -> list[Job]:
    size = dict(model="tiny", steps=4, global_batch=8, seq_len=32)
    rows = ("mtlora", "hydralora")
    return [Job("python", 0, [Run(method=m, mode="1gpu", **size) for m in rows]),
            Job("torchrun", 0, [Run(method=m, mode="ddp", **size) for m in rows])]



# ------------------------------------------------------------------------------------ models and data

def prepare_model(name: str, work_dir: Path, tokenizer, quick: bool) -> Path:
    """A random-weight model folder (bf16 weights on the GPU plan) with the SmolLM2 tokenizer files."""
    folder = work_dir / name
    if (folder / "ready").is_file():
        return folder
    overrides = {**TINY_MODEL, "vocab_size": len(tokenizer)} if quick else {}
    config_name = "smollm2-135m" if name == "tiny" else name
    device = torch.device("cpu" if quick else "cuda")
    model = build_model(config_name, overrides, device, torch.float32 if quick else torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "ready").write_text("")
    del model
    free_device_memory()
    return folder


def synthetic_records(tokenizer, count: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Three word tasks whose prompt and response together exceed ``seq_len`` tokens, so every example is
    truncated to exactly ``seq_len``; each word is one token with an id below 20,000 (inside the 32,000 of
    LLaMA-2's vocabulary) both after a space and at the start of a line."""
    vocab = tokenizer.get_vocab()
    words = sorted(s[1:] for s, i in vocab.items() if s.startswith("Ġ") and s[1:].isalpha() and s[1:].islower()
                   and 1000 <= i < 20000 and vocab.get(s[1:], 20000) < 20000)
    rng = random.Random(seed)
    tasks = {"copy": ("Repeat these words.", lambda w: w), "reverse": ("Reverse these words.", lambda w: w[::-1]),
             "sort": ("Sort these words.", sorted)}
    records = []
    for index in range(count):
        task = list(tasks)[index % len(tasks)]
        instruction, transform = tasks[task]
        chosen = rng.choices(words, k=seq_len)
        records.append({"instruction": instruction, "input": " ".join(chosen),
                        "output": " ".join(transform(chosen)[: seq_len // 2]), "task_type": task})
    return records


def prepare_data(work_dir: Path, tokenizer, count: int, seq_len: int, vocab_size: int) -> Path:
    path = work_dir / f"records-{count}x{seq_len}.jsonl"
    if not path.is_file():
        records = synthetic_records(tokenizer, count, seq_len)
        for index, (example, _) in enumerate(tokenize_records(records, tokenizer, seq_len)):  # every example fills
            ids = example["input_ids"]  # seq_len, with ids inside the vocabulary
            if len(ids) != seq_len or max(ids) >= vocab_size:
                raise RuntimeError(f"synthetic record {index}: {len(ids)} tokens, largest id {max(ids)}")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------- launching

def train_argv(run: Run, model_dir: Path, data: Path, output_dir: Path, quick: bool, hidden: int) -> list[str]:
    rank, experts = (4, 4) if quick else (16, 16)
    argv = ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(output_dir),
            "--max_steps", str(run.steps), "--per_device_train_batch_size", str(run.global_batch // run.world_size),
            "--max_seq_length", str(run.seq_len), "--learning_rate", "1e-3", "--lora_rank", str(rank),
            "--lora_alpha", str(4 * rank), "--lora_nums", str(experts), "--lora_dropout", "0",
            "--logging_steps", "1", "--save_strategy", "no", "--seed", "42"] + METHOD_FLAGS[run.method]
    if AdapterConfig(method=run.method, lora_nums=experts).has_token_router:  # the balance loss needs a router
        argv += ["--enable_blc"]
    if run.method == "mtlora":
        argv += ["--routing_group_size", str(hidden // 2)]
    argv += ["--use_cpu"] if quick else ["--bf16"]
    if run.checkpointing:
        argv += ["--gradient_checkpointing"]
    if run.mode in DEEPSPEED_CONFIGS:
        argv += ["--deepspeed", str(REPO / "configs" / f"{DEEPSPEED_CONFIGS[run.mode]}.json")]
    return argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(job: Job, spec: Path) -> list[str]:
    worker = [str(SCRIPT), "worker", str(spec)]
    python = [sys.executable]
    if job.launcher == "python":
        return python + worker
    if job.launcher == "torchrun":
        return python + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + worker
    if job.launcher == "deepspeed":  # the deepspeed launcher; it takes the GPU from CUDA_VISIBLE_DEVICES
        return python + ["-m", "deepspeed.launcher.runner", "--master_port", str(free_port())] + worker
    if job.launcher == "accelerate":
        return python + ["-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "1",
                         "--main_process_port", str(free_port())] + worker
    raise ValueError(f"unknown launcher {job.launcher}")


# ---------------------------------------------------------------------------------------------- worker

class Measure(TrainerCallback):
    """Step times (after the device finished the step) and what the Trainer built."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.values: dict = {}
        self._started = 0.0

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        chain, inner, stepping = [], optimizer, None
        while inner is not None:  # the wrappers (accelerate's, DeepSpeed's) down to the optimizer that steps
            chain.append(f"{type(inner).__module__}.{type(inner).__name__}")
            stepping, inner = inner, getattr(inner, "optimizer", None)
        config = getattr(args, "hf_deepspeed_config", None)
        self.values.update(optimizer=chain, fused=getattr(stepping, "defaults", {}).get("fused"),
                           lr_scheduler=f"{type(lr_scheduler).__module__}.{type(lr_scheduler).__name__}",
                           zero_optimization=config.config.get("zero_optimization") if config else None)

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.step_seconds.append(time.perf_counter() - self._started)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(value: int) -> float:
    return round(value / 2**30, 3)


def per_rank(value):
    """``value`` from every rank (a list in rank order), or ``[value]`` outside a process group."""
    if not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def worker_run(spec: dict) -> dict:
    measure, cuda = Measure(), torch.cuda.is_available()
    free_device_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    held_before = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    summary = run_training(*parse_arguments(spec["argv"]), callbacks=[measure])
    record = {**measure.values, "wall_seconds": round(time.perf_counter() - started, 2),
              "step_seconds": measure.step_seconds,
              "log": [{k: e[k] for k in ("step", "loss", "learning_rate", "balance_loss") if k in e}
                      for e in summary["log_history"] if "loss" in e],
              "every_example_full": summary["truncated_examples"] == summary["train_examples"],
              "trainable_params": summary["trainable_params"]}
    memory = per_rank((torch.cuda.max_memory_allocated() - held_before, held_before) if cuda else (0, 0))
    record["peak_gib"] = [gib(peak) for peak, _ in memory]
    record["held_before_gib"] = [gib(held) for _, held in memory]
    return record


def worker(spec_path: str) -> None:
    """Run every run of a job in this process (group); rank 0 writes one record per run."""
    spec = json.loads(Path(spec_path).read_text())
    for run in spec["runs"]:
        try:
            record = worker_run(run)
        except Exception:  # recorded, and the job goes on with its next run
            record = {"error": traceback.format_exc()[-4000:]}
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            Path(run["record"]).write_text(json.dumps(record, indent=1))


# ------------------------------------------------------------------------------------------- analysis

def throughput(run: Run, record: dict) -> float | None:
    timed = record["step_seconds"][WARMUP_STEPS:] or record["step_seconds"]
    return run.global_batch * run.seq_len / statistics.median(timed) if timed else None


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def adapter_check(output_dir: Path, model_dir: Path, baseline_dir: Path | None) -> dict:
    """The saved adapter loads strictly onto the architecture (every tensor present, whole, right shape);
    its largest relative difference from the baseline's adapter, tensor by tensor."""
    from safetensors.torch import load_file

    try:
        load_adapter(build_meta_model(str(model_dir)), output_dir)
    except Exception as err:  # noqa: BLE001 - reported in the results
        return {"loads": False, "error": str(err)[:500]}
    saved = load_file(str(output_dir / "adapter_model.safetensors"))
    result = {"loads": True, "tensors": len(saved), "empty": sum(t.numel() == 0 for t in saved.values()),
              "dtype": str(next(iter(saved.values())).dtype)}
    if baseline_dir is not None and (baseline_dir / "adapter_model.safetensors").is_file():
        base = load_file(str(baseline_dir / "adapter_model.safetensors"))
        result["max_rel_diff_vs_1gpu"] = max(float((saved[k] - base[k]).norm() / base[k].norm().clamp_min(1e-12))
                                             for k in base)
    return result


def analyse(run: Run, record: dict, baseline: dict | None, model_dir: Path, run_dir: Path, base_dir: Path) -> dict:
    row = {"run": run.name, **asdict(run), "world_size": run.world_size}
    if "error" in record:
        return {**row, "error": record["error"]}
    losses = [e["loss"] for e in record["log"]]
    row.update(loss_step1=losses[0], loss_last=losses[-1], steps_logged=len(losses),
               tokens_per_s=throughput(run, record), peak_gib=record["peak_gib"],
               held_before_gib=record["held_before_gib"], optimizer=record["optimizer"], fused=record["fused"],
               lr_scheduler=record["lr_scheduler"], zero_optimization=record["zero_optimization"],
               every_example_full=record["every_example_full"], wall_seconds=record["wall_seconds"],
               adapter=adapter_check(run_dir, model_dir, base_dir if run.mode != "1gpu" else None))
    if baseline is not None and "error" not in baseline and run.mode != "1gpu":
        base_losses = [e["loss"] for e in baseline["log"]]
        row.update(loss_step1_rel=relative(losses[0], base_losses[0]),
                   loss_last_rel=relative(losses[-1], base_losses[-1]),
                   lr_equal=[e["learning_rate"] for e in record["log"]] == [e["learning_rate"]
                                                                            for e in baseline["log"]])
        base_rate = throughput(Run(**{**asdict(run), "mode": "1gpu"}), baseline)
        if row["tokens_per_s"] and base_rate:
            row["speed_vs_1gpu"] = row["tokens_per_s"] / base_rate
        row["agrees"] = (row["loss_step1_rel"] < STEP1_RTOL and row["loss_last_rel"] < LAST_STEP_RTOL
                         and row["lr_equal"] and row["adapter"].get("loads", False) and row["adapter"]["empty"] == 0)
    return row


# -------------------------------------------------------------------------------------------- reports

def environment(quick: bool) -> dict:
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__}
    for name in ("accelerate", "deepspeed"):
        if importlib.util.find_spec(name) is not None:
            versions[name] = __import__(name).__version__
    gpus = torch.cuda.device_count() if not quick else 0
    return {**command_and_date(),
            "device": f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "cpu (gloo)",
            "versions": versions, "tolerances": {"loss_step1_rel": STEP1_RTOL, "loss_last_rel": LAST_STEP_RTOL},
            "warmup_steps_not_timed": WARMUP_STEPS}


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Multi-GPU training: {env['device']}", "",
             f"`{env['command']}`, {env['date']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "| model | method | mode | GPUs | steps | loss step 1 (rel. diff vs 1 GPU) | last-step loss (rel. diff) "
             "| LR = 1 GPU's | tokens/s | tokens/s vs 1 GPU | peak GiB per GPU | adapter | agrees |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | {row['mode']} | {row['world_size']} | "
                         f"error: {row['error'].strip().splitlines()[-1][:120]} |||||||||")
            continue
        adapter = row["adapter"]
        adapter_text = ("whole, loads" if adapter.get("loads") and not adapter.get("empty") else "BROKEN") + (
            f", Δ {fmt(adapter['max_rel_diff_vs_1gpu'], 2)}" if "max_rel_diff_vs_1gpu" in adapter else "")
        lines.append(
            f"| {row['model']} | {row['method']} | {row['mode']} | {row['world_size']} | {row['steps']} "
            f"| {fmt(row['loss_step1'], 6)} ({fmt(row.get('loss_step1_rel'), 2)}) "
            f"| {fmt(row['loss_last'], 6)} ({fmt(row.get('loss_last_rel'), 2)}) | {fmt(row.get('lr_equal'))} "
            f"| {fmt(row['tokens_per_s'], 5)} | {fmt(row.get('speed_vs_1gpu'), 3)} "
            f"| {', '.join(fmt(p, 3) for p in row['peak_gib'])} | {adapter_text} | {fmt(row.get('agrees'))} |")
    if results["skipped"]:
        lines += ["", "Skipped (time budget): " + "; ".join(results["skipped"])]
    lines += ["", "Loss differences are relative to the one-GPU run of the same model and method (its global batch "
              f"on one GPU); 'agrees' = step-1 within {STEP1_RTOL}, last step within {LAST_STEP_RTOL}, the same "
              "learning rate at every step, and an adapter that is whole and loads strictly. Peak memory is what "
              "the run allocated on top of what its process held before it."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: Path, tag: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"distributed_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / f"distributed_{tag}.md").write_text(markdown(results))


# ------------------------------------------------------------------------------------------ orchestration

@dataclass
class Launched:
    process: subprocess.Popen
    job: Job
    gpus: list[int]
    log: Path
    started: float


def run_jobs(jobs: list[Job], args, work_dir: Path, models: dict, data: dict, hidden: dict, results: dict,
             started_at: float) -> None:
    """Start each job, in order, once as many GPUs as it needs are free (CPU jobs one at a time); start none after
    --budget_minutes since the script started, and stop one that runs longer than --job_timeout_minutes."""
    free_gpus, running, records = list(range(0 if args.quick else torch.cuda.device_count())), [], {}
    clock = lambda: f"[{time.monotonic() - started_at:6.0f}s]"  # noqa: E731

    def finish(entry: Launched) -> None:
        if entry.process.poll() is None:  # over its time: the whole process group (launcher and ranks)
            os.killpg(entry.process.pid, signal.SIGKILL)
        entry.process.wait()
        free_gpus.extend(entry.gpus)
        for run in entry.job.runs:
            path = work_dir / "records" / f"{run.name}.json"
            records[run.name] = (json.loads(path.read_text()) if path.is_file() else {
                "error": f"no record: {entry.job.launcher} exited with {entry.process.returncode} after "
                         f"{time.monotonic() - entry.started:.0f} s; the end of {entry.log}:\n"
                         + entry.log.read_text(errors="replace")[-3000:]})
        print(f"{clock()} done {entry.job.name} (exit {entry.process.returncode})", flush=True)
        results["runs"] = report(jobs, records, work_dir, models)
        write_results(results, args.output_dir, args.tag)

    def wait_until(ready) -> None:
        while running and not ready():
            for entry in list(running):
                overdue = time.monotonic() - entry.started > 60 * args.job_timeout_minutes
                if entry.process.poll() is not None or overdue:
                    finish(entry)
                    running.remove(entry)
            time.sleep(0.5)

    for job in jobs:
        wait_until(lambda: len(free_gpus) >= job.gpus and not (args.quick and running))
        if (time.monotonic() - started_at) / 60 > args.budget_minutes:
            results["skipped"].append(job.name)
            continue
        gpus = [] if args.quick else [free_gpus.pop(0) for _ in range(job.gpus)]
        spec = {"runs": []}
        for run in job.runs:
            out, record = work_dir / "out" / run.name, work_dir / "records" / f"{run.name}.json"
            shutil.rmtree(out, ignore_errors=True)  # nothing left from an earlier invocation can pass for this one
            record.unlink(missing_ok=True)
            spec["runs"].append({"argv": train_argv(run, models[run.model], data[(run.model, run.steps)], out,
                                                    args.quick, hidden[run.model]), "record": str(record)})
        spec_path = work_dir / "specs" / f"{len(list((work_dir / 'specs').glob('*.json')))}.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        log = work_dir / "logs" / f"{spec_path.stem}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        if args.quick:
            env["OMP_NUM_THREADS"] = "1"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        print(f"{clock()} start {job.name} on GPUs {gpus or 'none'} (log {log})", flush=True)
        with log.open("w") as handle:
            process = subprocess.Popen(launch_command(job, spec_path), cwd=REPO, env=env, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        running.append(Launched(process, job, gpus, log, time.monotonic()))
    wait_until(lambda: False)


def report(jobs: list[Job], records: dict, work_dir: Path, models: dict) -> list[dict]:
    """One row per finished run; a baseline missing from this invocation is read from an earlier one's record."""
    rows = []
    for run in (run for job in jobs for run in job.runs):
        if run.name not in records:
            continue
        base = Run(**{**asdict(run), "mode": "1gpu"})
        base_record = records.get(base.name)
        earlier = work_dir / "records" / f"{base.name}.json"
        if base_record is None and earlier.is_file():
            base_record = json.loads(earlier.read_text())
        rows.append(analyse(run, records[run.name], base_record, models[run.model], work_dir / "out" / run.name,
                            work_dir / "out" / base.name))
    return rows


def summary_lines(results: dict) -> list[str]:
    lines = []
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"{row['run']}: ERROR")
        elif row["mode"] != "1gpu":
            lines.append(f"{row['run']}: step-1 Δ {fmt(row.get('loss_step1_rel'), 2)}, last Δ "
                         f"{fmt(row.get('loss_last_rel'), 2)}, LR equal {row.get('lr_equal')}, tokens/s vs 1 GPU "
                         f"{fmt(row.get('speed_vs_1gpu'), 3)}, peak {row['peak_gib']} GiB, agrees {row.get('agrees')}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, DDP on 2 gloo ranks")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/mtlora_bench_distributed"),
                        help="model folders, data, checkpoints and logs (the 7B folder takes 13.5 GB)")
    parser.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default=None, help="results file name: distributed_<tag>.json (default: device)")
    parser.add_argument("--only", default=None,
                        help="run only the runs whose name (MODEL-METHOD-MODE) matches this regular expression, e.g. "
                             "'llama-2-7b-.*(1gpu|offload)$'; a baseline not run again is read from an earlier "
                             "invocation's record in the same --work_dir")
    parser.add_argument("--job_timeout_minutes", type=float, default=7.0)
    parser.add_argument("--budget_minutes", type=float, default=7.0,
                        help="start no job after this many minutes since the start (those left are listed as "
                             "skipped); the last ones started take about 2 more on 2 H200s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    if argv is None:  # the deepspeed launcher adds --local_rank=N before the script's arguments (LOCAL_RANK has it)
        argv = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    if argv[:1] == ["worker"]:
        worker(argv[1])
        return {}
    started_at = time.monotonic()
    args = parse_args(argv)
    work_dir = args.work_dir
    for sub in ("records", "specs", "logs", "out"):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    jobs = quick_plan() if args.quick else gpu_plan()
    if args.only:
        jobs = [Job(job.launcher, job.gpus, [r for r in job.runs if re.search(args.only, r.name)]) for job in jobs]
        jobs = [job for job in jobs if job.runs]
    needed = max((job.gpus for job in jobs), default=0)
    if not args.quick and torch.cuda.device_count() < needed:
        sys.exit(f"the selected runs need {needed} GPUs, {torch.cuda.device_count()} found (--only picks one-GPU runs; "
                 "--quick runs on the CPU)")
    args.tag = args.tag or ("quick" if args.quick else f"{torch.cuda.device_count()}x"
                            + torch.cuda.get_device_name(0).split()[-1].lower())
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    models, data, hidden = {}, {}, {}
    for run in (run for job in jobs for run in job.runs):
        if run.model not in models:
            print(f"[{time.monotonic() - started_at:6.0f}s] preparing model {run.model}", flush=True)
            models[run.model] = prepare_model(run.model, work_dir, tokenizer, args.quick)
            hidden[run.model] = json.loads((models[run.model] / "config.json").read_text())["hidden_size"]
        if (run.model, run.steps) not in data:
            vocab = json.loads((models[run.model] / "config.json").read_text())["vocab_size"]
            data[(run.model, run.steps)] = prepare_data(work_dir, tokenizer, run.steps * run.global_batch, run.seq_len,
                                                        vocab)
    results = {"environment": environment(args.quick), "runs": [], "skipped": []}
    run_jobs(jobs, args, work_dir, models, data, hidden, results, started_at)
    write_results(results, args.output_dir, args.tag)
    print("\n".join(summary_lines(results)))
    print(f"wrote {args.output_dir / f'distributed_{args.tag}.json'} and .md")
    return results


if __name__ == "__main__":
    main()
