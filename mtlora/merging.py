"""Merge a library of LoRA adapters into the base weights: Task Arithmetic, TIES and DARE.

For every adapted linear layer, each adapter's full update dW_t = s B_t A_t (d_out x d_in) is built in
float32, one layer at a time; the updates are combined by the published rule and added to the frozen
weight, W <- W + merge(dW_1, ..., dW_N). The result is a plain model: no adapter, no router.

The rules are ``peft.utils.merge_utils`` applied to the full updates, as the published algorithms are
defined. PEFT's own ``add_weighted_adapter`` is not used: its ``linear``/``ties``/``dare_*`` types act on
the A and B factors separately (trimming and sign election on factor entries, cross terms B_i A_j in the
product), and its ``*_svd`` types scale each update twice (by s^2) up to PEFT 0.20 and truncate the rank.

* ``task_arithmetic``: W + lambda * sum_t dW_t.
* ``ties``: trim each dW_t to its top ``density`` fraction by magnitude, elect the sign with the larger
  total mass per entry, average the surviving entries that agree with it (disjoint mean), W + lambda * that.
* ``dare_linear`` / ``dare_ties``: drop each entry with probability p = 1 - density, rescale the rest by
  1 / (1 - p), then Task Arithmetic / TIES's sign election and disjoint mean. Random: seeded, and a result
  should be reported as the mean and spread over several seeds (:data:`DARE_SEEDS`).

Trimming is per layer (PEFT's granularity); the official TIES code takes the top-k over the whole
flattened task vector instead. ``dare_ties`` is PEFT's: random drop, then sign election and disjoint mean,
with no magnitude trim (the DARE code's TIES variant, for GLUE models, also trims after the drop).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft.utils import merge_utils
from torch import nn
from tqdm.auto import tqdm

from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput
from mtlora.library import lora_factors

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN = "total"  # TIES's sign election by total mass ("frequency" would count signs)

# The authors' settings without validation data (BASELINES.md sections 3-5).
TA_LAMBDA = 0.4  # Task Arithmetic paper, as used by TIES
TIES_DENSITY, TIES_LAMBDA = 0.2, 1.0  # TIES paper: keep the top 20%, lambda 1
DARE_DROP_RATE, DARE_LAMBDA = 0.2, 1.0  # MergeLM README: p = 0.2 with rescaling for merging; scaling 1.0
DARE_SEEDS = (0, 1, 2)
DEFAULT_LAMBDA = {"task_arithmetic": TA_LAMBDA, "ties": TIES_LAMBDA, "dare_linear": DARE_LAMBDA,
                  "dare_ties": DARE_LAMBDA}
DEFAULT_DENSITY = {"task_arithmetic": None, "ties": TIES_DENSITY, "dare_linear": 1.0 - DARE_DROP_RATE,
                   "dare_ties": 1.0 - DARE_DROP_RATE}

# A small grid holding the defaults, within the authors' own search ranges (TA/TIES repos, DARE paper).
# Tune on a held-out split of the training tasks, never on the BBH or MMLU test items.
GRIDS = {
    "task_arithmetic": {"weight": (0.1, 0.2, 0.4, 0.6, 0.8, 1.0), "density": (None,)},
    "ties": {"weight": (0.8, 1.0, 1.5), "density": (0.1, 0.2, 0.3)},
    "dare_linear": {"weight": (0.5, 1.0), "density": (0.5, 0.7, 0.8, 0.9)},
    "dare_ties": {"weight": (0.5, 1.0), "density": (0.5, 0.7, 0.8, 0.9)},
}


@dataclass(frozen=True)
class MergeSpec:
    """One merge: the rule, lambda (``weight``), the fraction kept (``density``) and DARE's seed."""

    method: str
    weight: float
    density: float | None = None
    seed: int | None = None

    @classmethod
    def default(cls, method: str, seed: int | None = None) -> "MergeSpec":
        """The authors' defaults for ``method`` (DARE: seed 0 unless given)."""
        _check_method(method)
        if method.startswith("dare"):
            seed = 0 if seed is None else seed
        return cls(method, DEFAULT_LAMBDA[method], DEFAULT_DENSITY[method], seed)

    def validate(self) -> "MergeSpec":
        """Raise naming the flag when a value does not fit the method; returns self."""
        _check_method(self.method)
        if self.method == "task_arithmetic":
            if self.density is not None:
                raise InvalidInput("--density: task_arithmetic keeps every entry; drop --density")
        elif self.density is None or not 0.0 < self.density <= 1.0:
            raise InvalidInput(f"--density must be in (0, 1] for {self.method} (the fraction kept), got {self.density}")
        if self.method.startswith("dare") and self.seed is None:
            raise InvalidInput(f"--seed: {self.method} drops entries at random and needs a seed")
        if not self.method.startswith("dare") and self.seed is not None:
            raise InvalidInput(f"--seed: {self.method} is deterministic; drop --seed")
        return self

    @property
    def name(self) -> str:
        """A short name for run folders, e.g. ``ties_d0.2_l1.0`` or ``dare_linear_d0.8_l1.0_s0``."""
        parts = [self.method] + ([f"d{self.density:g}"] if self.density is not None else []) + [f"l{self.weight:g}"]
        return "_".join(parts + ([f"s{self.seed}"] if self.seed is not None else []))


def _check_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise InvalidInput(f"--method: unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}")


# The rules that add the task updates up (the others average them): their lambda scales a sum over N tasks, so their
# grid also holds lambda = 1/N, uniform averaging (BASELINES.md), the scale at which a library of many tasks adds up to
# one update's size (lambda = 0.4 over 64 tasks is 25.6 times it).
SUMMING = ("task_arithmetic", "dare_linear")


def merge_grid(method: str, seeds: Sequence[int] = DARE_SEEDS, num_tasks: int | None = None) -> list[MergeSpec]:
    """The small search grid of ``method`` (:data:`GRIDS`), with lambda = 1 / ``num_tasks`` first for a summing rule
    when the library's size is given; DARE points are repeated for every seed."""
    _check_method(method)
    grid = GRIDS[method]
    weights = grid["weight"]
    if num_tasks is not None and method in SUMMING and 1 / num_tasks not in weights:
        weights = (1 / num_tasks, *weights)
    seed_values = tuple(seeds) if method.startswith("dare") else (None,)
    return [MergeSpec(method, weight, density, seed)
            for density, weight, seed in itertools.product(grid["density"], weights, seed_values)]


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The full update s * B A (d_out, d_in) in float32 from A (r, d_in) and B (d_out, r)."""
    return scaling * (lora_B.float() @ lora_A.float())


def merge_updates(updates: Sequence[torch.Tensor], spec: MergeSpec) -> torch.Tensor:
    """Combine N full updates (each d_out x d_in, float32) by ``spec``'s rule; one lambda for every task.

    DARE draws its masks from torch's global generator: seed it (see :func:`merge_into_model`).
    """
    weights = torch.full((len(updates),), float(spec.weight), device=updates[0].device)
    updates = list(updates)
    if spec.method == "task_arithmetic":
        return merge_utils.task_arithmetic(updates, weights)
    if spec.method == "ties":
        return merge_utils.ties(updates, weights, spec.density, MAJORITY_SIGN)
    if spec.method == "dare_linear":
        return merge_utils.dare_linear(updates, weights, spec.density)
    return merge_utils.dare_ties(updates, weights, spec.density, MAJORITY_SIGN)


@torch.no_grad()
def merge_into_model(model: nn.Module, config: AdapterConfig, modules: Sequence[dict[str, torch.Tensor]],
                     spec: MergeSpec, device: str | torch.device | None = None) -> dict:
    """Add the merged update of the library ``modules`` (see :func:`mtlora.library.read_lora_modules`) to
    every adapted weight of ``model``, in place. Updates are built and merged on ``device`` (default: the
    weight's). Returns statistics: the number of merged layers and the mean ||merged dW|| / ||W||.
    """
    spec.validate()
    factors = [lora_factors(module) for module in modules]
    ratios = []
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        if spec.seed is not None:
            torch.manual_seed(spec.seed)  # the DARE masks, in layer order; the caller's generator is untouched
        for host in tqdm(list(factors[0]), desc=f"merge {spec.method}", unit="layer"):
            weight = model.get_submodule(host).weight
            target = torch.device(device) if device is not None else weight.device
            updates = [delta_weight(A.to(target), B.to(target), config.scaling) for A, B in (f[host] for f in factors)]
            merged = merge_updates(updates, spec)
            new_weight = weight.to(target, torch.float32) + merged
            ratios.append(float(merged.norm() / weight.float().norm().clamp(min=1e-12)))
            weight.copy_(new_weight.to(weight.device, weight.dtype))
    return {"merged_layers": len(ratios), "mean_update_norm_ratio": sum(ratios) / max(1, len(ratios))}


def merge_description(spec: MergeSpec) -> dict:
    """What is stored with a merged model to say how it was made."""
    dare, elects_sign = spec.method.startswith("dare"), spec.method in ("ties", "dare_ties")
    return {"method": spec.method, "lambda": spec.weight, "density": spec.density,
            "drop_rate": 1.0 - spec.density if dare else None, "seed": spec.seed,
            "majority_sign": MAJORITY_SIGN if elects_sign else None,
            "trim": "top-k by magnitude per layer" if spec.method == "ties" else None,
            "updates": "full dW = s B A per layer in float32, combined by peft.utils.merge_utils"}
