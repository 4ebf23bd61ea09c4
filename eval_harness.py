"""Evaluate a base model (optionally with an adapter checkpoint) with lm-eval's own MMLU and BBH tasks.

The numbers the rest of the field reports, from lm-evaluation-harness itself (lm-eval's prompts,
exemplars and metrics; only the data is read from the local folders, no network):
  mmlu               letters A-D by log-likelihood (lm-eval's prompt)     acc,none
  mmlu_continuation  answer texts by log-likelihood (cloze)               acc,none and acc_norm,none
  bbh_fewshot        3 fixed exemplars, greedy generation                 exact_match,none and
                                                                          exact_match,remove_whitespace
Groups (mmlu and its categories, bbh_fewshot) are aggregated by lm-eval when every subject / task runs.
The paper's protocol is eval_mmlu.py / eval_bbh.py.

Example: python eval_harness.py --lora_checkpoint runs/mtlora --output_dir outputs/harness_mtlora
"""

from __future__ import annotations

import argparse
import sys

from mtlora.errors import UsageError
from mtlora.evaluation.cli import (add_model_args, add_run_args, check_model_args, check_positive, default_data_dir,
                                   load_for_eval, model_metadata)
from mtlora.evaluation.harness import ENGINES, harness_markdown, resolve_benchmarks, run_harness
from mtlora.evaluation.harness_tasks import BENCHMARKS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_run_args(parser, "outputs/eval_harness", "test items per lm-eval task, the first n (lm-eval's --limit)")
    parser.add_argument("--tasks", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help="lm-eval groups to run (default: all)")
    parser.add_argument("--mmlu_dir", default=default_data_dir("mmlu"),
                        help="folder with dev/<subject>_dev.csv and test/<subject>_test.csv")
    parser.add_argument("--bbh_dir", default=default_data_dir("bbh"), help="folder of <task>.json files")
    parser.add_argument("--subjects", nargs="+", default=None,
                        help="MMLU subjects (default: all; a subset runs without lm-eval's group averages)")
    parser.add_argument("--bbh_tasks", nargs="+", default=None,
                        help="BBH tasks (default: all; a subset runs without lm-eval's group average)")
    parser.add_argument("--num_fewshot", type=int, default=None,
                        help="dev exemplars for the MMLU tasks (default: lm-eval's, 0; the leaderboard convention is 5); "
                             "bbh_fewshot always uses its 3 fixed exemplars")
    parser.add_argument("--harness_engine", choices=ENGINES, default="batched",
                        help="who runs lm-eval's requests: 'batched', this package's batched generation (a task's "
                             "exemplars run once, rows leave the batch as they end) and scoring (one forward per "
                             "prompt for one-token answers, log-probabilities of the answer positions only), in float32 "
                             "the same outputs as lm-eval's; 'hflm', lm-eval's own HFLM")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    check_positive(parser, args, "limit")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    try:  # check the data before spending time on loading the model
        resolve_benchmarks(args.tasks, args.mmlu_dir, args.bbh_dir, args.subjects, args.bbh_tasks)
    except UsageError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_eval(args)
    summary = run_harness(model, tokenizer, args.tasks, mmlu_dir=args.mmlu_dir, bbh_dir=args.bbh_dir,
                          subjects=args.subjects, bbh_tasks=args.bbh_tasks, limit=args.limit,
                          batch_size=args.batch_size or ("auto" if args.device.startswith("cuda") else 8),
                          num_fewshot=args.num_fewshot, output_dir=args.output_dir,
                          metadata=model_metadata(args), engine=args.harness_engine,
                          rows_per_batch=args.batch_size)
    print(harness_markdown(summary))
    print(f"\nresults written to {args.output_dir}/ (summary.json, summary.md, lm_eval_results.json, samples/*.json, "
          "lm_eval_tasks/ with the configs and data lm-eval read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
