"""Evaluate a base model (optionally with an adapter checkpoint) on MMLU, 5-shot with dev exemplars.

Reports both scorers: `generate` (the paper's: one greedy token == gold letter) and `loglik`
(argmax of the four letter-token log-probs), micro (over questions) and macro (over subjects)
averages and the four category averages.

Example: python eval_mmlu.py --lora_checkpoint runs/mtlora --output_dir outputs/mmlu_mtlora
"""

from __future__ import annotations

import argparse
import sys

from mtlora.errors import UsageError
from mtlora.evaluation.cli import add_model_args, add_run_args, check_positive, default_data_dir, load_for_eval, model_metadata
from mtlora.evaluation.mmlu import HEADER_PRESETS, NUM_SHOTS, mmlu_markdown, resolve_subjects, run_mmlu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_run_args(parser, "outputs/eval_mmlu", "test questions per subject")
    parser.add_argument("--data_dir", default=default_data_dir("mmlu"),
                        help="folder with dev/<subject>_dev.csv and test/<subject>_test.csv")
    parser.add_argument("--subjects", nargs="+", default=None, help="subject names (default: all in --data_dir)")
    parser.add_argument("--num_shots", type=int, default=NUM_SHOTS)
    parser.add_argument("--prompt_header", default="none",
                        help=f"header before the exemplars: a preset {sorted(HEADER_PRESETS)} or a template using "
                             "{subject}; default none, as in the paper's format")
    parser.add_argument("--max_length", type=int, default=None,
                        help="context size (default: model max positions); longer prompts lose exemplars first")
    args = parser.parse_args(argv)
    check_positive(parser, args, "batch_size", "limit", "max_length")
    if args.num_shots < 0:
        parser.error(f"--num_shots must be >= 0, got {args.num_shots}")
    try:  # check the data before spending time on loading the model
        args.subjects = resolve_subjects(args.data_dir, args.subjects)
    except UsageError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_eval(args)
    summary = run_mmlu(model, tokenizer, args.data_dir, subjects=args.subjects, limit=args.limit,
                       batch_size=args.batch_size, num_shots=args.num_shots, prompt_header=args.prompt_header,
                       max_length=args.max_length, output_dir=args.output_dir, metadata=model_metadata(args))
    print(mmlu_markdown(summary))
    print(f"\nresults written to {args.output_dir}/ (summary.json, summary.md, subjects/*.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
