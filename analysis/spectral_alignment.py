"""Fig. 1B / S2: singular value spectra of expert updates and the alignment of their top subspaces.

For every adapter and expert i the update is Delta_i = B_i A_i (d_out x d_in; A is shared by the experts
of HydraLoRA / mtLoRA). Its SVD comes from the small factors: B_i = Q_b R_b, A_i^T = Q_a R_a, and the SVD
of the r x r core R_b R_a^T = U_c S V_c^T gives Delta_i = (Q_b U_c) S (Q_a V_c)^T.

Reported per checkpoint: the spectrum of each expert normalised by its largest singular value (mean over
adapters); the energy fraction sum_{j<k} s_j^2 / sum_j s_j^2 of the top-k components; and, per transformer
block, the alignment of the top-k left singular subspaces across experts,
mean over pairs i < j of ||U_i[:, :k]^T U_j[:, :k]||_F^2 / k (1 = same subspace; random subspaces give
about k / d_out), with the same measure on the bottom-k components for contrast. Scaling s = alpha / r
changes none of these. Experts with an all-zero update (untrained) are left out of the pairs.

    python -m analysis.spectral_alignment --checkpoints hydralora=outputs/hydra mtlora=outputs/mtlora \\
        --top_k 4 --output_dir outputs/analysis
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch

from analysis.common import block_index, integer_ticks, parse_labelled_paths, read_adapter_factors, write_outputs

from mtlora.errors import InvalidInput, UsageError

NAME = "spectral_alignment"


def expert_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (d_out, r), S (r,)) of B A for A (r, d_in), B (d_out, r), via QR of both factors (float64)."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().t())
    u_core, s, _ = torch.linalg.svd(r_b @ r_a.t())
    return q_b @ u_core, s


def subspace_alignment(u_i: torch.Tensor, u_j: torch.Tensor) -> float:
    """||U_i^T U_j||_F^2 / k for two orthonormal (d, k) bases: 1 for the same subspace, 0 for orthogonal."""
    return float((u_i.t() @ u_j).pow(2).sum() / u_i.shape[1])


def _mean_or_none(values) -> float | None:
    """Mean of the defined values; None (JSON null) when there are none, e.g. a single expert."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _mean_pairwise(bases: list[torch.Tensor]) -> float:
    pairs = list(itertools.combinations(bases, 2))
    return float(np.mean([subspace_alignment(x, y) for x, y in pairs])) if pairs else float("nan")


def adapter_spectra(a: torch.Tensor, b: torch.Tensor, top_k: int) -> dict:
    """Per-adapter numbers: normalised spectra, top-k energy, top-k and bottom-k alignment across experts."""
    spectra, top, bottom, energy = [], [], [], []
    for expert in range(b.shape[0]):
        u, s = expert_svd(a[expert if a.shape[0] > 1 else 0], b[expert])
        if s[0] <= 0:  # zero update: no direction to compare
            spectra.append(torch.zeros_like(s))
            continue
        spectra.append(s / s[0])
        energy.append(float(s[:top_k].pow(2).sum() / s.pow(2).sum()))
        top.append(u[:, :top_k])
        bottom.append(u[:, -top_k:])
    return {"spectra": torch.stack(spectra), "energy": energy,
            "top_alignment": _mean_pairwise(top), "bottom_alignment": _mean_pairwise(bottom)}


def checkpoint_spectra(checkpoint: str, top_k: int = 4) -> dict:
    """All spectral numbers of one checkpoint (see the module docstring)."""
    config, factors = read_adapter_factors(checkpoint)
    if config.uses_block_adapter and config.block_adapter_style != "lowrank":
        raise InvalidInput(f"--checkpoints {checkpoint}: block_adapter_style {config.block_adapter_style!r} puts a ReLU "
                         "between A and B, so B_i A is not the update; only lowrank adapters can be analysed")
    rank = next(iter(factors.values()))[1].shape[-1]
    if not 1 <= top_k <= rank:
        raise InvalidInput(f"--top_k must be between 1 and the adapter rank {rank}, got {top_k}")
    per_adapter = {name: adapter_spectra(a, b, top_k) for name, (a, b) in factors.items()}
    blocks: dict[int, list[dict]] = {}
    for name, result in per_adapter.items():
        blocks.setdefault(block_index(name), []).append(result)
    spectra = torch.stack([r["spectra"] for r in per_adapter.values()])  # (adapters, E, r)
    energy = [e for r in per_adapter.values() for e in r["energy"]]
    d_out = next(iter(factors.values()))[1].shape[1]

    def block_mean(key: str) -> dict:
        return {str(b): _mean_or_none([r[key] for r in rs]) for b, rs in sorted(blocks.items())}

    top_by_block, bottom_by_block = block_mean("top_alignment"), block_mean("bottom_alignment")
    return {
        "checkpoint": str(checkpoint), "method": config.method, "num_experts": spectra.shape[1], "rank": rank,
        "top_k": top_k, "num_adapters": len(per_adapter),
        "mean_normalised_spectrum_per_expert": spectra.mean(0).tolist(),
        "mean_normalised_spectrum": spectra.mean((0, 1)).tolist(),
        "top_k_energy_fraction": _mean_or_none(energy),
        "top_k_alignment": _mean_or_none(top_by_block.values()),
        "bottom_k_alignment": _mean_or_none(bottom_by_block.values()),
        "random_subspace_alignment": top_k / d_out,
        "top_k_alignment_per_layer": top_by_block, "bottom_k_alignment_per_layer": bottom_by_block,
    }


def plot_spectra(results: dict) -> plt.Figure:
    """Left: mean normalised spectrum (bold) and per expert (thin); right: top-k alignment per layer."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (label, result) in enumerate(results.items()):
        colour = f"C{index}"
        for expert in result["mean_normalised_spectrum_per_expert"]:
            left.plot(range(1, len(expert) + 1), expert, color=colour, alpha=0.25, linewidth=0.8)
        spectrum = result["mean_normalised_spectrum"]
        left.plot(range(1, len(spectrum) + 1), spectrum, color=colour, linewidth=2, label=label)
        layers = {int(b): v for b, v in result["top_k_alignment_per_layer"].items() if v is not None}
        if layers:
            right.plot(list(layers), list(layers.values()), marker=".", color=colour,
                       label=f"{label} top-{result['top_k']}")
        bottom = {int(b): v for b, v in result["bottom_k_alignment_per_layer"].items() if v is not None}
        if bottom:
            right.plot(list(bottom), list(bottom.values()), linestyle="--", color=colour, alpha=0.6,
                       label=f"{label} bottom-{result['top_k']}")
    left.set_xlabel("singular value index")
    left.set_ylabel("sigma / sigma_1")
    left.set_title("Expert update spectra (mean over layers)")
    left.legend(fontsize=8)
    right.set_xlabel("transformer block")
    right.set_ylabel("subspace alignment across experts")
    right.set_ylim(0, 1.05)
    right.set_title("Top-k (solid) vs bottom-k (dashed) alignment")
    right.legend(fontsize=8)
    integer_ticks(left)
    integer_ticks(right)
    figure.tight_layout()
    return figure


def redraw(data: dict) -> plt.Figure:
    """The figure again from the JSON :func:`spectral_alignment` saved."""
    return plot_spectra(data["checkpoints"])


def spectral_alignment(checkpoints: list[tuple[str, str]], output_dir: str, top_k: int = 4) -> dict:
    """Compute, plot and save the spectral analysis of labelled checkpoints; returns the JSON data."""
    results = {label: checkpoint_spectra(path, top_k) for label, path in checkpoints}
    write_outputs(output_dir, NAME, plot_spectra(results), {"checkpoints": results})
    return {"checkpoints": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="label=path items (train.py output dirs).")
    parser.add_argument("--top_k", type=int, default=4, help="Size of the compared singular subspaces.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    try:
        data = spectral_alignment(parse_labelled_paths(args.checkpoints), args.output_dir, args.top_k)
    except UsageError as err:
        sys.exit(f"error: {err}")
    for label, r in data["checkpoints"].items():
        print(f"{label}: top-{r['top_k']} alignment {r['top_k_alignment']}, bottom {r['bottom_k_alignment']}, "
              f"top-{r['top_k']} energy {r['top_k_energy_fraction']}")


if __name__ == "__main__":
    main()
