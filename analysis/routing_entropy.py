"""Fig. 1A: routing entropy vs regularisation strength.

For each checkpoint (labelled with its regularisation strength) the entropy of the per-token routing
distribution over experts is averaged over non-padding tokens, routing groups and adapters, in nats and
normalised by log(E) (1 = uniform routing, 0 = one expert per token); also per transformer block.

    python -m analysis.routing_entropy --checkpoints 0.0=outputs/a 0.5=outputs/b 1.0=outputs/c \\
        --data_path data/train.jsonl --output_dir outputs/analysis
"""

from __future__ import annotations

import argparse
import sys

import matplotlib.pyplot as plt
import numpy as np

from analysis.common import (add_data_arguments, add_model_arguments, block_index, integer_ticks, load_checkpoint,
                             max_entropy, parse_labelled_paths, read_checkpoint_configs, routing_stats_by_task,
                             sample_records_by_task, task_batches, write_outputs)
from mtlora.errors import UsageError

NAME = "routing_entropy"


def checkpoint_entropy(stats_by_task: dict, num_experts: int) -> dict:
    """Mean routing entropy of one checkpoint: overall, per task and per block (nats and / log E)."""
    names = list(next(iter(stats_by_task.values())).tokens)
    total = {n: sum(s.entropy_sum[n] for s in stats_by_task.values()) / sum(s.tokens[n] for s in stats_by_task.values())
             for n in names}
    blocks: dict[int, list[float]] = {}
    for name, value in total.items():
        blocks.setdefault(block_index(name), []).append(value)
    per_block = {b: float(np.mean(v)) for b, v in sorted(blocks.items())}
    per_task = {t: float(np.mean([s.mean_entropy(n) for n in names])) for t, s in stats_by_task.items()}
    log_e = max_entropy(num_experts)
    mean = float(np.mean(list(total.values())))
    return {
        "num_experts": num_experts, "log_num_experts": log_e, "num_adapters": len(names),
        "tokens": sum(s.tokens[names[0]] for s in stats_by_task.values()),
        "mean_entropy": mean, "normalised_entropy": mean / log_e,
        "per_task": {t: {"entropy": v, "normalised": v / log_e} for t, v in per_task.items()},
        "per_layer": {str(b): {"entropy": v, "normalised": v / log_e} for b, v in per_block.items()},
    }


def _strength(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


def plot_entropy(results: dict) -> plt.Figure:
    """Left: normalised entropy vs strength (categorical when labels are not numbers); right: per layer."""
    labels = list(results)
    strengths = [_strength(label) for label in labels]
    numeric = all(s is not None for s in strengths)
    x = strengths if numeric else list(range(len(labels)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [results[label]["normalised_entropy"] for label in labels], "o-")
    left.set_xlabel("regularisation strength" if numeric else "checkpoint")
    if not numeric:
        left.set_xticks(x, labels, rotation=30)
    left.set_ylabel("routing entropy / log E")
    left.set_ylim(0, 1.05)
    left.set_title("Mean per-token routing entropy")
    for label in labels:
        layers = results[label]["per_layer"]
        right.plot([int(b) for b in layers], [v["normalised"] for v in layers.values()], marker=".", label=label)
    right.set_xlabel("transformer block")
    right.set_ylabel("routing entropy / log E")
    right.set_ylim(0, 1.05)
    right.legend(title="strength" if numeric else None, fontsize=8)
    right.set_title("Per layer")
    integer_ticks(right)
    figure.tight_layout()
    return figure


def redraw(data: dict) -> plt.Figure:
    """The figure again from the JSON :func:`routing_entropy` saved."""
    return plot_entropy(data["checkpoints"])


def routing_entropy(checkpoints: list[tuple[str, str]], data_path: str, output_dir: str,
                    model_name_or_path: str | None = None, samples_per_task: int = 32, batch_size: int = 8,
                    max_seq_length: int = 512, seed: int = 42, device: str = "cpu", dtype: str = "float32") -> dict:
    """Compute, plot and save routing entropy for labelled checkpoints; returns the JSON data."""
    read_checkpoint_configs(checkpoints, routed=True)  # every checkpoint checked before the first model loads
    records = sample_records_by_task(data_path, samples_per_task, seed)
    results = {}
    for label, path in checkpoints:
        model, tokenizer, config = load_checkpoint(path, model_name_or_path, dtype, device)
        batches = task_batches(records, tokenizer, config, batch_size, max_seq_length)
        stats = routing_stats_by_task(model, batches, device, desc=f"entropy {label}")
        results[label] = {"checkpoint": str(path), **checkpoint_entropy(stats, config.num_experts)}
        del model
    data = {"data_path": str(data_path), "samples_per_task": samples_per_task, "tasks": list(records),
            "checkpoints": results}
    write_outputs(output_dir, NAME, plot_entropy(results), data)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="label=path items, label = regularisation strength (e.g. 0.5=outputs/run_b).")
    add_data_arguments(parser)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        data = routing_entropy(parse_labelled_paths(args.checkpoints), args.data_path, args.output_dir,
                               args.model_name_or_path, args.samples_per_task, args.batch_size, args.max_seq_length,
                               args.seed, args.device, args.dtype)
    except UsageError as err:
        sys.exit(f"error: {err}")
    for label, result in data["checkpoints"].items():
        print(f"{label}: entropy {result['mean_entropy']:.4f} nats ({result['normalised_entropy']:.3f} of log E)")


if __name__ == "__main__":
    main()
