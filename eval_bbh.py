"""Evaluate a base model (optionally with an adapter checkpoint) on BIG-Bench Hard, 3-shot.

The paper's protocol by default (greedy, 32 new tokens, EOS only, first 2,048 prompt tokens, the lenient
scorer and our extracted_match beside it, macro average over tasks and the paper's Table 6 difficulty
groups). Several processes split the items: `accelerate launch eval_bbh.py ...` or `torchrun ...`.

Example: python eval_bbh.py --lora_checkpoint runs/mtlora --output_dir outputs/bbh_mtlora
"""

from __future__ import annotations

import argparse
import sys

from mtlora.errors import UsageError
from mtlora.evaluation import distributed
from mtlora.evaluation.bbh import bbh_markdown, load_bbh, run_bbh
from mtlora.evaluation.cli import (add_model_args, add_protocol_args, add_run_args, check_model_args, check_positive,
                                   default_data_dir, load_for_eval, model_metadata)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_run_args(parser, "outputs/eval_bbh", "scored items per task (the 3 exemplars are never scored)")
    parser.add_argument("--data_dir", default=default_data_dir("bbh"),
                        help="folder of <task>.json files: a list of {input, target} or {\"examples\": [...]}")
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (default: every file in --data_dir)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    add_protocol_args(parser, "cuts the prompt from the left so it and the new tokens fit --max_length")
    parser.add_argument("--stop_strings", nargs="+", default=[],
                        help="also end a generation at the first of these strings and cut it there (default: none, "
                             "EOS only, as the reference; changes lenient scores, which count answers the model "
                             "writes into questions it invents after its own answer)")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    check_positive(parser, args, "limit", "max_new_tokens", "max_length")
    try:  # check the data before spending time on loading the model
        args.tasks = list(load_bbh(args.data_dir, args.tasks))
    except UsageError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_eval(args)
    summary = run_bbh(model, tokenizer, args.data_dir, tasks=args.tasks, limit=args.limit,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, output_dir=args.output_dir,
                      max_length=args.max_length, metadata=model_metadata(args), truncation=args.truncation,
                      share_prefix=args.share_prefix, stop_strings=args.stop_strings)
    if distributed.is_main():
        print(bbh_markdown(summary))
        print(f"\nresults written to {args.output_dir}/ (summary.json, summary.md, tasks/*.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
