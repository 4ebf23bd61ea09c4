"""Paper scale at full shape: every row of the paper's tables on LLaMA-2-7B / 13B-shaped random models, one GPU.

The paper-scale tables (``tables/*.sh --scale paper``) need LLaMA-2 weights, Flan-v2 and Dolly; none of them
change how long a step takes, how much memory it needs or how fast the evaluators run. One invocation measures
all of that on the real code path, with random weights (``--random_init``, bf16, built on the GPU), synthetic
training records whose token lengths follow ``data/synthetic.py``'s documented table, and a slice of the real
BBH / MMLU prompts (``mtlora.experiments.dry_run``):

1. every distinct adapter configuration of Tables 2, 3, 4 and the main results (7B) and Table S7 (13B), trained
   by ``mtlora.training.run_training`` (the Trainer, the paper's flags and batch settings as the table runner
   passes them: micro-batch 16 x 2 accumulation, 512 tokens, bf16, gradient checkpointing) for --warmup_steps +
   --timed_steps steps; the spectral rows fire their regulariser on one timed step (it fires once per real run).
   Then ``run_bbh`` / ``run_mmlu`` on the slice with the trained adapters attached. Per configuration: s/step,
   tokens/s, peak GPU memory, evaluation questions/s;
2. the base model's evaluation speed (the base rows; a merged model runs at the same speed);
3. the memory plan: the peak of one training step (forward, balance loss, backward, clipping, AdamW) of HydraLoRA
   and mtLoRA at micro-batch 1, 2, 4, 8, 16 x 512 tokens, with and without gradient checkpointing, 7B and 13B;
4. the per-expert loop of the public code for HydraLoRA, block-level and mtLoRA (the ratios of Table S1).

Projections: a full row = the full run's steps x s/step (+ the spectral step) + the whole suite's items /
questions/s, per track (Flan-v2 -> BBH: 938 steps; Dolly -> MMLU: 446); a table = its rows x 3 seeds. Results
are written after every unit (``paper_scale.json`` and ``PAPER_SCALE.md`` in --output_dir); past --time_budget_s
no unit starts, and the skipped ones are listed. Accuracy is never reported: the weights are random.

    PYTHONPATH=. python benchmarks/bench_paper_scale.py --bbh_dir .devdata/bbh --mmlu_dir .devdata/mmlu --output_dir OUT
    python benchmarks/bench_paper_scale.py --quick --output_dir /tmp/paper_scale   # CPU, tiny configs, seconds
    python benchmarks/bench_paper_scale.py --render OUT/paper_scale.json             # the Markdown again
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]

from benchmarks.bench_adapters import command_and_date, free_memory, set_checkpointing, synchronize, train_step_fn
from data.synthetic import BIGBENCH_POOL, synthetic_records
from mtlora.evaluation.bbh import run_bbh
from mtlora.evaluation.cli import default_data_dir
from mtlora.evaluation.mmlu import run_mmlu
from mtlora.errors import InvalidInput
from mtlora.evaluation.reporting import markdown_table
from mtlora.experiments import dry_run, memory_plan
from mtlora.experiments.jobs import Job, RunSettings, as_cli
from mtlora.experiments.registry import SCALES, TABLES, Row
from mtlora.injection import attach_adapters, detach_adapters, set_expert_mix
from mtlora.loading import ModuloTokenizer, build_random_model, load_tokenizer
from mtlora.training import run_training
from mtlora.train_cli import parse_arguments

CONFIGS = REPO / "configs" / "models"
MODEL_TABLES = {"llama-2-7b": ("main_ablation", "block_level", "routing_granularity", "main_results"),
                "llama-2-13b": ("llama13b",)}
LOOP_UNITS = ("baseline", "block", "mtlora")  # also timed with the public code's per-expert loop
MEMORY_ROWS = ("baseline", "mtlora")  # HydraLoRA and mtLoRA (Table 2's rows; Table S7's for 13B)
MICRO_BATCHES = (1, 2, 4, 8, 16)
SEQ_LEN = 512
SEEDS = 3  # the paper reports 3 seeds per row
MOLE_LIBRARY = 8  # LoRAs MoLE gates over in the timing (Dolly's 8 categories; Flan-v2's task count is unknown)
# Cards of the README's memory table: (label, GiB as torch reports the smallest common card of the class).
CARDS = (("16 GB (V100-16GB, T4)", 14.5), ("24 GB (A10, RTX 3090/4090)", 22.0), ("40 GB (A100-40GB)", 39.0),
         ("48 GB (L40S, RTX A6000)", 44.5), ("80 GB (A100-80GB, H100)", 79.0))
TINY = {"llama-2-7b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4),
        "llama-2-13b": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=8)}  # 512: Table S7's routing group size must divide it


@dataclass
class Context:
    """Everything a measurement needs, made once."""

    args: argparse.Namespace
    device: torch.device
    work: Path
    config_dirs: dict[str, Path]
    data_path: Path
    bbh_dir: Path
    mmlu_dir: Path
    eval_tokenizer: object = None
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ----------------------------------------------------------------------------------------------- set-up

def paper_scale(quick: bool):
    scale = SCALES["paper"]
    if quick:  # the same path at sizes a CPU runs in seconds
        scale = replace(scale, training={**scale.training, "per_device_train_batch_size": 2, "max_seq_length": 64,
                                         "bf16": False}, effective_batch_size=4, eval_batch_size=2)
    return scale


def model_configs(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The config-only folders of both models (tiny ones with the same vocabulary for --quick)."""
    if not args.quick:
        return {name: CONFIGS / name for name in MODEL_TABLES}
    folders = {}
    for name, overrides in TINY.items():
        config = json.loads((CONFIGS / name / "config.json").read_text())
        folders[name] = work / "configs" / name
        folders[name].mkdir(parents=True, exist_ok=True)
        (folders[name] / "config.json").write_text(json.dumps({**config, **overrides}))
    return folders


def make_jobs(ctx: Context, model: str, table_name: str) -> list[Job]:
    """The table runner's jobs of a table (first track of each row; flags and training settings as it runs them)."""
    settings = RunSettings(str(ctx.config_dirs[model]), 1, ctx.work / "runs", str(ctx.bbh_dir), str(ctx.mmlu_dir),
                           ctx.device.type == "cuda", (42,),
                           dry_run=dry_run.DryRun(steps=ctx.args.warmup_steps + ctx.args.timed_steps,
                                                  warmup_steps=ctx.args.warmup_steps, eval_items=ctx.args.eval_items))
    scale, table = paper_scale(ctx.args.quick), TABLES[table_name]
    tracks = [t for t in scale.tracks if table.tracks is None or t.name in table.tracks]
    return [Job(settings, scale, table, tracks[0], row, 42) for row in table.rows]


def unit_key(job: Job) -> str:
    """Rows with the same adapter flags share a measurement (the spectral schedule and weight are per track)."""
    flags = {k: v for k, v in job.train_flags.items() if k not in ("spectral_reg_steps", "spectral_reg_lambda")}
    return json.dumps({"kind": job.kind, "flags": flags}, sort_keys=True)


def unit_names(ctx: Context, model: str) -> dict[str, str]:
    """unit_key -> unit name (the first row key with those flags over the model's tables, in order; a later row
    of another table with the same key and other flags is named ``table/key``)."""
    names = {}
    for table_name in MODEL_TABLES[model]:
        for job in make_jobs(ctx, model, table_name):
            if job.kind in ("adapter", "mole") and unit_key(job) not in names:
                taken = job.row.key in names.values()
                names[unit_key(job)] = f"{table_name}/{job.row.key}" if taken else job.row.key
    return names


def plan_units(ctx: Context, model: str, tables: tuple[str, ...]) -> dict[str, Job]:
    """Unit name -> a job to measure it, for the trained rows of ``tables``."""
    names = unit_names(ctx, model)
    return {names[unit_key(job)]: job for table_name in tables for job in make_jobs(ctx, model, table_name)
            if job.kind in ("adapter", "mole")}


def row_units(ctx: Context, model: str, table_name: str) -> dict[str, str]:
    """Row key -> the unit that measured it."""
    names = unit_names(ctx, model)
    return {job.row.key: names[unit_key(job)] for job in make_jobs(ctx, model, table_name)
            if job.kind in ("adapter", "mole")}


def prepare_inputs(ctx: Context) -> None:
    """Synthetic training records, the evaluation slice, the full suites' sizes."""
    tokenizer = load_tokenizer(str(dry_run.TOKENIZER), "--tokenizer_name_or_path")
    records = synthetic_records(tokenizer, ctx.args.examples, BIGBENCH_POOL, seed=42)
    ctx.data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = dry_run.DryRun(bbh_tasks=ctx.args.bbh_tasks, mmlu_subjects=ctx.args.mmlu_subjects)
    bbh, mmlu, chosen = dry_run.copy_slice(ctx.args.bbh_dir, ctx.args.mmlu_dir, settings, ctx.work / "slice")
    ctx.bbh_dir, ctx.mmlu_dir = bbh, mmlu
    vocab = json.loads((ctx.config_dirs["llama-2-7b"] / "config.json").read_text())["vocab_size"]
    ctx.eval_tokenizer = ModuloTokenizer(tokenizer, vocab) if len(tokenizer) > vocab else tokenizer
    ctx.results["setup"] = {
        "slice": chosen, "eval_items_per_task": ctx.args.eval_items,
        "full_eval_items": dry_run.full_eval_items(ctx.args.bbh_dir, ctx.args.mmlu_dir),
        "synthetic": {"examples": len(records), "lengths": BIGBENCH_POOL["source"]},
        "tokenizer": f"{dry_run.TOKENIZER.relative_to(REPO)} (SmolLM2, {len(tokenizer)} tokens; training ids stay "
                     f"below {vocab}, evaluation ids are taken modulo {vocab})"}


# -------------------------------------------------------------------------------------------- measuring

class ExpertMix(TrainerCallback):
    """Switch the attached adapters to the per-expert loop once training starts (after they are attached)."""

    def __init__(self, mix: str):
        self.mix = mix

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        set_expert_mix(model, self.mix)


def time_eval(ctx: Context, model, suite: str, batch_size: int) -> dict:
    """Questions/s of the real evaluator on the slice (tokenisation and prefix sharing included)."""
    model.eval()
    synchronize(ctx.device)
    started = time.perf_counter()
    run = run_bbh if suite == "bbh" else run_mmlu
    summary = run(model, ctx.eval_tokenizer, ctx.bbh_dir if suite == "bbh" else ctx.mmlu_dir,
                  limit=ctx.args.eval_items, batch_size=batch_size)
    synchronize(ctx.device)
    seconds = time.perf_counter() - started
    return {"items": summary["num_examples"], "seconds": seconds, "questions_per_s": summary["num_examples"] / seconds}


def measure_unit(ctx: Context, model, job: Job, suites: tuple[str, ...], mix: str = "fused") -> dict:
    """Train ``job``'s configuration through run_training on the loaded model, then evaluate ``suites``."""
    flags = dict(job.train_flags)
    spectral_step = None
    if flags.get("enable_spectral_reg"):  # fires at step S - 1: the second timed step
        flags["spectral_reg_steps"] = ctx.args.warmup_steps + 2
        spectral_step = ctx.args.warmup_steps + 1
    if job.kind == "mole":  # as the table runner trains it: gates over the library (here a random one)
        flags = {"method": "mole", "lora_library": mole_library(ctx, model)}
    out = ctx.work / "out" / f"{job.row.key}-{mix}"
    shutil.rmtree(out, ignore_errors=True)
    argv = as_cli({**job.model_flags(), **flags, **job.training, "data_path": str(ctx.data_path),
                   "output_dir": str(out), "save_strategy": "no", "logging_steps": 1})
    try:  # the adapters come off whatever happens, so that the next unit starts from the bare model
        return train_and_evaluate(ctx, model, job, suites, mix, flags, argv, spectral_step)
    finally:
        detach_adapters(model)
        model.train()
        free_memory(ctx.device)


def train_and_evaluate(ctx: Context, model, job: Job, suites: tuple[str, ...], mix: str, flags: dict, argv: list[str],
                       spectral_step: int | None) -> dict:
    summary = run_training(*parse_arguments(argv), callbacks=[ExpertMix(mix)] if mix != "fused" else None,
                           base_model=model)
    result = {"row": job.row.key, "label": job.row.label, "kind": job.kind, "expert_mix": mix, "flags": flags,
              "micro_batch": job.training["per_device_train_batch_size"],
              "accumulation": job.training["gradient_accumulation_steps"],
              "trainable_params": summary["trainable_params"], "step_seconds": summary["step_seconds"],
              "step_tokens": summary["step_tokens"], "peak_gpu_memory_gib": summary["peak_gpu_memory_gib"],
              **step_statistics(summary["step_seconds"], summary["step_tokens"], ctx.args.warmup_steps, spectral_step)}
    result["eval"] = {suite: time_eval(ctx, model, suite, job.scale.eval_batch_size) for suite in suites}
    return result


def step_statistics(seconds: list[float], tokens: list[int] | None, warmup: int, spectral_step: int | None) -> dict:
    """s/step of the timed steps without the spectral one, that step's extra seconds, tokens/s."""
    timed = [i for i in range(warmup, len(seconds)) if i != spectral_step]
    plain = statistics.mean(seconds[i] for i in timed)
    stats = {"s_per_step": plain, "tokens_per_s": sum(tokens[i] for i in timed) / sum(seconds[i] for i in timed)
             if tokens else None, "spectral_step_extra_s": None}
    if spectral_step is not None and spectral_step < len(seconds):
        stats["spectral_step_extra_s"] = seconds[spectral_step] - plain
    return stats


def mole_library(ctx: Context, model) -> list[str]:
    """MOLE_LIBRARY random LoRA checkpoints of the loaded model (saved once): what MoLE's gates mix."""
    from mtlora.checkpoint import save_adapter
    from mtlora.config import AdapterConfig

    folder = ctx.work / f"mole_library_{model.config.hidden_size}"
    paths = [folder / f"task_{i}" for i in range(MOLE_LIBRARY)]
    if all((p / "adapter_config.json").is_file() for p in paths):
        return [str(p) for p in paths]
    config = AdapterConfig(method="lora")
    for index, path in enumerate(paths):
        attach_adapters(model, config)
        generator = torch.Generator(device="cpu").manual_seed(index)
        for param in (p for p in model.parameters() if p.requires_grad):
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        save_adapter(model, config, path)
        detach_adapters(model)
    return [str(p) for p in paths]


def memory_point(ctx: Context, model, flags: dict, micro_batch: int, checkpointing: bool) -> dict:
    """Peak (allocated, reserved) memory of one whole training step, and the time of a second one."""
    seq_len = 32 if ctx.args.quick else SEQ_LEN
    attach_adapters(model, memory_plan.adapter_config_from_flags(flags))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model.config.use_cache = False
    set_checkpointing(model, checkpointing)
    ids = torch.randint(3, model.config.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(ctx.device), "labels": ids.to(ctx.device)}
    point = {"micro_batch": micro_batch, "seq_len": seq_len, "checkpointing": checkpointing,
             "trainable_params": sum(p.numel() for p in params)}
    step = train_step_fn(model, params, batch)
    free_memory(ctx.device)
    try:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        step()
        synchronize(ctx.device)
        if ctx.device.type == "cuda":
            point.update(peak_gib=torch.cuda.max_memory_allocated(ctx.device) / 2**30,
                         reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / 2**30)
        started = time.perf_counter()
        step()
        synchronize(ctx.device)
        point["s_per_step"] = time.perf_counter() - started
        point["tokens_per_s"] = micro_batch * seq_len / point["s_per_step"]
    except torch.cuda.OutOfMemoryError:
        point["oom"] = True
    finally:
        del step, params, batch
        for param in model.parameters():
            param.grad = None
        detach_adapters(model)
        set_checkpointing(model, True)
        free_memory(ctx.device)
    return point


def memory_sweep(ctx: Context, model, model_name: str) -> list[dict]:
    jobs = {job.row.key: job for job in make_jobs(ctx, model_name, MODEL_TABLES[model_name][0])}
    points = []
    for row in MEMORY_ROWS:
        flags = jobs[row].train_flags
        shape = memory_plan.step_shape(str(ctx.config_dirs[model_name]), flags)
        for checkpointing in (True, False):
            for micro_batch in MICRO_BATCHES if not ctx.args.quick else (1, 2):
                point = memory_point(ctx, model, flags, micro_batch, checkpointing)
                point.update(model=model_name, row=row, family=shape.family,
                             formula_gib=memory_plan.formula_peak_gib(shape, micro_batch, SEQ_LEN, checkpointing))
                points.append(point)
                if point.get("oom"):
                    break  # larger micro-batches fail too
    return points


# ------------------------------------------------------------------------------------------- the driver

class Runner:
    """Units in priority order; each writes the results when done; none starts past the time budget."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        results = ctx.results
        results.update(meta=metadata(ctx.args, ctx.device), models={}, units={}, memory=[], errors={}, skipped=[])

    def run(self, name: str, fn, always: bool = False) -> None:
        """Run unit ``name`` unless --only leaves it out (``always``: the set-up every unit needs) or the time
        budget is spent."""
        ctx = self.ctx
        if not always and ctx.args.only and not re.search(ctx.args.only, name):
            return
        if ctx.elapsed() > ctx.args.time_budget_s:
            ctx.results["skipped"].append(name)
            return
        started = time.perf_counter()
        try:
            fn()
        except Exception as error:  # one failing unit must not cost the others on a scarce device
            if ctx.args.quick:
                raise
            ctx.results["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"
            print(f"[{name}] FAILED: {type(error).__name__}: {error}", flush=True)
            free_memory(ctx.device)
        print(f"[{ctx.elapsed():6.0f}s] {name}: {time.perf_counter() - started:.1f}s", flush=True)
        ctx.results["elapsed_s"] = ctx.elapsed()
        write_outputs(ctx.results, ctx.args.output_dir)


def load_model(ctx: Context, name: str):
    synchronize(ctx.device)
    started = time.perf_counter()
    model = build_random_model(str(ctx.config_dirs[name]), torch.bfloat16 if ctx.device.type == "cuda"
                               else torch.float32, ctx.device)
    synchronize(ctx.device)
    ctx.results["models"][name] = {"config": str(ctx.config_dirs[name]), "init_seconds": time.perf_counter() - started,
                                   "params": sum(p.numel() for p in model.parameters())}
    return model


def measure_model(ctx: Context, runner: Runner, name: str, tables: tuple[str, ...], memory: bool,
                  loop: bool = False) -> None:
    """Load ``name``, time the trained rows of ``tables`` (each unit once), its base evaluation and memory plan."""
    state = {}
    runner.run(f"{name}: build", lambda: state.update(model=load_model(ctx, name)), always=True)
    if "model" not in state:
        return
    model = state["model"]
    units = ctx.results["units"].setdefault(name, {})
    suites = tuple(dict.fromkeys(s for t in tables for job in make_jobs(ctx, name, t)[:1] for s in
                                 _table_suites(ctx, t)))
    if "base" not in units:
        runner.run(f"{name}: base model evaluation", lambda: units.update(
            base={"eval": {s: time_eval(ctx, model, s, paper_scale(ctx.args.quick).eval_batch_size) for s in suites}}))
    for unit, job in plan_units(ctx, name, tables).items():
        if unit not in units:
            runner.run(f"{name}: {unit}", lambda u=unit, j=job: units.update({u: measure_unit(ctx, model, j, suites)}))
    if memory:
        runner.run(f"{name}: memory plan", lambda: ctx.results["memory"].extend(memory_sweep(ctx, model, name)))
    if loop:
        for unit, job in plan_units(ctx, name, tables).items():
            if unit in LOOP_UNITS and f"{unit} (loop)" not in units:
                runner.run(f"{name}: {unit} (loop)", lambda u=unit, j=job: units.update(
                    {f"{u} (loop)": measure_unit(ctx, model, j, (), mix="loop")}))
    del state["model"], model
    free_memory(ctx.device)


def _table_suites(ctx: Context, table_name: str) -> tuple[str, ...]:
    table = TABLES[table_name]
    return tuple(s for t in paper_scale(ctx.args.quick).tracks if table.tracks is None or t.name in table.tracks
                 for s in t.suites)


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = Context(args, device, work, model_configs(args, work), work / "synthetic.jsonl", args.bbh_dir, args.mmlu_dir)
    runner = Runner(ctx)
    runner.run("inputs", lambda: prepare_inputs(ctx), always=True)
    if "setup" not in ctx.results:
        return ctx.results
    first = MODEL_TABLES["llama-2-7b"][:1]  # Table 2 and the memory plan first, then 13B, then the rest
    measure_model(ctx, runner, "llama-2-7b", first, memory=True)
    measure_model(ctx, runner, "llama-2-13b", MODEL_TABLES["llama-2-13b"], memory=True)
    measure_model(ctx, runner, "llama-2-7b", MODEL_TABLES["llama-2-7b"], memory=False, loop=True)
    ctx.results["elapsed_s"] = ctx.elapsed()
    write_outputs(ctx.results, args.output_dir)
    print(render(ctx.results))
    return ctx.results


def metadata(args: argparse.Namespace, device: torch.device) -> dict:
    return {**command_and_date(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
            if device.type == "cuda" else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "quick": args.quick, "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps,
            "eval_items": args.eval_items, "time_budget_s": args.time_budget_s, "only": args.only}


def write_outputs(results: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "paper_scale.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (output_dir / "PAPER_SCALE.md").write_text(render(results))


# ---------------------------------------------------------------------------------------------- Markdown

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


@dataclass
class RowProjection:
    """A table row's measured numbers and its projected full-scale hours (one seed)."""

    row: Row
    unit: str | None
    measured: dict | None
    eval_unit: dict | None
    train_hours: dict  # track -> hours of training
    eval_hours: dict  # track -> hours of evaluation

    @property
    def hours(self) -> float | None:
        values = list(self.train_hours.values()) + list(self.eval_hours.values())
        return None if not values or None in values else sum(values)


def project_rows(results: dict, model: str, table_name: str) -> list[RowProjection]:
    """Every row of a table, from the units that measured it (see the module docstring)."""
    ctx = _render_context(results)
    units = results.get("units", {}).get(model, {})
    mapping = row_units(ctx, model, table_name)
    full_items = results.get("setup", {}).get("full_eval_items", {})
    table, scale = TABLES[table_name], paper_scale(results["meta"]["quick"])
    tracks = [t for t in scale.tracks if table.tracks is None or t.name in table.tracks]
    projections = []
    for row in table.rows:
        unit = mapping.get(row.key) or {"lorahub": mapping.get("lora"), "merge": None, "uniform": mapping.get(
            "baseline")}.get(row.kind)
        measured = units.get(unit) if row.kind in ("adapter", "mole") else None
        eval_unit = units.get(unit) if unit else units.get("base")
        train_hours, eval_hours = {}, {}
        for track in tracks:
            steps = (row.training.get("max_steps") or dry_run.full_steps(
                track.examples, row.effective_batch_size or scale.effective_batch_size))
            if measured is not None:
                extra = measured.get("spectral_step_extra_s") or 0.0
                train_hours[track.name] = (steps * measured["s_per_step"] + extra) / 3600
            elif row.kind not in ("base", "uniform", "merge", "lorahub"):
                train_hours[track.name] = None
            for suite in track.suites:
                speed = ((eval_unit or {}).get("eval", {}).get(suite) or {}).get("questions_per_s")
                items = full_items.get(suite)
                eval_hours[track.name] = items / speed / 3600 if speed and items else None
        projections.append(RowProjection(row, unit, measured, eval_unit, train_hours, eval_hours))
    return projections


def _render_context(results: dict) -> Context:
    """Enough of a Context to rebuild the jobs (flags) when rendering from JSON."""
    args = argparse.Namespace(quick=results["meta"]["quick"], warmup_steps=results["meta"]["warmup_steps"],
                              timed_steps=results["meta"]["timed_steps"], eval_items=results["meta"]["eval_items"])
    saved = {name: Path(info["config"]) for name, info in results.get("models", {}).items()}
    configs = {name: saved[name] if name in saved and saved[name].is_dir() else CONFIGS / name for name in MODEL_TABLES}
    return Context(args, torch.device("cpu"), Path("."), configs, Path("."), Path("."), Path("."))


def library_hours(results: dict, model: str, table_name: str) -> float | None:
    """The per-task LoRA library of the merge / LoRAHub / MoLE rows: the LoRA row's steps over every example."""
    lora = results.get("units", {}).get(model, {}).get("lora")
    if lora is None or not any(r.needs_library for r in TABLES[table_name].rows):
        return None
    scale = paper_scale(results["meta"]["quick"])
    return sum(dry_run.full_steps(t.examples, scale.effective_batch_size) * lora["s_per_step"]
               for t in scale.tracks) / 3600


def render_table(results: dict, model: str, table_name: str) -> list[str]:
    table = TABLES[table_name]
    projections = project_rows(results, model, table_name)
    baseline = next((p for p in projections if p.row.key == "baseline" and p.measured), None)
    header = ["row", "trainable", "micro-batch x accum.", "s/step", "tokens/s", "peak GiB", "BBH q/s", "MMLU q/s",
              "train h (per track)", "eval h", "row h (1 seed)", "train time vs HydraLoRA", "paper time", "paper min"]
    lines = []
    for p in projections:
        m, e = p.measured or {}, (p.eval_unit or {}).get("eval", {})
        ratio = None
        if baseline and p.measured:
            ratio = sum(v for v in p.train_hours.values() if v) / sum(v for v in baseline.train_hours.values() if v)
        train = ", ".join(f"{t.split('_')[0]} {_fmt(h)}" for t, h in p.train_hours.items()) or "—"
        lines.append([p.row.label, _fmt(m.get("trainable_params") and f"{m['trainable_params'] / 1e6:.1f}M"),
                      f"{m['micro_batch']} x {m['accumulation']}" if m else "—", _fmt(m.get("s_per_step")),
                      _fmt(m.get("tokens_per_s"), 5), _fmt(m.get("peak_gpu_memory_gib")),
                      _fmt((e.get("bbh") or {}).get("questions_per_s")),
                      _fmt((e.get("mmlu") or {}).get("questions_per_s")), train,
                      _fmt(sum(v for v in p.eval_hours.values() if v) or None), _fmt(p.hours),
                      _fmt(ratio and f"{ratio:.2f}x"), _fmt(p.row.paper.get("time") and f"{p.row.paper['time']:.2f}x"),
                      _fmt(p.row.paper.get("minutes"))])
    total = table_hours(results, model, table_name)
    notes = {"merge": "merges: evaluation at the base model's speed; the merge itself (CPU arithmetic, writing a "
                      "whole model) is not timed",
             "lorahub": "LoRAHub: evaluation at the LoRA row's speed; the composition (40 loss evaluations on BBH "
                        "exemplars) is not timed",
             "mole": f"MoLE: gates over {MOLE_LIBRARY} LoRAs (Dolly's 8 categories; a Flan-v2 library has one per "
                     "task, more), 800 steps of 12, as the row sets",
             "uniform": "uniform routing: the baseline's adapter evaluated, nothing trained"}
    kinds = {r.kind for r in table.rows}
    text = [f"### {table.title} ({model})", "", markdown_table(header, lines), ""]
    text += [f"- {notes[k]}" for k in notes if k in kinds]
    library = library_hours(results, model, table_name)
    if library is not None:
        text.append(f"- the per-task LoRA library (merges, LoRAHub, MoLE): {library:.2f} h per seed, at the LoRA "
                    "row's s/step over every example of both tracks")
    if total is not None:
        text.append(f"- **projected table: {total:.1f} GPU-hours** on this device ({SEEDS} seeds per trained row, "
                    "the base model once; model loading not included)")
    return text + [""]


def table_hours(results: dict, model: str, table_name: str) -> float | None:
    projections = project_rows(results, model, table_name)
    if any(p.hours is None for p in projections):
        return None
    total = sum(p.hours * (1 if p.row.kind == "base" else SEEDS) for p in projections)
    library = library_hours(results, model, table_name)
    return total + SEEDS * (library or 0.0)


def render_ratios(results: dict) -> list[str]:
    """Table S1's relative times against ours (fused, and the public code's per-expert loop)."""
    units = results.get("units", {}).get("llama-2-7b", {})
    mapping = row_units(_render_context(results), "llama-2-7b", "main_ablation")
    base, base_loop = units.get("baseline"), units.get("baseline (loop)")
    if base is None:
        return []
    lines = []
    for row in TABLES["main_ablation"].rows:
        unit = units.get(mapping.get(row.key))
        loop = units.get(f"{mapping.get(row.key)} (loop)")
        extra = (unit or {}).get("spectral_step_extra_s")
        lines.append([row.label, f"{row.paper['time']:.2f}x", f"{row.paper['minutes']}",
                      _fmt(unit and f"{unit['s_per_step'] / base['s_per_step']:.2f}x"),
                      _fmt(loop and base_loop and f"{loop['s_per_step'] / base_loop['s_per_step']:.2f}x"),
                      _fmt(unit and f"{unit['s_per_step']:.3f}"), _fmt(loop and f"{loop['s_per_step']:.3f}"),
                      _fmt(extra)])
    header = ["row (Table S1)", "paper time", "paper min (2 GPUs)", "ours, fused", "ours, per-expert loop",
              "s/step fused", "s/step loop", "spectral step: extra s"]
    text = ["## Relative training time against Table S1", "", markdown_table(header, lines), ""]
    block = units.get("block")
    if block:
        text.append(f"- Fused expert mix (this package's default): the block-level row takes "
                    f"{block['s_per_step'] / base['s_per_step']:.2f}x HydraLoRA's step time; the paper reports 0.67x.")
    if base_loop and units.get("block (loop)"):
        text.append(f"- With the public code's per-expert loop the same ratio is "
                    f"{units['block (loop)']['s_per_step'] / base_loop['s_per_step']:.2f}x: there HydraLoRA's 64 "
                    "component adapters each run 16 full-width expert products, so removing them saves much more "
                    "than with the fused mix, where an adapter costs a few percent of the step "
                    "(benchmarks/RESULTS.md).")
    text += ["- The paper's minutes are 2-GPU runs (Table S1's caption: 2-GPU DDP; the reference scripts ran the "
             "spectral rows under DDP and the other rows under DeepSpeed ZeRO-2, ../shared/METHOD.md), so the "
             "spectral rows' +0.03x / +0.09x may be the launcher as much as the regulariser. Here the regulariser "
             "costs one step's extra seconds per run (last column): nothing at 938 steps.", ""]
    return text


def measured_table(points: list[dict]) -> dict:
    """MEASURED_PEAK_GIB entries (mtlora/experiments/memory_plan.py) from the memory sweep."""
    table = {}
    for point in points:
        if point.get("peak_gib") is None or point["seq_len"] != SEQ_LEN:
            continue
        entry = table.setdefault((point["model"], point["family"], point["checkpointing"]),
                                 {"trainable_params": point["trainable_params"], "peak_gib": {}})
        entry["trainable_params"] = min(entry["trainable_params"], point["trainable_params"])
        peak = entry["peak_gib"].get(point["micro_batch"], 0.0)
        entry["peak_gib"][point["micro_batch"]] = round(max(peak, point["peak_gib"]), 2)
    return table


def render_memory(results: dict) -> list[str]:
    points = results.get("memory", [])
    if not points:
        return []
    header = ["model", "row", "checkpointing", "micro-batch", "peak GiB (allocated)", "reserved GiB", "formula GiB",
              "s/step", "tokens/s"]
    lines = [[p["model"], p["row"], "on" if p["checkpointing"] else "off", p["micro_batch"],
              "out of memory" if p.get("oom") else _fmt(p.get("peak_gib")), _fmt(p.get("reserved_gib")),
              _fmt(p["formula_gib"]), _fmt(p.get("s_per_step")), _fmt(p.get("tokens_per_s"), 5)] for p in points]
    measured = measured_table(points)
    text = ["## Memory plan", "", "One whole training step (forward, LM + 0.01 x balance loss, backward, clipping, "
            f"AdamW over the adapters) at {SEQ_LEN} tokens per sequence, bf16 base; peak = max_memory_allocated, "
            "weights included.", "", markdown_table(header, lines), "", "### GPU memory -> micro-batch and gradient "
            "accumulation (effective batch 32, one GPU, gradient checkpointing on)", ""]
    cards = [["model", "row"] + [label for label, _ in CARDS]]
    for model in MODEL_TABLES:
        for row in MEMORY_ROWS:
            flags = next((p for p in points if p["model"] == model and p["row"] == row), None)
            if flags is None:
                continue
            cells = [model, row]
            for _, gib in CARDS:
                cells.append(card_choice(results, model, row, gib, measured))
            cards.append(cells)
    text += [markdown_table(cards[0], cards[1:]), "", f"Card sizes as torch reports the smallest card of each class "
             f"({', '.join(f'{g} GiB' for _, g in CARDS)}); a plan fits when peak x {memory_plan.FRAGMENTATION} + "
             f"{memory_plan.CONTEXT_GIB:.0f} GiB <= the card. `tables/run_table.py --gpu_memory_gb` makes the same "
             "choice for every row.", "", "`MEASURED_PEAK_GIB` for mtlora/experiments/memory_plan.py:", "", "```python",
             "MEASURED_PEAK_GIB = {"]
    for key, value in measured.items():
        text.append(f"    {key!r}: {value!r},")
    return text + ["}", "```", ""]


def card_choice(results: dict, model: str, row: str, gib: float, measured: dict) -> str:
    ctx = _render_context(results)
    job = {j.row.key: j for j in make_jobs(ctx, model, MODEL_TABLES[model][0])}[row]
    try:
        choice = memory_plan.choose_micro_batch(str(ctx.config_dirs[model]), job.train_flags, 32, 16, SEQ_LEN, True,
                                                gib, measured=measured)
    except InvalidInput:
        return "does not fit: ZeRO-3 + CPU offload"
    return f"{choice.micro_batch} x {choice.accumulation} ({choice.peak_gib:.1f} GiB, {choice.source})"


def render_eval(results: dict) -> list[str]:
    full = results.get("setup", {}).get("full_eval_items", {})
    lines = []
    for model, units in results.get("units", {}).items():
        for name, unit in units.items():
            for suite, timing in unit.get("eval", {}).items():
                minutes = full.get(suite) / timing["questions_per_s"] / 60 if full.get(suite) else None
                lines.append([model, name, suite, timing["items"], _fmt(timing["seconds"]),
                              _fmt(timing["questions_per_s"]), _fmt(minutes)])
    if not lines:
        return []
    setup = results["setup"]
    return ["## Evaluation speed", "", f"`run_bbh` / `run_mmlu` on {setup['eval_items_per_task']} items of each of "
            f"{setup['slice']} (batch size {paper_scale(results['meta']['quick']).eval_batch_size}, the paper "
            "scale's), adapters attached as trained; BBH generates its 32 tokens (random weights rarely stop early, "
            "LLaMA-2 rarely does either under the paper's EOS-only stop). Full suite: "
            + ", ".join(f"{s} {n} items" for s, n in full.items()) + ".", "",
            markdown_table(["model", "unit", "suite", "items", "seconds", "questions/s", "full suite, minutes"], lines),
            ""]


def render(results: dict) -> str:
    meta = results["meta"]
    text = ["# Paper scale at full shape: dry-run timings", "",
            f"**{dry_run.LABEL.capitalize()}: random weights.** `{meta['command']}` on {meta['device']}, "
            f"{meta['date']}; torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}.", ""]
    if "setup" in results:
        setup = results["setup"]
        text += [f"Training: {meta['warmup_steps']} warm-up + {meta['timed_steps']} timed steps per configuration on "
                 f"{setup['synthetic']['examples']} synthetic records ({setup['synthetic']['lengths']}); tokenizer: "
                 f"{setup['tokenizer']}. s/step is the mean of the timed steps (the spectral step apart); tokens/s "
                 "counts padding. Model build (random init on the device): "
                 + ", ".join(f"{m} {_fmt(i['init_seconds'])} s" for m, i in results.get("models", {}).items()) + ".",
                 ""]
    text += ["## Per-row timings and projections", ""]
    for model, tables in MODEL_TABLES.items():
        if results.get("units", {}).get(model):
            for table_name in tables:
                text += render_table(results, model, table_name)
    totals = [(TABLES[t].title.split(":")[0], m, table_hours(results, m, t)) for m, ts in MODEL_TABLES.items()
              for t in ts if results.get("units", {}).get(m)]
    if totals:
        text += ["### Projected GPU-hours per table (this device, 3 seeds)", "",
                 markdown_table(["table", "model", "GPU-hours"], [[t, m, _fmt(h)] for t, m, h in totals]), ""]
    text += render_ratios(results) + render_memory(results) + render_eval(results)
    if results.get("skipped"):
        text += ["## Not measured (time budget)", "", "; ".join(results["skipped"]), ""]
    if results.get("errors"):
        text += ["## Errors", ""] + [f"- {name}: {error.splitlines()[0]}" for name, error in results["errors"].items()]
    return "\n".join(text) + "\n"


# ------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results" / "paper_scale",
                        help="paper_scale.json and PAPER_SCALE.md")
    parser.add_argument("--bbh_dir", type=Path, default=Path(default_data_dir("bbh")))
    parser.add_argument("--mmlu_dir", type=Path, default=Path(default_data_dir("mmlu")))
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/mtlora_paper_scale"),
                        help="synthetic data, the slice, adapters (deleted at the start)")
    parser.add_argument("--time_budget_s", type=float, default=290.0, help="start no unit after this many seconds")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--timed_steps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=None, help="synthetic training records (default 512; 64 "
                                                                        "with --quick)")
    parser.add_argument("--eval_items", type=int, default=None,
                        help="items per BBH task / MMLU subject (default 16, one batch of the paper scale's; 2 with "
                             "--quick)")
    parser.add_argument("--only", default=None,
                        help="run only the units whose name matches this regular expression, e.g. "
                             "'llama-2-7b: (baseline|mtlora)$' (units: '<model>: <row key>', '<model>: memory plan', "
                             "'<model>: base model evaluation', '<model>: <row key> (loop)')")
    parser.add_argument("--bbh_tasks", type=int, default=2)
    parser.add_argument("--mmlu_subjects", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny configs on the CPU: the whole path in seconds")
    parser.add_argument("--render", type=Path, default=None, help="print the Markdown of a paper_scale.json; no run")
    args = parser.parse_args(argv)
    args.examples = args.examples or (64 if args.quick else 512)
    args.eval_items = args.eval_items or (2 if args.quick else 16)
    if args.timed_steps < 2:
        parser.error("--timed_steps must be >= 2 (the spectral rows fire on the second timed step)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        print(render(results))
        return results
    return run(args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
