"""Trainable-parameter counting, and the paper's closed-form counts to check it against."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on meta-device models (no memory needed)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def format_parameter_count(trainable: int, total: int) -> str:
    """The line train.py prints, e.g. ``trainable params: 39845888 (39.8M) || all params: ... || trainable%: 0.59``."""
    return (f"trainable params: {trainable} ({trainable / 1e6:.1f}M) || all params: {total} "
            f"|| trainable%: {100 * trainable / total:.2f}")


def routed_adapter_formula(d_in: int, d_out: int, rank: int, experts: int, groups: int = 1) -> int:
    """The paper's per-module count r*d_in + E*d_out*r + E*G*d_in (A, experts B_i, router)."""
    router = experts * groups * d_in if experts > 1 else 0
    return rank * d_in + experts * d_out * rank + router
