"""The training run behind train.py: validate everything cheap first, then load, attach, train, save."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from mtlora.arguments import AdapterTrainingArguments, DataArguments, ModelArguments
from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput, MissingInput
from mtlora.injection import attach_adapters, find_decoder_layers
from mtlora.loading import build_meta_model, load_base_model, load_tokenizer
from mtlora.losses import AuxiliaryLosses
from mtlora.params import count_parameters, format_parameter_count
from mtlora.trainer import AdapterTrainer
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


def deepspeed_config(training_args: AdapterTrainingArguments) -> dict | None:
    """The --deepspeed config (a JSON file or a dict), or None without DeepSpeed."""
    config = training_args.deepspeed
    if not config:
        return None
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise MissingInput(f"--deepspeed {config}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInput(f"--deepspeed {config}:{err.lineno}: invalid JSON ({err.msg})") from None


def deepspeed_zero_stage(training_args: AdapterTrainingArguments) -> int | None:
    """The ZeRO stage of --deepspeed, or None without DeepSpeed."""
    config = deepspeed_config(training_args)
    return None if config is None else config.get("zero_optimization", {}).get("stage", 0)


def check_distributed_support(aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments) -> None:
    """Refuse, before anything is loaded, a --deepspeed config the run cannot use or would train differently under."""
    config = deepspeed_config(training_args)
    if config is None:
        return
    source = f"--deepspeed {training_args.deepspeed}" if isinstance(training_args.deepspeed, str) else "--deepspeed"
    replaced = [key for key in ("optimizer", "scheduler") if key in config]
    if replaced:
        raise InvalidInput(
            f"{source}: remove its {' and '.join(map(repr, replaced))} section: the optimizer and learning-rate "
            "schedule come from train.py's flags (--optim, --learning_rate, --weight_decay, --lr_scheduler_type, "
            "--warmup_steps), so that a DeepSpeed run trains like a DDP one; a DeepSpeed scheduler would replace "
            "the schedule, and DeepSpeed's optimizers are compiled on first use")
    if aux_losses.enable_spectral_reg and config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise InvalidInput("--enable_spectral_reg needs every expert matrix whole on each rank, which ZeRO-3 "
                           f"partitions ({source}): use configs/ds_zero2.json or plain DDP")
    if "WORLD_SIZE" not in os.environ and not mpi_available():
        raise InvalidInput(
            f"{source} needs a launcher that starts the ranks: `deepspeed --num_gpus N train.py ...`, `torchrun "
            "--nproc_per_node N train.py ...` or `accelerate launch --use_deepspeed --num_processes N train.py ...` "
            "(N = 1 for one GPU); without one DeepSpeed looks for MPI, and mpi4py is not installed")


def mpi_available() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def load_for_zero3(model_name_or_path: str | None, dtype: torch.dtype, adapter_config: AdapterConfig,
                   training_args: AdapterTrainingArguments):
    """The base model, partitioned across ranks as it loads (ZeRO-3), with adapters attached."""
    import deepspeed

    deepspeed.init_distributed()  # partitioning needs the ranks; a no-op where the launcher's setup started them
    # Each parameter's placeholder must stay on this rank's device: DeepSpeed gathers a parameter onto it.
    model = load_base_model(model_name_or_path, dtype=dtype, device=training_args.device)
    return attach_adapters(model, adapter_config)


def run_training(model_args: ModelArguments, data_args: DataArguments, adapter_config: AdapterConfig,
                 aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments,
                 callbacks: list | None = None) -> dict:
    """Train adapters and save them in --output_dir; returns the run summary (also written as JSON)."""
    adapter_config.validate()
    aux_losses.validate(adapter_config)
    check_distributed_support(aux_losses, training_args)
    if data_args.data_path is None:
        raise InvalidInput("--data_path is required for training (a JSON/JSONL file of instruction records)")
    if data_args.max_seq_length < 8:
        raise InvalidInput(f"--max_seq_length must be at least 8, got {data_args.max_seq_length}")
    records = read_instruction_records(data_args.data_path)
    adapter_config.task_names = task_labels(records)
    # Every check that needs the model's shapes (target names, group sizes), on the architecture alone;
    # counted here too, since ZeRO-3 partitions the loaded weights.
    meta_model = attach_adapters(build_meta_model(model_args.model_name_or_path), adapter_config)
    trainable, total = count_parameters(meta_model)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    dataset = InstructionDataset(records, tokenizer, data_args.max_seq_length, adapter_config.task_names)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    set_seed(training_args.seed)  # adapter and router initialisation is part of the run's seeded state
    if deepspeed_zero_stage(training_args) == 3:
        model = load_for_zero3(model_args.model_name_or_path, dtype, adapter_config, training_args)
    else:
        model = attach_adapters(load_base_model(model_args.model_name_or_path, dtype=dtype), adapter_config)
    if model_args.compile_layers:
        compile_decoder_layers(model)
    if training_args.should_log:
        print(format_parameter_count(trainable, total))
        print(f"training examples: {len(dataset)} "
              f"({dataset.num_truncated} truncated to {data_args.max_seq_length} tokens)")

    trainer = AdapterTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=callbacks,
        adapter_config=adapter_config, aux_losses=aux_losses,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # on the main process only, gathered from every rank under DeepSpeed
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
