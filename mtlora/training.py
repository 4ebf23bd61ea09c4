"""The training run behind train.py: validate everything cheap first, then load, attach, train, save."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from transformers import set_seed

from mtlora.arguments import BASE_DTYPES, AdapterTrainingArguments, DataArguments, ModelArguments
from mtlora.checkpoint import is_adapter_checkpoint
from mtlora.config import AdapterConfig, warn_ignored
from mtlora.errors import InvalidInput, MissingInput
from mtlora.injection import attach_adapters, detach_adapters, find_decoder_layers
from mtlora.library import resolve_lora_checkpoints
from mtlora.loading import (RANDOM_INIT_SEED, build_meta_model, has_tokenizer, is_config_only, load_base_model,
                            load_tokenizer, resolve_model_source, resolve_tokenizer_source, tokenizer_source)
from mtlora.losses import AuxiliaryLosses
from mtlora.params import count_parameters, format_parameter_count
from mtlora.run_folder import (TRAIN_SUMMARY, check_resume_checkpoint, claim_output_dir, last_valid_checkpoint,
                               resumes_last, run_identity)
from mtlora.trainer import AdapterTrainer, ProgressFile, StepTimes, write_progress
from mtlora.training_data import InstructionDataset, PaddingCollator, read_instruction_records, task_labels


def allow_checkpointed_side_effects() -> None:
    """The adapters record their routing means (a module attribute) inside the checkpointed region; dynamo
    refuses that side effect under activation checkpointing unless told not to replay it in the recomputation
    (eager replays it harmlessly). Older torch releases (2.6 among them) have no such setting: there the write
    is a graph break, which costs speed, not correctness (the compiled-vs-eager test passes on 2.6)."""
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def compile_decoder_layers(model) -> None:
    """Compile every decoder layer in place; the graph is shared by the layers (same code, same shapes)."""
    allow_checkpointed_side_effects()
    for layer in find_decoder_layers(model):
        layer.compile()


def count_only(model_args: ModelArguments, adapter_config: AdapterConfig) -> int:
    """Attach adapters to a meta-device model and print ``trainable params: N``."""
    warn_ignored(adapter_config.ignored_flags())
    model = attach_adapters(build_meta_model(model_args.model_name_or_path), adapter_config.effective())
    trainable, total = count_parameters(model)
    print(format_parameter_count(trainable, total))
    return trainable


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


def zero_stage(config: dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config, or None without one."""
    return None if config is None else config.get("zero_optimization", {}).get("stage", 0)


def check_checkpointing(aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments) -> None:
    """--blc_mode live under reentrant checkpointing would silently be the reference mode (the balance term is
    recorded under no_grad there): refuse it."""
    kwargs = training_args.gradient_checkpointing_kwargs or {}
    if (aux_losses.enable_blc and aux_losses.blc_mode == "live" and training_args.gradient_checkpointing
            and isinstance(kwargs, dict) and kwargs.get("use_reentrant")):
        raise InvalidInput("--blc_mode live needs non-reentrant checkpointing: with --gradient_checkpointing_kwargs "
                           "use_reentrant true the balance term has no gradient (that is --blc_mode reference)")


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
    if aux_losses.enable_spectral_reg and zero_stage(config) == 3:
        raise InvalidInput("--enable_spectral_reg needs every expert matrix whole on each rank, which ZeRO-3 "
                           f"partitions ({source}): use configs/ds_zero2.json or plain DDP")
    if "WORLD_SIZE" not in os.environ and not mpi_available():
        raise InvalidInput(
            f"{source} needs a launcher that starts the ranks: `deepspeed --num_gpus N train.py ...`, `torchrun "
            "--nproc_per_node N train.py ...` or `accelerate launch --use_deepspeed --num_processes N train.py ...` "
            "(N = 1 for one GPU); without one DeepSpeed looks for MPI, and mpi4py is not installed")


def mpi_available() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def check_training_arguments(training_args: AdapterTrainingArguments) -> None:
    """The Trainer flags it would only reject (or silently accept) after the model is loaded."""
    for flag, value, minimum in (("--per_device_train_batch_size", training_args.per_device_train_batch_size, 1),
                                 ("--gradient_accumulation_steps", training_args.gradient_accumulation_steps, 1)):
        if value < minimum:
            raise InvalidInput(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--weight_decay", training_args.weight_decay),
                        ("--max_grad_norm", training_args.max_grad_norm)):
        if value is not None and value < 0:
            raise InvalidInput(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--seed", training_args.seed), ("--data_seed", training_args.data_seed)):
        if value is not None and not 0 <= value < 2**32:
            raise InvalidInput(f"{flag} must be in [0, 2**32), got {value}")
    if training_args.learning_rate <= 0:
        raise InvalidInput(f"--learning_rate must be > 0, got {training_args.learning_rate}")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise InvalidInput(f"--num_train_epochs must be > 0 (or --max_steps > 0), got {training_args.num_train_epochs}")
    if training_args.save_strategy == "steps" and training_args.save_steps <= 0:
        raise InvalidInput(f"--save_steps must be > 0, got {training_args.save_steps}")


def claim_run_folder(training_args: AdapterTrainingArguments, identity: dict) -> tuple[str | None, list[str]]:
    """Check --resume_from_checkpoint, make --output_dir this run's; returns (checkpoint to resume from or None,
    how an explicitly given checkpoint's run differs from this one)."""
    resume = training_args.resume_from_checkpoint
    differences = check_resume_checkpoint(resume, identity) if resume and not resumes_last(resume) else []
    with training_args.main_process_first(local=False, desc="claiming --output_dir"):
        claim_output_dir(training_args.output_dir, identity, training_args.overwrite_output_dir,
                         resuming=resume is not None, is_main=training_args.should_save)
    if resumes_last(resume):
        resume = last_valid_checkpoint(training_args.output_dir, identity)
    return resume, differences


def run_training(model_args: ModelArguments, data_args: DataArguments, adapter_config: AdapterConfig,
                 aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments,
                 callbacks: list | None = None, base_model=None) -> dict:
    """Train adapters and save them in --output_dir; returns the run summary (also written as JSON).

    ``base_model``: the base model --model_name_or_path names, already loaded (a benchmark training several
    configurations on one model); the adapters are attached to it and left attached.
    """
    adapter_config.validate()
    aux_losses.validate(adapter_config)
    check_training_arguments(training_args)
    if model_args.base_dtype not in BASE_DTYPES:
        raise InvalidInput(f"--base_dtype: expected one of {', '.join(BASE_DTYPES)}, got {model_args.base_dtype!r}")
    ignored_flags = adapter_config.ignored_flags() + aux_losses.ignored_flags()
    warn_ignored(ignored_flags)
    adapter_config = adapter_config.effective()  # what the run records
    check_distributed_support(aux_losses, training_args)
    check_checkpointing(aux_losses, training_args)
    if adapter_config.is_mole:  # absolute paths: the checkpoint's config names the library wherever it is read
        adapter_config.lora_library = [str(Path(p).resolve())
                                       for p in resolve_lora_checkpoints(",".join(adapter_config.lora_library))]
    if data_args.data_path is None:
        raise InvalidInput("--data_path is required for training (a JSON/JSONL file of instruction records)")
    if data_args.max_seq_length < 8:
        raise InvalidInput(f"--max_seq_length must be at least 8, got {data_args.max_seq_length}")
    records = read_instruction_records(data_args.data_path)
    adapter_config.task_names = task_labels(records)
    # Every check that needs the model's shapes (target names, group sizes), on the architecture alone;
    # counted here too, since ZeRO-3 partitions the loaded weights.
    counts = count_parameters(attach_adapters(build_meta_model(model_args.model_name_or_path), adapter_config))
    check_model_source(model_args)
    if data_args.train_per_task:
        return train_task_library(model_args, data_args, adapter_config, aux_losses, training_args, records,
                                  counts, ignored_flags, callbacks)
    identity = training_run_identity(model_args, data_args, adapter_config, aux_losses, training_args)
    resume, resumed_differences = claim_run_folder(training_args, identity)
    base_model = load_model(model_args, training_args) if base_model is None else base_model
    return train_adapter(base_model, load_run_tokenizer(model_args),
                         records, model_args, data_args, adapter_config, aux_losses, training_args, identity, counts,
                         resume, resumed_differences, ignored_flags, callbacks)


def check_model_source(model_args: ModelArguments) -> None:
    """Training needs weights, or --random_init; and a tokenizer: the model's, or --tokenizer_name_or_path's."""
    folder, gguf_file = resolve_model_source(model_args.model_name_or_path)
    config_only = gguf_file is None and is_config_only(folder)
    if config_only and not model_args.random_init:
        raise InvalidInput(f"--model_name_or_path {folder}: holds only config.json; training needs the weights "
                           "(a config-only folder serves --count_params_only, and a dry run with --random_init)")
    if model_args.tokenizer_name_or_path is None and config_only and not has_tokenizer(folder):
        raise InvalidInput(f"--random_init with the config-only folder {folder} needs --tokenizer_name_or_path "
                           "(any LLaMA-family tokenizer, e.g. configs/models/smollm2-135m)")
    resolve_tokenizer_source(*tokenizer_source(model_args.model_name_or_path, model_args.tokenizer_name_or_path))


def training_run_identity(model_args: ModelArguments, data_args: DataArguments, adapter_config: AdapterConfig,
                          aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments) -> dict:
    """The run's identity (mtlora.run_folder.run_identity); a --random_init run's model is marked as such, so a dry
    run's folder never passes for (or resumes) a real one."""
    identity = run_identity(model_args.model_name_or_path, data_args.data_path, data_args.max_seq_length,
                            adapter_config, aux_losses.effective(), training_args, model_args.base_dtype)
    if model_args.random_init:
        identity["model"] = {**identity["model"], "random_init_seed": RANDOM_INIT_SEED,
                             "tokenizer": model_args.tokenizer_name_or_path}
    return identity


def load_run_tokenizer(model_args: ModelArguments):
    return load_tokenizer(*tokenizer_source(model_args.model_name_or_path, model_args.tokenizer_name_or_path))


def load_model(model_args: ModelArguments, training_args: AdapterTrainingArguments):
    """The frozen base model in the dtype of --base_dtype (auto: bfloat16 with --bf16, else float32); under ZeRO-3
    partitioned across the ranks as it loads. With --random_init, random weights built on the training device."""
    auto = torch.bfloat16 if training_args.bf16 else torch.float32
    dtype = {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16}[model_args.base_dtype]
    if model_args.random_init:
        return load_base_model(model_args.model_name_or_path, dtype=dtype, device=training_args.device,
                               random_init=True)
    if zero_stage(deepspeed_config(training_args)) != 3:
        return load_base_model(model_args.model_name_or_path, dtype=dtype)
    import deepspeed

    deepspeed.init_distributed()  # partitioning needs the ranks; a no-op where the launcher's setup started them
    # Each parameter's placeholder must stay on this rank's device: DeepSpeed gathers a parameter onto it.
    return load_base_model(model_args.model_name_or_path, dtype=dtype, device=training_args.device)


def train_adapter(base_model, tokenizer, records: list[dict], model_args: ModelArguments, data_args: DataArguments,
                  adapter_config: AdapterConfig, aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments,
                  identity: dict, counts: tuple[int, int], resume: str | None = None,
                  resumed_differences: list[str] = (), ignored_flags: list[str] = (),
                  callbacks: list | None = None) -> dict:
    """Attach adapters to ``base_model``, train them on ``records``, save them in --output_dir; returns the summary.

    ``counts``: (trainable, total) parameters, counted on the meta-device model (ZeRO-3 partitions the real one).
    """
    trainable, total = counts
    dataset = InstructionDataset(records, tokenizer, data_args.max_seq_length, adapter_config.task_names)
    check_vocabulary(dataset, base_model.config.vocab_size, model_args)
    set_seed(training_args.seed)  # adapter and router initialisation is part of the run's seeded state
    model = attach_adapters(base_model, adapter_config)
    if model_args.compile_layers:
        compile_decoder_layers(model)
    if training_args.should_log:
        print(format_parameter_count(trainable, total))
        print(f"training examples: {len(dataset)} "
              f"({dataset.num_truncated} truncated to {data_args.max_seq_length} tokens)")

    step_times = StepTimes()
    trainer = AdapterTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        callbacks=[ProgressFile(training_args.output_dir), step_times, *(callbacks or [])],
        adapter_config=adapter_config, aux_losses=aux_losses, run_identity=identity,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    summary = {
        "model": model_args.model_name_or_path, "adapter_config": adapter_config.to_dict(),
        "auxiliary_losses": aux_losses.effective(), "ignored_flags": list(ignored_flags),
        "trainable_params": trainable, "total_params": total, "train_examples": len(dataset),
        "truncated_examples": dataset.num_truncated, "resumed_from": resume,
        "resumed_from_differences": list(resumed_differences),
        "global_step": result.global_step, "train_loss": result.training_loss,
        "train_seconds": time.perf_counter() - started, "metrics": result.metrics, **step_times.summary(),
        "log_history": trainer.state.log_history,
    }
    if trainer.args.should_save:  # the summary first: the adapter's files mark the run as finished
        Path(training_args.output_dir, TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    trainer.save_model()  # on the main process only, gathered from every rank under DeepSpeed
    return summary


def check_vocabulary(dataset: InstructionDataset, vocab_size: int, model_args: ModelArguments) -> None:
    """Every token id must index the model's embedding (a tokenizer from --tokenizer_name_or_path may be larger)."""
    largest = max(max(example["input_ids"]) for example in dataset.examples)
    if largest >= vocab_size:
        source, _ = tokenizer_source(model_args.model_name_or_path, model_args.tokenizer_name_or_path)
        raise InvalidInput(f"the training data has token id {largest}, outside the model's vocabulary of {vocab_size}: "
                           f"the tokenizer ({source}) does not fit --model_name_or_path {model_args.model_name_or_path}"
                           " (a dry run's synthetic data keeps to ids below the vocabulary: data/prepare.py synthetic)")


def train_task_library(model_args: ModelArguments, data_args: DataArguments, adapter_config: AdapterConfig,
                       aux_losses: AuxiliaryLosses, training_args: AdapterTrainingArguments, records: list[dict],
                       counts: tuple[int, int], ignored_flags: list[str] = (), callbacks: list | None = None) -> dict:
    """``--train_per_task``: one adapter per task label into ``<output_dir>/<task>/``, each trained as its own run
    (same flags and seed) on that task's records; the base model is loaded once; finished tasks are skipped."""
    tokenizer = load_run_tokenizer(model_args)
    base_model = load_model(model_args, training_args)
    summaries = {}
    for index, task in enumerate(adapter_config.task_names):
        output_dir = Path(training_args.output_dir) / task
        write_progress(training_args.output_dir, f"task {task}", index, len(adapter_config.task_names))
        if is_adapter_checkpoint(output_dir) and (output_dir / TRAIN_SUMMARY).is_file():
            summaries[task] = json.loads((output_dir / TRAIN_SUMMARY).read_text())
            continue
        task_args = copy.deepcopy(training_args)
        task_args.output_dir = str(output_dir)
        config = dataclasses.replace(adapter_config)
        config.task_names = [task]
        identity = training_run_identity(model_args, data_args, config, aux_losses, task_args)
        resume, _ = claim_run_folder(task_args, identity)
        summaries[task] = train_adapter(base_model, tokenizer, [r for r in records if r["task_type"] == task],
                                        model_args, data_args, config, aux_losses, task_args, identity, counts,
                                        resume, ignored_flags=ignored_flags, callbacks=callbacks)
        detach_adapters(base_model)
    summary = {"tasks": {t: {k: s[k] for k in ("train_examples", "global_step", "train_loss", "train_seconds",
                                                 "trainable_params")} for t, s in summaries.items()},
               "train_seconds": sum(s["train_seconds"] for s in summaries.values())}
    if training_args.should_save:
        Path(training_args.output_dir, "library_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
