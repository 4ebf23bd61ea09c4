"""Attach adapters to an unmodified Hugging Face causal LM.

Each adapter becomes a child module named ``adapter`` of the module it runs beside (its "host"),
and a forward hook adds its output to the host's output, reading the host's own input:

* component level: host = a target linear layer (``q_proj``...): y = W x + Delta(x);
* block level: host = the decoder layer's ``mlp`` and/or ``self_attn``, whose input is already the
  normalised hidden state, so the block computes x + F(LN(x)) + Delta(LN(x)).

The base model's parameter names are untouched, so base weights load as usual and adapter weights
are exactly the parameters whose name contains ``.adapter.``.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from mtlora.adapters import RoutedLowRankAdapter, TaskGatedLoRA
from mtlora.config import AdapterConfig, AdapterConfigError
from mtlora.experts import routed_expert_mix, routed_expert_mix_loop

ADAPTER_NAME = "adapter"
BLOCK_HOSTS = {"ffn": ("mlp",), "attention": ("self_attn",), "both": ("self_attn", "mlp")}
EXPERT_MIXES = {"fused": routed_expert_mix, "loop": routed_expert_mix_loop}


def _add_adapter_output(host: nn.Module, args: tuple, kwargs: dict, output):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    delta = host.adapter(hidden)
    if isinstance(output, tuple):  # attention modules return (attn_output, attn_weights, ...)
        return (output[0] + delta.to(output[0].dtype),) + tuple(output[1:])
    return output + delta.to(output.dtype)


# The hooks each adapter module needs, so that detach_adapters can remove them.
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def track_hook(adapter: nn.Module, handle) -> None:
    """Remember a hook that belongs to ``adapter`` (removed with it by :func:`detach_adapters`)."""
    _HOOKS.setdefault(adapter, []).append(handle)


def install_adapter(host: nn.Module, adapter: nn.Module) -> None:
    """Make ``adapter`` the child ``adapter`` of ``host`` (on its device) and add its output to the host's output."""
    weight = next(host.parameters())
    host.add_module(ADAPTER_NAME, adapter.to(device=weight.device).train(host.training))
    track_hook(adapter, host.register_forward_hook(_add_adapter_output, with_kwargs=True))


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList whose children all have ``self_attn`` and ``mlp``."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in module
        ):
            return module
    raise AdapterConfigError(
        f"--enable_block_adapter: cannot find decoder layers with `self_attn` and `mlp` in {type(model).__name__}"
    )


def _routed_adapter(config: AdapterConfig, d_in: int, d_out: int, rank: int, num_groups: int,
                    style: str = "lowrank", component_level: bool = False) -> RoutedLowRankAdapter:
    return RoutedLowRankAdapter(
        d_in, d_out, rank=rank, num_experts=config.num_experts, scaling=config.lora_alpha / rank,
        dropout=config.lora_dropout, num_groups=num_groups, style=style,
        dropout_per_expert=component_level and config.expert_dropout == "reference",
    )


def _component_adapter(config: AdapterConfig, linear: nn.Linear, num_groups: int) -> nn.Module:
    if config.is_task_gated:
        return TaskGatedLoRA(linear.in_features, linear.out_features, config.lora_rank, config.expert_num,
                             config.num_tasks, config.scaling, config.lora_dropout)
    return _routed_adapter(config, linear.in_features, linear.out_features, config.lora_rank, num_groups,
                           component_level=True)


def _attach_component_level(model: nn.Module, config: AdapterConfig) -> int:
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.trainable]
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    missing = set(config.trainable) - found
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise AdapterConfigError(f"--trainable: no linear layer named {sorted(missing)}; available: {', '.join(available)}")
    groups = [config.group_count(linear.out_features, name) for name, linear in targets]  # check all first
    for (_, linear), num_groups in zip(targets, groups):
        install_adapter(linear, _component_adapter(config, linear, num_groups))
    return len(targets)


def _attach_block_level(model: nn.Module, config: AdapterConfig) -> int:
    hidden = model.config.hidden_size
    rank = config.block_adapter_rank or config.lora_rank
    num_groups = config.group_count(hidden, "the decoder block (hidden size)")
    layers = find_decoder_layers(model)
    for layer in layers:
        for host_name in BLOCK_HOSTS[config.block_adapter_type]:
            adapter = _routed_adapter(config, hidden, hidden, rank, num_groups, config.block_adapter_style)
            install_adapter(getattr(layer, host_name), adapter)
    return len(layers) * len(BLOCK_HOSTS[config.block_adapter_type])


def attach_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and attach the adapters ``config`` describes; returns the same model.

    Raises :class:`AdapterConfigError` (naming the flag) before touching the model when the
    configuration does not fit it.
    """
    config.validate()
    if adapter_modules(model):
        raise AdapterConfigError("this model already has adapters attached")
    if config.is_mole:
        from mtlora.mole import attach_mole  # MoLE builds on this module's attachment

        attach_mole(model, config.lora_library)
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    if config.uses_block_adapter:
        _attach_block_level(model, config)
    else:
        _attach_component_level(model, config)
    return model


def detach_adapters(model: nn.Module) -> nn.Module:
    """Remove every adapter :func:`attach_adapters` added (modules and hooks); the base stays frozen."""
    for name, adapter in adapter_modules(model).items():
        host = model.get_submodule(name.rpartition(".")[0])
        for handle in _HOOKS.pop(adapter, []):
            handle.remove()
        delattr(host, ADAPTER_NAME)
    return model


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> adapter module (every child named ``adapter``), in model order."""
    return {name: m for name, m in model.named_modules() if name.rpartition(".")[2] == ADAPTER_NAME}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only, keyed by their full names in ``model``."""
    marker = f".{ADAPTER_NAME}."
    return {name: tensor for name, tensor in model.state_dict().items() if marker in name}


def set_task_ids(model: nn.Module, task_ids: torch.Tensor | None) -> None:
    """Give MMoELoRA's task gates the task id of each sequence of the next batch (None: no task id)."""
    for module in model.modules():
        if isinstance(module, TaskGatedLoRA):
            module.task_ids = task_ids


def routed_adapters(model: nn.Module) -> dict[str, RoutedLowRankAdapter]:
    """Name -> adapter, for the adapters that have a token router (and so take part in the balance loss)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedLowRankAdapter) and m.router is not None}


def set_expert_mix(model: nn.Module, mix: str) -> None:
    """Compute every routed adapter's expert mix ``fused`` (the default) or as the reference's per-expert ``loop``.

    Both compute the same function (tests hold them equal); the loop exists to be compared against.
    """
    if mix not in EXPERT_MIXES:
        raise ValueError(f"expert mix must be one of {', '.join(EXPERT_MIXES)}, got {mix!r}")
    for module in model.modules():
        if isinstance(module, RoutedLowRankAdapter):
            module.expert_mix = EXPERT_MIXES[mix]
