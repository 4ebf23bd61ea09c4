"""A multi-task instruction set built from the JSON tasks of the PyPI sdist ``bigbench==1.0.0``.

The task files are read straight from the .tar.gz (``bigbench-1.0.0/bigbench/benchmark_tasks/
<task>/task.json``); nothing is extracted or installed. Only top-level task files are used (tasks
whose examples live only in subtask folders are skipped). The 23 tasks BBH was built from are
always excluded, with everything under their folders. An example is usable when it has a string
``input`` and either ``target_scores`` with a single best option (multiple choice: the options
are listed in the instruction, the best one is the output) or a string ``target`` (a one-item list
counts; with several references the first is the output and all are kept as ``references`` in
the held-out file).
"""

from __future__ import annotations

import json
import random
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from data.sources import DataSourceError
from mtlora.evaluation.reporting import write_json, write_jsonl

TASKS_DIR = "benchmark_tasks"
# The BIG-bench tasks BBH was built from (folder names in bigbench==1.0.0).
BBH_SOURCE_TASKS = frozenset({
    "boolean_expressions", "causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton", "logical_deduction",
    "movie_recommendation", "multistep_arithmetic", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects", "web_of_lies", "word_sorting",
})


def task_path(member_name: str) -> list[str] | None:
    """Folders below ``benchmark_tasks/`` for a ``task.json`` member, else None."""
    parts = member_name.split("/")
    if parts[-1] != "task.json" or TASKS_DIR not in parts:
        return None
    return parts[parts.index(TASKS_DIR) + 1:-1]


def read_tasks(sdist: str | Path) -> dict[str, dict]:
    """Top-level task JSONs of the sdist, by folder name, BBH source tasks excluded."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise DataSourceError(
            f"--sdist {sdist}: no such file (get it with `pip download --no-deps bigbench==1.0.0 -d DIR`)")
    tasks = {}
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:  # sequential: one pass over the compressed stream
                folders = task_path(member.name)
                if member.isfile() and folders and len(folders) == 1 and folders[0] not in BBH_SOURCE_TASKS:
                    tasks[folders[0]] = _task_json(sdist, member.name, archive.extractfile(member).read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:  # not gzip, truncated, corrupt
        raise DataSourceError(f"--sdist {sdist}: not a complete .tar.gz ({type(error).__name__}: {error}); download "
                              "it again with `pip download --no-deps bigbench==1.0.0 -d DIR`") from None
    if not tasks:
        raise DataSourceError(f"--sdist {sdist}: no {TASKS_DIR}/<task>/task.json files inside")
    return tasks


def _task_json(sdist: Path, member: str, data: bytes) -> dict:
    """A task.json member of the sdist as a dict; raises naming the archive and member when it is not one."""
    try:
        content = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataSourceError(f"--sdist {sdist}: {member}: not UTF-8 text ({error.reason} at byte "
                              f"{error.start})") from None
    except json.JSONDecodeError as error:
        raise DataSourceError(f"--sdist {sdist}: {member}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(content, dict):
        raise DataSourceError(f"--sdist {sdist}: {member}: expected a JSON object, got {type(content).__name__}")
    return content


def example_record(task: str, example: dict, task_prefix: str = "") -> dict | None:
    """The instruction record of one example, or None when it has no usable input/target."""
    question = example.get("input")
    if not isinstance(question, str) or not question.strip():
        return None
    answer, references, options = _answer(example)
    if answer is None:
        return None
    instruction = f"{task_prefix.strip()}\n\n{question}" if task_prefix.strip() else question
    if options:
        instruction += "\nOptions:\n" + "\n".join(f"- {option}" for option in options)
    return {"instruction": instruction, "input": "", "output": answer, "task_type": task,
            "references": references}


def _answer(example: dict) -> tuple[str | None, list[str], list[str]]:
    """(output, acceptable answers, options shown) for one example."""
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        best = max(scores.values())
        winners = [option for option, score in scores.items() if score == best]
        if len(winners) != 1 or not all(isinstance(o, str) for o in scores):
            return None, [], []  # ambiguous best option
        return winners[0], winners, list(scores)
    target = example.get("target")
    targets = [target] if isinstance(target, str) else target
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t.strip() for t in targets):
        return targets[0], targets, []
    return None, [], []


def usable_records(task: str, content: dict) -> list[dict]:
    """All usable examples of a task, deduplicated on the instruction text (first kept)."""
    prefix = content.get("task_prefix", "") if isinstance(content.get("task_prefix"), str) else ""
    records, seen = [], set()
    for example in content.get("examples") or []:
        record = example_record(task, example, prefix) if isinstance(example, dict) else None
        if record is not None and record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    return records


def choose_tasks(eligible: Sequence[str], num_tasks: int | None, explicit: Sequence[str] | None,
                 seed: int) -> list[str]:
    """Explicit ``--tasks`` (validated) or a seeded sample of ``num_tasks`` eligible tasks, sorted."""
    if explicit:
        bbh = sorted(set(explicit) & BBH_SOURCE_TASKS)
        if bbh:
            raise DataSourceError(f"--tasks: {bbh} are BBH source tasks and always excluded")
        unknown = sorted(set(explicit) - set(eligible))
        if unknown:
            raise DataSourceError(f"--tasks: {unknown} are unknown or have too few usable examples; "
                                  f"eligible: {', '.join(eligible)}")
        return sorted(set(explicit))
    if num_tasks is None or num_tasks > len(eligible):
        raise DataSourceError(f"--num_tasks {num_tasks}: only {len(eligible)} eligible tasks "
                              f"(at least --min_examples usable examples each)")
    return sorted(random.Random(seed).sample(sorted(eligible), num_tasks))


def split_task(records: list[dict], eval_per_task: int, max_per_task: int | None,
               seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle; the first ``eval_per_task`` are held out, then up to ``max_per_task`` for training."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    held_out, rest = shuffled[:eval_per_task], shuffled[eval_per_task:]
    return rest[:max_per_task] if max_per_task is not None else rest, held_out


def prepare_bigbench(output_dir: str | Path, sdist: str | Path, num_tasks: int | None = None,
                     tasks: Sequence[str] | None = None, max_per_task: int | None = 200,
                     eval_per_task: int = 40, min_examples: int = 100, seed: int = 42) -> dict:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``tasks.json``; returns the tasks.json content."""
    contents = read_tasks(sdist)
    usable = {name: usable_records(name, content) for name, content in contents.items()}
    eligible = sorted(name for name, records in usable.items() if len(records) >= max(min_examples, eval_per_task + 1))
    chosen = choose_tasks(eligible, num_tasks, tasks, seed)
    train, held_out, counts = [], [], {}
    for name in chosen:
        task_train, task_eval = split_task(usable[name], eval_per_task, max_per_task, seed)
        train += [{k: v for k, v in r.items() if k != "references"} for r in task_train]
        held_out += task_eval
        counts[name] = {"usable": len(usable[name]), "train": len(task_train), "eval": len(task_eval),
                        "multiple_choice": any(isinstance(ex, dict) and "target_scores" in ex
                                               for ex in contents[name]["examples"])}
    random.Random(seed).shuffle(train)  # interleave tasks; the trainer may shuffle again
    write_jsonl(Path(output_dir) / "train.jsonl", train)
    write_jsonl(Path(output_dir) / "eval.jsonl", held_out)
    summary = {"source": str(sdist), "seed": seed, "num_tasks": len(chosen), "max_per_task": max_per_task,
               "eval_per_task": eval_per_task, "min_examples": min_examples, "num_train": len(train),
               "num_eval": len(held_out), "excluded_bbh_source_tasks": sorted(BBH_SOURCE_TASKS),
               "num_eligible_tasks": len(eligible), "tasks": counts}
    write_json(Path(output_dir) / "tasks.json", summary)
    return summary
