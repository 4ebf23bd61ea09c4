"""Held-out accuracy on instruction records (e.g. ``eval.jsonl`` of ``data/prepare.py bigbench``).

Records are read by the training reader (``mtlora.training_data.read_instruction_records``) and fed
in the training format by the training encoder (``mtlora.prompts.encode_prompts``); the answer is
generated greedily up to EOS, and scored two ways: ``exact`` (normalised generation equals the
normalised ``output``) and ``lenient`` (the normalised ``output`` occurs in the normalised
generation); a record's optional ``references`` list adds other acceptable answers.
Accuracies per ``task_type`` and their unweighted average over tasks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.evaluation import distributed
from mtlora.evaluation.answers import exact_match, normalize
from mtlora.evaluation.batching import generate_batched, truncate_left
from mtlora.evaluation.reporting import markdown_table, mean, write_json
from mtlora.prompts import encode_prompts

def generate_for_records(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[dict],
                         max_new_tokens: int = 64, batch_size: int | None = 8, max_length: int | None = None,
                         desc: str = "generate") -> list[str]:
    """Greedy answers to records with ``instruction`` and ``input``, fed in the training format; prompts longer
    than ``max_length`` (default: the model's context) minus ``max_new_tokens`` lose their start (BOS kept)."""
    budget = (max_length or model.config.max_position_embeddings) - max_new_tokens
    prompts = [truncate_left(ids, budget, keep_first=tokenizer.bos_token_id) for ids in encode_prompts(tokenizer, records)]
    return generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, desc=desc)


def references(record: dict) -> list[str]:
    """Acceptable answers: the optional ``references`` list (several valid targets), else ``output``."""
    return record.get("references") or [record["output"]]


def limit_per_task(records: Sequence[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records of each task (all when None), in file order."""
    if limit is None:
        return list(records)
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for record in records:
        if seen[record["task_type"]] < limit:
            seen[record["task_type"]] += 1
            kept.append(record)
    return kept


def evaluate_heldout(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[dict],
                     batch_size: int | None = 8, max_new_tokens: int = 64, limit: int | None = None,
                     max_length: int | None = None, output_dir: str | Path | None = None,
                     metadata: dict | None = None) -> dict:
    """Score held-out records; returns per-task and average (over tasks) exact/lenient accuracy.

    ``metadata`` (e.g. the model name) is stored with the settings. With ``output_dir``: ``predictions.json`` (every generation), ``summary.json``, ``summary.md``.
    """
    model.eval()
    records = limit_per_task(records, limit)
    generations = generate_for_records(model, tokenizer, records, max_new_tokens, batch_size, max_length, "held-out")
    predictions = [{"task_type": r["task_type"], "output": r["output"], "generation": g,
                    "exact": any(exact_match(g, ref) for ref in references(r)),
                    "lenient": any(normalize(ref) in normalize(g) for ref in references(r))}
                   for r, g in zip(records, generations, strict=True)]
    summary = summarize_heldout(predictions)
    summary["settings"] = {**(metadata or {}), "limit": limit, "batch_size": batch_size or "auto",
                           "max_new_tokens": max_new_tokens,
                           "max_length": max_length or model.config.max_position_embeddings}
    if output_dir is not None and distributed.is_main():
        write_json(Path(output_dir) / "predictions.json", {"predictions": predictions})
        write_json(Path(output_dir) / "summary.json", summary)
        (Path(output_dir) / "summary.md").write_text(heldout_markdown(summary) + "\n", encoding="utf-8")
    return summary


def summarize_heldout(predictions: Sequence[dict]) -> dict:
    """Per-task accuracies and the unweighted average over tasks."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_task[p["task_type"]].append(p)
    tasks = {t: {"num_examples": len(ps), "exact": mean([p["exact"] for p in ps]),
                 "lenient": mean([p["lenient"] for p in ps])} for t, ps in sorted(by_task.items())}
    return {"tasks": tasks, "num_examples": len(predictions),
            "average": {k: mean([t[k] for t in tasks.values()]) for k in ("exact", "lenient")}}


def heldout_markdown(summary: dict) -> str:
    """Markdown table: one row per task plus the average over tasks, in %."""
    rows = [[t, v["num_examples"], f"{100 * v['exact']:.1f}", f"{100 * v['lenient']:.1f}"]
            for t, v in summary["tasks"].items()]
    rows.append(["**average over tasks**", summary["num_examples"], f"{100 * summary['average']['exact']:.1f}",
                 f"{100 * summary['average']['lenient']:.1f}"])
    return markdown_table(["task", "n", "exact %", "lenient %"], rows)
