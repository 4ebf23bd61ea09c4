"""BIG-Bench Hard, 3-shot: prompts, data loading, scoring and result files.

Prompt format of the paper: the first three items of a task file are the exemplars, written as
"Q: {input}\\nA: {target}\\n\\n", then "Q: {input}\\nA:" for the scored item. The exemplars are
never scored. Greedy decoding, 32 new tokens by default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput, MissingInput
from mtlora.evaluation.answers import exact_match, extract_answer, infer_answer_kind, lenient_match
from mtlora.evaluation.batching import generate_batched, truncate_left
from mtlora.evaluation.reporting import markdown_table, mean, write_results
from mtlora.evaluation.selection import select_requested

NUM_EXEMPLARS = 3
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects", "logical_deduction_three_objects",
    "movie_recommendation", "multistep_arithmetic_two", "navigate", "object_counting",
    "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting",
)


def build_bbh_prompt(exemplars: Sequence[dict], question: str) -> str:
    """The few-shot prompt: each exemplar as "Q: ..\\nA: ..\\n\\n", then "Q: {question}\\nA:"."""
    shots = "".join(f"Q: {ex['input']}\nA: {ex['target']}\n\n" for ex in exemplars)
    return f"{shots}Q: {question}\nA:"


def load_bbh_task(path: str | Path) -> list[dict]:
    """Items of one task file: a JSON list of {input, target}, or upstream's {"examples": [...]}."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data["examples"] if isinstance(data, dict) and "examples" in data else data
    if not isinstance(items, list) or not all(isinstance(x, dict) and {"input", "target"} <= x.keys() for x in items):
        raise InvalidInput(f"{path}: expected a JSON list of {{input, target}} or {{\"examples\": [...]}}")
    return [{"input": str(x["input"]), "target": str(x["target"])} for x in items]


def available_tasks(data_dir: str | Path) -> list[str]:
    """Task names (file stems) of the *.json files in ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MissingInput(
            f"--data_dir {data_dir}: no such folder (run `python data/prepare.py bbh` or point it at a "
            "folder of BBH task JSON files)")
    tasks = sorted(p.stem for p in data_dir.glob("*.json"))
    if not tasks:
        raise MissingInput(f"--data_dir {data_dir}: holds no *.json task files")
    return tasks


def resolve_tasks(data_dir: str | Path, tasks: Sequence[str] | None) -> list[str]:
    """The requested tasks (all in ``data_dir`` when None); unknown names raise, listing the valid ones."""
    return select_requested(tasks, available_tasks(data_dir), "--tasks", data_dir)


def score_bbh_task(task: str, items: Sequence[dict], generations: Sequence[str],
                   kind_targets: Sequence[str] | None = None) -> dict:
    """Per-task result with both scorers and every prediction kept.

    The answer kind is inferred from ``kind_targets`` (pass all of the task's targets, so that a
    ``--limit`` run extracts answers exactly as a full run does), else from the items' targets.
    """
    kind, vocabulary = infer_answer_kind(kind_targets or [it["target"] for it in items])
    predictions = []
    for index, (item, generation) in enumerate(zip(items, generations, strict=True)):
        extracted = extract_answer(generation, kind, vocabulary)
        predictions.append({
            "index": index, "input": item["input"], "target": item["target"], "generation": generation,
            "extracted": extracted, "exact": exact_match(extracted, item["target"]),
            "lenient": lenient_match(generation, item["target"]),
        })
    return {
        "task": task, "answer_kind": kind, "num_examples": len(items),
        "lenient": mean([p["lenient"] for p in predictions]),
        "exact": mean([p["exact"] for p in predictions]),
        "predictions": predictions,
    }


def _task_prompts(tokenizer: PreTrainedTokenizerBase, items: Sequence[dict], limit: int | None,
                  max_prompt_length: int) -> tuple[list[dict], list[list[int]], int]:
    exemplars, scored = items[:NUM_EXEMPLARS], items[NUM_EXEMPLARS:]
    if limit is not None:
        scored = scored[:limit]
    prompts, truncated = [], 0
    for item in scored:
        ids = tokenizer(build_bbh_prompt(exemplars, item["input"])).input_ids
        truncated += len(ids) > max_prompt_length
        prompts.append(truncate_left(ids, max_prompt_length, keep_first=tokenizer.bos_token_id))
    return list(scored), prompts, truncated


def run_bbh(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path,
            tasks: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 8,
            max_new_tokens: int = 32, output_dir: str | Path | None = None,
            max_length: int | None = None, metadata: dict | None = None) -> dict:
    """Evaluate BBH 3-shot; returns the summary (per task and macro averages of both scorers).

    All tasks' prompts go through one length-sorted generation pass. Prompts longer than
    ``max_length - max_new_tokens`` (default: the model's max positions) are cut from the left and
    counted. ``metadata`` (e.g. the model name) is stored with the settings. With ``output_dir``:
    ``tasks/<task>.json`` (every prediction), ``summary.json`` and ``summary.md`` are written there.
    """
    model.eval()
    names = resolve_tasks(data_dir, tasks)
    max_length = max_length or model.config.max_position_embeddings
    per_task, all_prompts, truncated = {}, [], {}
    for name in names:
        items = load_bbh_task(Path(data_dir) / f"{name}.json")
        scored, prompts, truncated[name] = _task_prompts(tokenizer, items, limit, max_length - max_new_tokens)
        per_task[name] = (scored, [it["target"] for it in items], len(all_prompts), len(all_prompts) + len(prompts))
        all_prompts.extend(prompts)
    generations = generate_batched(model, tokenizer, all_prompts, max_new_tokens, batch_size, desc="BBH")
    results = {name: score_bbh_task(name, scored, generations[start:end], targets)
               for name, (scored, targets, start, end) in per_task.items()}
    for name, result in results.items():
        result["num_truncated"] = truncated[name]
    settings = {**(metadata or {}), "limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "max_length": max_length, "num_exemplars": NUM_EXEMPLARS}
    summary = summarize_bbh(results, settings)
    if output_dir is not None:
        write_results(output_dir, "tasks", results, summary, bbh_markdown(summary))
    return summary


def summarize_bbh(results: dict[str, dict], settings: dict) -> dict:
    """Per-task accuracies and their macro averages (unweighted mean over tasks)."""
    tasks = {name: {k: r[k] for k in ("num_examples", "lenient", "exact", "answer_kind", "num_truncated")}
             for name, r in results.items()}
    return {
        "benchmark": "bbh", "settings": settings, "tasks": tasks,
        "macro_avg": {"lenient": mean([t["lenient"] for t in tasks.values()]),
                      "exact": mean([t["exact"] for t in tasks.values()])},
        "num_examples": sum(t["num_examples"] for t in tasks.values()),
        "num_truncated": sum(t["num_truncated"] for t in tasks.values()),
    }


def bbh_markdown(summary: dict) -> str:
    """Markdown table: one row per task plus the macro average, accuracies in %."""
    rows = [[name, t["num_examples"], f"{100 * t['lenient']:.1f}", f"{100 * t['exact']:.1f}"]
            for name, t in summary["tasks"].items()]
    rows.append(["**macro average**", summary["num_examples"], f"{100 * summary['macro_avg']['lenient']:.1f}",
                 f"{100 * summary['macro_avg']['exact']:.1f}"])
    return markdown_table(["task", "n", "lenient (paper) %", "exact %"], rows)

