"""Adapter configuration: one dataclass that fully describes which adapters go where.

It is saved next to every adapter checkpoint (``adapter_config.json``) so a checkpoint can be
re-attached to a fresh base model without the training flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("lora", "hydralora", "mmoelora", "mtlora")
BLOCK_ADAPTER_TYPES = ("ffn", "attention", "both")
BLOCK_ADAPTER_STYLES = ("lowrank", "bottleneck", "adaptformer")
SPECTRAL_REG_FORMS = ("reference", "singular_basis")


class AdapterConfigError(ValueError):
    """A configuration value is invalid; the message names the command-line flag."""


@dataclass
class AdapterConfig:
    """Which adapter to attach, where, and with which hyper-parameters.

    Field names equal the command-line flags of ``train.py`` (``--lora_rank`` -> ``lora_rank``).
    """

    method: str = "hydralora"
    lora_rank: int = 16
    lora_alpha: float = 64.0
    lora_nums: int = 16
    lora_dropout: float = 0.05
    trainable: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    enable_block_adapter: bool = False
    block_adapter_type: str = "ffn"
    block_adapter_style: str = "lowrank"
    block_adapter_rank: int | None = None
    enable_fine_grained_routing: bool = False
    routing_group_size: int | None = None
    num_tasks: int = 1
    task_names: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        """Plain LoRA is a single adapter; every other method routes over ``lora_nums`` experts."""
        return 1 if self.method == "lora" else self.lora_nums

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def uses_block_adapter(self) -> bool:
        return self.enable_block_adapter and self.method in ("hydralora", "mtlora")

    def routing_groups(self, out_features: int) -> int:
        """Number of output-dimension groups G = d_out / g (1 means scalar routing per expert)."""
        if not self.enable_fine_grained_routing or self.routing_group_size is None:
            return 1
        return out_features // self.routing_group_size

    def validate(self, hidden_size: int | None = None) -> None:
        """Raise :class:`AdapterConfigError` naming the offending flag; cheap, run before any loading."""
        if self.method not in METHODS:
            raise AdapterConfigError(f"--method: unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.lora_rank < 1:
            raise AdapterConfigError(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_nums < 1:
            raise AdapterConfigError(f"--lora_nums (number of experts) must be >= 1, got {self.lora_nums}")
        if self.block_adapter_rank is not None and self.block_adapter_rank < 1:
            raise AdapterConfigError(f"--block_adapter_rank must be >= 1, got {self.block_adapter_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.block_adapter_type not in BLOCK_ADAPTER_TYPES:
            raise AdapterConfigError(
                f"--block_adapter_type: unknown type {self.block_adapter_type!r}; expected one of {', '.join(BLOCK_ADAPTER_TYPES)}"
            )
        if self.block_adapter_style not in BLOCK_ADAPTER_STYLES:
            raise AdapterConfigError(
                f"--block_adapter_style: unknown style {self.block_adapter_style!r}; expected one of {', '.join(BLOCK_ADAPTER_STYLES)}"
            )
        if self.enable_block_adapter and self.method in ("lora", "mmoelora"):
            raise AdapterConfigError(f"--enable_block_adapter is supported for hydralora and mtlora, not --method {self.method}")
        if not self.uses_block_adapter and not self.trainable:
            raise AdapterConfigError("--trainable must name at least one module (e.g. q_proj,v_proj)")
        if self.enable_fine_grained_routing:
            self._validate_group_size(hidden_size)
        if self.method == "mmoelora" and self.num_tasks < 1:
            raise AdapterConfigError(f"mmoelora needs at least one task label, got num_tasks={self.num_tasks}")

    def _validate_group_size(self, hidden_size: int | None) -> None:
        if self.method in ("lora", "mmoelora"):
            raise AdapterConfigError(f"--enable_fine_grained_routing is supported for hydralora and mtlora, not --method {self.method}")
        g = self.routing_group_size
        if g is None or g < 1:
            raise AdapterConfigError(f"--routing_group_size must be a positive integer with --enable_fine_grained_routing, got {g}")
        if hidden_size is not None and hidden_size % g != 0:
            raise AdapterConfigError(
                f"--routing_group_size {g} does not divide the model's hidden size {hidden_size}; "
                f"choose a divisor of {hidden_size} (e.g. {hidden_size // 2})"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise AdapterConfigError(f"adapter config has unknown keys {sorted(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AdapterConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
