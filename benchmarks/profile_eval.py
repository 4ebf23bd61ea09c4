"""Where an evaluation's time goes on a GPU: ``run_mmlu`` / ``run_bbh`` timed, profiled and varied.

    PYTHONPATH=. python benchmarks/profile_eval.py --smollm2_path smollm2.gguf --data_dir /data --benchmark mmlu \
        --output benchmarks/results/h200_profile_mmlu.json

The model is ``bench_eval``'s SmolLM2-135M with a random mtLoRA adapter (bf16 on a GPU), or with ``--adapter`` a
trained adapter folder. The evaluator runs with its defaults (the paper protocol, shared exemplar prefixes) and the
automatic batch size:
1. a warm-up on one item per task / subject;
2. the whole suite (or ``--limit`` items per task / subject), timed without the profiler;
3. a run of ``--profile_limit`` items per task / subject under ``torch.profiler`` (the whole suite makes millions of
   events, whose summary takes minutes): the GPU's busy time (the sum of its kernels' times), the host time spent
   inside the model's forward calls (issuing kernels and waiting where the model synchronises; taken from forward
   hooks), and the operators / kernels that take the most GPU time (a table beside the JSON);
4. variants on ``--variant_limit`` items per task / subject, each timed: fixed batch sizes, whole prompts (no
   shared prefix), eager attention.
Where the GPU's busy time is close to the wall time the run is bound by its kernels (the table says which);
where it is far below, by the host. The JSON is written after every stage, so a run stopped early keeps what it
measured.

``--quick``: a tiny random model on the CPU, in seconds (a correctness check; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from benchmarks.bench_adapters import command_and_date, synchronize, write_outputs
from benchmarks.bench_eval import REPO, load_model
from mtlora.evaluation.bbh import run_bbh
from mtlora.evaluation.mmlu import run_mmlu
from mtlora.evaluation.reporting import markdown_table

RUNNERS = {"bbh": run_bbh, "mmlu": run_mmlu}
VARIANTS = {  # name -> (evaluator options, attention implementation)
    "default": ({}, None),
    "batch 64": ({"batch_size": 64}, None),
    "batch 256": ({"batch_size": 256}, None),
    "whole prompts": ({"share_prefix": False}, None),
    "eager attention": ({}, "eager"),
}


class ForwardClock:
    """Host seconds spent inside the model's top-level forward calls (kernel issue, Python), and their count."""

    def __init__(self, model: torch.nn.Module):
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        self._handles = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _leave(self, *_):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def evaluate(benchmark: str, model, tokenizer, data_dir: Path, limit: int | None, **options) -> tuple[int, float]:
    """(items, wall seconds) of one run of the evaluator."""
    options = {"batch_size": None, **options}  # the evaluator's automatic batch size unless a variant sets one
    synchronize(model.device)
    start = time.perf_counter()
    summary = RUNNERS[benchmark](model, tokenizer, data_dir / benchmark, limit=limit, **options)
    synchronize(model.device)
    return summary["num_examples"], time.perf_counter() - start


def profiled(benchmark: str, model, tokenizer, data_dir: Path, limit: int | None, top: int) -> tuple[dict, str]:
    """One run under the profiler: its totals, the top kernels by GPU time, and the operator table."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = model.device.type == "cuda"
    clock = ForwardClock(model)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        items, seconds = evaluate(benchmark, model, tokenizer, data_dir, limit)
    clock.remove()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time_total / 1e6)
    gpu_seconds = sum(sum(times) for times in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    totals = {"items": items, "wall_s": round(seconds, 2), "gpu_busy_s": round(gpu_seconds, 2) if on_gpu else None,
              "gpu_busy_share": round(gpu_seconds / seconds, 3) if on_gpu else None,
              "host_in_forward_s": round(clock.seconds, 2), "forward_calls": clock.calls,
              "kernel_launches": sum(len(times) for times in kernels.values()),
              "top_kernels": [{"kernel": name[:120], "gpu_s": round(sum(times), 3), "calls": len(times),
                               "share_of_gpu": round(sum(times) / gpu_seconds, 3) if gpu_seconds else None}
                              for name, times in ranked]}
    table = prof.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                      row_limit=top)
    return totals, table


def variants(benchmark: str, model, tokenizer, data_dir: Path, limit: int | None) -> list[dict]:
    """Each variant's questions/s on the same items."""
    rows = []
    implementation = model.config._attn_implementation
    for name, (options, attention) in VARIANTS.items():
        if attention is not None:
            model.set_attn_implementation(attention)
        items, seconds = evaluate(benchmark, model, tokenizer, data_dir, limit, **options)
        model.set_attn_implementation(implementation)
        rows.append({"variant": name, "items": items, "seconds": round(seconds, 2),
                     "questions_per_s": round(items / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(results: dict) -> str:
    meta = "; ".join(f"{key}: {value}" for key, value in results["meta"].items())
    run, prof = results["run"], results["profile"]
    if not prof:
        return f"{meta}\n\nTimed: {run}\n"
    totals = markdown_table(
        ["run", "items", "wall s", "questions/s", "GPU busy s (share)", "host s in forward", "forward calls",
         "kernel launches"],
        [["timed", run["items"], run["wall_s"], run["questions_per_s"], "-", "-", "-", "-"],
         ["profiled", prof["items"], prof["wall_s"], round(prof["items"] / prof["wall_s"], 1),
          f"{prof['gpu_busy_s']} ({prof['gpu_busy_share']})", prof["host_in_forward_s"], prof["forward_calls"],
          prof["kernel_launches"]]])
    kernels = markdown_table(["kernel", "GPU s", "calls", "share of GPU time"],
                             [[k["kernel"], k["gpu_s"], k["calls"], k["share_of_gpu"]] for k in prof["top_kernels"]])
    varied = markdown_table(["variant", "items", "seconds", "questions/s"],
                            [[v["variant"], v["items"], v["seconds"], v["questions_per_s"]] for v in results["variants"]])
    return f"{meta}\n\n{totals}\n\nTop kernels by GPU time:\n\n{kernels}\n\nVariants:\n\n{varied}\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model on the CPU: a correctness check")
    parser.add_argument("--benchmark", choices=sorted(RUNNERS), default="mmlu")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding bbh/ and mmlu/")
    parser.add_argument("--smollm2_path", default=None, help="the real SmolLM2-135M (.gguf file or model folder)")
    parser.add_argument("--adapter", type=Path, default=None, help="a trained adapter folder instead of a random one")
    parser.add_argument("--limit", type=int, default=None, help="items per task / subject (default: all)")
    parser.add_argument("--profile_limit", type=int, default=50, help="items per task / subject under the profiler")
    parser.add_argument("--variant_limit", type=int, default=50, help="items per task / subject for the variants")
    parser.add_argument("--top", type=int, default=25, help="kernels / operators listed")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file; the Markdown (.md) and the profiler's operator table (.txt) go beside it")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.profile_limit, args.variant_limit, args.top = 2, 2, 2, 10
    return args


def save(results: dict, output: Path | None, table: str | None = None) -> None:
    write_outputs(output, results, markdown(results))
    if output is not None and table is not None:
        output.with_suffix(".txt").write_text(table + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model("smollm2", args.quick, device, dtype, args.smollm2_path, args.adapter)
    results = {"meta": {**command_and_date(argv), "benchmark": args.benchmark,
                        "adapter": str(args.adapter) if args.adapter else "random mtLoRA (bench_eval)",
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "dtype": str(dtype).replace("torch.", ""), "limit": args.limit,
                        "profile_limit": args.profile_limit, "variant_limit": args.variant_limit},
               "run": {}, "profile": {}, "variants": []}
    evaluate(args.benchmark, model, tokenizer, args.data_dir, 1)  # warm-up
    items, seconds = evaluate(args.benchmark, model, tokenizer, args.data_dir, args.limit)
    results["run"] = {"items": items, "wall_s": round(seconds, 2), "questions_per_s": round(items / seconds, 1)}
    print(json.dumps(results["run"]), flush=True)
    save(results, args.output)
    results["profile"], table = profiled(args.benchmark, model, tokenizer, args.data_dir, args.profile_limit, args.top)
    print(json.dumps({k: v for k, v in results["profile"].items() if k != "top_kernels"}), flush=True)
    save(results, args.output, table)
    results["variants"] = variants(args.benchmark, model, tokenizer, args.data_dir, args.variant_limit)
    save(results, args.output, table)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
