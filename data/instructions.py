"""Instruction-tuning sets as JSONL records {instruction, input, output, task_type}.

- ``flan``: a Flan-v2 subset (about 30k examples by default) with its task labels;
- ``dolly``: databricks-dolly-15k (instruction, context -> input, response -> output,
  category -> task_type), split into train/validation with a seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from data.sources import DataSourceError, load_hub_dataset, read_json_records, require_hub
from mtlora.evaluation.reporting import write_json, write_jsonl

FLAN_HUB = "Muennighoff/flan"
DOLLY_HUB = "databricks/databricks-dolly-15k"
# Field names seen in Flan dumps, in order of preference.
FLAN_FIELDS = {"instruction": ("inputs", "input", "instruction", "prompt"),
               "output": ("targets", "target", "output", "response"),
               "task_type": ("task_name", "task", "_task_name", "task_type")}
DOLLY_FIELDS = ("instruction", "context", "response", "category")
STREAM_SHUFFLE_BUFFER = 10_000


def flan_record(raw: dict, where: str) -> dict:
    """Map one Flan example to a training record (raises naming ``where`` when a field is missing)."""
    record = {"input": ""}
    for field, aliases in FLAN_FIELDS.items():
        value = next((raw[a] for a in aliases if a in raw), None)
        if not isinstance(value, str):
            raise DataSourceError(f"{where}: no string field among {list(aliases)} for '{field}'")
        record[field] = value
    return {k: record[k] for k in ("instruction", "input", "output", "task_type")}


def sample_per_task(records: Iterable[dict], num_examples: int, max_per_task: int | None) -> list[dict]:
    """The first ``num_examples`` records, at most ``max_per_task`` of any task (input already shuffled)."""
    kept, counts = [], Counter()
    for record in records:
        if max_per_task is None or counts[record["task_type"]] < max_per_task:
            counts[record["task_type"]] += 1
            kept.append(record)
            if len(kept) == num_examples:
                break
    return kept


def prepare_flan(output_dir: str | Path, source: str | Path | None = None, num_examples: int = 30_000,
                 max_per_task: int | None = None, seed: int = 42) -> dict:
    """Write ``train.jsonl`` (a seeded sample of Flan) and ``tasks.json`` (counts per task)."""
    records = sample_per_task(_flan_records(source, seed), num_examples, max_per_task)
    if not records:
        raise DataSourceError(f"--source {source}: no Flan examples found")
    write_jsonl(Path(output_dir) / "train.jsonl", records)
    summary = {"source": str(source or FLAN_HUB), "seed": seed, "num_examples": len(records),
               "tasks": dict(sorted(Counter(r["task_type"] for r in records).items()))}
    write_json(Path(output_dir) / "tasks.json", summary)
    return summary


def _flan_records(source: str | Path | None, seed: int) -> Iterator[dict]:
    if source:
        raw = read_json_records(source)
        random.Random(seed).shuffle(raw)
        return (flan_record(record, where) for where, record in raw)
    require_hub("flan", FLAN_HUB, "a JSON/JSONL file of Flan examples with fields inputs, targets, task_name")
    stream = load_hub_dataset(FLAN_HUB, split="train", streaming=True)
    return (flan_record(r, FLAN_HUB) for r in stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER))


def dolly_record(raw: dict, where: str) -> dict:
    """Map one Dolly example to a training record."""
    missing = [f for f in DOLLY_FIELDS if f not in raw]
    if missing:
        raise DataSourceError(f"{where}: missing field(s) {missing} (expected {list(DOLLY_FIELDS)})")
    not_text = [f for f in DOLLY_FIELDS if not isinstance(raw[f], str) and not (f == "context" and raw[f] is None)]
    if not_text:
        raise DataSourceError(f"{where}: field(s) {not_text} must be strings")
    return {"instruction": raw["instruction"], "input": raw["context"] or "", "output": raw["response"],
            "task_type": raw["category"]}


def cluster_tasks(records: list[dict], num_clusters: int, seed: int) -> list[dict]:
    """The paper's Dolly task labels: K-means (seeded) over TF-IDF vectors of instruction + context, as
    ``task_type`` = ``cluster_00`` ...; Dolly's own category stays in ``category``."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not 2 <= num_clusters <= len(records):
        raise DataSourceError(f"--num_clusters {num_clusters}: expected 2 to {len(records)} (the number of records)")
    vectors = TfidfVectorizer(max_features=20_000, stop_words="english").fit_transform(
        [f"{r['instruction']} {r['input']}" for r in records])
    labels = KMeans(n_clusters=num_clusters, random_state=seed, n_init=10).fit_predict(vectors)
    return [{**r, "task_type": f"cluster_{label:02d}", "category": r["task_type"]} for r, label in zip(records, labels)]


def prepare_dolly(output_dir: str | Path, source: str | Path | None = None, val_size: float = 0.05,
                  seed: int = 42, num_clusters: int | None = None) -> dict:
    """Write ``train.jsonl`` and ``validation.jsonl`` (a seeded split) and ``tasks.json``.

    ``val_size`` below 1 is a fraction of the records, from 1 up a count. Task labels: Dolly's ``category``
    (what the reference runs use), or with ``num_clusters`` K the paper's K-means clusters (:func:`cluster_tasks`).
    """
    if source:
        raw = read_json_records(source)
    else:
        require_hub("dolly", DOLLY_HUB, "a JSON/JSONL file with fields instruction, context, response, category")
        raw = [(f"{DOLLY_HUB}, record {i}", r) for i, r in enumerate(load_hub_dataset(DOLLY_HUB, split="train"), 1)]
    records = [dolly_record(record, where) for where, record in raw]
    if num_clusters is not None:
        records = cluster_tasks(records, num_clusters, seed)
    random.Random(seed).shuffle(records)
    num_val = round(val_size * len(records)) if val_size < 1 else int(val_size)
    if not 0 <= num_val < len(records):
        raise DataSourceError(f"--val_size {val_size}: leaves no training records out of {len(records)}")
    train, validation = records[num_val:], records[:num_val]
    write_jsonl(Path(output_dir) / "train.jsonl", train)
    write_jsonl(Path(output_dir) / "validation.jsonl", validation)
    summary = {"source": str(source or DOLLY_HUB), "seed": seed, "train": len(train), "validation": len(validation),
               "task_labels": f"K-means, {num_clusters} clusters" if num_clusters else "category",
               "tasks": dict(sorted(Counter(r["task_type"] for r in records).items()))}
    write_json(Path(output_dir) / "tasks.json", summary)
    return summary
