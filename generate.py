"""Greedy answers from a base model, a merged model or an adapter checkpoint, in the training prompt format.

Each prompt is fed exactly as training feeds an instruction, {bos}{instruction[\\ninput]}{eos}, and the answer
is generated greedily up to EOS, in length-sorted left-padded batches. Output: JSONL, one line per prompt,
the prompt's record plus "generation".

Prompts: --prompt TEXT (repeatable; TEXT is the instruction), or --prompts_file FILE, a JSONL file of
instruction records ({"instruction": ..., "input": ...}, other fields kept) or {"prompt": ...} lines.

Examples:
    python generate.py --lora_checkpoint outputs/mtlora --prompt "Reverse the order of these words.
    stone river cloud"
    python generate.py --model_name_or_path outputs/merged_ties --prompts_file prompts.jsonl --output answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtlora.errors import InvalidInput, MissingInput, UsageError
from mtlora.evaluation.cli import add_model_args, check_positive, load_for_eval
from mtlora.evaluation.heldout import generate_for_records
from mtlora.training_data import read_utf8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="An instruction to answer (repeat for several).")
    source.add_argument("--prompts_file", help='JSONL: {"instruction", "input"} records or {"prompt"} lines.')
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=None, help="context size (default: model max positions)")
    parser.add_argument("--output", default="-", help="JSONL file to write (default: standard output)")
    args = parser.parse_args(argv)
    check_positive(parser, args, "batch_size", "max_new_tokens", "max_length")
    return args


def read_prompts(path: str | Path) -> list[dict]:
    """The records of a prompts file; raises naming ``file:line`` for a line that is not a prompt."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--prompts_file {path}: no such file")
    records = []
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{path}:{number}: invalid JSON ({err.msg})") from None
        text = record.get("instruction", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not isinstance(record.get("input", ""), str):
            raise InvalidInput(f"{path}:{number}: expected an object with a string \"instruction\" (and optional "
                             f"\"input\") or \"prompt\", got {line[:80]!r}")
        records.append(record)
    if not records:
        raise InvalidInput(f"{path}: no prompts")
    return records


def as_instruction(record: dict) -> dict:
    """The instruction/input pair a record is fed as ({"prompt": p} is the instruction p)."""
    return {"instruction": record.get("instruction", record.get("prompt")), "input": record.get("input") or ""}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = [{"prompt": p} for p in args.prompt] if args.prompt else read_prompts(args.prompts_file)
        model, tokenizer = load_for_eval(args)  # checks the checkpoint and model paths before loading
    except UsageError as error:
        sys.exit(f"error: {error}")
    generations = generate_for_records(model, tokenizer, [as_instruction(r) for r in records], args.max_new_tokens,
                                       args.batch_size, args.max_length)
    lines = "".join(json.dumps({**r, "generation": g}, ensure_ascii=False) + "\n" for r, g in zip(records, generations))
    if args.output == "-":
        sys.stdout.write(lines)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
