"""Fig. S3: gradient conflict between tasks, component-level vs block-level adapters.

For each configuration, the gradient of the LM loss (response tokens) with respect to all adapter
parameters is averaged over each task's sample batches. Per transformer block, the adapter gradients of
that block are concatenated into one vector per task, and the cosine similarity of every task pair is
computed. Reported per layer: mean cosine, fraction of negative-cosine pairs, and the conflict
mean(max(0, -cos)). The overall conflict is that mean over task pairs and layers, and the paper's
"block-level reduces conflict by 76%" is checked as 1 - conflict(block) / conflict(component).

Configurations come from checkpoints (``--checkpoints component=outputs/hydra block=outputs/mtlora``) or,
without ``--checkpoints``, from fresh adapters built from the method flags: a component-level one on
``--trainable`` and a block-level one (``--block_adapter_type``) with otherwise identical flags. At
initialisation B = 0, which gives A and the router no gradient, so fresh B are perturbed with
N(0, --init_noise^2) noise (default 1e-3); the JSON records this.

    python -m analysis.gradient_conflict --checkpoints component=outputs/hydra block=outputs/mtlora_block \\
        --data_path data/train.jsonl --output_dir outputs/analysis
    python -m analysis.gradient_conflict --method hydralora --lora_nums 16 --data_path data/train.jsonl \\
        --output_dir outputs/analysis        # fresh adapters, component vs block
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import HfArgumentParser

from analysis.common import (add_data_arguments, add_model_arguments, block_index, integer_ticks, load_checkpoint,
                             model_inputs, parse_labelled_paths, read_checkpoint_configs, sample_records_by_task,
                             task_batches, write_outputs)
from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput, UsageError
from mtlora.injection import attach_adapters
from mtlora.loading import DTYPES, load_base_model, load_tokenizer
from mtlora.training_data import IGNORE_INDEX

NAME = "gradient_conflict"


def _response_loss(model: torch.nn.Module, batch: dict, device: str) -> torch.Tensor:
    logits = model(**model_inputs(model, batch, device)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def task_gradients(model: torch.nn.Module, batches: dict[str, list[dict]], device: str = "cpu") -> dict[str, dict]:
    """Task -> {adapter parameter name: gradient averaged over the task's batches} (float32, on CPU)."""
    params = {name: p for name, p in model.named_parameters() if ".adapter." in name}
    for p in params.values():
        p.requires_grad_(True)
    model.eval()  # no dropout: the gradients of the same data must be reproducible
    result = {}
    progress = tqdm(total=sum(len(b) for b in batches.values()), desc="gradients", leave=False)
    for task, task_batches_ in batches.items():
        total = {name: torch.zeros(p.shape) for name, p in params.items()}
        for batch in task_batches_:
            grads = torch.autograd.grad(_response_loss(model, batch, device), list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    total[name] += grad.float().cpu()
            progress.update()
        result[task] = {name: g / len(task_batches_) for name, g in total.items()}
    progress.close()
    return result


def layer_cosines(gradients: dict[str, dict]) -> dict[int, np.ndarray]:
    """Block index -> (T, T) cosine similarity matrix of the tasks' gradient vectors in that block."""
    tasks = list(gradients)
    names = list(gradients[tasks[0]])
    blocks = sorted({block_index(name) for name in names})
    result = {}
    for block in blocks:
        vectors = torch.stack([torch.cat([gradients[t][n].reshape(-1) for n in names if block_index(n) == block])
                               for t in tasks]).double()
        norms = vectors.norm(dim=1)
        if (norms == 0).any():
            zero = [t for t, n in zip(tasks, norms) if n == 0]
            raise InvalidInput(f"block {block}: zero adapter gradient for task(s) {zero} (all-zero B at "
                             "initialisation? use fresh adapters with --init_noise > 0)")
        unit = vectors / norms[:, None]
        result[block] = (unit @ unit.t()).numpy()
    return result


def conflict_summary(cosines: dict[int, np.ndarray]) -> dict:
    """Per-layer and overall mean cosine, negative fraction and conflict mean(max(0, -cos)) over task pairs."""
    per_layer = {}
    for block, matrix in cosines.items():
        pairs = np.array([matrix[i, j] for i, j in itertools.combinations(range(len(matrix)), 2)])
        per_layer[str(block)] = {"mean_cosine": float(pairs.mean()), "negative_fraction": float((pairs < 0).mean()),
                                 "conflict": float(np.maximum(0.0, -pairs).mean()), "cosine_matrix": matrix.tolist()}
    return {
        "mean_cosine": float(np.mean([v["mean_cosine"] for v in per_layer.values()])),
        "negative_fraction": float(np.mean([v["negative_fraction"] for v in per_layer.values()])),
        "conflict": float(np.mean([v["conflict"] for v in per_layer.values()])),
        "per_layer": per_layer,
    }


def fresh_configs(base: AdapterConfig, block_adapter_type: str = "ffn") -> dict[str, AdapterConfig]:
    """The component-level config ``base`` and its block-level twin (same method, rank, experts)."""
    if not base.supports_block_level:
        raise InvalidInput(f"--method {base.method}: fresh adapters are compared at component and block level, "
                         "which needs --method hydralora or mtlora (or pass --checkpoints)")
    component = dataclasses.replace(base, enable_block_adapter=False)
    block = dataclasses.replace(base, enable_block_adapter=True, block_adapter_type=block_adapter_type)
    for config in (component, block):
        config.validate()  # fail before loading anything
    return {"component": component, "block": block}


def _fresh_model(config: AdapterConfig, model_name_or_path, dtype, device, init_noise: float, seed: int):
    torch.manual_seed(seed)  # same A, router and noise draws on every run
    model = attach_adapters(load_base_model(model_name_or_path, dtype=DTYPES[dtype], device=device), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora_B"):
                param.add_(torch.randn_like(param) * init_noise)
    return model


def plot_conflict(results: dict, ratio: dict | None) -> plt.Figure:
    """Left: mean cosine per layer; right: conflict per layer; one line per configuration."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, result in results.items():
        blocks = [int(b) for b in result["per_layer"]]
        left.plot(blocks, [v["mean_cosine"] for v in result["per_layer"].values()], marker=".", label=label)
        right.plot(blocks, [v["conflict"] for v in result["per_layer"].values()], marker=".",
                   label=f"{label} (mean {result['conflict']:.3f})")
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set_xlabel("transformer block")
    left.set_ylabel("mean cosine between task gradients")
    left.legend(fontsize=8)
    right.set_xlabel("transformer block")
    right.set_ylabel("conflict = mean max(0, -cos)")
    right.legend(fontsize=8)
    if ratio is not None:
        right.set_title(f"{ratio['compare']} / {ratio['baseline']} conflict = {ratio['ratio']:.2f} "
                        f"(reduction {100 * ratio['reduction']:.0f}%)")
    integer_ticks(left)
    integer_ticks(right)
    figure.tight_layout()
    return figure


def _conflict_ratio(results: dict, baseline: str, compare: str) -> dict | None:
    if baseline not in results or compare not in results:
        return None
    base = results[baseline]["conflict"]
    ratio = results[compare]["conflict"] / base if base > 0 else float("inf")
    return {"baseline": baseline, "compare": compare, "ratio": ratio, "reduction": 1.0 - ratio,
            "definition": "conflict = mean over layers and task pairs of max(0, -cos); reduction = 1 - ratio"}


def redraw(data: dict) -> plt.Figure:
    """The figure again from the JSON :func:`gradient_conflict` saved."""
    return plot_conflict(data["configurations"], data["conflict_ratio"])


def gradient_conflict(data_path: str, output_dir: str, checkpoints: list[tuple[str, str]] | None = None,
                      fresh: AdapterConfig | None = None, block_adapter_type: str = "ffn", init_noise: float = 1e-3,
                      model_name_or_path: str | None = None, samples_per_task: int = 32, batch_size: int = 8,
                      max_seq_length: int = 512, seed: int = 42, device: str = "cpu", dtype: str = "float32",
                      baseline_label: str = "component", compare_label: str = "block") -> dict:
    """Per-task gradient cosines of labelled checkpoints, or of fresh component/block adapters from ``fresh``."""
    if bool(checkpoints) == (fresh is not None):
        raise InvalidInput("give either --checkpoints or the method flags for fresh adapters, not both")
    if checkpoints:
        read_checkpoint_configs(checkpoints)  # every checkpoint checked before the first model loads
    configs = checkpoints or list(fresh_configs(fresh, block_adapter_type).items())
    records = sample_records_by_task(data_path, samples_per_task, seed, min_tasks=2)
    results = {}
    for label, source in configs:
        if checkpoints:
            model, tokenizer, config = load_checkpoint(source, model_name_or_path, dtype, device)
        else:
            config, tokenizer = source, load_tokenizer(model_name_or_path)
            model = _fresh_model(config, model_name_or_path, dtype, device, init_noise, seed)
        batches = task_batches(records, tokenizer, config, batch_size, max_seq_length)
        results[label] = {"source": str(source) if checkpoints else "fresh", "adapter_config": config.to_dict(),
                          **conflict_summary(layer_cosines(task_gradients(model, batches, device)))}
        del model
    ratio = _conflict_ratio(results, baseline_label, compare_label)
    data = {"data_path": str(data_path), "samples_per_task": samples_per_task, "tasks": list(records),
            "fresh_adapters_init_noise": None if checkpoints else init_noise,
            "configurations": results, "conflict_ratio": ratio}
    write_outputs(output_dir, NAME, plot_conflict(results, ratio), data)
    return data


def main(argv: list[str] | None = None) -> None:
    # The adapter flags of train.py (AdapterConfig) describe the fresh adapters when --checkpoints is not given;
    # --trainable sets the component-level targets and --block_adapter_type the block of the block-level twin.
    parser = HfArgumentParser(AdapterConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=None,
                        help="label=path items, e.g. component=outputs/hydra block=outputs/block_ffn.")
    parser.add_argument("--baseline_label", default="component", help="Denominator of the conflict ratio.")
    parser.add_argument("--compare_label", default="block", help="Numerator of the conflict ratio.")
    parser.add_argument("--init_noise", type=float, default=1e-3,
                        help="Std of the noise added to the zero-init B of fresh adapters.")
    add_data_arguments(parser)
    add_model_arguments(parser)
    fresh, args = parser.parse_args_into_dataclasses(args=argv)
    try:
        data = gradient_conflict(
            args.data_path, args.output_dir, parse_labelled_paths(args.checkpoints) if args.checkpoints else None,
            None if args.checkpoints else fresh, fresh.block_adapter_type, args.init_noise, args.model_name_or_path, args.samples_per_task,
            args.batch_size, args.max_seq_length, args.seed, args.device, args.dtype, args.baseline_label,
            args.compare_label)
    except UsageError as err:
        sys.exit(f"error: {err}")
    for label, result in data["configurations"].items():
        print(f"{label}: mean cosine {result['mean_cosine']:.3f}, negative pairs {result['negative_fraction']:.2f}, "
              f"conflict {result['conflict']:.4f}")
    if data["conflict_ratio"]:
        print(f"conflict ratio {data['conflict_ratio']['ratio']:.3f} "
              f"(reduction {100 * data['conflict_ratio']['reduction']:.1f}%)")


if __name__ == "__main__":
    main()
