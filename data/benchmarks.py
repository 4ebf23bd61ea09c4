"""BBH and MMLU in the layouts the evaluators read.

- BBH: ``<out>/<task>.json``, a JSON list of {input, target} per task (27 tasks).
- MMLU: ``<out>/dev/<subject>_dev.csv`` and ``<out>/test/<subject>_test.csv`` with the header
  ``question,choice0,choice1,choice2,choice3,answer`` (answer = index 0-3).
"""

from __future__ import annotations

import csv
from pathlib import Path

from data.sources import DataSourceError, load_hub_dataset, require_hub
from mtlora.evaluation.reporting import write_json
from mtlora.evaluation.bbh import BBH_TASKS, load_bbh_task
from mtlora.evaluation.mmlu import CSV_HEADER, LETTERS, SUBJECT_CATEGORY, load_mmlu_csv

BBH_HUB = "lukaemon/bbh"
MMLU_HUB = "cais/mmlu"
MMLU_SPLITS = ("dev", "test")


def prepare_bbh(output_dir: str | Path, source: str | Path | None = None) -> dict[str, int]:
    """Write every BBH task to ``output_dir``; returns the item count per task."""
    tasks = _bbh_from_folder(Path(source)) if source else _bbh_from_hub()
    for name, items in tasks.items():
        write_json(Path(output_dir) / f"{name}.json", items)
    return {name: len(items) for name, items in tasks.items()}


def _bbh_from_folder(folder: Path) -> dict[str, list[dict]]:
    if not folder.is_dir():
        raise DataSourceError(f"--source {folder}: not a folder of BBH <task>.json files")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataSourceError(f"--source {folder}: holds no <task>.json files")
    try:
        return {path.stem: load_bbh_task(path) for path in files}
    except ValueError as error:  # malformed file (bad JSON or layout): the message names it
        raise DataSourceError(f"--source: {error}") from error


def _bbh_from_hub() -> dict[str, list[dict]]:
    require_hub("bbh", BBH_HUB, "a folder of <task>.json files, each a list of {input, target} "
                               "or the upstream {\"examples\": [...]} format")
    return {name: [{"input": row["input"], "target": row["target"]}
                   for row in load_hub_dataset(BBH_HUB, name, split="test")] for name in BBH_TASKS}


def prepare_mmlu(output_dir: str | Path, source: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Write dev/ and test/ CSVs for every subject; returns the counts per split and subject."""
    splits = _mmlu_from_folder(Path(source)) if source else _mmlu_from_hub()
    counts: dict[str, dict[str, int]] = {}
    for split, subjects in splits.items():
        for subject, items in subjects.items():
            _write_mmlu_csv(Path(output_dir) / split / f"{subject}_{split}.csv", items)
        counts[split] = {subject: len(items) for subject, items in subjects.items()}
    return counts


def _mmlu_from_folder(folder: Path) -> dict[str, dict[str, list[dict]]]:
    splits = {}
    for split in MMLU_SPLITS:
        files = sorted((folder / split).glob(f"*_{split}.csv"))
        if not files:
            raise DataSourceError(f"--source {folder}: expected {split}/<subject>_{split}.csv files")
        try:
            splits[split] = {path.name[:-len(f"_{split}.csv")]: load_mmlu_csv(path) for path in files}
        except ValueError as error:  # malformed row: the message names file and row
            raise DataSourceError(f"--source: {error}") from error
    return splits


def _mmlu_from_hub() -> dict[str, dict[str, list[dict]]]:
    require_hub("mmlu", MMLU_HUB, "a folder with dev/<subject>_dev.csv and test/<subject>_test.csv "
                                 "(header question,choice0..3,answer, or the original headerless CSVs)")
    return {split: {subject: [{"question": row["question"], "choices": list(row["choices"]),
                               "answer": LETTERS[int(row["answer"])]}
                              for row in load_hub_dataset(MMLU_HUB, subject, split=split)]
                    for subject in SUBJECT_CATEGORY}
            for split in MMLU_SPLITS}


def _write_mmlu_csv(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for item in items:
            writer.writerow([item["question"], *item["choices"], LETTERS.index(item["answer"])])
