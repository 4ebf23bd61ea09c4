"""GPU memory -> micro-batch: the largest per-device batch whose training step fits the card; gradient
accumulation keeps the effective batch.

The peak of one training step (bf16 base, float32 adapter master weights, AdamW, micro-batch b of L tokens) is
planned from the model's shape, in bytes:

    weights       2 x base parameters                          (bf16)
    adapters     16 x trainable parameters                     (float32 weight, gradient, two AdamW moments)
    activations   b x L x per-token bytes:
      with gradient checkpointing     2 x layers x d            the checkpointed input of every decoder layer
                                    + 2 x (11 d + 4 f)          one layer recomputed in the backward pass
                                    + 2 x (a + c)               that layer's adapters (a: their input + output widths;
                                                                c: G x E x r of the routed ones, the routing-weighted
                                                                code their expert mix keeps for its backward)
      without                         layers x 2 x (11 d + 4 f + a + c)
      both                          + 3 x e                     e: E x input width of the widest adapter with one
                                                                dropout mask per expert (the reference's component
                                                                level): its masked bf16 copies and 1-byte masks,
                                                                recomputed for one adapter at a time in the backward
      both                          + 12 x V                    logits (bf16), their float32 copy for the loss, its gradient

with d the hidden size, f the MLP width and V the vocabulary. 11 d + 4 f is what a LLaMA layer keeps for its
backward (attention: normed input, q, k, v, output and its projection; MLP: normed input, gate, up, activation,
product). Against the H100 measurements of benchmarks/RESULTS.md (LLaMA-2-7B mtLoRA, b = 16, L = 512: 5,176 MiB of
activations with checkpointing, 12,802 MiB without on 8 layers) the activation term is 27% and 18% high:
conservative. A plan fits a card of M GiB when
``peak x FRAGMENTATION + CONTEXT_GIB <= M`` (the allocator's reserve over what it hands out; the CUDA context and
library workspaces, which max_memory_allocated does not count).

``MEASURED_PEAK_GIB`` holds the peaks benchmarks/bench_paper_scale.py measured (its Markdown prints the entries);
where it covers a shape, family and micro-batch, the measurement (plus 16 bytes per trainable parameter the row
has beyond the measured configuration) replaces the formula.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput

FRAGMENTATION = 1.10
CONTEXT_GIB = 1.0
GIB = 2**30
# (hidden, layers, MLP width, vocabulary) -> name, for the measured table
SHAPES = {(4096, 32, 11008, 32000): "llama-2-7b", (5120, 40, 13824, 32000): "llama-2-13b"}
# (shape name, family, gradient checkpointing) -> {"trainable_params": N, "peak_gib": {micro-batch: GiB}} at
# 512 tokens per sequence; family: "component" (adapters on q_proj, v_proj) | "block" (one per decoder block).
# Measured on one NVIDIA H200 (benchmarks/PAPER_SCALE.md, 2026-11-30): GiB allocated at the peak of one step.
MEASURED_PEAK_GIB: dict[tuple[str, str, bool], dict] = {
    ('llama-2-7b', 'component', True): {'trainable_params': 75497472, 'peak_gib': {1: 14.02, 2: 14.02, 4: 14.56, 8: 16.23, 16: 19.55}},
    ('llama-2-7b', 'component', False): {'trainable_params': 75497472, 'peak_gib': {1: 21.4, 2: 29.81, 4: 46.59, 8: 79.95}},
    ('llama-2-7b', 'block', True): {'trainable_params': 39845888, 'peak_gib': {1: 13.36, 2: 13.39, 4: 14.03, 8: 15.29, 16: 17.82}},
    ('llama-2-7b', 'block', False): {'trainable_params': 39845888, 'peak_gib': {1: 15.37, 2: 17.95, 4: 23.07, 8: 33.13, 16: 53.42}},
    ('llama-2-13b', 'component', True): {'trainable_params': 117964800, 'peak_gib': {1: 26.62, 2: 26.62, 4: 27.1, 8: 29.34, 16: 33.81}},
    ('llama-2-13b', 'component', False): {'trainable_params': 117964800, 'peak_gib': {1: 38.09, 2: 51.13, 4: 76.92, 8: 128.75}},
    ('llama-2-13b', 'block', True): {'trainable_params': 88473600, 'peak_gib': {1: 26.12, 2: 26.09, 4: 26.31, 8: 27.87, 16: 30.97}},
    ('llama-2-13b', 'block', False): {'trainable_params': 88473600, 'peak_gib': {1: 28.96, 2: 32.96, 4: 40.74, 8: 56.54, 16: 88.17}},
}
MEASURED_SEQ_LEN = 512


@dataclass(frozen=True)
class StepShape:
    """What a training step's peak memory depends on (besides the batch)."""

    name: str | None  # a SHAPES name, or None
    base_params: int
    trainable_params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    adapter_width: int  # sum over one decoder layer's adapters of input + output width
    family: str
    expert_dropout_width: int = 0  # E x input width of the widest adapter with one dropout mask per expert
    folded_width: int = 0  # sum over one layer's routed adapters of G x E x r (the routing-weighted code)


@dataclass(frozen=True)
class MicroBatch:
    micro_batch: int
    accumulation: int
    peak_gib: float  # planned peak of one step (allocated memory)
    source: str  # "formula" | "measured"

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x {self.accumulation} accumulation step(s) "
                f"(planned peak {self.peak_gib:.1f} GiB, {self.source})")


def adapter_config_from_flags(flags: dict) -> AdapterConfig:
    """The AdapterConfig of a row's train.py flags (auxiliary-loss flags are left out)."""
    names = {f.name for f in dataclasses.fields(AdapterConfig) if f.init}
    config = AdapterConfig(**{k: v for k, v in flags.items() if k in names})
    config.task_names = ["task"]  # MMoELoRA's gate needs a task count; one is enough to size it
    return config


@functools.lru_cache(maxsize=None)
def _step_shape(model_name_or_path: str | None, flags_json: str) -> StepShape:
    from mtlora.injection import adapter_modules, attach_adapters, find_decoder_layers
    from mtlora.loading import build_meta_model
    from mtlora.params import count_parameters

    flags = json.loads(flags_json)
    model = build_meta_model(model_name_or_path)
    config = model.config
    if flags.get("method") == "mole":  # gates over a library: plan it as one LoRA (its adapters are buffers)
        flags = {"method": "lora"}
    attach_adapters(model, adapter_config_from_flags(flags))
    trainable, total = count_parameters(model)
    layers = len(find_decoder_layers(model))
    adapters = adapter_modules(model).values()
    width = sum(m.in_features + m.out_features for m in adapters) // layers
    expert_dropout = max((m.num_experts * m.in_features for m in adapters if getattr(m, "dropout_per_expert", False)),
                         default=0)
    folded = sum(m.num_groups * m.num_experts * m.rank for m in adapters if hasattr(m, "num_groups"))
    key = (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size)
    return StepShape(SHAPES.get(key), total - trainable, trainable, config.hidden_size, config.intermediate_size,
                     config.num_hidden_layers, config.vocab_size, width,
                     "block" if flags.get("enable_block_adapter") else "component", expert_dropout,
                     folded // layers)


def step_shape(model_name_or_path: str | None, flags: dict) -> StepShape:
    """The shape of a training step of ``flags``' adapters on the model (built on the meta device: no memory)."""
    return _step_shape(model_name_or_path, json.dumps(flags, sort_keys=True))


def formula_peak_gib(shape: StepShape, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """The module docstring's formula."""
    layer = 11 * shape.hidden + 4 * shape.intermediate
    adapters = 2 * (shape.adapter_width + shape.folded_width)
    if checkpointing:
        per_token = 2 * shape.layers * shape.hidden + 2 * layer + adapters
    else:
        per_token = shape.layers * (2 * layer + adapters)
    per_token += 3 * shape.expert_dropout_width  # one adapter's masked copies, recomputed in the backward pass
    per_token += 12 * shape.vocab
    fixed = 2 * shape.base_params + 16 * shape.trainable_params
    return (fixed + micro_batch * seq_len * per_token) / GIB


def planned_peak_gib(shape: StepShape, micro_batch: int, seq_len: int, checkpointing: bool,
                     measured: dict | None = None) -> tuple[float, str]:
    """(peak GiB, "measured" | "formula"): the measured table (default MEASURED_PEAK_GIB) where it covers the
    step, else the formula."""
    measured = (MEASURED_PEAK_GIB if measured is None else measured).get((shape.name, shape.family, checkpointing))
    if measured is not None and seq_len == MEASURED_SEQ_LEN and micro_batch in measured["peak_gib"]:
        extra = 16 * (shape.trainable_params - measured["trainable_params"]) / GIB
        return measured["peak_gib"][micro_batch] + max(extra, 0.0), "measured"
    return formula_peak_gib(shape, micro_batch, seq_len, checkpointing), "formula"


def fits(peak_gib: float, gpu_memory_gib: float) -> bool:
    return peak_gib * FRAGMENTATION + CONTEXT_GIB <= gpu_memory_gib


def micro_batch_at(model_name_or_path: str | None, flags: dict, per_device_batch: int, micro_batch: int, seq_len: int,
                   checkpointing: bool, measured: dict | None = None) -> MicroBatch:
    """The split of ``per_device_batch`` at ``micro_batch`` rows per step, with its planned peak."""
    peak, source = planned_peak_gib(step_shape(model_name_or_path, flags), micro_batch, seq_len, checkpointing, measured)
    return MicroBatch(micro_batch, per_device_batch // micro_batch, peak, source)


def choose_micro_batch(model_name_or_path: str | None, flags: dict, per_device_batch: int, largest: int,
                       seq_len: int, checkpointing: bool, gpu_memory_gib: float,
                       measured: dict | None = None) -> MicroBatch:
    """The largest divisor of ``per_device_batch`` (the effective batch on one device), at most ``largest``, whose
    step fits ``gpu_memory_gib``; raises naming --gpu_memory_gb when even 1 does not fit."""
    shape = step_shape(model_name_or_path, flags)
    for micro_batch in range(min(largest, per_device_batch), 0, -1):
        if per_device_batch % micro_batch:
            continue
        peak, source = planned_peak_gib(shape, micro_batch, seq_len, checkpointing, measured)
        if fits(peak, gpu_memory_gib):
            return MicroBatch(micro_batch, per_device_batch // micro_batch, peak, source)
    peak, source = planned_peak_gib(shape, 1, seq_len, checkpointing, measured)
    raise InvalidInput(
        f"--gpu_memory_gb {gpu_memory_gib:.1f}: a training step of {model_name_or_path} does not fit even at "
        f"micro-batch 1 (planned peak {peak:.1f} GiB by the {source}, plus {100 * (FRAGMENTATION - 1):.0f}% and "
        f"{CONTEXT_GIB:.0f} GiB of overhead). Train it with DeepSpeed ZeRO-3 and CPU offload (train.py --deepspeed "
        "configs/ds_zero3_offload.json, benchmarks/bench_distributed.py), or on a larger card")
