"""Prepare training and evaluation data in the layouts train.py and the evaluators read.

Subcommands (each writes under --output_dir, default data/processed/<name>):
  bbh       BIG-Bench Hard, one <task>.json list of {input, target} per task   (Hub: lukaemon/bbh)
  mmlu      MMLU dev/ and test/ CSVs, header question,choice0..3,answer       (Hub: cais/mmlu)
  flan      Flan-v2 subset (~30k) -> train.jsonl of instruction records       (Hub: Muennighoff/flan)
  dolly     databricks-dolly-15k -> train.jsonl + validation.jsonl            (Hub: databricks/databricks-dolly-15k)
  bigbench  multi-task set from the bigbench==1.0.0 sdist -> train.jsonl, eval.jsonl, tasks.json
  synthetic records of single-token words with a documented token-length distribution (dry runs) -> train.jsonl

Without --source the data is downloaded with `datasets` (needs network); with --source a local copy
is converted. Records: {"instruction", "input", "output", "task_type"}, one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from data.benchmarks import prepare_bbh, prepare_mmlu
from data.bigbench import prepare_bigbench
from data.instructions import prepare_dolly, prepare_flan
from data.synthetic import LLAMA2_VOCABULARY, prepare_synthetic
from mtlora.errors import UsageError

DEFAULT_ROOT = Path(__file__).resolve().parent / "processed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("bbh", "folder of <task>.json (list or {\"examples\": [...]})"),
                            ("mmlu", "folder with dev/ and test/ <subject>_{dev,test}.csv"),
                            ("flan", "JSON/JSONL with inputs, targets, task_name"),
                            ("dolly", "JSON/JSONL with instruction, context, response, category")):
        sub = commands.add_parser(name, help=f"prepare {name}")
        sub.add_argument("--source", default=None, help=f"local copy instead of downloading: {help_text}")
        _add_output(sub, name)
    flan, dolly = commands.choices["flan"], commands.choices["dolly"]
    flan.add_argument("--num_examples", type=int, default=30_000)
    flan.add_argument("--max_per_task", type=int, default=None)
    flan.add_argument("--seed", type=int, default=42)
    dolly.add_argument("--val_size", type=float, default=0.05, help="fraction (< 1) or count of validation records")
    dolly.add_argument("--seed", type=int, default=42)
    dolly.add_argument("--num_clusters", type=int, default=None,
                       help="task labels from K-means over TF-IDF of instruction + context (the paper: 16); default: "
                            "Dolly's category field (the reference runs and the tables)")
    bigbench = commands.add_parser("bigbench", help="multi-task set from the bigbench==1.0.0 sdist")
    bigbench.add_argument("--sdist", required=True, help="bigbench-1.0.0.tar.gz from `pip download --no-deps bigbench==1.0.0`")
    group = bigbench.add_mutually_exclusive_group(required=True)
    group.add_argument("--num_tasks", type=int, help="how many eligible tasks to draw (seeded)")
    group.add_argument("--tasks", nargs="+", help="explicit task folder names")
    bigbench.add_argument("--max_per_task", type=int, default=200, help="training examples per task (cap)")
    bigbench.add_argument("--eval_per_task", type=int, default=40, help="held-out examples per task")
    bigbench.add_argument("--min_examples", type=int, default=100, help="usable examples a task needs to be eligible")
    bigbench.add_argument("--seed", type=int, default=42)
    _add_output(bigbench, "bigbench")
    synthetic = commands.add_parser("synthetic", help="records with a documented token-length distribution (dry runs)")
    synthetic.add_argument("--num_examples", type=int, default=30_000)
    synthetic.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "configs" / "models" /
                                                      "smollm2-135m"), help="whose tokens the lengths count")
    synthetic.add_argument("--lengths_from", default=None,
                           help="measure the length distribution from this instruction file (default: the built-in "
                                "table, measured on the BIG-bench pool: data/synthetic.py)")
    synthetic.add_argument("--num_tasks", type=int, default=8, help="task labels synthetic_00, synthetic_01, ...")
    synthetic.add_argument("--max_tokens", type=int, default=2048, help="cap on a drawn prompt or response length")
    synthetic.add_argument("--max_token_id", type=int, default=LLAMA2_VOCABULARY,
                           help="every token id stays below this (default: LLaMA-2's vocabulary)")
    synthetic.add_argument("--seed", type=int, default=42)
    _add_output(synthetic, "synthetic")
    return parser


def _add_output(sub: argparse.ArgumentParser, name: str) -> None:
    sub.add_argument("--output_dir", default=str(DEFAULT_ROOT / name), help=f"default: data/processed/{name}")


def run(args: argparse.Namespace) -> dict:
    """Dispatch one subcommand; returns what it wrote (counts)."""
    if args.command == "bbh":
        return prepare_bbh(args.output_dir, args.source)
    if args.command == "mmlu":
        return prepare_mmlu(args.output_dir, args.source)
    if args.command == "flan":
        return prepare_flan(args.output_dir, args.source, args.num_examples, args.max_per_task, args.seed)
    if args.command == "dolly":
        return prepare_dolly(args.output_dir, args.source, args.val_size, args.seed, args.num_clusters)
    if args.command == "synthetic":
        return prepare_synthetic(args.output_dir, args.tokenizer, args.num_examples, args.num_tasks, args.seed,
                                 args.lengths_from, args.max_tokens, args.max_token_id)
    return prepare_bigbench(args.output_dir, args.sdist, num_tasks=args.num_tasks, tasks=args.tasks,
                            max_per_task=args.max_per_task, eval_per_task=args.eval_per_task,
                            min_examples=args.min_examples, seed=args.seed)


# Lower bounds of the count flags (a subcommand has some of them).
MINIMUMS = {"num_examples": 1, "max_per_task": 1, "num_tasks": 1, "eval_per_task": 0, "min_examples": 1,
            "max_tokens": 8, "max_token_id": 1001}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, minimum in MINIMUMS.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")
    start = time.time()
    try:
        summary = run(args)
    except UsageError as error:  # DataSourceError and the readers' errors name the file or flag
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = {k: v for k, v in summary.items() if k != "excluded_bbh_source_tasks"}
    print(json.dumps(counts, indent=1)[:3000])
    print(f"{args.command}: wrote {args.output_dir} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
