"""Fig. S4: mean routing weight per expert per task (heatmaps tasks x experts).

The routing weight of each expert (averaged over routing groups) is averaged over a task's non-padding
tokens, per adapter. Shown for chosen transformer blocks (adapters of one block, e.g. q_proj and v_proj,
are averaged) and for the average over all adapters. Rows sum to 1.

    python -m analysis.routing_patterns --checkpoint outputs/mtlora --data_path data/train.jsonl \\
        --layers 0 15 29 --output_dir outputs/analysis
"""

from __future__ import annotations

import argparse
import sys

import matplotlib.pyplot as plt
import numpy as np

from analysis.common import (add_data_arguments, add_model_arguments, block_index, load_checkpoint,
                             read_checkpoint_configs, routing_stats_by_task, sample_records_by_task, task_batches,
                             write_outputs)
from mtlora.errors import InvalidInput, UsageError
from mtlora.injection import attach_adapters, routed_adapters
from mtlora.loading import build_meta_model

NAME = "routing_patterns"


def default_layers(blocks: list[int]) -> list[int]:
    """First, middle and last adapted block (deduplicated for shallow models)."""
    return sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})


def resolve_layers(adapter_names: list[str], layers: list[int] | None) -> list[int]:
    """The requested blocks (default: first/middle/last adapted block); raises naming --layers if not adapted."""
    blocks = sorted({block_index(n) for n in adapter_names})
    if not blocks:
        raise InvalidInput("the checkpoint has no routed adapters (plain --method lora or mmoelora has no token router)")
    if layers is None:
        return default_layers(blocks)
    unknown = [layer for layer in layers if layer not in blocks]
    if unknown:
        raise InvalidInput(f"--layers {unknown}: not adapted blocks; adapted blocks are {blocks[0]}..{blocks[-1]}")
    return list(dict.fromkeys(layers))


def routing_matrices(stats_by_task: dict, layers: list[int] | None = None) -> dict:
    """{"layers": {block: (T, E) matrix}, "average": (T, E) matrix}; rows are tasks, in ``stats_by_task`` order."""
    names = list(next(iter(stats_by_task.values())).tokens)
    layers = resolve_layers(names, layers)

    def matrix(selected: list[str]) -> np.ndarray:
        return np.stack([np.mean([s.mean_weights(n).numpy() for n in selected], axis=0)
                         for s in stats_by_task.values()])

    return {"layers": {layer: matrix([n for n in names if block_index(n) == layer]) for layer in layers},
            "average": matrix(names)}


def plot_patterns(matrices: dict, tasks: list[str]) -> plt.Figure:
    """One heatmap per chosen layer plus the average; colour = mean routing weight."""
    panels = [(f"block {layer}", m) for layer, m in matrices["layers"].items()] + [("all adapters", matrices["average"])]
    num_experts = panels[0][1].shape[1]
    figure, axes = plt.subplots(1, len(panels), figsize=(0.35 * num_experts * len(panels) + 3, 0.4 * len(tasks) + 2),
                                squeeze=False)
    vmax = max(float(m.max()) for _, m in panels)
    for axis, (title, values) in zip(axes[0], panels):
        image = axis.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        axis.set_title(title)
        axis.set_xlabel("expert")
        axis.set_xticks(range(num_experts))
        axis.set_yticks(range(len(tasks)), tasks if axis is axes[0][0] else [""] * len(tasks))
    figure.colorbar(image, ax=list(axes[0]), label="mean routing weight")
    return figure


def redraw(data: dict) -> plt.Figure:
    """The figure again from the JSON :func:`routing_patterns` saved."""
    matrices = {"layers": {int(layer): np.asarray(m) for layer, m in data["layers"].items()},
                "average": np.asarray(data["average"])}
    return plot_patterns(matrices, data["tasks"])


def routing_patterns(checkpoint: str, data_path: str, output_dir: str, layers: list[int] | None = None,
                     model_name_or_path: str | None = None, samples_per_task: int = 32, batch_size: int = 8,
                     max_seq_length: int = 512, seed: int = 42, device: str = "cpu", dtype: str = "float32") -> dict:
    """Compute, plot and save the task x expert routing matrices of one checkpoint; returns the JSON data."""
    config = read_checkpoint_configs([("", checkpoint)], "--checkpoint", routed=True)[""]
    meta = attach_adapters(build_meta_model(model_name_or_path), config)
    layers = resolve_layers(list(routed_adapters(meta)), layers)  # on the architecture: fail before loading
    records = sample_records_by_task(data_path, samples_per_task, seed)
    model, tokenizer, config = load_checkpoint(checkpoint, model_name_or_path, dtype, device, flag="--checkpoint")
    stats = routing_stats_by_task(model, task_batches(records, tokenizer, config, batch_size, max_seq_length), device)
    matrices = routing_matrices(stats, layers)
    tasks = list(records)
    data = {
        "checkpoint": str(checkpoint), "data_path": str(data_path), "samples_per_task": samples_per_task,
        "tasks": tasks, "num_experts": config.num_experts,
        "tokens_per_task": {t: next(iter(s.tokens.values())) for t, s in stats.items()},
        "layers": {str(layer): m.tolist() for layer, m in matrices["layers"].items()},
        "average": matrices["average"].tolist(),
    }
    write_outputs(output_dir, NAME, plot_patterns(matrices, tasks), data)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A train.py output dir with routed adapters.")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="Transformer blocks to show (default: first, middle and last adapted block).")
    add_data_arguments(parser)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        data = routing_patterns(args.checkpoint, args.data_path, args.output_dir, args.layers, args.model_name_or_path,
                                args.samples_per_task, args.batch_size, args.max_seq_length, args.seed, args.device,
                                args.dtype)
    except UsageError as err:
        sys.exit(f"error: {err}")
    for task, row in zip(data["tasks"], data["average"]):
        print(f"{task}: " + " ".join(f"{w:.3f}" for w in row))


if __name__ == "__main__":
    main()
