"""Where raw data comes from: a local --source path, or the Hugging Face Hub when it is reachable."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from mtlora.errors import UsageError
from mtlora.training_data import read_utf8

HUB_HOST = "huggingface.co"


class DataSourceError(UsageError):
    """A data source is missing or malformed; the message names the flag or file to fix."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or huggingface.co cannot be reached quickly."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def require_hub(command: str, dataset: str, source_help: str) -> None:
    """Raise a clear error naming --source when the Hub cannot be used."""
    if not hub_reachable():
        raise DataSourceError(
            f"{command}: no --source given and {HUB_HOST} is unreachable (or offline mode is set), so "
            f"{dataset} cannot be downloaded. Pass --source PATH: {source_help}")


def load_hub_dataset(*args, **kwargs):
    """``datasets.load_dataset``, imported lazily so offline use never needs the Hub machinery."""
    from datasets import load_dataset

    return load_dataset(*args, **kwargs)


def read_json_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, object) pairs of a JSONL file, a JSON list, or a JSON object holding one list (e.g. {"data": [...]}).

    ``where`` is ``file:line`` (JSONL) or ``file, record i`` (JSON lists, counted from 1), for error messages;
    a non-object record, invalid JSON or non-UTF-8 text raises naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"--source {path}: no such file")
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        return _jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _jsonl(path, text)  # JSON lines under a .json name
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataSourceError(f"--source {path}: expected a JSON list of records or JSONL")
        data = lists[0]
    if not isinstance(data, list):
        raise DataSourceError(f"--source {path}: expected a JSON list of records or JSONL, got {type(data).__name__}")
    return [_object(f"{path}, record {index}", value) for index, value in enumerate(data, start=1)]


def _jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append(_object(f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataSourceError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records


def _object(where: str, value) -> tuple[str, dict]:
    if not isinstance(value, dict):
        raise DataSourceError(f"{where}: expected a JSON object (a record), got {type(value).__name__} "
                              f"{str(value)[:40]!r}")
    return where, value


