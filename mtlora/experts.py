"""The routed mix of expert up-projections, computed without a loop over experts.

Every multi-expert method here shares one shape of computation: a rank-r code h per token, E expert
up-projections B_i (d_out x r), and per-token routing weights, optionally one weight per group of
output dimensions (fine-grained routing):

    out[n, group k] = sum_i w[n, k, i] * (B_i h[n])[group k]

A naive implementation evaluates B_i h for every expert (E full-width outputs). Because the weights are
scalars per (token, group, expert), they can be folded into the code instead: z[n, k, (i, j)] =
w[n, k, i] * h[n, j] is only E*r wide, and the sum over experts becomes part of a single matrix
product with the concatenated up-projections [B_1 | ... | B_E] (d_out x E*r).

At LLaMA-7B width the fused form's GPU work is well under a millisecond, so its wall time is set by
the number of kernels it launches: every step below avoids one where it can (views instead of
indexing, the dtype cast done by the layout copy the GEMM needs anyway).
"""

from __future__ import annotations

import torch


def routed_expert_mix(code: torch.Tensor, routing_weights: torch.Tensor, expert_up: torch.Tensor) -> torch.Tensor:
    """Mix expert up-projections of a shared low-rank code with per-token (per-group) weights.

    Args:
        code: (N, r) low-rank code per token (e.g. A @ x), or (N, E, r) one code per expert (scalar routing
            only: each expert's own dropout mask, as in the reference's expert loop).
        routing_weights: (N, G, E) weight of each expert for each group of output dimensions;
            G = 1 is scalar routing. G must divide d_out.
        expert_up: (E, d_out, r) stacked expert up-projections B_i, in code's dtype or a wider one
            (float32 master weights): the cast happens in the layout copy.

    Returns:
        (N, d_out) tensor in code's dtype: sum_i w_i * B_i @ code, group by group.
    """
    num_tokens, rank = code.shape[0], code.shape[-1]
    num_experts, d_out, _ = expert_up.shape
    num_groups = routing_weights.shape[1]
    if num_groups == 1:
        weights = routing_weights.view(num_tokens, num_experts, 1)  # a view: no gather in the backward pass
        per_expert = code if code.dim() == 3 else code[:, None, :]  # (N, E or 1, r)
        folded = (weights * per_expert).reshape(num_tokens, num_experts * rank)
        up = _contiguous_as(expert_up.permute(1, 0, 2), code.dtype).reshape(d_out, num_experts * rank)  # [B_1 | ... | B_E]
        return folded @ up.t()  # one GEMM: (N, E*r) x (E*r, d_out)
    group_width = d_out // num_groups
    # (G, N, E, r) -> (G, N, E*r): the routing weights of group k folded into the code
    folded = routing_weights.permute(1, 0, 2)[..., None] * code[None, :, None, :]
    folded = folded.reshape(num_groups, num_tokens, num_experts * rank)
    # (E, G, g, r) -> (G, E*r, g): the rows of every expert that land in group k
    up = expert_up.reshape(num_experts, num_groups, group_width, rank).permute(1, 0, 3, 2)
    up = _contiguous_as(up, code.dtype).reshape(num_groups, num_experts * rank, group_width)
    out = torch.bmm(folded, up)  # one batched GEMM over groups: (G, N, g)
    return out.transpose(0, 1).reshape(num_tokens, d_out)


def gated_lora_mix(tokens: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Mix E full LoRA experts (A_i, B_i) with one weight per sequence and expert, in two GEMMs.

    The codes of all experts come from one product with the stacked down-projections, the gate is folded
    into them, and the sum over experts is one product with [B_1 | ... | B_E] (MMoELoRA's task gate, MoLE).

    Args:
        tokens: (batch, L, d_in).
        lora_A: (E, r, d_in) stacked down-projections; lora_B: (E, d_out, r) stacked up-projections
            (any float dtype: cast to the tokens' dtype here).
        gates: (batch, E) weight of each expert for each sequence (scaling folded in), in the tokens' dtype.

    Returns:
        (batch, L, d_out): sum_i gates[b, i] * B_i A_i tokens[b, t].
    """
    batch, length, d_in = tokens.shape
    num_experts, d_out, rank = lora_B.shape
    all_A = lora_A.to(tokens.dtype).reshape(num_experts * rank, d_in)
    code = (tokens @ all_A.t()).view(batch, length, num_experts, rank)  # one GEMM for every expert's code
    folded = (code * gates[:, None, :, None]).reshape(batch * length, num_experts * rank)
    all_B = _contiguous_as(lora_B.permute(1, 0, 2), tokens.dtype).reshape(d_out, num_experts * rank)  # [B_1 | ... | B_E]
    return (folded @ all_B.t()).view(batch, length, d_out)


def _contiguous_as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One copy that both casts and lays the tensor out contiguously (``.to`` alone keeps the strides).

    With the dtype already right no copy is made here, and the caller's ``reshape`` makes it.
    """
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format)


def routed_expert_mix_loop(code: torch.Tensor, routing_weights: torch.Tensor, expert_up: torch.Tensor) -> torch.Tensor:
    """Reference form of :func:`routed_expert_mix`: a loop over experts, one full-width output each.

    This is the pattern of the public reference implementation: scalar routing multiplies each expert's
    (N, d_out) output by a broadcast (N, 1) weight (HydraLoRA's code), fine-grained routing first repeats
    each group's weight over the group's columns (N, d_out). It is kept for tests and benchmarks.
    """
    num_experts, d_out, _ = expert_up.shape
    num_groups = routing_weights.shape[1]
    out = 0
    for i in range(num_experts):
        expert_code = code[:, i] if code.dim() == 3 else code  # (N, r)
        expert_out = expert_code @ expert_up[i].to(code.dtype).t()  # (N, d_out)
        weight = routing_weights[:, :, i]  # (N, G)
        if num_groups > 1:
            weight = weight.repeat_interleave(d_out // num_groups, dim=1)  # (N, d_out)
        out = out + weight * expert_out
    return out
