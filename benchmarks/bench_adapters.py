"""Speed and memory of the fused routed adapter against the reference per-expert loop, end to end.

One run measures, on whatever device is there (the numbers that count come from a GPU):

1. ``adapter``: forward+backward time and peak activation memory of one routed adapter at LLaMA-2-7B
   width (N = 8192 tokens, d = 4096, r = 16, E = 16), scalar routing and routing groups of 2048, 512,
   256, 128 columns; the package's fused mix against its per-expert loop (the public reference's
   pattern, ``mtlora.injection.set_expert_mix``), plus the block's own MLP for scale.
2. ``train``: a whole training step (bf16 frozen base, float32 adapter master weights, AdamW, gradient
   clipping, balance loss, gradient checkpointing) of a random-weight LLaMA-2-7B-shaped model for
   hydralora (q_proj, v_proj), block-ffn and full mtLoRA, fused against loop, and the base model
   with no adapters as the floor; then a profile of one mtLoRA step of each implementation.
3. ``eval``: questions/s of the evaluators' batched greedy generation (BBH-like, 3-shot prompt lengths,
   up to 32 new tokens) and next-token scoring (MMLU-like, 5-shot prompt lengths), both from
   ``mtlora.evaluation.batching``, for a
   SmolLM2-135M-shaped and the LLaMA-2-7B-shaped random model, without and with mtLoRA adapters.
4. ``nockpt``: the floor and mtLoRA steps without gradient checkpointing on the first few layers.
5. ``compile``: ``torch.compile`` of the fused adapter, and the mtLoRA step with every decoder layer
   compiled, each against eager (on the layers left by ``nockpt`` when that ran first).

Before timing, fused and loop are checked to compute the same outputs and gradients. ``--quick`` runs
all of it at tiny sizes on the CPU in seconds (the CI correctness check; its timings mean nothing).

    PYTHONPATH=. python benchmarks/bench_adapters.py --output benchmarks/results/h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mtlora.adapters import RoutedLowRankAdapter
from mtlora.config import AdapterConfig
from mtlora.evaluation.batching import generate_batched, next_token_scores
from mtlora.injection import adapter_modules, attach_adapters, detach_adapters, set_expert_mix
from mtlora.evaluation.reporting import write_json
from mtlora.losses import balance_loss, clear_routing_records

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
GROUP_COUNTS = (1, 2, 8, 16, 32)  # at d = 4096: scalar routing, g = 2048, 512, 256, 128
SECTIONS = ("adapter", "train", "profile", "eval", "nockpt", "compile")
METHODS = ("none", "hydralora", "block_ffn", "mtlora")
BLC_ALPHA = 0.01


@dataclass
class Sizes:
    """Every size the benchmark uses; ``full`` is the paper's setting, ``quick`` a CPU smoke test."""

    tokens: int  # adapter micro-benchmark: N
    width: int  # d
    rank: int
    experts: int
    batch: int  # training step: batch x seq_len tokens
    seq_len: int
    warmup: int
    repeats: int  # timed repeats (median reported) ...
    inner: int  # ... of this many back-to-back iterations each
    model_overrides: dict = field(default_factory=dict)
    smollm_overrides: dict = field(default_factory=dict)
    gen_prompt: tuple[int, int] = (600, 800)  # BBH 3-shot prompt lengths
    mmlu_prompt: tuple[int, int] = (400, 700)  # MMLU 5-shot prompt lengths
    new_tokens: int = 32
    eval_questions: dict = field(default_factory=dict)  # (model, task) -> (questions, batch size)


FULL = Sizes(tokens=8192, width=4096, rank=16, experts=16, batch=16, seq_len=512, warmup=3, repeats=5, inner=5,
             eval_questions={("smollm2-135m", "bbh"): (128, 64), ("smollm2-135m", "mmlu"): (256, 64),
                             ("llama-2-7b", "bbh"): (64, 32), ("llama-2-7b", "mmlu"): (128, 16)})
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256)
QUICK = Sizes(tokens=48, width=64, rank=4, experts=4, batch=2, seq_len=16, warmup=1, repeats=2, inner=1,
              model_overrides=TINY_MODEL, smollm_overrides=TINY_MODEL, gen_prompt=(12, 20), mmlu_prompt=(10, 16),
              new_tokens=4, eval_questions={("smollm2-135m", "bbh"): (4, 2), ("smollm2-135m", "mmlu"): (4, 2),
                                            ("llama-2-7b", "bbh"): (4, 2), ("llama-2-7b", "mmlu"): (4, 2)})


# ----------------------------------------------------------------------------------------------------
# Measurement helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, sizes: Sizes, inner: int | None = None) -> dict:
    """Median time of ``fn`` over repeats of back-to-back calls (so launches overlap as in training),
    and the peak memory one call adds over what is allocated before it (None off the GPU)."""
    inner = inner or sizes.inner
    for _ in range(sizes.warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(sizes.repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000 / inner)
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_mb": peak_memory_mb(fn, device)}


def peak_memory_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def gpu_kernel_time(fn, device: torch.device, calls: int = 5) -> dict:
    """GPU time per call, summed over its kernels, and the kernels it launches (profiler; None off the GPU).

    Where the wall time exceeds it, the call is bound by the CPU issuing its launches; inside a training
    step that CPU time overlaps with the GPU work of the layers around the adapter.
    """
    if device.type != "cuda":
        return {"gpu_ms": None, "kernels": None}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"gpu_ms": sum(e.device_time_total for e in kernels) / 1000 / calls, "kernels": len(kernels) / calls}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# 1. One adapter: fused against loop


def make_adapter(sizes: Sizes, groups: int, device: torch.device) -> RoutedLowRankAdapter:
    """A block-level adapter as mtLoRA attaches it, with random (non-zero) expert up-projections."""
    adapter = RoutedLowRankAdapter(sizes.width, sizes.width, sizes.rank, sizes.experts, scaling=64 / sizes.rank,
                                   dropout=0.05, num_groups=groups).to(device)
    nn.init.normal_(adapter.lora_B, std=0.02)
    return adapter.train()


def adapter_grads(adapter: nn.Module, x: torch.Tensor, upstream: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Output and the gradients of input and parameters for one forward+backward (fixed dropout seed)."""
    adapter.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    out = adapter(x)
    out.backward(upstream)
    return [out.detach(), x.grad] + [p.grad for p in adapter.parameters()]


def check_adapter_agreement(sizes: Sizes, groups: int, device: torch.device) -> float:
    """Largest relative difference between fused and loop (output, input and parameter gradients), float32."""
    adapter = make_adapter(sizes, groups, device)
    x = torch.randn(sizes.tokens, sizes.width, device=device)
    upstream = torch.randn(sizes.tokens, sizes.width, device=device)
    fused = adapter_grads(adapter, x, upstream, seed=1)
    set_expert_mix(adapter, "loop")
    loop = adapter_grads(adapter, x, upstream, seed=1)
    return max(relative_error(f, l) for f, l in zip(fused, loop))


def fwd_bwd(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    """A closure running one forward+backward of ``module`` on ``x`` with fresh gradients."""
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(upstream)
    return step


def bench_adapter(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    """Fused and loop adapter timings per routing group count, plus the block's MLP for scale."""
    rows, agreement = [], {}
    x, upstream = adapter_inputs(sizes, device, dtype)
    for groups in GROUP_COUNTS:
        agreement[groups] = check_adapter_agreement(sizes, groups, device)
        if agreement[groups] > 1e-2:  # float32 rounding (or TF32, if enabled) stays far below this
            raise AssertionError(f"fused and loop adapters disagree at G={groups}: relative error {agreement[groups]:.2e}")
        adapter = make_adapter(sizes, groups, device)
        for impl in ("fused", "loop"):
            set_expert_mix(adapter, impl)
            step = fwd_bwd(adapter, x, upstream)
            rows.append(dict(impl=impl, groups=groups, group_size=sizes.width // groups,
                             **measure(step, device, sizes), **gpu_kernel_time(step, device)))
        free_memory(device)
    step = fwd_bwd(make_mlp(sizes, device, dtype), x, upstream)
    rows.append(dict(impl="llama_mlp", groups=None, group_size=None, **measure(step, device, sizes),
                     **gpu_kernel_time(step, device)))
    return {"rows": rows, "agreement_fp32": agreement}


def adapter_inputs(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The block input (a leaf that needs its gradient, as the residual stream does) and an upstream gradient."""
    x = torch.randn(sizes.tokens, sizes.width, device=device, dtype=dtype, requires_grad=True)
    return x, torch.randn(sizes.tokens, sizes.width, device=device, dtype=dtype)


def bench_compiled_adapter(sizes: Sizes, device: torch.device, dtype: torch.dtype, groups_list: tuple[int, ...],
                           backend: str) -> list[dict]:
    """``torch.compile`` of the fused adapter module, per routing group count."""
    rows = []
    x, upstream = adapter_inputs(sizes, device, dtype)
    for groups in groups_list:
        compiled = torch.compile(make_adapter(sizes, groups, device), backend=backend)
        start = time.perf_counter()
        fwd_bwd(compiled, x, upstream)()
        synchronize(device)
        compile_s = time.perf_counter() - start
        step = fwd_bwd(compiled, x, upstream)
        rows.append(dict(impl="fused+compile", groups=groups, group_size=sizes.width // groups, compile_s=compile_s,
                         **measure(step, device, sizes), **gpu_kernel_time(step, device)))
    return rows


def make_mlp(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The LLaMA-2-7B MLP (frozen, as in adapter training) at the benchmark's width."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = model_config("llama-2-7b", sizes.model_overrides)
    config.hidden_size = sizes.width
    with torch.device(device):
        mlp = LlamaMLP(config).to(dtype=dtype)
    return mlp.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# 2. Whole training step


def model_config(name: str, overrides: dict):
    config = AutoConfig.from_pretrained(CONFIGS / name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_model(name: str, overrides: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random-weight model of the named shape, built directly on ``device``."""
    config = model_config(name, overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False)


def adapter_config(method: str, hidden: int) -> AdapterConfig | None:
    """The paper's configurations (r = 16, alpha = 64, E = 16, dropout 0.05) for each benchmarked method."""
    if method == "none":
        return None
    if method == "hydralora":
        return AdapterConfig(method="hydralora")
    if method == "block_ffn":
        return AdapterConfig(method="hydralora", enable_block_adapter=True, block_adapter_type="ffn")
    return AdapterConfig(method="mtlora", enable_block_adapter=True, block_adapter_type="ffn",
                         enable_fine_grained_routing=True, routing_group_size=hidden // 2)


def scale_adapter_config(config: AdapterConfig, sizes: Sizes) -> AdapterConfig:
    config.lora_rank, config.lora_nums = sizes.rank, sizes.experts
    return config


def attach(model: nn.Module, method: str, sizes: Sizes) -> list[nn.Parameter]:
    """Attach ``method``'s adapters (random experts, float32 master weights); returns the trainable params."""
    detach_adapters(model)
    config = adapter_config(method, model.config.hidden_size)
    if config is None:
        return []
    attach_adapters(model, scale_adapter_config(config, sizes))
    for adapter in adapter_modules(model).values():
        nn.init.normal_(adapter.lora_B, std=0.02)
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(model: nn.Module, sizes: Sizes, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (sizes.batch, sizes.seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


def forward_backward(model: nn.Module, batch: dict) -> torch.Tensor:
    """LM loss plus the balance loss (every table script of the paper enables it), backward."""
    loss = model(**batch).loss
    blc = balance_loss(model)
    if blc is not None:
        loss = loss + BLC_ALPHA * blc
    loss.backward()
    clear_routing_records(model)
    return loss.detach()


def train_step_fn(model: nn.Module, params: list[nn.Parameter], batch: dict):
    """One optimisation step as train.py runs it: forward, backward, clip to 1.0, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=2e-4) if params else None

    def step():
        forward_backward(model, batch)
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def check_step_agreement(model: nn.Module, params: list[nn.Parameter], batch: dict) -> dict:
    """Loss and adapter-gradient relative differences, fused against loop, same dropout masks."""
    results = {}
    for impl in ("fused", "loop"):
        set_expert_mix(model, impl)
        torch.manual_seed(1)
        loss = forward_backward(model, batch)
        results[impl] = (loss, torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad = None
    return {"loss_rel_diff": relative_error(results["loop"][0], results["fused"][0]),
            "grad_rel_diff": relative_error(results["loop"][1], results["fused"][1])}


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.enable_input_require_grads()  # so the floor (no trainable parameter) still runs its backward


def bench_steps(model: nn.Module, sizes: Sizes, device: torch.device, methods: tuple[str, ...],
                impls: tuple[str, ...], label: str) -> dict:
    """Tokens/s and peak memory of a training step per (method, implementation)."""
    batch = make_batch(model, sizes, device)
    rows, agreement = [], {}
    model.train()
    for method in methods:
        params = attach(model, method, sizes)
        if params:
            agreement[method] = check_step_agreement(model, params, batch)
        for impl in impls if params else ("base",):
            if params:
                set_expert_mix(model, impl)
            result = measure(train_step_fn(model, params, batch), device, sizes, inner=1)
            rows.append(dict(setting=label, method=method, impl=impl, tokens=sizes.batch * sizes.seq_len,
                             tokens_per_s=sizes.batch * sizes.seq_len / result["ms"] * 1000, **result))
        free_memory(device)
    detach_adapters(model)
    return {"rows": rows, "agreement": agreement}


def profile_steps(model: nn.Module, sizes: Sizes, device: torch.device, out_dir: Path) -> dict:
    """Kernel-time tables of one mtLoRA step per implementation, written next to the JSON."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    params = attach(model, "mtlora", sizes)
    step = train_step_fn(model, params, make_batch(model, sizes, device))
    files = {}
    for impl in ("fused", "loop"):
        set_expert_mix(model, impl)
        step()
        synchronize(device)
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        path = out_dir / f"profile_mtlora_{impl}.txt"
        path.write_text(prof.key_averages().table(sort_by=sort_key, row_limit=30))
        files[impl] = path.name
    detach_adapters(model)
    return files


# ----------------------------------------------------------------------------------------------------
# 3. Evaluation throughput


def random_prompts(count: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    """Random token ids with uniformly drawn lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator)),),
                          generator=generator).tolist() for _ in range(count)]


def time_eval(model: nn.Module, name: str, sizes: Sizes, device: torch.device, label: str) -> list[dict]:
    """Questions/s of the evaluators' own batched generation (BBH-like) and next-token scoring (MMLU-like)."""
    rows = []
    tokenizer = AutoTokenizer.from_pretrained(CONFIGS / "smollm2-135m")  # decodes the ids; any vocabulary >= the model's
    for task in ("bbh", "mmlu"):
        count, batch_size = sizes.eval_questions[(name, task)]
        lengths = sizes.gen_prompt if task == "bbh" else sizes.mmlu_prompt
        prompts = random_prompts(count, lengths, model.config.vocab_size, seed=len(task))

        def work(subset):
            if task == "bbh":
                return generate_batched(model, tokenizer, subset, sizes.new_tokens, batch_size, desc="bench BBH")
            return next_token_scores(model, tokenizer, subset, [4, 5, 6, 7], batch_size, desc="bench MMLU")
        work(prompts)  # warm-up over every shape: attention plans are built per sequence length
        synchronize(device)
        start = time.perf_counter()
        work(prompts)
        synchronize(device)
        seconds = time.perf_counter() - start
        rows.append(dict(model=name, adapters=label, task=task, questions=count, batch_size=batch_size,
                         prompt_tokens=sum(len(p) for p in prompts), seconds=seconds, questions_per_s=count / seconds))
    return rows


def bench_eval(llama: nn.Module, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Both models, base and with (fused) mtLoRA adapters attached, as evaluated after training."""
    rows = []
    smollm = build_model("smollm2-135m", sizes.smollm_overrides, device, dtype)
    for name, model in (("smollm2-135m", smollm), ("llama-2-7b", llama)):
        model.eval()
        model.config.use_cache = True
        for method in ("none", "mtlora"):
            attach(model, method, sizes)
            rows.extend(time_eval(model, name, sizes, device, method))
        detach_adapters(model)
    del smollm
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------
# 4. no checkpointing; 5. torch.compile


def bench_compiled_step(model: nn.Module, sizes: Sizes, device: torch.device, backend: str) -> dict:
    """The mtLoRA (fused) step, eager then with every decoder layer compiled (regional compilation)."""
    from mtlora.injection import find_decoder_layers
    from mtlora.training import allow_checkpointed_side_effects

    allow_checkpointed_side_effects()
    model.train()
    model.config.use_cache = False
    set_checkpointing(model, True)
    batch = make_batch(model, sizes, device)
    params = attach(model, "mtlora", sizes)
    set_expert_mix(model, "fused")
    layers = find_decoder_layers(model)
    rows, grads = [], {}
    initial = [p.detach().clone() for p in params]
    for impl in ("fused", "fused+compile"):
        if impl == "fused+compile":
            for layer in layers:
                layer.compile(backend=backend)
        with torch.no_grad():  # undo the optimiser steps of the eager timing, to compare like with like
            for param, value in zip(params, initial):
                param.copy_(value)
        start = time.perf_counter()
        with adapter_dropout_off(model):
            loss = forward_backward(model, batch)  # the first compiled call compiles
        synchronize(device)
        first_call_s = time.perf_counter() - start
        grads[impl] = (loss, torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad = None
        result = measure(train_step_fn(model, params, batch), device, sizes, inner=1)
        rows.append(dict(setting=f"ckpt, {len(layers)} layers", method="mtlora", impl=impl,
                         tokens=sizes.batch * sizes.seq_len, first_call_s=first_call_s,
                         tokens_per_s=sizes.batch * sizes.seq_len / result["ms"] * 1000, **result))
        free_memory(device)
    for layer in layers:
        layer._compiled_call_impl = None  # back to eager for whatever runs next
    detach_adapters(model)
    agreement = {"loss_rel_diff": relative_error(grads["fused+compile"][0], grads["fused"][0]),
                 "grad_rel_diff": relative_error(grads["fused+compile"][1], grads["fused"][1])}
    return {"rows": rows, "agreement_eager": agreement}


@contextlib.contextmanager
def adapter_dropout_off(model: nn.Module):
    """Compiled code draws its dropout masks differently from eager: compare the two with dropout off."""
    dropouts = [m.dropout for m in adapter_modules(model).values() if isinstance(m.dropout, nn.Dropout)]
    rates = [d.p for d in dropouts]
    for dropout in dropouts:
        dropout.p = 0.0
    try:
        yield
    finally:
        for dropout, rate in zip(dropouts, rates):
            dropout.p = rate


def bench_compile(model: nn.Module, sizes: Sizes, device: torch.device, dtype: torch.dtype,
                  groups_list: tuple[int, ...], backend: str) -> dict:
    """torch.compile of the adapter alone and of the whole step, each against its eager form."""
    adapter_rows = bench_compiled_adapter(sizes, device, dtype, groups_list, backend)
    free_memory(device)
    return dict(bench_compiled_step(model, sizes, device, backend), adapter_rows=adapter_rows)


def bench_no_checkpointing(model: nn.Module, sizes: Sizes, device: torch.device, layers: int) -> dict:
    """Steps without checkpointing on the first ``layers`` layers (all 32 do not fit with the loop)."""
    from mtlora.injection import find_decoder_layers

    decoder = find_decoder_layers(model)
    del decoder[layers:]
    model.config.num_hidden_layers = layers
    model.config.use_cache = False
    set_checkpointing(model, False)
    free_memory(device)
    return bench_steps(model, sizes, device, ("none", "mtlora"), ("fused", "loop"), f"no-ckpt, {layers} layers")


# ----------------------------------------------------------------------------------------------------
# Driver, summary and tables


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def summarize(results: dict) -> dict:
    """The issue's targets, as ratios measured in this run."""
    targets = {}
    adapter = {(r["impl"], r["groups"]): r for r in results.get("adapter", {}).get("rows", [])}
    for key, name in (("ms", "adapter_speedup_min_5x"), ("gpu_ms", "adapter_gpu_time_speedup_min_5x")):
        speedups = {g: ratio(adapter[("loop", g)][key], adapter[("fused", g)][key])
                    for g in GROUP_COUNTS if ("loop", g) in adapter and adapter[("loop", g)].get(key)}
        if speedups:
            targets[name] = {"value": min(speedups.values()), "per_groups": speedups, "met": min(speedups.values()) >= 5}
    steps = {(r["setting"], r["method"], r["impl"]): r for r in results.get("train", {}).get("rows", [])}
    fused, loop = steps.get(("ckpt", "mtlora", "fused")), steps.get(("ckpt", "mtlora", "loop"))
    floor = steps.get(("ckpt", "none", "base"))
    if fused and loop:
        value = ratio(fused["tokens_per_s"], loop["tokens_per_s"])
        # Even an adapter costing nothing could not beat the loop by more than loop / floor.
        bound = ratio(loop["ms"], floor["ms"]) if floor else None
        targets["mtlora_step_speedup_1.5x"] = {"value": value, "upper_bound_loop_over_floor": bound, "met": value >= 1.5}
        if fused["peak_mb"] is not None:
            targets["mtlora_step_peak_memory_below_loop"] = {
                "value": ratio(fused["peak_mb"], loop["peak_mb"]), "met": fused["peak_mb"] < loop["peak_mb"]}
    if fused and floor:
        overhead = fused["ms"] / floor["ms"] - 1
        others = {f"{m}/{i}": r["ms"] / floor["ms"] - 1 for (setting, m, i), r in steps.items() if setting == "ckpt" and r is not floor}
        targets["mtlora_overhead_over_floor_15pct"] = {"value": overhead, "all": others, "met": overhead <= 0.15}
    return targets


def markdown_tables(results: dict) -> str:
    """The tables RESULTS.md shows, rendered from the JSON."""
    lines = []
    adapter_rows = results.get("adapter", {}).get("rows", []) + results.get("compile", {}).get("adapter_rows", [])
    if adapter_rows:
        lines += ["| adapter (fwd+bwd) | routing | wall ms | GPU ms | kernels | peak MiB | compile s |",
                  "|---|---|---|---|---|---|---|"]
        for r in adapter_rows:
            routing = "-" if r["groups"] is None else ("scalar" if r["groups"] == 1 else f"g={r['group_size']}")
            gpu = "-" if r.get("gpu_ms") is None else f"{r['gpu_ms']:.3f}"
            lines.append(f"| {r['impl']} | {routing} | {r['ms']:.3f} | {gpu} | {_fmt(r.get('kernels'))} "
                         f"| {_fmt(r['peak_mb'])} | {_fmt(r.get('compile_s'))} |")
        lines.append("")
    step_rows = results.get("train", {}).get("rows", []) + results.get("nockpt", {}).get("rows", []) \
        + results.get("compile", {}).get("rows", [])
    if step_rows:
        lines += ["| step setting | method | impl | ms/step | tokens/s | peak MiB |", "|---|---|---|---|---|---|"]
        for r in step_rows:
            lines.append(f"| {r['setting']} | {r['method']} | {r['impl']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} "
                         f"| {_fmt(r['peak_mb'])} |")
        lines.append("")
    eval_rows = results.get("eval", [])
    if eval_rows:
        lines += ["| eval model | adapters | task | questions | batch | questions/s |", "|---|---|---|---|---|---|"]
        for r in eval_rows:
            lines.append(f"| {r['model']} | {r['adapters']} | {r['task']} | {r['questions']} | {r['batch_size']} "
                         f"| {r['questions_per_s']:.1f} |")
        lines.append("")
    for name, target in results.get("targets", {}).items():
        lines.append(f"- {name}: {target['value']:.3f} -> {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: a correctness check, in seconds")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--skip_eval", action="store_true", help="leave out the evaluation-throughput section")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the LLaMA-2-7B-shaped model")
    parser.add_argument("--nockpt_layers", type=int, default=8, help="layers kept for the no-checkpointing steps")
    parser.add_argument("--compile_groups", default="1,2", help="routing group counts of the compiled-adapter rows")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results (profiles go beside it)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    sizes = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sections = [s for s in args.sections.split(",") if s and not (args.skip_eval and s == "eval")]
    backend = "aot_eager" if args.quick else "inductor"  # the CPU check traces, the GPU run generates kernels
    results = {"meta": run_metadata(args, device, dtype), "errors": {}}

    def record(name, fn):
        started = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as error:  # one failing section must not cost the others on a scarce device
            if args.quick:
                raise
            results["errors"][name] = f"{type(error).__name__}: {error}"
            print(f"[{name}] FAILED: {results['errors'][name]}", flush=True)
        print(f"[{name}] {time.perf_counter() - started:.1f} s", flush=True)
        results["targets"] = summarize(results)
        save(results, args.output)

    if "adapter" in sections:
        record("adapter", lambda: bench_adapter(sizes, device, dtype))
        free_memory(device)
    if any(s in sections for s in SECTIONS[1:]):
        overrides = dict(sizes.model_overrides, num_hidden_layers=min(args.layers, sizes.model_overrides.get(
            "num_hidden_layers", args.layers)))
        model = build_model("llama-2-7b", overrides, device, dtype)
        model.config.use_cache = False
        set_checkpointing(model, True)
        results["meta"]["train_layers"] = model.config.num_hidden_layers
        if "train" in sections:
            record("train", lambda: bench_steps(model, sizes, device, METHODS, ("fused", "loop"), "ckpt"))
        if "profile" in sections and args.output is not None:
            record("profile", lambda: profile_steps(model, sizes, device, args.output.parent))
        if "eval" in sections:
            set_checkpointing(model, False)
            record("eval", lambda: bench_eval(model, sizes, device, dtype))
        if "nockpt" in sections:
            layers = min(args.nockpt_layers, model.config.num_hidden_layers)
            record("nockpt", lambda: bench_no_checkpointing(model, sizes, device, layers))
        if "compile" in sections:
            compile_groups = tuple(int(g) for g in args.compile_groups.split(",") if g)
            record("compile", lambda: bench_compile(model, sizes, device, dtype, compile_groups, backend))
    print(markdown_tables(results), flush=True)
    return results


def command_and_date(argv: list[str] | None = None) -> dict:
    """The benchmark's command line (``argv`` when called from Python, else the process's) and the UTC date: what
    every recorded benchmark output starts with."""
    return {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def report(output: Path | None, results: dict, markdown: str) -> None:
    """Print a benchmark's Markdown and record it with ``results`` (:func:`write_outputs`)."""
    print(markdown)
    write_outputs(output, results, markdown)


def write_outputs(output: Path | None, results: dict, markdown: str) -> None:
    """A benchmark's recorded output: ``results`` as JSON at ``output`` and ``markdown`` beside it (.md); nothing
    without ``output``."""
    if output is not None:
        write_json(output, results)
        output.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n")


def run_metadata(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    return {
        **command_and_date(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "dtype": str(dtype),
        "sizes": "quick" if args.quick else "full",
    }


def save(results: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
