"""Small helpers shared by the evaluators: means, JSON files and Markdown tables."""

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
