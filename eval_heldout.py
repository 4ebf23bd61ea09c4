"""Held-out accuracy over the trained tasks: greedy answers to instruction records, exact/lenient match.

Several processes split the records: `accelerate launch eval_heldout.py ...`.

Example: python eval_heldout.py --eval_file data/processed/bigbench25/eval.jsonl --lora_checkpoint runs/x
"""

from __future__ import annotations

import argparse
import sys

from mtlora.errors import UsageError
from mtlora.evaluation import distributed
from mtlora.evaluation.cli import (add_model_args, add_run_args, check_model_args, check_positive, load_for_eval,
                                   model_metadata)
from mtlora.evaluation.heldout import evaluate_heldout, heldout_markdown
from mtlora.training_data import read_instruction_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_run_args(parser, "outputs/eval_heldout", "records per task")
    parser.add_argument("--eval_file", required=True, help="JSONL of {instruction, input, output, task_type}")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None, help="context size (default: model max positions)")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    check_positive(parser, args, "limit", "max_new_tokens", "max_length")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = read_instruction_records(args.eval_file, "--eval_file")  # fail on a bad file before loading the model
    except UsageError as error:
        sys.exit(f"error: {error}")
    model, tokenizer = load_for_eval(args)
    summary = evaluate_heldout(model, tokenizer, records, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, limit=args.limit,
                               max_length=args.max_length, output_dir=args.output_dir,
                               metadata={**model_metadata(args), "eval_file": args.eval_file})
    if distributed.is_main():
        print(heldout_markdown(summary))
        print(f"\nresults written to {args.output_dir}/ (summary.json, summary.md, predictions.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
