"""Adapter modules: the trainable residual paths added in parallel to a frozen module.

``RoutedLowRankAdapter`` covers LoRA (one expert, no router), HydraLoRA (shared A, E experts B_i,
per-token softmax router), mtLoRA's block-level adapter and fine-grained routing (a weight per expert
per group of output dimensions). ``TaskGatedLoRA`` is MMoELoRA: the rank split across E LoRA experts
mixed by a gate that depends on the task label, not on the token.

Parameters are kept in float32 (master weights); the forward pass casts them to the input's dtype,
so a bf16 base model runs its adapters in bf16 too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtlora.experts import gated_lora_mix, routed_expert_mix

TASK_EMBEDDING_DIM = 64  # MMoELoRA's task embedding width (the reference's default)


class RoutedLowRankAdapter(nn.Module):
    """Delta(u) = s * sum_i w_i(u) B_i f(A dropout(u)), routed per token (and per output group).

    Shapes: A (r, d_in) shared by all experts, B (E, d_out, r), router W_g (E*G, d_in).
    Styles: ``lowrank`` (f = identity, B = 0 at init, s = alpha/r), ``bottleneck`` (f = ReLU,
    B ~ N(0, 0.02): not the identity at init, as in the reference code) and ``adaptformer``
    (f = ReLU, B = 0, a learnable per-expert scale initialised at 0 replaces s).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_experts: int,
        scaling: float,
        dropout: float = 0.0,
        num_groups: int = 1,
        style: str = "lowrank",
        dropout_per_expert: bool = False,
    ):
        super().__init__()
        if out_features % num_groups != 0:
            raise ValueError(f"routing group count {num_groups} does not divide the output width {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.num_experts, self.num_groups = rank, num_experts, num_groups
        self.scaling, self.style = scaling, style
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, rank))
        self.router = nn.Linear(in_features, num_groups * num_experts, bias=False) if num_experts > 1 else None
        self.expert_scale = nn.Parameter(torch.zeros(num_experts)) if style == "adaptformer" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # One dropout mask per expert (the reference's expert loop at the component level); scalar routing only.
        self.dropout_per_expert = dropout_per_expert and dropout > 0 and num_experts > 1 and num_groups == 1
        self.routing_mean: torch.Tensor | None = None  # (E,) mean routing weight, see forward()
        self.expert_mix = routed_expert_mix  # or experts.routed_expert_mix_loop (injection.set_expert_mix)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.style == "lowrank":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as LoRA / HydraLoRA
        else:
            nn.init.kaiming_uniform_(self.lora_A, nonlinearity="relu")  # the reference's ReLU styles
        if self.style == "bottleneck":
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            nn.init.zeros_(self.lora_B)
        if self.router is not None:
            self.router.reset_parameters()
        if self.expert_scale is not None:
            nn.init.zeros_(self.expert_scale)

    def routing_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, d_in) -> (N, G, E) softmax over experts within each output group, in the tokens' dtype."""
        return self._routing_probabilities(tokens).to(tokens.dtype)

    def _routing_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, G, E) routing softmax in float32 (computed in float32 straight from the logits)."""
        if self.router is None:
            return tokens.new_ones(tokens.shape[0], 1, 1, dtype=torch.float32)
        logits = F.linear(tokens, self.router.weight.to(tokens.dtype))
        logits = logits.view(tokens.shape[0], self.num_groups, self.num_experts)
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    def _per_expert_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, d_in) -> (N, E, r): each expert's code of its own dropout mask, as the reference's expert loop.

        Run under activation checkpointing (the RNG state is restored for the recompute, so the masks and
        results are the same): the backward pass keeps the N x d_in input instead of E masked copies of it
        and their masks, 3 x E bytes per input element in bf16 (HydraLoRA on SmolLM2: half the step's peak)."""
        masked = self.dropout(tokens.expand(self.num_experts, *tokens.shape))  # (E, N, d_in)
        return (masked @ self.lora_A.to(tokens.dtype).t()).transpose(0, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        tokens = u.reshape(-1, self.in_features)  # (N, d_in)
        if self.dropout_per_expert and self.training:  # E masks: (N, E, r), E masked inputs recomputed in backward
            code = checkpoint(self._per_expert_code, tokens, use_reentrant=False)
        else:
            code = self.dropout(tokens) @ self.lora_A.to(u.dtype).t()  # (N, r)
        if self.style != "lowrank":
            code = torch.relu(code)
        probabilities = self._routing_probabilities(tokens)  # (N, G, E), float32
        if self.training and self.router is not None and self.routing_mean is None:
            # Only the first forward since clear_routing_records() records: a gradient-checkpointing
            # recompute during backward must not replace it with a tensor that keeps its graph alive.
            self.routing_mean = probabilities.mean(dim=(0, 1))
        scale = self.expert_scale if self.expert_scale is not None else self.scaling
        weights = (probabilities * scale).to(u.dtype)
        out = self.expert_mix(code, weights, self.lora_B)  # the fused mix casts B while laying it out
        return out.reshape(*u.shape[:-1], self.out_features)


class TaskGatedLoRA(nn.Module):
    """MMoELoRA as the reference builds it: the rank r split across E experts (A_i, B_i) of rank r / E,
    mixed per sequence by a gate on the task label, softmax(W_g e[task]).

    Shapes: A (E, r/E, d_in) ~ N(0, 0.01), B (E, d_out, r/E) = 0, task embedding e (num_tasks + 1, 64) and
    gate W_g (E, 64), both randomly initialised (nn.Embedding / nn.Linear defaults). Task ids come from
    :func:`mtlora.injection.set_task_ids` before the forward pass; without them (generation, where the
    reference drops the task id) the last embedding row, index num_tasks ("unknown task"), is used. The
    scale is alpha / r for the whole rank, as in the reference.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, num_experts: int, num_tasks: int,
                 scaling: float, dropout: float = 0.0):
        super().__init__()
        if rank % num_experts != 0:
            raise ValueError(f"rank {rank} is not divisible by {num_experts} experts")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.num_tasks, self.scaling = num_experts, num_tasks, scaling
        expert_rank = rank // num_experts
        self.lora_A = nn.Parameter(torch.empty(num_experts, expert_rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, expert_rank))
        self.task_embedding = nn.Embedding(num_tasks + 1, TASK_EMBEDDING_DIM)
        self.gate = nn.Linear(TASK_EMBEDDING_DIM, num_experts, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.task_ids: torch.Tensor | None = None
        nn.init.normal_(self.lora_A, std=0.01)

    def gate_weights(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """(batch, E) mixing weights, one row per sequence."""
        task_ids = self.task_ids if self.task_ids is not None else torch.full((batch_size,), self.num_tasks)
        embedding = self.task_embedding(task_ids.to(device))  # (batch, 64)
        return torch.softmax(self.gate(embedding), dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch_size = u.shape[0] if u.dim() == 3 else 1
        tokens = self.dropout(u).reshape(batch_size, -1, self.in_features)  # (batch, L, d_in)
        gate = self.gate_weights(batch_size, u.device).to(u.dtype) * self.scaling  # (batch, E)
        return gated_lora_mix(tokens, self.lora_A, self.lora_B, gate).reshape(*u.shape[:-1], self.out_features)
