"""Adapter configuration: one dataclass that fully describes which adapters go where.

Its fields are the adapter flags of ``train.py`` (``HfArgumentParser`` parses this class directly, with
the help text below), and it is saved next to every adapter checkpoint (``adapter_config.json``), so a
checkpoint can be re-attached to a fresh base model without the training flags. What a method can do
(a token router, block-level placement, ...) is a property of the config, never a list of method names
elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mtlora.errors import IgnoredFlagWarning, InvalidInput

METHODS = ("lora", "hydralora", "mmoelora", "mtlora", "mole")
BLOCK_ADAPTER_TYPES = ("ffn", "attention", "both")
BLOCK_ADAPTER_STYLES = ("lowrank", "bottleneck", "adaptformer")
EXPERT_DROPOUT = ("reference", "shared")


class AdapterConfigError(InvalidInput):
    """A configuration value is invalid; the message names the command-line flag."""


@dataclass
class AdapterConfig:
    """Which adapter to attach, where, and with which hyper-parameters (field name = ``train.py`` flag)."""

    method: str = field(default="hydralora", metadata={
        "help": "lora | hydralora | mmoelora | mtlora | mole. As in the reference code, mtlora takes the hydralora "
                "code path: its components are switched on only by --enable_block_adapter, "
                "--enable_fine_grained_routing, --enable_spectral_reg and --enable_blc. mole trains gates over "
                "the frozen LoRAs of --lora_library (MoLE, Wu et al. 2024)."})
    lora_rank: int = field(default=16, metadata={"help": "Rank r of every adapter."})
    lora_alpha: float = field(default=64.0, metadata={"help": "Scaling s = alpha / r."})
    lora_nums: int = field(default=16, metadata={"help": "Number of experts E of the routed methods."})
    expert_num: int = field(default=4, metadata={
        "help": "--method mmoelora: number of experts the rank is split across (rank / E each; the reference's "
                "flag and default)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    expert_dropout: str = field(default="reference", metadata={
        "help": "reference: at the component level with scalar routing every expert draws its own dropout mask, "
                "as the reference's expert loop does (elsewhere one mask is shared, as there too) | shared: one "
                "mask for all experts everywhere."})
    trainable: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "Names of the linear layers to adapt (component level), space- or comma-separated."})
    enable_block_adapter: bool = field(default=False, metadata={
        "help": "Block-level adaptation: one routed adapter beside a whole sub-block instead of per target linear."})
    block_adapter_type: str = field(default="ffn", metadata={"help": "ffn | attention | both"})
    block_adapter_style: str = field(default="lowrank", metadata={"help": "lowrank | bottleneck | adaptformer"})
    block_adapter_rank: int | None = field(default=None, metadata={
        "help": "Rank of block adapters (default: --lora_rank)."})
    enable_fine_grained_routing: bool = field(default=False, metadata={
        "help": "One routing weight per expert per group of --routing_group_size output dimensions."})
    routing_group_size: int | None = field(default=None, metadata={
        "help": "Output dimensions per routing group g (the reference's flag); must divide every adapted width "
                "(g = d is scalar routing)."})
    routing_groups: int | None = field(default=None, metadata={
        "help": "Instead of --routing_group_size: G output groups in every adapted module (group width d_out / G), "
                "the paper's notation; the same as g = d / G where every width is d, and well defined when the "
                "widths differ (grouped-query attention makes v_proj narrower than q_proj)."})
    lora_library: list[str] = field(default_factory=list, metadata={
        "help": "--method mole: the per-task LoRA checkpoints to gate (train.py --method lora outputs), or one "
                "folder holding them."})
    # Set from the training data, not from the command line (init=False keeps them out of the parser).
    task_names: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.trainable = [name.strip() for item in self.trainable for name in item.split(",") if name.strip()]

    # ------------------------------------------------------------------------------ capabilities

    @property
    def is_routed(self) -> bool:
        """A per-token softmax router over experts (HydraLoRA's structure; mtLoRA's code path)."""
        return self.method in ("hydralora", "mtlora")

    @property
    def has_token_router(self) -> bool:
        """A router is built only when there are at least two experts to route between."""
        return self.is_routed and self.lora_nums > 1

    @property
    def is_task_gated(self) -> bool:
        """Experts mixed by a gate on the task label (MMoELoRA), not on the token."""
        return self.method == "mmoelora"

    @property
    def is_mole(self) -> bool:
        """Gates over a library of frozen LoRAs (MoLE): the gates are the only trained weights."""
        return self.method == "mole"

    @property
    def supports_block_level(self) -> bool:
        return self.is_routed

    @property
    def supports_fine_grained_routing(self) -> bool:
        return self.is_routed

    @property
    def has_expert_up_projections(self) -> bool:
        """Several expert matrices B_i per adapter: what spectral regularisation acts on."""
        return self.method not in ("lora", "mole")

    @property
    def num_experts(self) -> int:
        """Plain LoRA is a single adapter, MMoELoRA mixes ``expert_num`` experts, MoLE its library's LoRAs, the
        routed methods ``lora_nums``."""
        if self.is_task_gated:
            return self.expert_num
        if self.is_mole:
            return len(self.lora_library)
        return self.lora_nums if self.has_expert_up_projections else 1

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def uses_block_adapter(self) -> bool:
        return self.enable_block_adapter and self.supports_block_level

    def group_count(self, out_features: int, where: str = "the adapted module") -> int:
        """Number of output-dimension groups G = d_out / g (1 means scalar routing per expert).

        The one place a group size is checked against a width: raises naming the flag when g does not divide it.
        """
        if not self.enable_fine_grained_routing:
            return 1
        if self.routing_groups is not None:
            if out_features % self.routing_groups != 0:
                raise AdapterConfigError(f"--routing_groups {self.routing_groups} does not divide the output width "
                                         f"{out_features} of {where}")
            return self.routing_groups
        g = self.routing_group_size
        if out_features % g != 0:
            divisors = [d for d in range(1, out_features + 1) if out_features % d == 0 and d > 1]
            raise AdapterConfigError(
                f"--routing_group_size {g} does not divide the output width {out_features} of {where}; "
                f"choose a divisor of {out_features} (e.g. {divisors[len(divisors) // 2]})")
        return out_features // g

    # -------------------------------------------------------------------------------- validation

    def validate(self) -> None:
        """Raise :class:`AdapterConfigError` naming the offending flag; cheap, run before any loading.

        Checks that need the model's shapes (target names, group size against widths) run when the
        adapters are attached, which :func:`mtlora.injection.attach_adapters` can do on a meta-device model.
        """
        _choice("--method", self.method, METHODS)
        _choice("--block_adapter_type", self.block_adapter_type, BLOCK_ADAPTER_TYPES)
        _choice("--block_adapter_style", self.block_adapter_style, BLOCK_ADAPTER_STYLES)
        _choice("--expert_dropout", self.expert_dropout, EXPERT_DROPOUT)
        for flag, value in (("--lora_rank", self.lora_rank), ("--lora_nums", self.lora_nums),
                            ("--expert_num", self.expert_num), ("--block_adapter_rank", self.block_adapter_rank)):
            if value is not None and value < 1:
                raise AdapterConfigError(f"{flag} must be >= 1, got {value}")
        if self.is_task_gated and self.lora_rank % self.expert_num != 0:
            raise AdapterConfigError(f"--lora_rank {self.lora_rank} must be divisible by --expert_num {self.expert_num} "
                                     "(MMoELoRA splits the rank across its experts)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.enable_block_adapter and not self.supports_block_level:
            raise AdapterConfigError(f"--enable_block_adapter is supported for hydralora and mtlora, not --method {self.method}")
        if self.is_mole != bool(self.lora_library):
            raise AdapterConfigError("--lora_library is needed by --method mole, and only by it")
        if not self.uses_block_adapter and not self.trainable:
            raise AdapterConfigError("--trainable must name at least one module (e.g. q_proj,v_proj)")
        if self.enable_fine_grained_routing:
            if not self.supports_fine_grained_routing:
                raise AdapterConfigError(
                    f"--enable_fine_grained_routing is supported for hydralora and mtlora, not --method {self.method}")
            if (self.routing_group_size is None) == (self.routing_groups is None):
                raise AdapterConfigError("--enable_fine_grained_routing needs exactly one of --routing_group_size "
                                         "and --routing_groups")
            for flag, value in (("--routing_group_size", self.routing_group_size),
                                ("--routing_groups", self.routing_groups)):
                if value is not None and value < 1:
                    raise AdapterConfigError(f"{flag} must be a positive integer, got {value}")
            if not self.has_token_router:
                raise AdapterConfigError("--enable_fine_grained_routing needs a router, so --lora_nums >= 2, "
                                         f"got {self.lora_nums}")

    # ------------------------------------------------------------------------ flags that do nothing

    def ignored_flags(self) -> list[str]:
        """One line per flag set away from its default that has no effect in this configuration.

        Enabling a component the method cannot have is an error (:meth:`validate`); a value for a component
        that is switched off is only ignored, which :func:`warn_ignored` says and :meth:`effective` records.
        """
        defaults = AdapterConfig()
        ignored = []

        def check(name: str, condition: bool, reason: str) -> None:
            if condition and getattr(self, name) != getattr(defaults, name):
                ignored.append(f"--{name} {_flag_value(getattr(self, name))} has no effect {reason}")

        check("lora_nums", not self.is_routed, f"with --method {self.method} (it has no token router)")
        check("expert_num", not self.is_task_gated, f"with --method {self.method} (only mmoelora splits its rank)")
        check("routing_group_size", not self.enable_fine_grained_routing, "without --enable_fine_grained_routing")
        check("routing_groups", not self.enable_fine_grained_routing, "without --enable_fine_grained_routing")
        for name in ("block_adapter_type", "block_adapter_style", "block_adapter_rank"):
            check(name, not self.uses_block_adapter, "without --enable_block_adapter")
        check("trainable", self.uses_block_adapter and self.trainable != [],
              "with --enable_block_adapter (block adapters replace them)")
        check("lora_rank", self.uses_block_adapter and self.block_adapter_rank not in (None, self.lora_rank),
              "with --enable_block_adapter and --block_adapter_rank")
        return ignored

    def effective(self) -> "AdapterConfig":
        """A copy that records what is built: unused optional values are None, other unused values their
        default; ``lora_nums`` is the number of experts built (1 for plain LoRA), block adapters have no
        ``trainable`` list and, with --block_adapter_rank, the same ``lora_rank``."""
        defaults = AdapterConfig()
        config = dataclasses.replace(self)
        config.task_names = list(self.task_names)
        if not self.is_routed:
            config.lora_nums = self.num_experts
        if not self.is_task_gated:
            config.expert_num = defaults.expert_num
        if not self.enable_fine_grained_routing:
            config.routing_group_size = config.routing_groups = None
        if self.uses_block_adapter:
            config.trainable = []
            config.lora_rank = self.block_adapter_rank or self.lora_rank
        else:
            config.block_adapter_type = defaults.block_adapter_type
            config.block_adapter_style = defaults.block_adapter_style
            config.block_adapter_rank = None
        return config

    # ------------------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "adapter config") -> "AdapterConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(fields)
        if unknown:
            raise AdapterConfigError(f"{source}: unknown keys {sorted(unknown)}; expected some of {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                expected = getattr(hints[name], "__name__", str(hints[name]))
                raise AdapterConfigError(f"{source}: {name} must be {expected}, got {value!r}")
        config = cls(**{k: v for k, v in values.items() if fields[k].init})
        config.task_names = list(values.get("task_names", []))
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AdapterConfig":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterConfigError(f"{path}: not a valid JSON adapter config ({err})") from None
        if not isinstance(values, dict):
            raise AdapterConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))


def warn_ignored(lines: list[str]) -> None:
    """Warn once per flag that has no effect (the run records the value actually used)."""
    for line in lines:
        warnings.warn(f"{line}; the run records the value actually used", IgnoredFlagWarning, stacklevel=2)


def _flag_value(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _has_type(value, expected) -> bool:
    """Whether a JSON value fits a field's type (int, float, bool, str, list[str], or X | None)."""
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for option in options:
        if typing.get_origin(option) is list:
            item = typing.get_args(option)[0]
            if isinstance(value, list) and all(isinstance(v, item) for v in value):
                return True
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif isinstance(value, option) and not (isinstance(value, bool) and option is not bool):
            return True
    return False


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AdapterConfigError(f"{flag}: unknown value {value!r}; expected one of {', '.join(choices)}")
