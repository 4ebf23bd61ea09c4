"""Run a table end to end: train every row at every seed (resumable), evaluate, aggregate, write the table.

Each job (row x track x seed) lives in ``<results_dir>/<scale>/runs/<track>/<row>-s<seed>-<key>``, keyed
by everything that determines it (:class:`mtlora.experiments.jobs.Job`), so a configuration shared by two
tables is trained once, a finished job is never redone, and a stale or foreign one is never reused. Jobs
can run in pieces (separate or interrupted invocations, on other machines: copy the run folders back) and
``--assemble_only`` tabulates whatever has finished.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from mtlora.checkpoint import is_adapter_checkpoint
from mtlora.errors import UsageError
from mtlora.evaluation.reporting import read_json, write_json, write_jsonl
from mtlora.experiments import dry_run, results
from mtlora.experiments.jobs import REPO_ROOT, Job, RunSettings, as_cli
from mtlora.experiments.registry import BASE, BASELINE_KEY, SCALES, TABLES, Row, Scale, Table, Track
from mtlora.loading import is_saved_model, load_model_config
from mtlora.trainer import PROGRESS_FILE  # written by train.py and the evaluator
from mtlora.training_data import read_instruction_records

LIBRARY = Row("library", "per-task LoRA library", {"method": "lora"}, kind="library")


@contextmanager
def locked(run_dir: Path):
    """Serialise work on one run folder across concurrently running table scripts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -------------------------------------------------------------------------------------------- planning

def table_tracks(table: Table, scale: Scale, settings: RunSettings) -> list[Track]:
    """The training sets a table runs on: the scale's tracks, or one per task count of the pool."""
    tracks = [t for t in scale.tracks if table.tracks is None or t.name in table.tracks]
    if not table.task_counts:
        return tracks
    return task_count_tracks(scale, settings)


def task_count_tracks(scale: Scale, settings: RunSettings) -> list[Track]:
    """Training sets of the first N tasks of the pool (same examples per task at every N); the table picks their
    suites (held-out and BBH at the small scale), without lm-eval's harness rows."""
    base = scale.tracks[0]
    train = read_instruction_records(base.train_data)
    heldout = read_instruction_records(base.heldout_data, "--heldout_data")  # keeps references
    by_task: dict[str, list[dict]] = {}
    for record in train:
        by_task.setdefault(record["task_type"], []).append(record)
    per_task = scale.task_count_examples
    eligible = sorted(t for t, records in by_task.items() if len(records) >= per_task)
    tracks = []
    for count in scale.task_counts:
        if count > len(eligible):
            raise SystemExit(f"error: task count {count} exceeds the {len(eligible)} tasks with at least {per_task} "
                             f"training examples in {base.train_data}")
        chosen = eligible[:count]
        folder = settings.results_dir / scale.name / "data" / f"tasks{count}"
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "train.jsonl", [r for t in chosen for r in by_task[t][:per_task]])
        write_jsonl(folder / "eval.jsonl", [r for r in heldout if r["task_type"] in chosen])
        tracks.append(replace(base, name=f"tasks{count}", train_data=str(folder / "train.jsonl"),
                              heldout_data=str(folder / "eval.jsonl"), harness_rows=()))
    return tracks


def plan_jobs(table: Table, scale: Scale, tracks: list[Track], settings: RunSettings, rows: list[Row],
              with_base: bool) -> list[Job]:
    """Every job of the table in execution order (a row's dependencies first, each job once)."""
    jobs: dict[tuple, Job] = {}

    def add(job: Job) -> Job:
        return jobs.setdefault((job.track.name, job.row.key, job.seed), job)

    for track in tracks:
        if with_base:
            add(Job(settings, scale, table, track, BASE, settings.seeds[0]))
        untunable = [r.key for r in rows if r.kind == "merge_tuned" and track.heldout_data is None]
        if untunable:
            print(f"track {track.name} has no held-out split to tune merges on: rows {', '.join(untunable)} left out")
        for seed in settings.seeds:
            for row in (r for r in rows if r.key not in untunable):
                depends_on = None
                if row.needs_library:
                    depends_on = add(Job(settings, scale, table, track, LIBRARY, seed))
                elif row.kind == "uniform":  # the baseline row's adapter, evaluated with uniform routing
                    baseline = next(r for r in table.rows if r.key == BASELINE_KEY)
                    depends_on = add(Job(settings, scale, table, track, baseline, seed))
                add(Job(settings, scale, table, track, row, seed, depends_on))
    return list(jobs.values())


# ------------------------------------------------------------------------------------------- execution

_STEPS: set[subprocess.Popen] = set()  # the step processes running now (one per running job)


def stop_steps_with_the_runner() -> None:
    """SIGTERM (``kill``, a scheduler's time limit) ends the runner's running steps with it, as Ctrl-C does, instead
    of leaving them writing into run folders whose locks died with the runner; the next run resumes them."""
    def stop(signum, frame):
        for process in list(_STEPS):
            process.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def run_step(command: list[str], log_path: Path, progress_dir: Path, bar: tqdm, phase: str,
             env: dict | None = None) -> float:
    """Run a step, streaming its output to a log file and its progress to the console; returns its seconds."""
    progress_file = progress_dir / PROGRESS_FILE
    progress_file.unlink(missing_ok=True)
    started = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _STEPS.add(process)
        try:
            while True:
                try:
                    process.wait(timeout=2)  # returns as soon as the step ends
                    break
                except subprocess.TimeoutExpired:
                    bar.set_postfix_str(f"{phase} {_progress_text(progress_file, started)}", refresh=True)
        except BaseException:  # the runner is stopping: so does its step
            process.terminate()
            process.wait()
            raise
        finally:
            _STEPS.discard(process)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().split("\n")[-30:])
        raise RuntimeError(f"step failed (exit {process.returncode}), log {log_path}:\n{tail}")
    return time.time() - started


def _progress_text(progress_file: Path, started: float) -> str:
    """"step 120/400, ETA 3m" from the step's progress file (written by train.py and the evaluator)."""
    try:
        progress = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        return f"{time.time() - started:.0f}s"
    done, total = progress.get("done", 0), progress.get("total") or 0
    eta = (time.time() - started) / done * (total - done) if done and total else None
    text = f"{progress.get('what', '')} {done}/{total}"
    return text + (f", ETA {eta / 60:.1f}m" if eta is not None else "")


def visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of the ``index``-th GPU this process sees (it may itself see a subset)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


def weights_needed(jobs: list[Job]) -> set[Path]:
    """Run folders whose weights a job still to do reads: the library of an unfinished merge, LoRAHub or MoLE job,
    the HydraLoRA run of an unfinished naive-averaging job."""
    return {j.depends_on.run_dir for j in jobs if j.depends_on is not None and j.pending_suites()}


def finished_without_weights(job: Job, needed: set[Path]) -> bool:
    """A run trained and evaluated elsewhere whose weights were not kept (results moved without them, as
    scripts/pack_results.py packs them): nothing is left to do unless another job needs its weights."""
    if job.run_dir in needed:
        return False
    if job.kind == "library":
        return True  # read by its dependents only, all finished
    if job.kind in ("adapter", "mole") and not (job.run_dir / "train_summary.json").is_file():
        return False
    return job.kind in ("adapter", "mole", "merge", "merge_tuned", "lorahub") and not job.pending_suites()


def execute(job: Job, bar: tqdm, gpu: int | None = None, needed: frozenset = frozenset()) -> None:
    """Train (or merge / compose) one job unless finished, then evaluate its pending suites (on ``gpu``, when
    given: the job's processes see that one GPU). ``needed``: run folders whose weights other jobs still read."""
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": visible_gpu(gpu)}
    if finished_without_weights(job, needed):
        return
    with locked(job.run_dir):
        write_json(job.run_dir / "identity.json", job.identity)
        timings = read_json(job.run_dir / "timings.json") or {}
        checkpoint, model = _produce(job, bar, timings, env)
        if job.kind == "library":
            write_json(job.run_dir / "timings.json", timings)
            return
        if job.pending_suites():
            command = job.evaluation_command(checkpoint, model)
            timings["eval"] = timings.get("eval", 0.0) + run_step(command, job.run_dir / "eval.log", job.run_dir,
                                                                 bar, f"{job.row.key} s{job.seed}: evaluating", env)
        write_json(job.run_dir / "timings.json", timings)


def _produce(job: Job, bar: tqdm, timings: dict, env: dict | None) -> tuple[Path | None, str | None]:
    """Make the job's adapter or model if it is not there yet; returns (adapter folder, model) to evaluate."""
    phase = f"{job.row.key} s{job.seed}"
    model = job.settings.model_name_or_path
    run_dir = job.run_dir
    if job.kind == "base":
        return None, model
    if job.kind == "uniform":
        return job.depends_on.run_dir, model
    if job.kind == "library":
        command = job.training_command(job.train_flags, run_dir, {"train_per_task": True})
    elif job.kind == "adapter":
        command = None if is_adapter_checkpoint(run_dir) else job.training_command(job.train_flags, run_dir)
    elif job.kind == "mole":
        flags = {"method": "mole", "lora_library": str(job.depends_on.run_dir)}
        command = None if is_adapter_checkpoint(run_dir) else job.training_command(flags, run_dir)
    elif job.kind == "lorahub":
        command = None if is_adapter_checkpoint(run_dir) else [
            job.launcher()[0], str(REPO_ROOT / "compose_lorahub.py"), "--lora_checkpoints", ",".join(job.library_sample()),
            "--fewshot_from_bbh", job.settings.bbh_dir, "--seed", str(job.seed), "--output_dir", str(run_dir),
            "--device", job.device, *as_cli(job.model_flags())]
    elif job.kind == "merge_tuned":
        merged = run_dir / "merged"
        if not is_saved_model(merged):
            shutil.rmtree(merged, ignore_errors=True)  # left without its weights when the results were moved
            timings["produce"] = timings.get("produce", 0.0) + tune_merge(job, bar, env)
        return None, str(merged)
    else:  # merge
        merged = run_dir / "merged"
        if not is_saved_model(merged):
            shutil.rmtree(merged, ignore_errors=True)
            seed = {"seed": job.seed} if job.row.flags["method"].startswith("dare") else {}
            timings["produce"] = merge(job, {**job.row.flags, **seed}, merged, bar, env)
        return None, str(merged)
    if command is not None:
        if job.kind != "library":
            shutil.rmtree(run_dir / "eval", ignore_errors=True)  # scores of an earlier adapter are stale
        timings["produce"] = timings.get("produce", 0.0) + run_step(command, run_dir / "train.log", run_dir, bar,
                                                                   f"{phase}: training", env)
    return run_dir, model



def merge(job: Job, flags: dict, output_dir: Path, bar: tqdm, env: dict | None) -> float:
    """merge_loras.py of the job's library with ``flags`` into ``output_dir``; returns its seconds."""
    command = [job.launcher()[0], str(REPO_ROOT / "merge_loras.py"), "--lora_checkpoints", str(job.depends_on.run_dir),
               "--output_dir", str(output_dir), "--device", job.device, *as_cli({**flags, **job.model_flags()})]
    return run_step(command, job.run_dir / "merge.log", job.run_dir, bar, f"{job.row.key} s{job.seed}: merging", env)


def tune_merge(job: Job, bar: tqdm, env: dict | None) -> float:
    """Merge at every point of the row's grid, score each on the held-out split, keep the best as ``merged``.

    Each point's scores stay in ``grid/<point>/`` (an interrupted search resumes), its weights only while it is the
    best so far; ``tuning.json`` records every point's held-out score and the choice (the first of equal bests, in
    grid order). Returns the seconds spent."""
    from mtlora.experiments.results import METRICS

    heldout = next(m for m in METRICS if m.name == "heldout")
    seconds, scores = 0.0, {}
    grid = {spec.name: spec for spec in job.merge_grid()}
    for name, spec in grid.items():
        point = job.run_dir / "grid" / name
        if heldout.average(point) is None:
            seconds += merge(job, merge_flags(spec), point / "merged", bar, env)
            command = job.evaluation_command(None, str(point / "merged"), suites=("heldout",), run_dir=point)
            seconds += run_step(command, job.run_dir / "eval.log", point, bar, f"{job.row.key} s{job.seed}: tuning", env)
        scores[name] = heldout.average(point)
        best = max(scores, key=lambda n: scores[n])  # the first of equal bests
        for other in scores:
            if other != best:
                shutil.rmtree(job.run_dir / "grid" / other / "merged", ignore_errors=True)
    chosen, kept = grid[best], job.run_dir / "grid" / best / "merged"
    if not is_saved_model(kept):  # an interrupted search: merge the best again
        seconds += merge(job, merge_flags(chosen), kept, bar, env)
    write_json(job.run_dir / "tuning.json", {"selected_on": "heldout", "scores": scores, "chosen": best,
                                             "lambda": chosen.weight, "density": chosen.density, "seed": chosen.seed})
    kept.rename(job.run_dir / "merged")
    return seconds


def merge_flags(spec) -> dict:
    """merge_loras.py's flags for a MergeSpec (unset density / seed left out)."""
    return {"method": spec.method, "lambda": spec.weight, "density": spec.density, "seed": spec.seed}


# ---------------------------------------------------------------------------------------------- inputs

def check_inputs(settings: RunSettings, tracks: list[Track], training_data: bool = True) -> int:
    """Fail before any work when the model or data is missing; returns the model's hidden size."""
    try:
        hidden_size = load_model_config(settings.model_name_or_path).hidden_size
    except Exception as err:  # any loader error means the same thing to the user: this path is unusable
        raise SystemExit(f"error: --model_name_or_path {settings.model_name_or_path}: cannot load the model config "
                         f"({err}). Download the weights and pass their local folder.") from None
    for track in tracks if training_data else []:
        for path in filter(None, (track.train_data, track.heldout_data)):
            if not Path(path).is_file():
                raise SystemExit(f"error: data {path} of track {track.name} is missing; prepare it with: {track.prepare}")
    for suite, folder in (("bbh", settings.bbh_dir), ("mmlu", settings.mmlu_dir)):
        if any(suite in t.suites for t in tracks) and not Path(folder).is_dir():
            raise SystemExit(f"error: --{suite}_dir {folder} is missing; prepare it with: python data/prepare.py {suite}")
    return hidden_size


# ---------------------------------------------------------------------------------------------- tables

def run_jobs(jobs: list[Job], bar: tqdm, parallel: int) -> None:
    """Execute ``jobs``, up to ``parallel`` at once (each on one GPU, round robin), a job after its dependency."""
    needed = frozenset(weights_needed(jobs))
    if parallel <= 1:
        for job in jobs:
            bar.set_postfix_str(f"{job.row.key} s{job.seed} on {job.track.name}", refresh=True)
            execute(job, bar, needed=needed)
            bar.update()
        return
    gpus = torch.cuda.device_count()
    pending, running, finished = list(jobs), {}, set()  # running: future -> (slot, job)
    with ThreadPoolExecutor(parallel) as pool:
        while pending or running:
            free = sorted(set(range(parallel)) - {slot for slot, _ in running.values()})
            for job in [j for j in pending if j.depends_on is None or j.depends_on.run_dir in finished][:len(free)]:
                slot = free.pop(0)
                running[pool.submit(execute, job, bar, slot % gpus if gpus else None, needed)] = (slot, job)
                pending.remove(job)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                _, job = running.pop(future)
                future.result()  # a failed job stops the table (the running ones finish first)
                finished.add(job.run_dir)
                bar.update()


def run_tables(table_names: list[str], scale_name: str, settings: RunSettings, only_rows: list[str] | None = None,
               with_base: bool = True, assemble_only: bool = False, parallel: int = 1) -> dict[str, dict]:
    """Train, evaluate and tabulate several tables with one pool of jobs (a job shared by two tables runs
    once); returns each table's results (also written as JSON and Markdown)."""
    plans = {}
    for name in table_names:
        table, scale = TABLES[name], SCALES[scale_name]
        if scale_name not in table.scales:
            raise SystemExit(f"error: table {name} has no {scale_name} scale (available: {', '.join(table.scales)})")
        tracks = [t for t in scale.tracks if table.tracks is None or t.name in table.tracks]
        rows = [r for r in table.rows if not only_rows or r.key in only_rows]
        table_settings = settings
        if settings.dry_run is not None:  # one seed: the others would time the same steps
            scale, tracks, table_settings, rows = prepare_dry_run(table, scale, tracks,
                                                                  replace(settings, seeds=settings.seeds[:1]), rows)
        check_inputs(table_settings, tracks)
        jobs = plan_jobs(table, scale, table_tracks(table, scale, table_settings), table_settings, rows, with_base)
        plans[name] = (scale, table_settings, jobs)
    jobs = shared_jobs([job for _, _, plan in plans.values() for job in plan])
    report_micro_batches(jobs, settings)
    started = time.time()
    if not assemble_only:
        with tqdm(total=len(jobs), desc=f"{' + '.join(table_names)} ({scale_name})", unit="job") as bar:
            run_jobs(jobs, bar, parallel)
    return {name: write_table(TABLES[name], scale, table_settings, plan, started, len(settings.seeds))
            for name, (scale, table_settings, plan) in plans.items()}


def shared_jobs(jobs: list[Job]) -> list[Job]:
    """One job per run folder (two tables may plan the same run), evaluated on every suite any of them reports."""
    merged: dict[Path, Job] = {}
    for job in jobs:
        seen = merged.get(job.run_dir)
        merged[job.run_dir] = job if seen is None else replace(seen, also_suites=seen.also_suites + job.suites)
    return list(merged.values())


def write_table(table: Table, scale: Scale, settings: RunSettings, jobs: list[Job], started: float,
                seeds: int) -> dict:
    """Tabulate one table's jobs into <results_dir>/<scale>/<table>[.dry_run].{json,md}; returns the results."""
    output = results.tabulate(table, scale, settings, [j for j in jobs if j.kind != "library"],
                              [j for j in jobs if j.kind == "library"])
    output["wall_minutes_this_invocation"] = (time.time() - started) / 60
    out_dir = settings.results_dir / scale.name
    markdown = results.render(table, scale, output)
    name = table.name
    if settings.dry_run is not None:  # beside the real table, never in its place
        full_items = json.loads((out_dir / "dry_run" / "full_eval_items.json").read_text())
        output["dry_run"] = {"label": dry_run.LABEL, "settings": settings.dry_run.identity(),
                             "timings": [dry_run.job_timing(j, full_items) for j in jobs]}
        markdown = (dry_run.render(table.title, output["device"], output["dry_run"]["timings"], seeds)
                    + f"\n\n**{dry_run.LABEL.capitalize()}:**\n\n" + markdown)
        name = f"{table.name}.dry_run"
    write_json(out_dir / f"{name}.json", output)
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    return output


def run_table(table_name: str, scale_name: str, settings: RunSettings, **options) -> dict:
    """:func:`run_tables` for one table."""
    return run_tables([table_name], scale_name, settings, **options)[table_name]


def prepare_dry_run(table: Table, scale: Scale, tracks: list[Track], settings: RunSettings,
                    rows: list[Row]) -> tuple[Scale, list[Track], RunSettings, list[Row]]:
    """The dry run's inputs (mtlora.experiments.dry_run.prepare) and rows (without the kinds it cannot run)."""
    if table.task_counts:
        raise SystemExit(f"error: --dry_run: table {table.name} draws its training sets from a real task pool")
    skipped = [r.key for r in rows if r.kind in dry_run.SKIPPED_KINDS]
    if skipped:
        print(f"{dry_run.LABEL}: rows {', '.join(skipped)} left out (merges and LoRAHub run outside train.py, on "
              "real weights)")
    check_inputs(settings, tracks, training_data=False)
    try:
        scale, tracks, settings = dry_run.prepare(scale, tracks, settings)
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
    return scale, tracks, settings, [r for r in rows if r.kind not in dry_run.SKIPPED_KINDS]


def report_micro_batches(jobs: list[Job], settings: RunSettings) -> None:
    """Plan every job's micro-batch for --gpu_memory_gb before any work, and print the choices."""
    if settings.gpu_memory_gib is None:
        return
    choices: dict[str, list[str]] = {}
    splits: dict[tuple[str, str], set[str]] = {}
    for job in jobs:
        try:
            split = job.micro_batch
        except UsageError as err:
            raise SystemExit(f"error: {err}") from None
        if split is not None:
            choices.setdefault(split.describe(), []).append(job.row.key)
            splits.setdefault((job.row.key, job.track.name), set()).add(f"{split.micro_batch} x {split.accumulation}")
    for choice, keys in choices.items():
        print(f"GPU memory {settings.gpu_memory_gib:.1f} GiB per job: {', '.join(dict.fromkeys(keys))}: {choice}")
    for (key, track), found in splits.items():
        if len(found) > 1:
            print(f"warning: {key} ({track}) has seeds at different micro-batch splits ({', '.join(sorted(found))}); "
                  "under the reference's per-micro-batch loss averaging they are different settings: more "
                  "--gpu_memory_gb per job (or a smaller --parallel) keeps one")
