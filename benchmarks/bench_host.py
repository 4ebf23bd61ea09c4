"""Host-side costs that no GPU measures: loading the GGUF model, and the Python around MMLU's forward passes.

    python benchmarks/bench_host.py --data_dir ../shared/data --output benchmarks/results/cpu_host.json

- ``model_load``: seconds to load SmolLM2-135M (model and tokenizer) straight from its GGUF file, as every process
  did before the converted folder was cached, against ``load_base_model`` + ``load_tokenizer`` once the cached folder
  exists (:func:`mtlora.loading.converted_gguf`).
- ``mmlu_host``: ``run_mmlu`` over the whole of MMLU with a one-layer, 16-wide model of SmolLM2's vocabulary, under
  cProfile, one CPU thread: the seconds in tokenisation, in the model's forward calls and in everything else. The
  model is tiny, so the last part is the host-side work a GPU run pays on top of its forward passes. It also counts the
  token positions the forward calls compute against the real tokens among them (the rest is padding).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.bench_adapters import command_and_date, report
from mtlora.evaluation.mmlu import run_mmlu
from mtlora.evaluation.reporting import markdown_table
from mtlora.loading import converted_gguf, default_model_path, load_base_model, load_tokenizer


def model_load() -> dict:
    gguf = Path(default_model_path())
    converted_gguf(str(gguf.parent), gguf.name)  # the cache exists before the timed cached load
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    direct = time.perf_counter() - started
    started = time.perf_counter()
    load_base_model(str(gguf))
    load_tokenizer(str(gguf))
    return {"gguf_direct_s": round(direct, 2), "cached_folder_s": round(time.perf_counter() - started, 2)}


def mmlu_host(data_dir: Path) -> dict:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).eval()
    positions = {"run": 0, "real": 0}

    def count(_module, _args, kwargs):  # suffix positions the forward computes, and the real (unpadded) ones
        rows, width = kwargs["input_ids"].shape
        positions["run"] += rows * width
        positions["real"] += int(kwargs["attention_mask"][:, -width:].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    profile = cProfile.Profile()
    started = time.perf_counter()
    summary = profile.runcall(run_mmlu, model, tokenizer, data_dir / "mmlu", batch_size=1024)
    total = time.perf_counter() - started
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    tokenising = sum(v[2] for k, v in stats.items() if "encode_batch" in k[2])
    forward = sum(v[3] for k, v in stats.items() if k[2] == "_first_pass")
    return {"questions": summary["num_examples"], "total_s": round(total, 2), "tokenising_s": round(tokenising, 2),
            "model_forward_s": round(forward, 2), "rest_s": round(total - tokenising - forward, 2),
            "token_positions_run": positions["run"], "real_tokens": positions["real"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--output", type=Path, default=None, help="JSON file; the Markdown goes beside it (.md)")
    args = parser.parse_args(argv)
    if not (args.data_dir / "mmlu").is_dir():
        parser.error(f"--data_dir {args.data_dir}: no mmlu folder in it")
    results = {"metadata": {**command_and_date(argv), "device": f"cpu ({os.cpu_count()} cores)",
                            "mmlu_threads": 1, "torch": torch.__version__},
               "model_load": model_load(), "mmlu_host": mmlu_host(args.data_dir)}
    load, mmlu = results["model_load"], results["mmlu_host"]
    meta = results["metadata"]
    markdown = (f"Host-side costs ({meta['date']}; `{meta['command']}`; {meta['device']}).\n\n"
                + markdown_table(["what", "seconds"], [
                    ["SmolLM2-135M model + tokenizer from the GGUF file", load["gguf_direct_s"]],
                    ["the same from the cached converted folder", load["cached_folder_s"]],
                    [f"run_mmlu, {mmlu['questions']:,} questions, one-layer model: total", mmlu["total_s"]],
                    ["  of which tokenising", mmlu["tokenising_s"]],
                    ["  of which the model's forward calls", mmlu["model_forward_s"]],
                    ["  of which the rest (host-side Python)", mmlu["rest_s"]]])
                + f"\n\nAt batch 1,024 the forward calls run {mmlu['token_positions_run']:,} token positions for "
                f"{mmlu['real_tokens']:,} real tokens (exemplar prefixes included once per subject; the rest is left "
                "padding to each batch's longest question).")
    report(args.output, results, markdown)
    return results


if __name__ == "__main__":
    main()
