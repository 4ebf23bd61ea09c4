"""Small helpers shared by the evaluators, the experiments and data preparation: means, JSON / JSONL files and
Markdown tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sequence (a task with no scored items)."""
    return float(sum(values)) / len(values) if values else 0.0


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented UTF-8 JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """One JSON object per line, UTF-8, parent folders created; an identical file is left alone (rewriting it
    would only touch its mtime, which the data fingerprints' cache watches)."""
    path = Path(path)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> dict | None:
    """The JSON file at ``path``, or None when there is none."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(output_dir: str | Path, item_folder: str, results: dict[str, dict], summary: dict,
                  markdown: str) -> None:
    """Write ``<item_folder>/<name>.json`` per task or subject, ``summary.json`` and ``summary.md``."""
    output_dir = Path(output_dir)
    for name, result in results.items():
        write_json(output_dir / item_folder / f"{name}.json", result)
    write_json(output_dir / "summary.json", summary)
    (output_dir / "summary.md").write_text(markdown + "\n", encoding="utf-8")
