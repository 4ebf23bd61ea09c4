"""lm-eval's own MMLU and BBH tasks on a model object (a base model with our adapter attached).

Our evaluators (mmlu.py, bbh.py) implement the paper's protocol; this module gives the numbers the rest
of the field reports by running lm-eval itself: the model is wrapped in lm-eval's ``HFLM``, lm-eval's
own tasks run on local data (harness_tasks.py: only the data location differs from lm-eval's yaml), and
lm-eval's metrics come back under lm-eval's names, ``<metric>,<filter>``:
- ``mmlu``: the letters " A".." D" scored by log-likelihood after "Answer:" (header line, no "Question: "
  prefix, question stripped); ``acc,none``. lm-eval's default is 0-shot; ``num_fewshot`` sets the dev
  exemplars (first n) of the MMLU tasks, as lm-eval's --num_fewshot does.
- ``mmlu_continuation``: the four answer texts scored as continuations of "Question: ...\\nAnswer:";
  ``acc,none`` and ``acc_norm,none`` (log-likelihood divided by the answer's length in bytes).
- ``bbh_fewshot``: 3 fixed exemplars from lm-eval's yaml (every test item is scored), greedy generation
  until "Q", a blank line or EOS; ``exact_match,none`` (lm-eval's literal match) and
  ``exact_match,remove_whitespace`` (the same after lm-eval's remove_whitespace filter, the one addition
  to lm-eval's config, see harness_tasks.py).
Groups (``mmlu`` and its four categories, ``bbh_fewshot``) are aggregated by lm-eval (mean weighted by
size) when every leaf task of the group runs; a subset runs as separate leaf tasks. lm-eval's requests (greedy
generation, log-likelihoods) run on this package's batched paths by default (:mod:`mtlora.evaluation.harness_lm`:
in float32 the same outputs as lm-eval's ``HFLM``); ``engine="hflm"`` keeps lm-eval's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput
from mtlora.evaluation.harness_tasks import (BENCHMARKS, HF_CACHE, MMLU_DATA, Selection, lm_eval_tasks_root, select,
                                              write_local_tasks)
from mtlora.evaluation.reporting import markdown_table, write_json, write_results
from mtlora.evaluation.selection import check_choice

ENGINES = ("batched", "hflm")  # who runs lm-eval's requests: mtlora.evaluation.harness_lm, or lm-eval's own HFLM

STDERR_MARK = "_stderr,"


def resolve_benchmarks(benchmarks: Sequence[str], mmlu_dir: str | Path | None, bbh_dir: str | Path | None,
                       subjects: Sequence[str] | None = None, bbh_tasks: Sequence[str] | None = None) -> list[Selection]:
    """One Selection per requested lm-eval group; raises naming the flag on bad input (no model needed)."""
    unknown = [name for name in benchmarks if name not in BENCHMARKS]
    if unknown or not benchmarks:
        raise InvalidInput(f"--tasks: unknown {unknown}; choose from {', '.join(BENCHMARKS)}")
    selections = []
    for name in dict.fromkeys(benchmarks):
        benchmark = BENCHMARKS[name]
        mmlu = benchmark.data is MMLU_DATA
        data_dir = mmlu_dir if mmlu else bbh_dir
        if data_dir is None:
            raise InvalidInput(f"{benchmark.data.dir_flag} is required for {name}")
        selections.append(select(benchmark, data_dir, subjects if mmlu else bbh_tasks))
    return selections


def run_harness(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, benchmarks: Sequence[str] = tuple(BENCHMARKS),
                mmlu_dir: str | Path | None = None, bbh_dir: str | Path | None = None,
                subjects: Sequence[str] | None = None, bbh_tasks: Sequence[str] | None = None,
                limit: int | None = None, batch_size: int | str = 8, num_fewshot: int | None = None,
                output_dir: str | Path | None = None, metadata: dict | None = None, engine: str = "batched",
                rows_per_batch: int | None = None) -> dict:
    """Run lm-eval's ``benchmarks`` (mmlu, mmlu_continuation, bbh_fewshot) on local data; returns the summary
    with lm-eval's per-item records (prompts included) under ``samples``.

    ``limit``: the first n test items of every leaf task (lm-eval's --limit). ``num_fewshot``: MMLU tasks
    only (None: lm-eval's default, 0). ``engine``: ``batched`` runs lm-eval's requests (greedy generation,
    log-likelihoods) through this package's batched paths (:mod:`mtlora.evaluation.harness_lm`, ``rows_per_batch``
    rows per forward, None: automatic), ``hflm`` through lm-eval's own ``HFLM`` (``batch_size``). With ``output_dir``: ``summary.json``, ``summary.md``,
    ``lm_eval_results.json`` (lm-eval's own results, without samples), ``samples/<task>.json`` and the
    generated configs and data under ``lm_eval_tasks/``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_choice("--harness_engine", engine, ENGINES)
    selections = resolve_benchmarks(benchmarks, mmlu_dir, bbh_dir, subjects, bbh_tasks)
    start = time.time()
    with _tasks_folder(output_dir) as tasks_dir:
        configs = write_local_tasks(selections, {"mmlu": mmlu_dir, "bbh": bbh_dir}, tasks_dir)
        manager, requested = load_tasks(selections, configs, num_fewshot)
        if engine == "batched":
            from mtlora.evaluation.harness_lm import BatchedLM

            lm = BatchedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, rows_per_batch=rows_per_batch)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = simple_evaluate(lm, tasks=requested, limit=limit, log_samples=True, task_manager=manager)
    settings = {**(metadata or {}), "lm_eval_version": _lm_eval_version(), "tasks": [s.benchmark.group for s in selections],
                "requested": {s.benchmark.group: s.requests for s in selections}, "limit": limit,
                "batch_size": batch_size, "engine": engine, "num_fewshot": num_fewshot, "n-shot": _shots_per_group(selections, raw["n-shot"]),
                "mmlu_dir": str(mmlu_dir) if mmlu_dir else None, "bbh_dir": str(bbh_dir) if bbh_dir else None,
                "seconds": round(time.time() - start, 1)}
    summary = summarize_harness(raw, settings)
    if output_dir is not None:
        samples = {task: {"task": task, "samples": [_trim_sample(s) for s in items]}
                   for task, items in raw["samples"].items()}
        write_results(output_dir, "samples", samples, summary, harness_markdown(summary))
        write_json(Path(output_dir) / "lm_eval_results.json", _jsonable({k: v for k, v in raw.items() if k != "samples"}))
    summary["samples"] = raw["samples"]  # lm-eval's per-item records, in memory only
    return summary


def load_tasks(selections: Sequence[Selection], configs: Path, num_fewshot: int | None):
    """(TaskManager, task/group objects to evaluate): lm-eval's task folders of the selections, then
    ``configs`` (whose tasks replace lm-eval's of the same name). Raises if any task escaped the override."""
    from lm_eval.tasks import TaskManager

    folders = list(dict.fromkeys(lm_eval_tasks_root() / s.benchmark.folder for s in selections))
    with _quiet("lm_eval.tasks._index"):  # one "overrides existing task" warning per task: all expected
        manager = TaskManager(include_path=[*folders, configs], include_defaults=False)
    requested = []
    for selection in selections:
        loaded = manager.load(selection.requests)
        for name, task in loaded["tasks"].items():
            source = Path(task.config.metadata.get("config_source", ""))
            if source.parent != configs or task.config.dataset_path != "json":
                raise RuntimeError(f"lm-eval task {name} would read {task.config.dataset_path} (config {source}), "
                                   f"not the local data of {configs}")
            if num_fewshot is not None and selection.benchmark.data is MMLU_DATA:
                task.set_config(key="num_fewshot", value=num_fewshot)  # what lm-eval's --num_fewshot does
        requested += [loaded["groups"][selection.benchmark.group]] if selection.complete else list(loaded["tasks"].values())
    return manager, requested


def _shots_per_group(selections: Sequence[Selection], n_shot: dict[str, int]) -> dict[str, int | list[int]]:
    """The exemplar count lm-eval used per group (a list when its tasks differ)."""
    shots = {s.benchmark.group: sorted({n_shot[task] for task in s.tasks}) for s in selections}
    return {group: values[0] if len(values) == 1 else values for group, values in shots.items()}


def summarize_harness(raw: dict, settings: dict) -> dict:
    """lm-eval's metrics per leaf task and per group, under lm-eval's keys ("acc,none", ...)."""
    groups = set(raw.get("group_subtasks", {}))
    results = {name: values for name, values in raw["results"].items() if name not in groups}
    return {
        "benchmark": "lm-eval", "settings": settings,
        "groups": {name: raw["results"][name] for name in raw.get("group_subtasks", {}) if name in raw["results"]},
        "group_subtasks": raw.get("group_subtasks", {}), "results": results,
        "n-samples": raw.get("n-samples", {}), "versions": raw.get("versions", {}),
        "higher_is_better": raw.get("higher_is_better", {}),
    }


def metric_keys(values: dict) -> list[str]:
    """lm-eval's metric keys of one result ("acc,none", "exact_match,get-answer", ...), stderr excluded."""
    return [key for key, value in values.items() if "," in key and STDERR_MARK not in key and isinstance(value, (int, float))]


def harness_markdown(summary: dict) -> str:
    """Markdown: groups, then leaf tasks; every lm-eval metric in % with its standard error."""
    sections = [f"lm-eval {summary['settings']['lm_eval_version']}, limit {summary['settings']['limit']}, "
                f"n-shot {summary['settings']['n-shot']}"]
    for title, rows in (("groups", summary["groups"]), ("tasks", summary["results"])):
        if rows:
            keys = list(dict.fromkeys(k for values in rows.values() for k in metric_keys(values)))
            table = [[name, values.get("sample_len", "")]
                     + [_percent(values, key) for key in keys] for name, values in rows.items()]
            sections.append(f"### {title}\n\n" + markdown_table([title[:-1], "n", *keys], table))
    return "\n\n".join(sections)


def _percent(values: dict, key: str) -> str:
    if key not in values:
        return ""
    metric, _, filter_name = key.partition(",")
    stderr = values.get(f"{metric}_stderr,{filter_name}")
    text = f"{100 * values[key]:.1f}"
    return f"{text} ± {100 * stderr:.1f}" if isinstance(stderr, (int, float)) else text


def _trim_sample(sample: dict) -> dict:
    """lm-eval's per-item record without the prompts (they repeat the few-shot context per choice)."""
    kept = {key: sample[key] for key in ("doc_id", "doc", "target", "filtered_resps", "filter") if key in sample}
    return _jsonable({**kept, **{metric: sample[metric] for metric in sample.get("metrics", [])}})


def _jsonable(payload):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(payload, default=handle_non_serializable))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@contextlib.contextmanager
def _tasks_folder(output_dir: str | Path | None) -> Iterator[Path]:
    """``<output_dir>/lm_eval_tasks`` (configs and data kept with the results; the Arrow cache that
    ``datasets`` built from the data is removed afterwards), or a temporary folder."""
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as folder:
            yield Path(folder)
        return
    folder = Path(output_dir) / "lm_eval_tasks"
    try:
        yield folder
    finally:
        shutil.rmtree(folder / HF_CACHE, ignore_errors=True)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
