"""Save and load adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

Loading is strict: every adapter tensor of the model must be in the file with the same shape, and the
file may hold nothing else (the reference evaluators load non-strictly, so a mismatch passes silently).
Each file is written under a temporary name and renamed into place, so a kill during a save never leaves
a half-written file under the real name; a truncated or malformed file is reported by name before any
model is loaded. A plain ``lora`` adapter can also be exported in the standard PEFT adapter layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mtlora.config import AdapterConfig, AdapterConfigError
from mtlora.errors import InvalidInput, MissingInput
from mtlora.injection import adapter_modules, adapter_state_dict, attach_adapters

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(model: nn.Module, config: AdapterConfig, output_dir: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter weights and config to ``output_dir``.

    ``state_dict`` is a full (e.g. DeepSpeed-gathered) state dict to take the adapter tensors from
    instead of the model's own parameters.
    """
    output_dir = save_adapter_weights(model, output_dir, state_dict)
    with _replaced_atomically(output_dir / ADAPTER_CONFIG) as temporary:
        config.save(temporary)
    return output_dir


def save_adapter_weights(model: nn.Module, output_dir: str | Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter tensors (the ``.adapter.`` entries of the state dict) to ``adapter_model.safetensors``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source = adapter_state_dict(model)
    if state_dict is not None:
        source = {name: state_dict[name] for name in source}
    tensors = {name: t.detach().contiguous().cpu() for name, t in source.items()}
    with _replaced_atomically(output_dir / ADAPTER_WEIGHTS) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt", "library": "mtlora"})
    return output_dir


@contextmanager
def _replaced_atomically(path: Path) -> Iterator[Path]:
    """``with _replaced_atomically(path) as temporary:`` write ``temporary``; on success it replaces ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def is_adapter_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_WEIGHTS).is_file() and (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(checkpoint_dir: str | Path, flag: str = "--lora_checkpoint") -> AdapterConfig:
    """The config saved with a checkpoint; a clear error naming ``flag`` when the folder is not one."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_adapter_checkpoint(checkpoint_dir):
        raise MissingInput(
            f"{flag} {checkpoint_dir}: expected a folder with {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} "
            "(written by train.py)"
        )
    check_adapter_weights(checkpoint_dir)
    config = AdapterConfig.load(checkpoint_dir / ADAPTER_CONFIG)
    try:
        config.validate()
    except AdapterConfigError as err:
        raise AdapterConfigError(f"{checkpoint_dir / ADAPTER_CONFIG}: {err}") from None
    return config


def check_adapter_weights(checkpoint_dir: str | Path) -> None:
    """Raise naming the file when ``adapter_model.safetensors`` is truncated or not a safetensors file.

    Reads only the header, which lists every tensor's byte range, so a file cut short is detected.
    """
    path = Path(checkpoint_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise InvalidInput(f"{path}: not a complete safetensors file ({err}); the checkpoint is truncated or "
                           "corrupt (a run killed while saving?)") from None


def load_adapter_weights(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Copy the saved adapter tensors into ``model`` (adapters already attached), strictly."""
    check_adapter_weights(checkpoint_dir)
    saved = load_file(str(Path(checkpoint_dir) / ADAPTER_WEIGHTS))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong_shape = [k for k in set(expected) & set(saved) if expected[k].shape != saved[k].shape]
    if missing or unexpected or wrong_shape:
        raise InvalidInput(
            f"adapter checkpoint {checkpoint_dir} does not match the model: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong_shape[:5]}"
        )
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        params[name].data.copy_(tensor.to(params[name].device))


def load_adapter(model: nn.Module, checkpoint_dir: str | Path) -> AdapterConfig:
    """Attach the adapters a train.py checkpoint describes to ``model`` (frozen) and load their weights."""
    config = read_adapter_config(checkpoint_dir)
    attach_adapters(model, config)
    load_adapter_weights(model, checkpoint_dir)
    return config


def export_peft_lora(model: nn.Module, config: AdapterConfig, output_dir: str | Path,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a ``--method lora`` adapter as a standard PEFT LoRA adapter (loadable by ``PeftModel``)."""
    if config.method != "lora":
        raise InvalidInput(f"only --method lora adapters have a PEFT equivalent, not {config.method}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, adapter in adapter_modules(model).items():
        host = name[: -len(".adapter")]
        tensors[f"base_model.model.{host}.lora_A.weight"] = adapter.lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{host}.lora_B.weight"] = adapter.lora_B[0].detach().cpu().contiguous()
    save_file(tensors, str(output_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": list(config.trainable), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
    }
    (output_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return output_dir
