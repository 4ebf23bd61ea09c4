"""A table's dry run: every row through the real code path, with nothing real but the shapes and the prompts.

``tables/run_table.py --dry_run`` makes every job a dry-run job: ``train.py --random_init`` (the model's
architecture from its config with seeded random weights, built on the GPU; any LLaMA-family tokenizer) on
synthetic records whose token lengths follow ``data/synthetic.py``'s documented table, for a fixed number of
steps with the table's flags and batch settings; then the real evaluators on a slice of the real BBH / MMLU
prompts. It answers "does it fit, how long does a step take, how fast is the evaluation, how long will the
table take", never "how accurate": the accuracy it reports means nothing, and its results are labelled so.
Dry-run settings are part of every job's identity, so a dry run's folders are never taken for real ones.

Not in a dry run: the merge rows (merge_loras.py writes a whole model per row) and LoRAHub (compose_lorahub.py),
which run outside train.py on real weights and a tokenizer that fits them.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mtlora.evaluation.bbh import NUM_EXEMPLARS, build_bbh_prompt, load_bbh
from mtlora.evaluation.mmlu import load_mmlu
from mtlora.evaluation.reporting import markdown_table, read_json, write_jsonl

LABEL = "dry run: timings only, accuracy meaningless"
REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = REPO_ROOT / "configs" / "models" / "smollm2-135m"  # a LLaMA-family (SentencePiece-free) tokenizer
SKIPPED_KINDS = ("merge", "merge_tuned", "lorahub")


@dataclass(frozen=True)
class DryRun:
    """What a dry-run job runs instead of the real thing."""

    steps: int = 8  # optimisation steps of each training
    warmup_steps: int = 3  # the first steps, not timed (allocation, kernel selection)
    examples: int = 2048  # synthetic training records per track
    bbh_tasks: int = 2
    mmlu_subjects: int = 3
    eval_items: int = 16  # scored items per task / subject (one full evaluation batch at the paper scale)
    tokenizer: str = str(TOKENIZER)
    seed: int = 42

    def identity(self) -> dict:
        return {"label": LABEL, **asdict(self)}

    def model_flags(self) -> dict:
        return {"random_init": True, "tokenizer_name_or_path": self.tokenizer}


# ------------------------------------------------------------------------------------------------- inputs

def representative(lengths: dict[str, float], count: int) -> list[str]:
    """``count`` names spread over the length order (at its (i + 1) / (count + 1) quantiles): a slice whose
    prompts are neither the shortest nor the longest of the suite."""
    ordered = sorted(lengths, key=lambda name: (lengths[name], name))
    picks = [ordered[min(len(ordered) - 1, (i + 1) * len(ordered) // (count + 1))] for i in range(count)]
    return sorted(dict.fromkeys(picks))


def bbh_slice(bbh_dir: str | Path, count: int) -> list[str]:
    tasks = load_bbh(bbh_dir)
    lengths = {name: statistics.mean(len(build_bbh_prompt(items[:NUM_EXEMPLARS], it["input"]))
                                     for it in items[NUM_EXEMPLARS:]) for name, items in tasks.items()}
    return representative(lengths, count)


def mmlu_slice(mmlu_dir: str | Path, count: int) -> list[str]:
    data = load_mmlu(mmlu_dir)
    lengths = {s: sum(len(" ".join(map(str, row.values()))) for row in dev + test[:20]) for s, (dev, test) in data.items()}
    return representative(lengths, count)


def full_eval_items(bbh_dir: str | Path | None, mmlu_dir: str | Path | None) -> dict[str, int]:
    """Scored items of the whole suites (what a real evaluation runs), counted from the data."""
    items = {}
    if bbh_dir and Path(bbh_dir).is_dir():
        items["bbh"] = sum(len(task) - NUM_EXEMPLARS for task in load_bbh(bbh_dir).values())
    if mmlu_dir and Path(mmlu_dir, "test").is_dir():
        items["mmlu"] = sum(len(test) for _, test in load_mmlu(mmlu_dir).values())
    return items


def copy_slice(bbh_dir: str | Path, mmlu_dir: str | Path, dry_run: DryRun, out: Path) -> tuple[Path, Path, dict]:
    """Copy the slice's BBH task files and MMLU subject files to ``out``; returns (bbh, mmlu, what was chosen)."""
    bbh, mmlu = out / "bbh", out / "mmlu"
    chosen = {"bbh": bbh_slice(bbh_dir, dry_run.bbh_tasks), "mmlu": mmlu_slice(mmlu_dir, dry_run.mmlu_subjects)}
    for folder in (bbh, mmlu):
        shutil.rmtree(folder, ignore_errors=True)
    bbh.mkdir(parents=True)
    for task in chosen["bbh"]:
        shutil.copyfile(Path(bbh_dir) / f"{task}.json", bbh / f"{task}.json")
    for split in ("dev", "test"):
        (mmlu / split).mkdir(parents=True)
        for subject in chosen["mmlu"]:
            shutil.copyfile(Path(mmlu_dir) / split / f"{subject}_{split}.csv", mmlu / split / f"{subject}_{split}.csv")
    return bbh, mmlu, chosen


def write_synthetic(path: Path, dry_run: DryRun) -> Path:
    """The dry run's training records (data/synthetic.py), rewritten only when they would differ."""
    from data.synthetic import synthetic_records
    from mtlora.loading import load_tokenizer

    records = synthetic_records(load_tokenizer(dry_run.tokenizer, "--tokenizer_name_or_path"), dry_run.examples,
                                seed=dry_run.seed)
    write_jsonl(path, records)
    return path


def prepare(scale, tracks: list, settings) -> tuple:
    """(scale, tracks, settings) of the dry run: synthetic training data per track, the evaluation slice (copied
    under ``<results_dir>/<scale>/dry_run/``), the slice's item limit; the full suites' sizes are recorded in
    ``dry_run/full_eval_items.json`` for the projections."""
    dry_run = settings.dry_run
    out = settings.results_dir / scale.name / "dry_run"
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_eval_items.json").write_text(json.dumps(full_eval_items(settings.bbh_dir, settings.mmlu_dir)))
    suites = {suite for track in tracks for suite in track.suites}
    bbh, mmlu = settings.bbh_dir, settings.mmlu_dir
    if suites & {"bbh", "mmlu"}:
        bbh, mmlu, chosen = copy_slice(settings.bbh_dir, settings.mmlu_dir, dry_run, out)
        print(f"{LABEL}: evaluation slice {chosen}")
    tracks = [replace(t, train_data=str(write_synthetic(out / "data" / f"{t.name}.jsonl", dry_run)),
                      heldout_data=None, suites=tuple(s for s in t.suites if s != "heldout")) for t in tracks]
    scale = replace(scale, tracks=tuple(tracks), eval_limits={s: dry_run.eval_items for s in ("bbh", "mmlu")})
    return scale, tracks, replace(settings, bbh_dir=str(bbh), mmlu_dir=str(mmlu))


# ---------------------------------------------------------------------------------------------- timings

def train_timing(summaries: list[dict], warmup_steps: int) -> dict:
    """s/step, tokens/s and peak memory from train_summary.json files (the steps after each run's first
    ``warmup_steps``; a task library has one run per task)."""
    timed, tokens, peaks = [], [], []
    for summary in summaries:
        seconds, counts = summary.get("step_seconds") or [], summary.get("step_tokens") or []
        skip = warmup_steps if len(seconds) > warmup_steps else 0
        timed += seconds[skip:]
        tokens += counts[skip:]
        peaks.append(summary.get("peak_gpu_memory_gib"))
    peaks = [p for p in peaks if p is not None]
    return {"steps_timed": len(timed), "s_per_step": statistics.mean(timed) if timed else None,
            "s_per_step_median": statistics.median(timed) if timed else None,
            "tokens_per_s": sum(tokens) / sum(timed) if tokens and timed else None,
            "peak_gpu_memory_gib": max(peaks) if peaks else None}


def full_steps(examples: int | None, effective_batch: int, epochs: float = 1.0) -> int | None:
    """Optimisation steps of the full run (the Trainer's count: partial last batch included)."""
    return None if not examples else math.ceil(math.ceil(examples / effective_batch) * epochs)


def job_timing(job, full_items: dict[str, int]) -> dict:
    """One dry-run job's timings (train and evaluation) and its projected full-scale hours."""
    dry_run = job.settings.dry_run
    files = sorted(job.run_dir.glob("*/train_summary.json")) if job.kind == "library" else [
        job.run_dir / "train_summary.json"]
    summaries = [s for s in map(read_json, files) if s is not None]
    result = {"key": job.row.key, "label": job.row.label, "track": job.track.name, "seed": job.seed,
              "kind": job.kind, "micro_batch": job.training.get("per_device_train_batch_size"),
              "accumulation": job.training.get("gradient_accumulation_steps"),
              **train_timing(summaries, dry_run.warmup_steps)}
    steps = full_steps(job.track.examples, job.effective_batch, job.training.get("num_train_epochs", 1))
    if job.kind in ("base", "uniform"):
        steps, result["s_per_step"] = 0, 0.0
    if job.row.training.get("max_steps"):
        steps = job.row.training["max_steps"]
    result["full_steps"] = steps
    train = None if steps is None or result["s_per_step"] is None else steps * result["s_per_step"]
    evaluation = 0.0
    for suite in job.suites if job.kind != "library" else ():
        timing = read_json(job.run_dir / "eval" / suite / "timing.json") or {}
        speed = timing["items"] / timing["seconds"] if timing.get("seconds") else None
        result[f"{suite}_questions_per_s"], result[f"{suite}_full_items"] = speed, full_items.get(suite)
        evaluation = None if evaluation is None or not speed or not full_items.get(suite) else (
            evaluation + full_items[suite] / speed)
    result["projected_hours"] = None if train is None or evaluation is None else (train + evaluation) / 3600
    return result


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render(title: str, device: str, rows: list[dict], seeds: int) -> str:
    """Markdown: one row per job (one seed) with its timings and the projected hours of the full-scale job; the
    table's total counts ``seeds`` seeds of every trained job (the base model once)."""
    header = ["row", "track", "seed", "micro-batch x accum.", "s/step", "tokens/s", "peak GiB", "BBH q/s", "MMLU q/s",
              "full steps", "projected h"]
    lines = [[r["label"], r["track"], r["seed"], f"{_fmt(r['micro_batch'])} x {_fmt(r['accumulation'])}",
              _fmt(r["s_per_step"]), _fmt(r["tokens_per_s"], 4), _fmt(r["peak_gpu_memory_gib"]),
              _fmt(r.get("bbh_questions_per_s")), _fmt(r.get("mmlu_questions_per_s")), _fmt(r["full_steps"]),
              _fmt(r["projected_hours"])] for r in rows]
    total = sum((r["projected_hours"] or 0.0) * (1 if r["kind"] == "base" else seeds) for r in rows)
    missing = [r["label"] for r in rows if r["projected_hours"] is None]
    return (f"## {title}\n\n**{LABEL.capitalize()}.** Device: {device}. Projected hours = the full run's steps x "
            "s/step + the whole suite's items / (questions/s), per job and seed; model loading is not included.\n\n"
            + markdown_table(header, lines) + f"\n\nProjected GPU-hours for the table ({seeds} seed(s) per trained "
            f"row): {total:.1f}" + (f", without {', '.join(missing)} (not projected)" if missing else "") + ".")
