"""BIG-Bench Hard, 3-shot: prompts, data loading, scoring, difficulty groups and result files.

Prompt format of the paper: the first three items of a task file are the exemplars, written as
"Q: {input}\\nA: {target}\\n\\n", then "Q: {input}\\nA:" for the scored item. The exemplars are
never scored. Greedy decoding, 32 new tokens by default, ending at EOS only (as the reference does).

Two scorers (:mod:`mtlora.evaluation.answers`): ``lenient`` (the paper's) and ``extracted_match`` (ours,
stricter; not lm-eval's bbh_fewshot, which ``eval_harness.py`` runs). Over-long prompts
(``TRUNCATIONS``): ``reference`` keeps the first 2,048 tokens, as the reference scripts' tokenizer call
does (no LLaMA-2 prompt is that long); ``fit`` cuts from the left so prompt and generation fit the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput, MissingInput
from mtlora.evaluation import distributed
from mtlora.evaluation.answers import exact_match, extract_answer, infer_answer_kind, lenient_match
from mtlora.evaluation.batching import (REFERENCE_MAX_LENGTH, TRUNCATIONS, generate_batched,
                                        truncate_left, truncate_right)
from mtlora.evaluation.reporting import markdown_table, mean, write_results
from mtlora.evaluation.selection import check_choice, select_requested
from mtlora.prompts import encode_batch

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
SCORERS = ("lenient", "extracted_match")
# The paper's task groups by difficulty (Table S5; Table 6 reports the mean accuracy of each group).
BBH_DIFFICULTY = {
    "Easy": ("formal_fallacies", "boolean_expressions", "movie_recommendation", "sports_understanding",
             "hyperbaton", "navigate", "web_of_lies"),
    "Medium": ("causal_judgement", "snarks", "object_counting", "logical_deduction_three_objects",
               "date_understanding", "tracking_shuffled_objects_three_objects", "disambiguation_qa", "word_sorting"),
    "Hard": ("logical_deduction_five_objects", "logical_deduction_seven_objects", "penguins_in_a_table",
             "reasoning_about_colored_objects", "salient_translation_error_detection",
             "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects", "dyck_languages",
             "geometric_shapes", "ruin_names", "temporal_sequences", "multistep_arithmetic_two"),
}


def build_bbh_prompt(exemplars: Sequence[dict], question: str) -> str:
    """The few-shot prompt: each exemplar as "Q: ..\\nA: ..\\n\\n", then "Q: {question}\\nA:"."""
    shots = "".join(f"Q: {ex['input']}\nA: {ex['target']}\n\n" for ex in exemplars)
    return f"{shots}Q: {question}\nA:"


def load_bbh_task(path: str | Path) -> list[dict]:
    """Items of one task file: a JSON list of {input, target}, or upstream's {"examples": [...]}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    items = data["examples"] if isinstance(data, dict) and "examples" in data else data
    if not isinstance(items, list):
        raise InvalidInput(f"{path}: expected a JSON list of {{input, target}} or {{\"examples\": [...]}}")
    for index, item in enumerate(items):
        missing = [key for key in ("input", "target") if not isinstance(item, dict) or key not in item]
        if missing:
            raise InvalidInput(f"{path}: item {index} (counting from 0) has no {' or '.join(missing)}; "
                               "every item needs an input and a target")
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


def load_bbh(data_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """{task: items} of the requested tasks, every file read and checked (cheap: the CLI runs it before
    loading a model). A task needs more items than its exemplars: one holding only those is refused, as
    scoring it would add a 0/0 task to the macro average."""
    data = {}
    for name in resolve_tasks(data_dir, tasks):
        path = Path(data_dir) / f"{name}.json"
        items = load_bbh_task(path)
        if len(items) <= NUM_EXEMPLARS:
            raise InvalidInput(f"{path}: {len(items)} items, none left to score after the {NUM_EXEMPLARS} exemplars; "
                               "remove the file from --data_dir or leave the task out of --tasks")
        data[name] = items
    return data


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
            "extracted": extracted, "extracted_match": exact_match(extracted, item["target"]),
            "lenient": lenient_match(generation, item["target"]),
        })
    return {
        "task": task, "answer_kind": kind, "num_examples": len(items),
        **{scorer: mean([p[scorer] for p in predictions]) for scorer in SCORERS},
        "predictions": predictions,
    }


def task_prompts(tokenizer: PreTrainedTokenizerBase, items: Sequence[dict], limit: int | None, truncation: str,
                 max_length: int) -> tuple[list[dict], list[list[int]], int]:
    """(scored items, their prompt token ids, how many were cut), one tokenizer call per task.

    ``max_length`` is the prompt's token limit: ``reference`` keeps its first tokens, ``fit`` its last
    (the BOS stays in front).
    """
    exemplars, scored = items[:NUM_EXEMPLARS], list(items[NUM_EXEMPLARS:])
    if limit is not None:
        scored = scored[:limit]
    full = encode_batch(tokenizer, [build_bbh_prompt(exemplars, item["input"]) for item in scored])
    if truncation == "reference":
        prompts = [truncate_right(ids, max_length) for ids in full]
    else:
        prompts = [truncate_left(ids, max_length, keep_first=tokenizer.bos_token_id) for ids in full]
    return scored, prompts, sum(len(ids) > max_length for ids in full)


def run_bbh(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path,
            tasks: Sequence[str] | None = None, limit: int | None = None, batch_size: int | None = 8,
            max_new_tokens: int = 32, output_dir: str | Path | None = None,
            max_length: int | None = None, metadata: dict | None = None, truncation: str = "reference",
            share_prefix: bool = True, stop_strings: Sequence[str] = ()) -> dict:
    """Evaluate BBH 3-shot; returns the summary (per task, macro averages and difficulty groups of both scorers).

    Over-long prompts (``truncation``): ``reference`` keeps the first ``max_length`` tokens (default 2,048);
    ``fit`` cuts from the left so prompt + ``max_new_tokens`` fit ``max_length`` (default: the model's max
    positions). Cut prompts are counted. ``batch_size=None`` chooses it automatically; ``share_prefix`` runs
    each task's exemplars once (the same results up to floating-point rounding); ``stop_strings`` end a
    generation early (default: EOS only, as the reference). ``metadata`` (e.g. the model name) is stored with
    the settings. With ``output_dir``: ``tasks/<task>.json`` (every prediction), ``summary.json`` and
    ``summary.md``.
    """
    check_choice("--truncation", truncation, TRUNCATIONS)
    model.eval()
    data = load_bbh(data_dir, tasks)
    if max_length is None:
        max_length = REFERENCE_MAX_LENGTH if truncation == "reference" else model.config.max_position_embeddings
    prompt_limit = max_length if truncation == "reference" else max_length - max_new_tokens
    per_task, all_prompts, groups, truncated = {}, [], [], {}
    for name, items in data.items():
        scored, prompts, truncated[name] = task_prompts(tokenizer, items, limit, truncation, prompt_limit)
        per_task[name] = (scored, [it["target"] for it in items], len(all_prompts), len(all_prompts) + len(prompts))
        all_prompts += prompts
        groups += [name] * len(prompts)
    generations = generate_batched(model, tokenizer, all_prompts, max_new_tokens, batch_size, desc="BBH",
                                   groups=groups, share_prefix=share_prefix, stop_strings=stop_strings)
    results = {name: score_bbh_task(name, scored, generations[start:end], targets)
               for name, (scored, targets, start, end) in per_task.items()}
    for name, result in results.items():
        result["num_truncated"] = truncated[name]
    settings = {**(metadata or {}), "limit": limit, "batch_size": batch_size or "auto", "max_new_tokens": max_new_tokens,
                "max_length": max_length, "truncation": truncation, "num_exemplars": NUM_EXEMPLARS,
                "share_prefix": share_prefix, "stop_strings": list(stop_strings)}
    summary = summarize_bbh(results, settings)
    if output_dir is not None and distributed.is_main():
        write_results(output_dir, "tasks", results, summary, bbh_markdown(summary))
    return summary


def accuracy_by_difficulty(per_task: dict[str, float]) -> dict[str, float]:
    """Table 6 of the paper from per-task accuracies: the mean of each difficulty group (Table S5) over
    the tasks present, and ``Overall``, the mean over all given tasks. Groups with no task are left out."""
    groups = {group: [per_task[t] for t in names if t in per_task] for group, names in BBH_DIFFICULTY.items()}
    return {**{group: mean(values) for group, values in groups.items() if values},
            "Overall": mean(list(per_task.values()))}


def summarize_bbh(results: dict[str, dict], settings: dict) -> dict:
    """Per-task accuracies, their macro averages (unweighted mean over tasks) and difficulty-group means."""
    tasks = {name: {k: r[k] for k in ("num_examples", *SCORERS, "answer_kind", "num_truncated")}
             for name, r in results.items()}
    return {
        "benchmark": "bbh", "settings": settings, "tasks": tasks,
        "macro_avg": {scorer: mean([t[scorer] for t in tasks.values()]) for scorer in SCORERS},
        "difficulty": {scorer: accuracy_by_difficulty({n: t[scorer] for n, t in tasks.items()}) for scorer in SCORERS},
        "difficulty_tasks": {group: sum(t in tasks for t in names) for group, names in BBH_DIFFICULTY.items()},
        "num_examples": sum(t["num_examples"] for t in tasks.values()),
        "num_truncated": sum(t["num_truncated"] for t in tasks.values()),
    }


def bbh_markdown(summary: dict) -> str:
    """Markdown: the difficulty groups (Table 6), then one row per task plus the macro average, in %."""
    header = ["lenient (paper) %", "extracted_match (ours) %"]
    difficulty = summary["difficulty"]
    counts = {**summary["difficulty_tasks"], "Overall": len(summary["tasks"])}
    groups = markdown_table(["difficulty", "tasks", *header],
                            [[group, counts[group], *(f"{100 * difficulty[s][group]:.2f}" for s in SCORERS)]
                             for group in difficulty["lenient"]])
    rows = [[name, t["num_examples"], *(f"{100 * t[s]:.1f}" for s in SCORERS)] for name, t in summary["tasks"].items()]
    rows.append(["**macro average**", summary["num_examples"], *(f"{100 * summary['macro_avg'][s]:.1f}" for s in SCORERS)])
    return f"{groups}\n\n{markdown_table(['task', 'n', *header], rows)}"
