"""Instruction-tuning data: read and validate records, tokenize with the prompt masked, collate.

A record is ``{"instruction": str, "input": str (optional), "output": str, "task_type": str (optional)}``
in a JSON list or JSONL file. As in the reference code a sequence is
``<bos>instruction[\\ninput]<eos>output<eos>`` and only the response tokens (``output<eos>``) are
trained on. Task labels are used by MMoELoRA's task gate only; routing never sees them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mtlora.errors import InvalidInput, MissingInput
from mtlora.prompts import encode_batch, encode_prompts

IGNORE_INDEX = -100
REQUIRED_TEXT_FIELDS = ("instruction", "output")
OPTIONAL_TEXT_FIELDS = ("input", "task_type")


class DataFormatError(InvalidInput):
    """A training record is malformed; the message names the file and line."""


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; raises :class:`DataFormatError` naming ``file:line`` when it is not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _raw_records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) pairs from a JSON list or a JSONL file."""
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        return [(index + 1, value) for index, value in enumerate(values)]  # record index for JSON lists
    records = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{line_number}: invalid JSON ({err.msg})") from None
    return records


def _check_record(path: Path, line_number: int, record: object) -> dict:
    where = f"{path}:{line_number}"
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object with instruction/input/output, got {type(record).__name__}")
    for name in REQUIRED_TEXT_FIELDS:
        if not isinstance(record.get(name), str):
            raise DataFormatError(f"{where}: field {name!r} must be a string (record keys: {sorted(record)})")
    for name in OPTIONAL_TEXT_FIELDS:
        if record.get(name) is not None and not isinstance(record[name], str):
            raise DataFormatError(f"{where}: field {name!r} must be a string when present")
    if not record["output"].strip():
        raise DataFormatError(f"{where}: field 'output' is empty: nothing to train on")
    references = record.get("references")
    if references is not None and not (isinstance(references, list) and all(isinstance(r, str) for r in references)):
        raise DataFormatError(f"{where}: field 'references' must be a list of strings when present")
    # Other fields (e.g. a record's accepted ``references``) are kept for the evaluators.
    return {**record, "input": record.get("input") or "", "task_type": record.get("task_type") or "default"}


def read_instruction_records(path: str | Path, flag: str = "--data_path") -> list[dict]:
    """Read and validate every record of a JSON list or JSONL file (training and held-out evaluation alike).

    Raises :class:`DataFormatError` naming the file and line, or ``FileNotFoundError`` naming ``flag``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{flag} {path}: no such file")
    records = [_check_record(path, n, r) for n, r in _raw_records(path)]
    if not records:
        raise DataFormatError(f"{path}: no records")
    return records


def tokenize_records(records: Sequence[dict], tokenizer, max_seq_length: int) -> list[tuple[dict, bool]]:
    """Per record, token ids and labels (prompt masked), and whether it had to be truncated; the texts are encoded
    in batches.

    Over-long examples keep their response (up to half the budget when the prompt is long) and
    lose the start of the prompt, so every example keeps tokens to learn from.
    """
    prompts = encode_prompts(tokenizer, records)
    responses = encode_batch(tokenizer, [r["output"] for r in records], add_special_tokens=False)
    return [_example(prompt_ids, response_ids + [tokenizer.eos_token_id], max_seq_length)
            for prompt_ids, response_ids in zip(prompts, responses, strict=True)]


def _example(prompt_ids: list[int], response_ids: list[int], max_seq_length: int) -> tuple[dict, bool]:
    truncated = len(prompt_ids) + len(response_ids) > max_seq_length
    if truncated:
        response_ids = response_ids[: max(max_seq_length - len(prompt_ids), max_seq_length // 2)]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_seq_length - len(response_ids)):]
    example = {"input_ids": prompt_ids + response_ids,
               "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}
    return example, truncated


def task_labels(records: list[dict]) -> list[str]:
    """The sorted task labels of ``records``: position = the task id MMoELoRA's gate uses."""
    return sorted({r["task_type"] for r in records})


class InstructionDataset(Dataset):
    """Tokenized records; ``task_names`` maps each task label to the id MMoELoRA's gate uses."""

    def __init__(self, records: list[dict], tokenizer, max_seq_length: int, task_names: list[str] | None = None):
        self.task_names = task_names or task_labels(records)
        task_index = {name: i for i, name in enumerate(self.task_names)}
        self.examples, self.num_truncated = [], 0
        for record, (example, truncated) in zip(records, tokenize_records(records, tokenizer, max_seq_length)):
            example["task_id"] = task_index.get(record["task_type"], 0)
            self.examples.append(example)
            self.num_truncated += truncated

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


@dataclass
class PaddingCollator:
    """Right-pads a batch (pad id for inputs, IGNORE_INDEX for labels) and stacks the task ids."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, example in enumerate(batch):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        task_ids = torch.tensor([example["task_id"] for example in batch], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "task_ids": task_ids}
