"""The training run behind train.py: validate everything cheap first, then load, attach, train, save."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from mtlora.arguments import AdapterTrainingArguments, DataArguments, ModelArguments
from mtlora.checkpoint import is_adapter_checkpoint, save_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput, MissingInput
from mtlora.injection import attach_adapters, detach_adapters, find_decoder_layers
from mtlora.library import resolve_lora_checkpoints
from mtlora.loading import build_meta_model, load_base_model, load_tokenizer
from mtlora.losses import AuxiliaryLosses
from mtlora.params import count_parameters, format_parameter_count
from mtlora.trainer import AdapterTrainer, ProgressFile, write_progress
from mtlora.training_data import InstructionDataset, PaddingCollator, read_instruction_records, task_labels


def compile_decoder_layers(model) -> None:
    """Compile every decoder layer in place; the graph is shared by the layers (same code, same shapes)."""
    # The adapters record their routing means inside the checkpointed region; without this setting that
    # attribute write is a graph break under activation checkpointing.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in find_decoder_layers(model):
        layer.compile()


def count_only(model_args: ModelArguments, adapter_config: AdapterConfig) -> int:
    """Attach adapters to a meta-device model and print ``trainable params: N``."""
    model = attach_adapters(build_meta_model(model_args.model_name_or_path), adapter_config)
    trainable, total = count_parameters(model)
    print(format_parameter_count(trainable, total))
    return trainable


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """``last`` (or ``true``) means the newest checkpoint in --output_dir, if there is one."""
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() not in ("last", "true"):
        if resume_from_checkpoint and not Path(resume_from_checkpoint).is_dir():
            raise MissingInput(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder")
        return resume_from_checkpoint
    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def deepspeed_zero_stage(training_args: AdapterTrainingArguments) -> int | None:
    """The ZeRO stage of --deepspeed (a JSON path or dict), or None without DeepSpeed."""
    config = training_args.deepspeed
    if not config:
        return None
    if isinstance(config, str):
        if not Path(config).is_file():
            raise MissingInput(f"--deepspeed {config}: no such file")
        config = json.loads(Path(config).read_text())
    return config.get("zero_optimization", {}).get("stage", 0)


def check_distributed_support(aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments) -> None:
    """Spectral regularisation reads whole expert matrices, which ZeRO-3 partitions across ranks."""
    if aux_losses.enable_spectral_reg and deepspeed_zero_stage(training_args) == 3:
        raise InvalidInput("--enable_spectral_reg needs every expert matrix whole on each rank, which ZeRO-3 "
                         "partitions: use --deepspeed configs/ds_zero2.json or plain DDP")


def run_training(model_args: ModelArguments, data_args: DataArguments, adapter_config: AdapterConfig,
                 aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments,
                 callbacks: list | None = None) -> dict:
    """Train adapters and save them in --output_dir; returns the run summary (also written as JSON)."""
    adapter_config.validate()
    aux_losses.validate(adapter_config)
    check_distributed_support(aux_losses, training_args)
    if adapter_config.is_mole:  # absolute paths: the checkpoint's config names the library wherever it is read
        adapter_config.lora_library = [str(Path(p).resolve())
                                       for p in resolve_lora_checkpoints(",".join(adapter_config.lora_library))]
    if data_args.data_path is None:
        raise InvalidInput("--data_path is required for training (a JSON/JSONL file of instruction records)")
    if data_args.max_seq_length < 8:
        raise InvalidInput(f"--max_seq_length must be at least 8, got {data_args.max_seq_length}")
    records = read_instruction_records(data_args.data_path)
    adapter_config.task_names = task_labels(records)
    # Every check that needs the model's shapes (target names, group sizes), on the architecture alone.
    attach_adapters(build_meta_model(model_args.model_name_or_path), adapter_config)
    if data_args.train_per_task:
        return train_task_library(model_args, data_args, adapter_config, aux_losses, training_args, records, callbacks)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    return train_adapter(load_model(model_args, training_args), tokenizer, records, model_args, data_args,
                         adapter_config, aux_losses, training_args, resume, callbacks)


def load_model(model_args: ModelArguments, training_args: AdapterTrainingArguments):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    return load_base_model(model_args.model_name_or_path, dtype=dtype)


def train_adapter(base_model, tokenizer, records: list[dict], model_args: ModelArguments, data_args: DataArguments,
                  adapter_config: AdapterConfig, aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments,
                  resume: str | None = None, callbacks: list | None = None) -> dict:
    """Attach adapters to ``base_model``, train them on ``records``, save them in --output_dir; returns the summary."""
    dataset = InstructionDataset(records, tokenizer, data_args.max_seq_length, adapter_config.task_names)
    set_seed(training_args.seed)  # adapter and router initialisation is part of the run's seeded state
    model = attach_adapters(base_model, adapter_config)
    if model_args.compile_layers:
        compile_decoder_layers(model)
    trainable, total = count_parameters(model)
    print(format_parameter_count(trainable, total))
    print(f"training examples: {len(dataset)} ({dataset.num_truncated} truncated to {data_args.max_seq_length} tokens)")

    trainer = AdapterTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=[ProgressFile(training_args.output_dir),
                                                                          *(callbacks or [])],
        adapter_config=adapter_config, aux_losses=aux_losses,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    save_adapter(model, adapter_config, training_args.output_dir)
    summary = {
        "model": model_args.model_name_or_path, "adapter_config": adapter_config.to_dict(),
        "auxiliary_losses": dataclasses.asdict(aux_losses),
        "trainable_params": trainable, "total_params": total, "train_examples": len(dataset),
        "truncated_examples": dataset.num_truncated, "resumed_from": resume,
        "global_step": result.global_step, "train_loss": result.training_loss,
        "train_seconds": time.perf_counter() - started, "metrics": result.metrics,
        "log_history": trainer.state.log_history,
    }
    if trainer.args.should_save:
        Path(training_args.output_dir, "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_task_library(model_args: ModelArguments, data_args: DataArguments, adapter_config: AdapterConfig,
                       aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments, records: list[dict],
                       callbacks: list | None = None) -> dict:
    """``--train_per_task``: one adapter per task label into ``<output_dir>/<task>/``, each trained as its own run
    (same flags and seed) on that task's records; the base model is loaded once; finished tasks are skipped."""
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    base_model = load_model(model_args, training_args)
    summaries = {}
    for index, task in enumerate(adapter_config.task_names):
        output_dir = Path(training_args.output_dir) / task
        write_progress(training_args.output_dir, f"task {task}", index, len(adapter_config.task_names))
        if is_adapter_checkpoint(output_dir) and (output_dir / "train_summary.json").is_file():
            summaries[task] = json.loads((output_dir / "train_summary.json").read_text())
            continue
        task_args = copy.deepcopy(training_args)
        task_args.output_dir = str(output_dir)
        config = dataclasses.replace(adapter_config)
        config.task_names = [task]
        summaries[task] = train_adapter(base_model, tokenizer, [r for r in records if r["task_type"] == task],
                                        model_args, data_args, config, aux_losses, task_args,
                                        resolve_resume(training_args.resume_from_checkpoint, str(output_dir)), callbacks)
        detach_adapters(base_model)
    summary = {"tasks": {t: {k: s[k] for k in ("train_examples", "global_step", "train_loss", "train_seconds",
                                                 "trainable_params")} for t, s in summaries.items()},
               "train_seconds": sum(s["train_seconds"] for s in summaries.values())}
    if training_args.should_save:
        Path(training_args.output_dir, "library_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
