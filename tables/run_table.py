"""Run one paper table end to end (train + evaluate every row, then a Markdown/JSON table).

    python tables/run_table.py --table main_ablation --scale small
    python tables/run_table.py --table main_ablation --scale paper --model_name_or_path /models/llama-2-7b --num_gpus 8
    python tables/run_table.py --table main_ablation --scale paper --model_name_or_path ../shared/configs/llama-2-7b --dry_run

Rows already trained or evaluated are skipped; an interrupted training resumes from its last checkpoint.
"""

import argparse
import math
from pathlib import Path

import torch

from mtlora.evaluation.cli import default_data_dir
from mtlora.experiments.dry_run import DryRun
from mtlora.experiments.registry import SCALES, TABLES
from mtlora.experiments.runner import RunSettings, run_tables, stop_steps_with_the_runner


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, nargs="+", choices=sorted(TABLES),
                        help="one or more tables: their jobs run as one pool (a job two tables share runs once)")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--model_name_or_path", default=None,
                        help="default: the table's LLaMA-2 model at --scale paper, SmolLM2-135M at --scale small")
    parser.add_argument("--num_gpus", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--results_dir", default="outputs/tables",
                        help="where runs and tables go (results/ holds the reference results committed to the repo)")
    parser.add_argument("--rows", nargs="+", default=None, help="only these row keys")
    parser.add_argument("--no_base", action="store_true", help="skip the base-model (no adapter) row")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds of every trained row (default: the scale's, 42 43 44: the paper reports "
                             "the mean +- std of 3 seeds)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="run this many jobs at once, each on one GPU (round robin over the visible GPUs; "
                             "--num_gpus is then 1 per job): a small model leaves a large GPU mostly idle")
    parser.add_argument("--assemble_only", action="store_true",
                        help="train and evaluate nothing: tabulate the runs that have finished (e.g. copied back "
                             "from other machines)")
    parser.add_argument("--as_on_gpu", action="store_true",
                        help="plan the jobs as on a GPU machine (bf16, the micro-batch for --gpu_memory_gb) on one without "
                             "a GPU: with --assemble_only, tabulates runs made on GPUs elsewhere")
    parser.add_argument("--bbh_dir", default=default_data_dir("bbh"))
    parser.add_argument("--mmlu_dir", default=default_data_dir("mmlu"))
    parser.add_argument("--gpu_memory_gb", type=float, default=None,
                        help="memory of each GPU in GiB (as torch reports it; default: the detected card's): every "
                             "training job takes the largest micro-batch that fits (mtlora/experiments/memory_plan.py) "
                             "and gradient accumulation for the rest of the effective batch; the choice is printed")
    parser.add_argument("--dry_run", action="store_true",
                        help="time the table instead of running it: random weights from the model's config (a "
                             "config-only folder is enough), synthetic training data, a few steps, the evaluators on "
                             "a slice; writes <table>.dry_run.{json,md} with the projected hours "
                             "(mtlora/experiments/dry_run.py). Accuracy means nothing")
    parser.add_argument("--dry_run_steps", type=int, default=DryRun.steps, help="training steps of each dry-run job")
    args = parser.parse_args(argv)
    tables, scale = [TABLES[name] for name in dict.fromkeys(args.table)], SCALES[args.scale]
    if args.rows:
        unknown = set(args.rows) - {r.key for t in tables for r in t.rows}
        if unknown:
            parser.error(f"--rows: unknown {sorted(unknown)}; rows: {', '.join(r.key for t in tables for r in t.rows)}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: repeated seeds {args.seeds}")
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    if args.dry_run_steps <= DryRun.warmup_steps:
        parser.error(f"--dry_run_steps must be > {DryRun.warmup_steps} (the untimed warm-up steps), got {args.dry_run_steps}")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        parser.error(f"--gpu_memory_gb must be > 0, got {args.gpu_memory_gb}")
    defaults = {t.paper_model if args.scale == "paper" else scale.model_name_or_path for t in tables}
    if args.model_name_or_path is None and len(defaults) > 1:
        parser.error(f"--table: these tables run on different models ({', '.join(map(str, defaults))}); "
                     "run them separately or pass --model_name_or_path")
    settings = RunSettings(model_name_or_path=args.model_name_or_path or defaults.pop(),
                           num_gpus=1 if args.parallel > 1 else args.num_gpus, results_dir=Path(args.results_dir),
                           bbh_dir=args.bbh_dir, mmlu_dir=args.mmlu_dir, use_cuda=torch.cuda.is_available() or args.as_on_gpu,
                           seeds=tuple(args.seeds or scale.seeds), gpu_memory_gib=gpu_memory(args),
                           dry_run=DryRun(steps=args.dry_run_steps) if args.dry_run else None)
    stop_steps_with_the_runner()
    run_tables([t.name for t in tables], args.scale, settings, only_rows=args.rows, with_base=not args.no_base,
               assemble_only=args.assemble_only, parallel=args.parallel)


def gpu_memory(args: argparse.Namespace) -> float | None:
    """GiB each job may use: --gpu_memory_gb or the detected card's, shared by the jobs --parallel puts on one GPU."""
    if args.gpu_memory_gb is None and not torch.cuda.is_available():
        return None
    total = args.gpu_memory_gb or torch.cuda.get_device_properties(0).total_memory / 2**30
    return total / math.ceil(args.parallel / max(1, torch.cuda.device_count()))


if __name__ == "__main__":
    main()
