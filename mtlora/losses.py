"""Auxiliary training losses: routing balance and spectral-aware regularisation of the experts.

:class:`AuxiliaryLosses` holds their flags (parsed by ``HfArgumentParser`` in ``train.py``) and their
schedule; the functions below compute them from a model with adapters attached.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from mtlora.adapters import RoutedLowRankAdapter, TaskGatedLoRA
from mtlora.config import AdapterConfig, AdapterConfigError
from mtlora.injection import routed_adapters


BLC_MODES = ("reference", "live")
SPECTRAL_SETTINGS = ("spectral_reg_lambda", "spectral_reg_form", "spectral_reg_frequency", "spectral_reg_steps",
                     "spectral_reg_max_matrices")


@dataclass
class AuxiliaryLosses:
    """Which auxiliary losses to add and when (METHOD.md gives the reference schedule)."""

    enable_blc: bool = field(default=False, metadata={"help": "Add the routing balance loss."})
    blc_alpha: float = field(default=0.01, metadata={"help": "Weight of the balance loss."})
    blc_mode: str = field(default="reference", metadata={
        "help": "reference: the balance loss is added and logged but carries no gradient, as in the reference runs "
                "(their reentrant gradient checkpointing recorded it under no_grad; results/fidelity/"
                "reentrant_balance.md) | live: it trains the routers."})
    enable_spectral_reg: bool = field(default=False, metadata={
        "help": "Add the spectral-aware regulariser of the expert up-projections."})
    spectral_reg_lambda: float = field(default=1.0, metadata={"help": "Weight of the spectral regulariser."})
    spectral_reg_form: str = field(default="reference", metadata={
        "help": "reference (the public code: weights on D's coordinates) | singular_basis (weights applied in "
                "B's singular basis, the paper's stated goal)."})
    spectral_reg_frequency: int = field(default=1, metadata={
        "help": "Apply at the first step of every N epochs (when no --spectral_reg_steps)."})
    spectral_reg_steps: int | None = field(default=None, metadata={
        "help": "Apply every S optimisation steps, at steps S-1, 2S-1, ... (the reference fires once per run at S=500)."})
    spectral_reg_max_matrices: int = field(default=64, metadata={
        "help": "Random sample of expert matrices per application."})
    mole_balance_alpha: float = field(default=0.5, metadata={
        "help": "--method mole: weight of MoLE's gate balance loss -log prod_i q_i (the authors' 0.5)."})

    def validate(self, adapter_config: AdapterConfig) -> None:
        """Raise :class:`AdapterConfigError` naming the flag; cheap, run before any loading."""
        if self.blc_mode not in BLC_MODES:
            raise AdapterConfigError(f"--blc_mode: expected one of {', '.join(BLC_MODES)}, got {self.blc_mode!r}")
        if self.spectral_reg_form not in SPECTRAL_PENALTIES:
            raise AdapterConfigError(f"--spectral_reg_form: expected one of {', '.join(SPECTRAL_PENALTIES)}, "
                                     f"got {self.spectral_reg_form!r}")
        for flag, value in (("--blc_alpha", self.blc_alpha), ("--spectral_reg_lambda", self.spectral_reg_lambda),
                            ("--mole_balance_alpha", self.mole_balance_alpha)):
            if value < 0:
                raise AdapterConfigError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--spectral_reg_steps", self.spectral_reg_steps),
                            ("--spectral_reg_frequency", self.spectral_reg_frequency),
                            ("--spectral_reg_max_matrices", self.spectral_reg_max_matrices)):
            if value is not None and value < 1:
                raise AdapterConfigError(f"{flag} must be >= 1, got {value}")
        if self.enable_spectral_reg and not adapter_config.has_expert_up_projections:
            raise AdapterConfigError("--enable_spectral_reg needs expert up-projections: use a multi-expert --method")
        if self.enable_blc and not adapter_config.has_token_router:
            raise AdapterConfigError("--enable_blc balances a token router, which needs --method hydralora or mtlora "
                                     f"with --lora_nums >= 2 (got --method {adapter_config.method}, "
                                     f"--lora_nums {adapter_config.lora_nums})")

    def ignored_flags(self) -> list[str]:
        """One line per flag set away from its default that has no effect (its loss is off, or it is overridden)."""
        defaults = AuxiliaryLosses()
        ignored = []
        unused = {"blc_alpha": "without --enable_blc"} if not self.enable_blc else {}
        if not self.enable_spectral_reg:
            unused.update({name: "without --enable_spectral_reg" for name in SPECTRAL_SETTINGS})
        elif self.spectral_reg_steps:
            unused["spectral_reg_frequency"] = "with --spectral_reg_steps"
        for name, reason in unused.items():
            if getattr(self, name) != getattr(defaults, name):
                ignored.append(f"--{name} {getattr(self, name)} has no effect {reason}")
        return ignored

    def effective(self) -> dict:
        """The settings as used, for the run's records: None for every value of a loss that is off (and for
        --spectral_reg_frequency when --spectral_reg_steps sets the schedule)."""
        values = dataclasses.asdict(self)
        if not self.enable_blc:
            values["blc_alpha"] = None
        if not self.enable_spectral_reg:
            values.update(dict.fromkeys(SPECTRAL_SETTINGS))
        elif self.spectral_reg_steps:
            values["spectral_reg_frequency"] = None
        return values

    def spectral_due(self, step: int, steps_per_epoch: int) -> bool:
        """The reference schedule: every ``spectral_reg_steps`` steps (at step S-1, 2S-1, ...), else at the
        first step of every ``spectral_reg_frequency`` epochs."""
        if self.spectral_reg_steps:
            return (step + 1) % self.spectral_reg_steps == 0
        return step % (self.spectral_reg_frequency * steps_per_epoch) == 0


def squared_coefficient_of_variation(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Var(p) / (Mean(p)^2 + eps), with the unbiased variance as in the reference (MoE) code."""
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + eps)


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over routed adapters of the squared CV of their mean routing weight per expert.

    Reads the routing means recorded by the first training forward pass since
    :func:`clear_routing_records` (which, as in the reference code, include padding tokens).
    Returns None when no adapter recorded routing.
    """
    means = [m.routing_mean for m in routed_adapters(model).values() if m.routing_mean is not None]
    if not means:
        return None
    return torch.stack([squared_coefficient_of_variation(p) for p in means]).mean()


def clear_routing_records(model: nn.Module) -> None:
    """Drop the recorded routing means, so that the next training forward records afresh."""
    for adapter in routed_adapters(model).values():
        adapter.routing_mean = None


def expert_up_projections(model: nn.Module) -> list[torch.Tensor]:
    """Every expert up-projection B_i (d_out x r) of every adapter, as views of the parameters."""
    matrices = []
    for module in model.modules():
        if isinstance(module, (RoutedLowRankAdapter, TaskGatedLoRA)):
            matrices.extend(module.lora_B.unbind(0))
    return matrices


def _noise_weights(up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors and weights w(sigma) = exp(-sigma / mean(sigma)) of B, without gradient."""
    with torch.no_grad():
        _, sigma, vh = torch.linalg.svd(up.float(), full_matrices=False)  # sigma descending
        weights = torch.exp(-sigma / (sigma.mean() + 1e-8))
    return weights, vh


def spectral_penalty_reference(up: torch.Tensor) -> torch.Tensor:
    """The reference code's penalty for one B (d x r): sum_jk (w_j w_k D_jk)^2, D = B^T B - c^2 I.

    w is indexed by the rank of each singular value (largest first) and applied to the coordinates
    of D directly, not in the singular basis: this is what the public code computes.
    """
    weights, _ = _noise_weights(up)
    gram_deviation = _gram_deviation(up)
    return ((weights[:, None] * weights[None, :] * gram_deviation) ** 2).sum()


def spectral_penalty_singular_basis(up: torch.Tensor) -> torch.Tensor:
    """The paper's stated goal: || P D P ||_F^2 with P = V diag(w) V^T from B = U S V^T.

    P D P = V diag(w) (S^2 - c^2 I) diag(w) V^T, so low-singular-value ("noise") directions are pushed
    towards orthogonality and high-singular-value directions are left nearly free. P is held constant,
    so the gradient flows only through the polynomial D and needs no SVD derivative.
    """
    weights, vh = _noise_weights(up)
    projector = vh.t() @ torch.diag(weights) @ vh  # (r, r), no gradient
    gram_deviation = _gram_deviation(up)
    return ((projector @ gram_deviation @ projector) ** 2).sum()


def _gram_deviation(up: torch.Tensor) -> torch.Tensor:
    """D = B^T B - c^2 I with c = ||B||_F / sqrt(r) + 1e-8: zero when B's columns are orthogonal with equal norms.

    As in the reference, c is a constant (a Python number from a detached B): only B^T B carries the gradient.
    """
    up = up.float()
    rank = up.shape[1]
    c = float(up.detach().norm()) / math.sqrt(rank) + 1e-8
    return up.t() @ up - c * c * torch.eye(rank, device=up.device)


SPECTRAL_PENALTIES = {"reference": spectral_penalty_reference, "singular_basis": spectral_penalty_singular_basis}


def spectral_loss(model: nn.Module, form: str = "reference", max_matrices: int = 64, step: int = 0) -> torch.Tensor:
    """Mean penalty over a sample of at most ``max_matrices`` expert up-projections.

    The sample is the reference's: ``random.seed(step); random.sample(matrices, max_matrices)`` over the
    matrices in module order (here with a private ``random.Random(step)``, which draws the same sample and
    leaves Python's global random state alone).
    """
    matrices = expert_up_projections(model)
    if not matrices:
        raise ValueError("spectral regularisation needs adapters with expert up-projections")
    if len(matrices) > max_matrices:
        matrices = random.Random(step).sample(matrices, max_matrices)
    penalty = SPECTRAL_PENALTIES[form]
    return torch.stack([penalty(up) for up in matrices]).mean()
