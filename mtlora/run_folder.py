"""An output folder belongs to one run: its identity, its checkpoints, and resuming only what is whole and ours.

``run_identity.json`` (in ``--output_dir`` and in every ``checkpoint-N``) records what decides a run's
result: the base model's fingerprint, the training file's sha256, the adapter config and auxiliary losses
as used, and the training arguments that change the weights (not paths, logging or save cadence). train.py
refuses a folder that holds another run's checkpoints or adapter, and resumes from the newest checkpoint
that is complete and belongs to this run, saying which ones it skipped and why. A checkpoint is written
into a hidden ``.incomplete-checkpoint-N`` folder and renamed into place, so a kill during a save leaves
no ``checkpoint-N`` at all. All of this runs before the model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from mtlora.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from mtlora.errors import InvalidInput, MissingInput, UsageError
from mtlora.fingerprint import RESULTS_VERSION, file_fingerprint, model_fingerprint

RUN_IDENTITY = "run_identity.json"
TRAIN_SUMMARY = "train_summary.json"
TRAINER_STATE = "trainer_state.json"
STAGING_PREFIX = ".incomplete-"  # a checkpoint being written: .incomplete-checkpoint-N/checkpoint-N
REPLACED_PREFIX = ".replaced-"  # a checkpoint being replaced by a new one of the same step
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folder names
# What train.py writes at the top of --output_dir (checkpoint folders aside): the run's own files.
RUN_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAIN_SUMMARY, RUN_IDENTITY)
# TrainingArguments that change the trained weights. Paths, logging, save cadence, the device and memory
# savers (gradient checkpointing, compilation) do not; the batch split across devices only through the
# effective batch size, recorded as train_batch_size_total.
RESULT_TRAINING_ARGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                        "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                        "optim", "optim_args", "seed", "data_seed", "bf16", "fp16", "label_smoothing_factor",
                        "dataloader_drop_last", "train_sampling_strategy", "average_tokens_across_devices",
                        "loss_averaging",
                        "neftune_noise_alpha")
# Fields whose difference makes a checkpoint unusable for this run even when resumed from by explicit path.
STRUCTURAL_FIELDS = ("model", "adapter")


# ------------------------------------------------------------------------------------------ identity

def training_identity(training_args) -> dict:
    """The result-deciding training arguments, JSON-safe (epochs are dropped when --max_steps overrides them)."""
    values = {name: getattr(training_args, name, None) for name in RESULT_TRAINING_ARGS}
    if training_args.max_steps > 0:
        values["num_train_epochs"] = None
    values["train_batch_size_total"] = (training_args.per_device_train_batch_size
                                        * training_args.gradient_accumulation_steps * training_args.world_size)
    return json.loads(json.dumps(values, default=str))


def run_identity(model_name_or_path: str | None, data_path: str, max_seq_length: int, adapter_config,
                 auxiliary_losses: dict, training_args, base_dtype: str = "auto") -> dict:
    """What decides a run's result (``adapter_config``: as used, see AdapterConfig.effective)."""
    return {"results_version": RESULTS_VERSION, "model": model_fingerprint(model_name_or_path), "base_dtype": base_dtype,
            "data": {"sha256": file_fingerprint(data_path), "max_seq_length": max_seq_length},
            "adapter": adapter_config.to_dict(), "auxiliary_losses": auxiliary_losses,
            "training": training_identity(training_args)}


def identity_differences(stored: dict, current: dict) -> list[str]:
    """``field: stored -> current`` for every leaf that differs (dotted names, sorted)."""
    old, new = _flatten(stored), _flatten(current)
    return [f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]


def read_identity(folder: Path) -> dict | None:
    """The run identity stored in ``folder``; None when there is none or it is unreadable."""
    try:
        values = json.loads((folder / RUN_IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def write_identity(folder: Path, identity: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{RUN_IDENTITY}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(identity, indent=2) + "\n")
    os.replace(temporary, folder / RUN_IDENTITY)


# ------------------------------------------------------------------------------------- output folder

def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``folder``, newest (highest N) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def run_outputs(folder: Path) -> list[str]:
    """Names of the checkpoints and adapter files a run left in ``folder`` (empty: it holds no run)."""
    names = [p.name for p in checkpoints(folder)]
    return names + [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if (folder / name).is_file()]


def clear_run(folder: Path) -> None:
    """Delete what a run wrote into ``folder`` (checkpoints, adapter, summary, identity, unfinished saves);
    anything else in the folder (logs, evaluation results) is left alone."""
    for path in checkpoints(folder) + _unfinished(folder):
        shutil.rmtree(path)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)


def _unfinished(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and p.name.startswith((STAGING_PREFIX, REPLACED_PREFIX))]


def claim_output_dir(output_dir: str, identity: dict, overwrite: bool, resuming: bool, is_main: bool = True) -> None:
    """Make ``output_dir`` this run's folder, or raise naming --output_dir when it holds another run.

    A folder holding checkpoints or an adapter must carry this run's identity; with ``overwrite`` that run's
    files are deleted instead. Without ``resuming``, a folder already holding this run is refused too (its
    checkpoints would be overwritten one by one). Only the main process (``is_main``) changes the folder.
    """
    folder = Path(output_dir)
    outputs = run_outputs(folder)
    if outputs and overwrite:
        if is_main:
            clear_run(folder)
            print(f"--overwrite_output_dir: deleted the run in {folder} ({_listing(outputs)})", file=sys.stderr)
    elif outputs:
        stored = read_identity(folder)
        if stored is None:
            raise InvalidInput(
                f"--output_dir {folder} holds {_listing(outputs)} but no readable {RUN_IDENTITY}, so they cannot be "
                "matched to this run: use a new --output_dir, or pass --overwrite_output_dir to delete them")
        differences = identity_differences(stored, identity)
        if differences:
            raise InvalidInput(
                f"--output_dir {folder} holds another run ({_listing(outputs)}); its {RUN_IDENTITY} differs in "
                f"{_listing(differences, 8, '; ')}. Use a new --output_dir, or pass --overwrite_output_dir to "
                "delete that run")
        if not resuming:
            raise InvalidInput(
                f"--output_dir {folder} already holds this run ({_listing(outputs)}): pass "
                "--resume_from_checkpoint last to continue it, or --overwrite_output_dir to start over")
    if is_main:
        for path in _unfinished(folder):
            shutil.rmtree(path)
        write_identity(folder, identity)


def _listing(items: list[str], limit: int = 4, separator: str = ", ") -> str:
    shown = separator.join(items[:limit])
    return shown + (f"{separator}... ({len(items)} in all)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------- resuming

def checkpoint_problem(checkpoint: Path, identity: dict | None = None) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None: it is whole and, given ``identity``, this run's).

    Checks the adapter (complete safetensors, valid config), that ``trainer_state.json`` parses, that every
    torch file (optimizer, scheduler, RNG states) is a complete archive, and the checkpoint's own identity.
    """
    try:
        read_adapter_config(checkpoint, "checkpoint")
    except UsageError as err:
        return str(err)
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{checkpoint / TRAINER_STATE} is missing or not valid JSON ({err})"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{checkpoint / TRAINER_STATE} has no global_step"
    for path in sorted(checkpoint.iterdir()):
        if path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path} is truncated or not a torch archive"
    stored = read_identity(checkpoint)
    if identity is not None and stored is not None and (differences := identity_differences(stored, identity)):
        return f"belongs to another run ({RUN_IDENTITY} differs in {_listing(differences, 4, '; ')})"
    return None


def resumes_last(resume_from_checkpoint: str | None) -> bool:
    """``--resume_from_checkpoint last`` (or ``true``): the newest usable checkpoint in --output_dir."""
    return resume_from_checkpoint is not None and resume_from_checkpoint.lower() in ("last", "true")


def last_valid_checkpoint(output_dir: str, identity: dict) -> str | None:
    """The newest checkpoint in ``output_dir`` that is whole and this run's; each newer one is skipped with a
    message saying why (None: start from the beginning)."""
    for checkpoint in checkpoints(Path(output_dir)):
        problem = checkpoint_problem(checkpoint, identity)
        if problem is None:
            return str(checkpoint)
        print(f"--resume_from_checkpoint last: skipping {checkpoint}: {problem}", file=sys.stderr)
    return None


def check_resume_checkpoint(path: str, identity: dict) -> list[str]:
    """An explicit --resume_from_checkpoint must be whole. It may come from a run with other training settings or
    data (continuing a run deliberately: the differences are printed and returned for the summary), but not
    with another base model or adapter."""
    checkpoint = Path(path)
    if not checkpoint.is_dir():
        raise MissingInput(f"--resume_from_checkpoint {checkpoint}: no such folder")
    if (problem := checkpoint_problem(checkpoint)) is not None:
        raise InvalidInput(f"--resume_from_checkpoint {checkpoint}: {problem}")
    stored = read_identity(checkpoint) or read_identity(checkpoint.parent)
    differences = identity_differences(stored, identity) if stored is not None else [f"no {RUN_IDENTITY}"]
    structural = [d for d in differences if d.startswith(tuple(f"{f}." for f in STRUCTURAL_FIELDS))]
    if structural:
        raise InvalidInput(f"--resume_from_checkpoint {checkpoint}: trained with another base model or adapter "
                           f"({_listing(structural, 6, '; ')})")
    if differences:
        print(f"--resume_from_checkpoint {checkpoint}: continuing a run that differs from this one in "
              f"{_listing(differences, 8, '; ')}", file=sys.stderr)
    return differences


# ---------------------------------------------------------------------------------------- saving

def staging_folder(run_dir: Path, name: str) -> Path:
    """Where ``checkpoint-N`` is written before it is renamed into place (``name/`` inside it)."""
    return run_dir / f"{STAGING_PREFIX}{name}"


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Rename a fully written checkpoint into place, replacing an older one of the same step."""
    if final.exists():
        replaced = final.with_name(f"{REPLACED_PREFIX}{final.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staged, final)
        shutil.rmtree(replaced)
    else:
        os.replace(staged, final)
