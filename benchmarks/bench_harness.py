"""lm-eval's own tasks run by lm-eval's HFLM against this package's batched engine, in one process: seconds, items/s,
and how many items score the same.

    python benchmarks/bench_harness.py --smollm2_path smollm2.gguf --data_dir ../shared/data --output out/harness.json
    python benchmarks/bench_harness.py --quick --data_dir DIR     # tiny random model on the CPU (tests)

Each engine runs ``run_harness`` (``mtlora.evaluation.harness``) on the same tasks, subjects and limit with SmolLM2-135M
(a random mtLoRA adapter attached, or ``--adapter``): ``hflm`` at lm-eval batch ``--batch_size`` (the table runner's
cap, 32), ``batched`` at ``--rows_per_batch`` (default: automatic). Per lm-eval task: items (documents), seconds of
the whole call, and the share of (document, metric, filter) values equal to the first engine's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_adapters import command_and_date, report  # noqa: E402
from benchmarks.bench_eval import load_model  # noqa: E402
from mtlora.evaluation.harness import ENGINES, run_harness  # noqa: E402
from mtlora.evaluation.harness_tasks import BENCHMARKS  # noqa: E402
from mtlora.evaluation.reporting import markdown_table  # noqa: E402


def item_values(summary: dict) -> dict[tuple, float]:
    """{(task, document, filter, metric): value} of every scored item."""
    values = {}
    for task, samples in summary["samples"].items():
        for sample in samples:
            for metric in sample.get("metrics", []):
                values[(task, sample["doc_id"], sample["filter"], metric)] = sample[metric]
    return values


def run_engine(engine: str, model, tokenizer, args: argparse.Namespace) -> dict:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    summary = run_harness(model, tokenizer, args.tasks, mmlu_dir=args.data_dir / "mmlu", bbh_dir=args.data_dir / "bbh",
                          subjects=args.subjects, bbh_tasks=args.bbh_tasks, limit=args.limit,
                          batch_size=args.batch_size, engine=engine, rows_per_batch=args.rows_per_batch)
    seconds = time.perf_counter() - started
    documents = sum(len({s["doc_id"] for s in samples}) for samples in summary["samples"].values())
    return {"engine": engine, "documents": documents, "seconds": round(seconds, 2),
            "documents_per_s": round(documents / seconds, 1), "values": item_values(summary),
            "results": summary["groups"] or summary["results"]}


def markdown(results: dict) -> str:
    meta = results["meta"]
    head = (f"command: {meta['command']}; date: {meta['date']}; device: {meta['device']}; torch: {meta['torch']}; "
            f"transformers: {meta['transformers']}; dtype: {meta['dtype']}")
    rows = [[r["engine"], r["documents"], r["seconds"], r["documents_per_s"], r.get("speedup", "-"),
             r.get("values_equal", "-")] for r in results["runs"]]
    table = markdown_table(["engine", "documents", "seconds", "documents/s", "vs first", "item values equal"], rows)
    return f"{head}\n\n{table}\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model on the CPU, 2 items per task")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data", help="holds bbh/ and mmlu/")
    parser.add_argument("--smollm2_path", default=None, help="the real SmolLM2-135M (.gguf or folder)")
    parser.add_argument("--adapter", type=Path, default=None, help="a trained adapter instead of the random one")
    parser.add_argument("--tasks", nargs="+", choices=list(BENCHMARKS), default=["mmlu_continuation", "mmlu", "bbh_fewshot"])
    parser.add_argument("--subjects", nargs="+", default=None, help="MMLU subjects (default: all)")
    parser.add_argument("--bbh_tasks", nargs="+", default=None, help="BBH tasks (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="documents per lm-eval task (default: all)")
    parser.add_argument("--engines", default=",".join(reversed(ENGINES)), type=lambda s: s.split(","),
                        help="in order; the first is the reference of 'item values equal'")
    parser.add_argument("--batch_size", type=int, default=32, help="lm-eval's batch (hflm)")
    parser.add_argument("--rows_per_batch", type=int, default=None, help="the batched engine's rows (default: automatic)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file; the Markdown goes beside it (.md)")
    args = parser.parse_args(argv)
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        parser.error(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    if args.quick:
        args.limit = 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model("smollm2", args.quick, device, dtype, args.smollm2_path, args.adapter)
    results = {"meta": {**command_and_date(argv), "dtype": str(dtype).replace("torch.", ""),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__}, "runs": []}
    reference = None
    for engine in args.engines:
        run = run_engine(engine, model, tokenizer, args)
        values = run.pop("values")
        if reference is None:
            reference = (run, values)
        else:
            shared = reference[1].keys() & values.keys()
            run["values_equal"] = round(sum(values[k] == reference[1][k] for k in shared) / max(len(shared), 1), 4)
            run["speedup"] = round(reference[0]["seconds"] / run["seconds"], 2)
        results["runs"].append(run)
    text = markdown(results)
    report(args.output, results, text)
    return results


if __name__ == "__main__":
    main()
