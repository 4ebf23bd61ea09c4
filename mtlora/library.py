"""A library of plain LoRA adapters: K ``train.py --method lora`` checkpoints that share targets and rank.

LoRAHub, the merge baselines (Task Arithmetic, TIES, DARE) and MoLE all start from such a library. A
checkpoint stores, per adapted linear layer ("host"), ``<host>.adapter.lora_A`` (r, d_in) and
``<host>.adapter.lora_B`` (1, d_out, r); the update is s * B A with s = alpha / r.

Everything here reads only the small adapter files (and, for :func:`check_library_fits`, a model that may
live on the meta device), so bad input is reported before any base model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mtlora.checkpoint import ADAPTER_WEIGHTS, is_adapter_checkpoint, read_adapter_config
from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput, MissingInput

# What makes two LoRA adapters interchangeable: the other fields describe training, not the adapter's shape.
SHAPE_FIELDS = ("method", "lora_rank", "lora_alpha", "trainable")
TRAIN_SUMMARY = "train_summary.json"  # written by train.py next to the final adapter; names the base model
A_SUFFIX, B_SUFFIX = ".adapter.lora_A", ".adapter.lora_B"


def resolve_lora_checkpoints(spec: str) -> list[str]:
    """``--lora_checkpoints``: a comma-separated list of checkpoint folders, or one folder whose sub-folders
    are checkpoints (taken in name order)."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if len(entries) == 1 and Path(entries[0]).is_dir() and not is_adapter_checkpoint(entries[0]):
        children = sorted(str(child) for child in Path(entries[0]).iterdir() if is_adapter_checkpoint(child))
        if not children:
            raise MissingInput(f"--lora_checkpoints {entries[0]}: neither a checkpoint nor a folder of checkpoints "
                                    "(folders with adapter_model.safetensors + adapter_config.json)")
        return children
    if not entries:
        raise InvalidInput("--lora_checkpoints: give at least one checkpoint")
    return entries


def recorded_base_model(checkpoint: str | Path) -> str | None:
    """The ``--model_name_or_path`` a checkpoint was trained on, from its train_summary.json (None: not recorded
    or the default model)."""
    summary = Path(checkpoint) / TRAIN_SUMMARY
    return json.loads(summary.read_text()).get("model") if summary.is_file() else None


def check_lora_configs(checkpoints: Sequence[str | Path]) -> AdapterConfig:
    """The shared config of K ``--method lora`` checkpoints; raises naming the first one that differs in its
    targets, rank, alpha or recorded base model."""
    if not checkpoints:
        raise InvalidInput("--lora_checkpoints: give at least one checkpoint")
    for path in checkpoints:
        if not is_adapter_checkpoint(path):
            raise MissingInput(f"--lora_checkpoints {path}: expected a folder with {ADAPTER_WEIGHTS} and "
                                    "adapter_config.json (written by train.py --method lora)")
    configs = [read_adapter_config(path) for path in checkpoints]
    reference = {k: getattr(configs[0], k) for k in SHAPE_FIELDS}
    for path, config in zip(checkpoints, configs):
        if config.method != "lora":
            raise InvalidInput(f"--lora_checkpoints {path}: expected a --method lora adapter, got {config.method}")
        diff = [k for k in SHAPE_FIELDS if getattr(config, k) != reference[k]]
        if diff:
            raise InvalidInput(f"--lora_checkpoints {path}: adapter config differs from {checkpoints[0]} in {diff}")
    recorded = {str(path): recorded_base_model(path) for path in checkpoints}
    known = {path: model for path, model in recorded.items() if model is not None}
    if len(set(known.values())) > 1:
        first, *rest = known.items()
        other = next((path, model) for path, model in rest if model != first[1])
        raise InvalidInput(f"--lora_checkpoints {other[0]}: trained on {other[1]!r}, but {first[0]} on {first[1]!r} "
                         f"({TRAIN_SUMMARY}); a library must share one base model")
    return dataclasses.replace(configs[0])  # task_names (init=False) is left empty


def read_lora_modules(checkpoints: Sequence[str | Path]) -> tuple[AdapterConfig, list[dict[str, torch.Tensor]]]:
    """(config, state dicts) of K ``--method lora`` checkpoints with the same targets, rank, alpha and tensors."""
    config = check_lora_configs(checkpoints)
    modules = [load_file(str(Path(path) / ADAPTER_WEIGHTS)) for path in checkpoints]
    expected = {name: tuple(t.shape) for name, t in modules[0].items()}
    for path, module in zip(checkpoints, modules):
        shapes = {name: tuple(t.shape) for name, t in module.items()}
        if shapes != expected:
            diff = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
            raise InvalidInput(f"--lora_checkpoints {path}: its tensors differ from {checkpoints[0]}'s (e.g. {diff}): "
                             "trained on another base model?")
    return config, modules


def lora_factors(module: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """host name -> (A (r, d_in), B (d_out, r)) for one plain-LoRA state dict, in file order."""
    factors = {}
    for name, tensor in module.items():
        if name.endswith(A_SUFFIX):
            host = name[: -len(A_SUFFIX)]
            factors[host] = (tensor, module[host + B_SUFFIX][0])
    return factors


def check_library_fits(model: nn.Module, module: dict[str, torch.Tensor], checkpoint: str | Path) -> None:
    """Every host of ``module`` is a linear layer of ``model`` with the adapter's input and output widths.

    ``model`` may be on the meta device (:func:`mtlora.loading.build_meta_model`): only shapes are read.
    """
    for host, (lora_A, lora_B) in lora_factors(module).items():
        try:
            linear = model.get_submodule(host)
        except AttributeError:
            raise InvalidInput(f"--lora_checkpoints {checkpoint}: the model has no module {host} "
                             "(adapter trained on another architecture?)") from None
        if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (lora_A.shape[1], lora_B.shape[0]):
            raise InvalidInput(f"--lora_checkpoints {checkpoint}: adapter of {host} maps {lora_A.shape[1]} -> "
                             f"{lora_B.shape[0]}, but the model's {host} is {linear} (different base model?)")
