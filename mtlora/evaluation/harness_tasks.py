"""lm-eval's own tasks on local data: which of its tasks to run, the data in its schema, and task configs.

lm-eval's yaml reads MMLU from the Hub dataset ``cais/mmlu`` and BBH from ``SaylorTwift/bbh``. To run
its tasks with no network, every leaf task we run gets, under one folder (``tasks_dir``):
- ``data/<benchmark data>/<name>/<split>.jsonl``: the local files in the schema lm-eval's yaml reads
  (MMLU: question, subject, choices [4 strings], answer 0-3, as cais/mmlu; BBH: input, target);
- ``configs/<task>.yaml``: ``include:`` lm-eval's own yaml of that task, then only ``dataset_path: json``,
  ``dataset_name: null`` and ``dataset_kwargs`` (``data_files`` and the Arrow ``cache_dir``). Prompts,
  few-shot exemplars and metrics come from lm-eval's file, and the task keeps lm-eval's name, so lm-eval's
  own groups (``mmlu``, ``mmlu_stem``, ``bbh_fewshot``, ...) pick it up.
- One addition, to ``bbh_fewshot`` only (``BBH_FILTERS``): lm-eval 0.4.13's bbh_fewshot has no filter, so a
  model whose answers start with a space (SmolLM2: every one) scores 0 on its literal ``exact_match,none``.
  The configs keep lm-eval's own pipeline under its name ``none`` and add lm-eval's ``remove_whitespace``
  filter as a second pipeline, so results carry both ``exact_match,none`` and
  ``exact_match,remove_whitespace`` (lm-eval aggregates both over the group).
The configs are written per run, not shipped: both paths they name (lm-eval's installed task folder and
the data folder chosen by --mmlu_dir / --bbh_dir) are machine-specific, and lm-eval's yaml has no variables.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtlora.evaluation.bbh import load_bbh_task
from mtlora.errors import MissingInput, UsageError
from mtlora.evaluation.mmlu import LETTERS, load_subject
from mtlora.evaluation.selection import select_requested


HF_CACHE = "hf_cache"  # the Arrow files ``datasets`` builds from the data, inside the tasks folder


@dataclass(frozen=True)
class LocalData:
    """One kind of local benchmark data: its flags, layout and the splits lm-eval's tasks read."""

    name: str
    dir_flag: str
    select_flag: str
    layout: str
    splits: tuple[str, ...]

    def has(self, data_dir: Path, name: str) -> bool:
        """Whether ``data_dir`` holds the files of task / subject ``name``."""
        if self.name == "bbh":
            return (data_dir / f"{name}.json").is_file()
        return all((data_dir / split / f"{name}_{split}.csv").is_file() for split in self.splits)


MMLU_DATA = LocalData("mmlu", "--mmlu_dir", "--subjects", "dev/<subject>_dev.csv and test/<subject>_test.csv", ("test", "dev"))
BBH_DATA = LocalData("bbh", "--bbh_dir", "--bbh_tasks", "<task>.json files (list of {input, target})", ("test",))


@dataclass(frozen=True)
class Benchmark:
    """An lm-eval group we run: its task folder inside ``lm_eval/tasks``, the local data it reads, and what the
    generated configs add to lm-eval's yaml besides the data location (``additions``)."""

    group: str
    folder: str
    data: LocalData
    additions: dict = field(default_factory=dict)


# lm-eval's default pipeline for generation tasks (named "none", as lm-eval names it when a yaml sets no filter),
# then lm-eval's own remove_whitespace filter (strip) as a second pipeline.
BBH_FILTERS = [{"name": "none", "filter": [{"function": "take_first"}]},
               {"name": "remove_whitespace", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}]

BENCHMARKS = {b.group: b for b in (
    Benchmark("mmlu", "mmlu/default", MMLU_DATA),                       # letters A-D, log-likelihood
    Benchmark("mmlu_continuation", "mmlu/continuation", MMLU_DATA),     # cloze: the answer text
    Benchmark("bbh_fewshot", "bbh/fewshot", BBH_DATA, {"filter_list": BBH_FILTERS}),  # 3 fixed exemplars, generation
)}


@dataclass(frozen=True)
class Selection:
    """What to run of one benchmark: local names (subjects / BBH tasks) and lm-eval's names for them."""

    benchmark: Benchmark
    names: list[str]
    tasks: list[str]          # lm-eval's leaf task names, one per name
    yaml_paths: list[Path]    # lm-eval's yaml of each leaf task
    complete: bool            # every leaf of lm-eval's group: request the group, so lm-eval aggregates it

    @property
    def requests(self) -> list[str]:
        return [self.benchmark.group] if self.complete else self.tasks


def lm_eval_tasks_root() -> Path:
    """lm-eval's installed task folder (``lm_eval/tasks``), found without importing lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("lm-eval is not installed: pip install -c constraints.txt -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def leaf_tasks(benchmark: Benchmark) -> dict[str, tuple[str, Path]]:
    """lm-eval's leaf tasks of ``benchmark``: {dataset_name (subject / BBH task): (task name, yaml path)}."""
    leaves = {}
    for path in sorted((lm_eval_tasks_root() / benchmark.folder).glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not path.name.startswith("_") and isinstance(config.get("task"), str) and "dataset_name" in config:
            leaves[config["dataset_name"]] = (config["task"], path)
    if not leaves:
        raise MissingInput(f"no lm-eval task yaml found in {lm_eval_tasks_root() / benchmark.folder}")
    return leaves


def select(benchmark: Benchmark, data_dir: str | Path, requested: Sequence[str] | None = None) -> Selection:
    """The leaf tasks to run: ``requested`` names (default: every lm-eval leaf with data in ``data_dir``).

    Raises naming the flag when the folder is missing, holds none of lm-eval's names, or a requested
    name is not one of lm-eval's or has no data.
    """
    data, data_dir = benchmark.data, Path(data_dir)
    if not data_dir.is_dir():
        raise MissingInput(f"{data.dir_flag} {data_dir}: no such folder (expected {data.layout})")
    leaves = leaf_tasks(benchmark)
    present = [name for name in leaves if data.has(data_dir, name)]
    if not present:
        raise MissingInput(f"{data.dir_flag} {data_dir}: holds none of lm-eval's {benchmark.group} "
                                f"names (expected {data.layout})")
    names = select_requested(requested, present, data.select_flag, data_dir)
    return Selection(benchmark, names, [leaves[n][0] for n in names], [leaves[n][1] for n in names],
                     complete=len(names) == len(leaves))


def write_local_tasks(selections: Sequence[Selection], data_dirs: dict[str, str | Path], tasks_dir: str | Path) -> Path:
    """Write the local data and one config per leaf task under ``tasks_dir``; returns the configs folder.

    ``data_dirs`` maps a data name ("mmlu", "bbh") to its local folder.
    """
    tasks_dir = Path(tasks_dir).resolve()
    configs = tasks_dir / "configs"
    for stale in (configs, tasks_dir / "data"):  # a config left by an earlier run would still be indexed
        shutil.rmtree(stale, ignore_errors=True)
    written: set[tuple[str, str]] = set()
    for selection in selections:
        data = selection.benchmark.data
        data_root = tasks_dir / "data" / data.name
        for name, task, lm_eval_yaml in zip(selection.names, selection.tasks, selection.yaml_paths, strict=True):
            if (data.name, name) not in written:  # mmlu and mmlu_continuation share the files
                _write_split_files(data, Path(data_dirs[data.name]), name, data_root / name)
                written.add((data.name, name))
            _write_config(configs / f"{task}.yaml", lm_eval_yaml, {
                split: str(data_root / name / f"{split}.jsonl") for split in data.splits}, tasks_dir / HF_CACHE,
                selection.benchmark.additions)
    return configs


def _write_split_files(data: LocalData, data_dir: Path, name: str, out: Path) -> None:
    if data.name == "mmlu":
        dev, test = load_subject(data_dir, name)
        splits = {split: [{"question": item["question"], "subject": name, "choices": item["choices"],
                           "answer": LETTERS.index(item["answer"])} for item in items]
                  for split, items in (("test", test), ("dev", dev))}
    else:
        splits = {"test": load_bbh_task(data_dir / f"{name}.json")}
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                            encoding="utf-8")


def _write_config(path: Path, lm_eval_yaml: Path, data_files: dict[str, str], cache_dir: Path,
                  additions: dict) -> None:
    """lm-eval's task yaml with the dataset location replaced and ``additions`` (the benchmark's) added."""
    config = {"include": str(lm_eval_yaml), "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": data_files, "cache_dir": str(cache_dir)}, **additions}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
