"""Evaluate a base model (optionally with an adapter checkpoint) on MMLU, 5-shot with dev exemplars.

Reports both scorers: `generate` (the paper's: one greedy token against the gold letter) and `loglik`
(argmax of the four letter-token log-probs), micro (over questions) and macro (over subjects)
averages and the four category averages. The defaults are the reference scripts' forms (scorer,
truncation, category averages); --mmlu_scorer strict --truncation fit --category_average questions
are the corrected forms. Several processes split the questions: `accelerate launch eval_mmlu.py ...`.

Example: python eval_mmlu.py --lora_checkpoint runs/mtlora --output_dir outputs/mmlu_mtlora
"""

from __future__ import annotations

import argparse
import sys

from mtlora.errors import UsageError
from mtlora.evaluation import distributed
from mtlora.evaluation.answers import MMLU_SCORERS
from mtlora.evaluation.cli import (add_model_args, add_protocol_args, add_run_args, check_model_args, check_positive,
                                   default_data_dir, load_for_eval, model_metadata)
from mtlora.evaluation.mmlu import CATEGORY_AVERAGES, HEADER_PRESETS, NUM_SHOTS, load_mmlu, mmlu_markdown, run_mmlu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_run_args(parser, "outputs/eval_mmlu", "test questions per subject")
    parser.add_argument("--data_dir", default=default_data_dir("mmlu"),
                        help="folder with dev/<subject>_dev.csv and test/<subject>_test.csv")
    parser.add_argument("--subjects", nargs="+", default=None, help="subject names (default: all in --data_dir)")
    parser.add_argument("--num_shots", type=int, default=NUM_SHOTS,
                        help="dev exemplars per prompt (the first n; at most the rows of each dev file)")
    parser.add_argument("--prompt_header", default="none",
                        help=f"header before the exemplars: a preset {sorted(HEADER_PRESETS)} or a template using "
                             "{subject}; default none, as in the paper's format")
    parser.add_argument("--mmlu_scorer", choices=MMLU_SCORERS, default="reference",
                        help="the generate scorer: reference (default, the reference scripts': the first character "
                             "of the stripped token, so ' An' counts as A) or strict (the whole stripped token)")
    parser.add_argument("--category_average", choices=CATEGORY_AVERAGES, default="subjects",
                        help="category scores: the mean of the category's subject accuracies (subjects, default, the "
                             "reference's) or the accuracy over its questions (questions)")
    add_protocol_args(parser, "drops exemplars, then cuts from the left, so the question and 'Answer:' are kept whole "
                              "(a correction: the reference cut loses 'Answer:' on 510 LLaMA-2 prompts)")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    check_positive(parser, args, "limit", "max_length")
    try:  # check the data before spending time on loading the model
        args.subjects = list(load_mmlu(args.data_dir, args.subjects, args.num_shots, args.prompt_header))
    except UsageError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_eval(args)
    summary = run_mmlu(model, tokenizer, args.data_dir, subjects=args.subjects, limit=args.limit,
                       batch_size=args.batch_size, num_shots=args.num_shots, prompt_header=args.prompt_header,
                       max_length=args.max_length, output_dir=args.output_dir, metadata=model_metadata(args),
                       scorer=args.mmlu_scorer, truncation=args.truncation, category_average=args.category_average,
                       share_prefix=args.share_prefix)
    if distributed.is_main():
        print(mmlu_markdown(summary))
        print(f"\nresults written to {args.output_dir}/ (summary.json, summary.md, subjects/*.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
