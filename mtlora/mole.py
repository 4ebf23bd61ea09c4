"""MoLE (Mixture of LoRA Experts, Wu, Huang, Wei, ICLR 2024): a learned gate per decoder layer over N frozen LoRAs.

The form of the authors' public code, adapted to causal LMs. For decoder layer l with input h (batch, L, d):

    z = mean over the prompt tokens of h_t / ||h_t||        (batch, d)
    G = softmax(W_g z)                                      (batch, N), W_g (N, d): the only trained weights
    y = W x + sum_i G_i s B_i A_i x                         every LoRA linear of layer l, one gate for all of them

The balance loss is L_bal = -log prod_i q_i with q the mean gate over the gated layers and the sequences of
the batch; it is smallest (N log N) when q is uniform. The authors' NLP settings: alpha = 0.5 (L = L_LM +
alpha L_bal), learning rate 1e-5, 800 iterations, batch 12. (The public diffusion code computes this term
from detached gate records, so there it has no gradient: alpha = 0 is that behaviour; the default follows
the paper.)

Gates for variable-length text: one gate vector per sequence, computed once from its prompt and kept fixed
while decoding (the code computes one gate per sample from the whole flattened input; the paper assumes a
fixed length). The prompt tokens are the non-padding tokens without a label (labels == -100) in a training
forward (all of them for a sequence labelled throughout), and all non-padding tokens of the first forward
otherwise (the prompt at generation); while decoding with a KV cache (``generate``'s default) the gates of
the prompt are reused. Tokens are normalised one by one before the mean, so a few large-norm tokens (e.g.
BOS) do not decide the gate alone. The paper's learnable temperature is not used (nor by the code), and the
paper's gate over the concatenated per-LoRA block outputs is not implemented.

The LoRA factors are stacked, A (N, r, d_in) and B (N, d_out, r), and mixed in two GEMMs
(:func:`mtlora.experts.gated_lora_mix`). They are non-persistent buffers: a MoLE checkpoint (train.py ``--method mole --lora_library ...``)
holds the gates and an adapter_config.json naming the library, and the adapter state dict (``.adapter.``
names) is exactly the gate weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput
from mtlora.experts import gated_lora_mix
from mtlora.injection import ADAPTER_NAME, adapter_state_dict, find_decoder_layers, install_adapter, track_hook
from mtlora.library import check_library_fits, lora_factors, read_lora_modules
from mtlora.training_data import IGNORE_INDEX

# The authors' settings for NLP tasks (paper, section 4 / appendix).
MOLE_BALANCE_ALPHA = 0.5
MOLE_LEARNING_RATE = 1e-5
MOLE_MAX_STEPS = 800
MOLE_BATCH_SIZE = 12
GATE_INIT_NORM = 0.01  # the code's initialiser: each expert's row of W_g a random direction of norm 0.01


class MoleGate(nn.Module):
    """G = softmax(W_g mean_t normalize(h_t)) over the pooled tokens, (batch, N) in float32.

    ``pool_mask`` (batch, L) and ``decoding`` are set before each model forward (see :func:`attach_mole`);
    ``gates`` keeps the last gates (reused while decoding), ``record`` the first gates of a training forward
    (for the balance loss).
    """

    def __init__(self, hidden_size: int, num_loras: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_loras, hidden_size))
        self.pool_mask: torch.Tensor | None = None
        self.decoding = False
        self.gates: torch.Tensor | None = None
        self.record: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight)
            self.weight.mul_(GATE_INIT_NORM / self.weight.norm(dim=1, keepdim=True))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoding and self.gates is not None:
            return self.gates
        tokens = F.normalize(hidden.float(), dim=-1)  # (batch, L, d)
        if self.pool_mask is None:
            pooled = tokens.mean(dim=1)
        else:
            if self.pool_mask.shape != tokens.shape[:2]:
                raise ValueError(f"MoLE pooling mask {tuple(self.pool_mask.shape)} does not match the layer input "
                                 f"{tuple(tokens.shape[:2])}")
            mask = self.pool_mask.to(tokens.device, tokens.dtype)[..., None]
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        self.gates = torch.softmax(pooled @ self.weight.float().t(), dim=-1)  # (batch, N)
        if self.training and self.record is None:
            self.record = self.gates
        return self.gates


class MoleLoRA(nn.Module):
    """Delta(x) = sum_i G_i s B_i A_i dropout(x) with N frozen LoRAs; G comes from the layer's :class:`MoleGate`."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("lora_A", lora_A.float().contiguous(), persistent=False)  # (N, r, d_in)
        self.register_buffer("lora_B", lora_B.float().contiguous(), persistent=False)  # (N, d_out, r)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gates: torch.Tensor | None = None  # (batch, N), set by the layer's forward pre-hook

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.gates is None:
            raise RuntimeError("MoLE gates are not set: run the model (its decoder layers compute them)")
        tokens = self.dropout(u).reshape(self.gates.shape[0], -1, u.shape[-1])  # (batch, L, d_in)
        gates = (self.gates * self.scaling).to(u.dtype)
        return gated_lora_mix(tokens, self.lora_A, self.lora_B, gates).reshape(*u.shape[:-1], self.lora_B.shape[1])


# ----------------------------------------------------------------------------------------------- hooks

def _gate_layer(layer: nn.Module, args: tuple, kwargs: dict, loras: Sequence[MoleLoRA]) -> None:
    """Decoder-layer pre-hook: compute the layer's gates from its input and hand them to its LoRAs."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    gates = getattr(layer, ADAPTER_NAME)(hidden)
    for lora in loras:
        lora.gates = gates


def _prepare_gates(model: nn.Module, args: tuple, kwargs: dict, gates: Sequence[MoleGate]) -> None:
    """Model pre-hook: which tokens the gates pool over, or, while decoding with a cache, keep the gates."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    decoding = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
    mask = kwargs.get("attention_mask")
    mask = mask.bool() if mask is not None and mask.dim() == 2 else None
    labels = kwargs.get("labels")
    if labels is not None:  # the prompt: tokens without a label; a sequence with none keeps all its tokens
        prompt = labels == IGNORE_INDEX if mask is None else (labels == IGNORE_INDEX) & mask
        all_tokens = torch.ones_like(prompt) if mask is None else mask
        mask = torch.where(prompt.any(dim=1, keepdim=True), prompt, all_tokens)
    for gate in gates:
        gate.decoding, gate.pool_mask = decoding, mask
        if not decoding:
            gate.record = None


def _release_gates(model: nn.Module, args: tuple, kwargs: dict, output, gates: Sequence[MoleGate]) -> None:
    """Model forward hook: forget the pooling mask, so a direct call of an inner module pools over all tokens."""
    for gate in gates:
        gate.pool_mask, gate.decoding = None, False


# -------------------------------------------------------------------------------------------- attaching

def attach_mole(model: nn.Module, lora_library: Sequence[str | Path]) -> AdapterConfig:
    """Freeze ``model``, attach the N LoRAs of ``lora_library`` (train.py ``--method lora`` checkpoints) to
    their linear layers and a trainable gate to every decoder layer holding one. Returns the library's config.
    """
    config, modules = read_lora_modules(lora_library)
    for path, module in zip(lora_library, modules):
        check_library_fits(model, module, path)
    if adapter_state_dict(model):
        raise InvalidInput("this model already has adapters attached")
    layers = find_decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    factors = [lora_factors(module) for module in modules]
    by_layer: dict[int, list[str]] = {}
    for host in factors[0]:
        index = host[len(prefix) + 1:].split(".", 1)[0] if host.startswith(prefix + ".") else ""
        if not index.isdigit():
            raise InvalidInput(f"--lora_checkpoints {lora_library[0]}: {host} is outside the decoder layers; "
                             "MoLE gates the LoRAs of each decoder layer")
        by_layer.setdefault(int(index), []).append(host)
    for param in model.parameters():
        param.requires_grad_(False)
    gates = []
    for index, hosts in sorted(by_layer.items()):
        loras = []
        for host in hosts:
            lora_A = torch.stack([f[host][0] for f in factors])  # (N, r, d_in)
            lora_B = torch.stack([f[host][1] for f in factors])  # (N, d_out, r)
            loras.append(MoleLoRA(lora_A, lora_B, config.scaling, config.lora_dropout))
            install_adapter(model.get_submodule(host), loras[-1])
        layer = layers[index]
        gate = MoleGate(model.config.hidden_size, len(modules))
        layer.add_module(ADAPTER_NAME, gate.to(device=next(layer.parameters()).device).train(layer.training))
        track_hook(gate, layer.register_forward_pre_hook(partial(_gate_layer, loras=loras), with_kwargs=True))
        gates.append(gate)
    track_hook(gates[0], model.register_forward_pre_hook(partial(_prepare_gates, gates=gates), with_kwargs=True))
    track_hook(gates[0], model.register_forward_hook(partial(_release_gates, gates=gates), with_kwargs=True))
    return config


def mole_gates(model: nn.Module) -> list[MoleGate]:
    return [m for m in model.modules() if isinstance(m, MoleGate)]


# ------------------------------------------------------------------------------------------------- loss

def gate_balance_loss(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_bal = -log prod_i q_i = -sum_i log q_i, q = the mean of the (batch, N) gates over layers and sequences."""
    q = torch.cat(list(gates)).mean(dim=0)  # (N,)
    return -torch.log(q.clamp(min=1e-12)).sum()


def mole_balance_loss(model: nn.Module) -> torch.Tensor | None:
    """The balance loss of the last training forward (None when no gate recorded one)."""
    records = [gate.record for gate in mole_gates(model) if gate.record is not None]
    return gate_balance_loss(records) if records else None
