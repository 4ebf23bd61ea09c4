"""One unit of work of a table: a row, on a track, at a seed; what identifies it, where it lives, how it runs.

A job's folder is keyed by everything that determines its result: the row's flags, the training settings,
the seed, the base model's and the data's fingerprints and the results version of the code
(:mod:`mtlora.fingerprint`). A finished job is reused only when all of them match; anything else gets a new
folder, so a result always belongs to the run that made it. One exception: the micro-batch split that
--gpu_memory_gb plans. A run trained earlier at another split of the same effective batch is reused (its split
adopted) rather than trained again, unless it would have to be retrained and that split does not fit.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path

from mtlora.experiments.dry_run import DryRun
from mtlora.checkpoint import is_adapter_checkpoint
from mtlora.experiments.evaluate import eval_identity, pending_suites, suite_data
from mtlora.experiments.memory_plan import MicroBatch, choose_micro_batch, fits, micro_batch_at
from mtlora.experiments.registry import Row, Scale, Table, Track
from mtlora.fingerprint import RESULTS_VERSION, data_fingerprint, digest, model_fingerprint
from mtlora.training_data import read_instruction_records, task_labels

REPO_ROOT = Path(__file__).resolve().parents[2]
LORAHUB_MODULES = 20  # LoRAHub composes a random sample of this many modules of the library (its paper's setting)


@dataclass(frozen=True)
class RunSettings:
    """What the command line decides for one table run."""

    model_name_or_path: str | None
    num_gpus: int
    results_dir: Path
    bbh_dir: str
    mmlu_dir: str
    use_cuda: bool
    seeds: tuple[int, ...] = (42,)
    gpu_memory_gib: float | None = None  # each job's share of a GPU: the micro-batch is planned to fit it
    dry_run: DryRun | None = None  # every job a dry-run job (mtlora.experiments.dry_run)


@dataclass(frozen=True)
class Job:
    settings: RunSettings
    scale: Scale
    table: Table
    track: Track
    row: Row
    seed: int
    depends_on: "Job | None" = field(default=None, compare=False)  # the library a merge/LoRAHub/MoLE row uses
    also_suites: tuple[str, ...] = ()  # suites other tables sharing this run folder report (the runner adds them)

    # ------------------------------------------------------------------------------------ what it runs

    @property
    def kind(self) -> str:
        return self.row.kind

    @cached_property
    def train_flags(self) -> dict:
        """train.py's adapter and auxiliary-loss flags (the spectral schedule comes from the track)."""
        flags = dict(self.row.flags)
        if flags.get("enable_spectral_reg"):
            flags.update(spectral_reg_steps=self.track.spectral_reg_steps,
                         spectral_reg_lambda=self.track.spectral_reg_lambda)
        return flags

    @cached_property
    def training(self) -> dict:
        """The training settings: the scale's, with the row's overrides, on the GPUs at hand."""
        return self._training_at(None if self.micro_batch is None else self.micro_batch.micro_batch)

    def _training_at(self, micro_batch: int | None) -> dict:
        training = {**self.scale.training, **self.table.training, **self.row.training, "seed": self.seed}
        if not self.settings.use_cuda:
            training.update(bf16=False, use_cpu=True)
        if micro_batch is not None:
            training["per_device_train_batch_size"] = micro_batch
        per_device = training["per_device_train_batch_size"]
        training["gradient_accumulation_steps"] = max(1, self.effective_batch // (per_device * self.settings.num_gpus))
        if self.settings.dry_run is not None:
            training.update(max_steps=self.settings.dry_run.steps, include_num_input_tokens_seen=True)
        return training

    @property
    def effective_batch(self) -> int:
        return self.row.effective_batch_size or self.scale.effective_batch_size

    @cached_property
    def micro_batch(self) -> MicroBatch | None:
        """The micro-batch planned for --gpu_memory_gb (mtlora.experiments.memory_plan), for jobs that train."""
        if self.settings.gpu_memory_gib is None or self.kind not in ("adapter", "library", "mole"):
            return None
        training = {**self.scale.training, **self.table.training, **self.row.training}
        step = (self.settings.model_name_or_path, self.train_flags, max(1, self.effective_batch // self.settings.num_gpus))
        memory = (training["max_seq_length"], bool(training.get("gradient_checkpointing")))
        planned = choose_micro_batch(*step, training["per_device_train_batch_size"], *memory,
                                     self.settings.gpu_memory_gib)
        return self._earlier_split(planned, lambda micro: micro_batch_at(*step, micro, *memory)) or planned

    def _earlier_split(self, planned: MicroBatch, plan_at) -> MicroBatch | None:
        """The split of this job's run trained earlier at another micro-batch (another --gpu_memory_gb or --parallel),
        which a resumed table reuses instead of training the job again when its weights are there, or nothing is left
        to evaluate, or its step fits this invocation's memory. None when the planned split's run was trained, or no
        other was."""
        folders = self._runs_folder.glob(f"{self._run_name}-*/train_summary.json")
        if next(folders, None) is None or self._trained_run_at(planned.micro_batch) is not None:
            return None
        per_device = planned.micro_batch * planned.accumulation
        for micro in (d for d in range(per_device, 0, -1) if per_device % d == 0 and d != planned.micro_batch):
            run_dir = self._trained_run_at(micro)
            if run_dir is None:
                continue
            split = plan_at(micro)
            if (is_adapter_checkpoint(run_dir) or not self.pending_suites(run_dir)
                    or fits(split.peak_gib, self.settings.gpu_memory_gib)):
                print(f"{self.row.key} s{self.seed}: reusing {run_dir.name}, trained at micro-batch {split.micro_batch} x "
                      f"{split.accumulation} (this --gpu_memory_gb plans {planned.micro_batch} x {planned.accumulation})")
                return replace(split, source="the split of the run trained earlier")
            print(f"{self.row.key} s{self.seed}: not reusing {run_dir.name} (trained at micro-batch {micro}, weights not "
                  f"kept, suites left to evaluate, planned peak {split.peak_gib:.1f} GiB does not fit --gpu_memory_gb "
                  f"{self.settings.gpu_memory_gib:.1f}): trains again at {planned.micro_batch} x {planned.accumulation}")
        return None

    def _trained_run_at(self, micro_batch: int) -> Path | None:
        """This job's run folder at ``micro_batch`` rows per step, if a run was trained there."""
        run_dir = self._run_dir_of(self._identity_of(self._training_at(micro_batch)))
        return run_dir if (run_dir / "train_summary.json").is_file() else None

    # -------------------------------------------------------------------------------------- identity

    @cached_property
    def identity(self) -> dict:
        """Everything that determines this job's result."""
        return self._identity_of(self.training)

    def _identity_of(self, training: dict) -> dict:
        identity = {"kind": self.kind, "results_version": RESULTS_VERSION,
                    "model": model_fingerprint(self.settings.model_name_or_path)}
        if self.kind != "base":
            identity.update(flags=self.train_flags, training=training, seed=self.seed,
                            train_data=data_fingerprint(self.track.train_data))
        if self.depends_on is not None:
            identity["library"] = self.depends_on.identity
        if self.kind == "merge_tuned":
            identity["grid"] = [spec.name for spec in self.merge_grid()]
        if self.settings.dry_run is not None:
            identity["dry_run"] = self.settings.dry_run.identity()
        return identity

    @cached_property
    def run_dir(self) -> Path:
        return self._run_dir_of(self.identity)

    def _run_dir_of(self, identity: dict) -> Path:
        return self._runs_folder / f"{self._run_name}-{digest(identity, 8)}"

    @property
    def _runs_folder(self) -> Path:
        return self.settings.results_dir / self.scale.name / "runs" / self.track.name

    @property
    def _run_name(self) -> str:
        name = self.row.key if self.kind == "base" else f"{self.row.key}-s{self.seed}"
        return name if self.settings.dry_run is None else f"dryrun-{name}"

    def pending_suites(self, run_dir: Path | None = None) -> list[str]:
        """The job's suites still to evaluate in its run folder (or ``run_dir``)."""
        return pending_suites(run_dir or self.run_dir, {suite: self.eval_identity(suite) for suite in self.suites})

    def eval_identity(self, suite: str) -> dict:
        """What a suite's scores depend on besides the adapter (the evaluator writes the same next to them)."""
        data = suite_data(self.track.heldout_data, self.settings.bbh_dir, self.settings.mmlu_dir)
        return eval_identity(suite, data[suite], self.scale.eval_limits.get(suite), self.kind == "uniform")

    @property
    def suites(self) -> tuple[str, ...]:
        """The track's suites that the table reports, plus lm-eval's MMLU and BBH for the track's harness rows at
        the harness seed, plus those of other tables that share the run."""
        reported = self.table.suites.get(self.scale.name)
        suites = tuple(s for s in self.track.suites if reported is None or s in reported)
        at_harness_seed = self.kind == "base" or self.seed == self.harness_seed  # the base model: one run, no seed
        if self.row.key in self.track.harness_rows and at_harness_seed and reported is None:
            suites += ("lm_eval_mmlu_bbh",)
        return tuple(dict.fromkeys(suites + self.also_suites))

    @property
    def harness_seed(self) -> int:
        """The one seed at which the harness rows get lm-eval's MMLU and BBH: the scale's first seed, whichever
        seeds this invocation runs (a runner given --seeds 43 alone must not retrain seed 43's finished runs for
        it); the first given seed only when none of the scale's seeds is run."""
        if set(self.settings.seeds) & set(self.scale.seeds):
            return self.scale.seeds[0]
        return self.settings.seeds[0]

    # -------------------------------------------------------------------------------------- commands

    def launcher(self) -> list[str]:
        if self.settings.num_gpus > 1:
            return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(self.settings.num_gpus)]
        return [sys.executable]

    @property
    def device(self) -> str:
        """Where the job's steps run: evaluation, merging and LoRAHub's search (training goes through its launcher)."""
        return "cuda" if self.settings.use_cuda else "cpu"

    def model_flags(self) -> dict:
        flags = {"model_name_or_path": self.settings.model_name_or_path}
        return flags if self.settings.dry_run is None else {**flags, **self.settings.dry_run.model_flags()}

    def training_command(self, flags: dict, output_dir: Path, extra: dict | None = None) -> list[str]:
        settings = {**self.model_flags(), **flags, **self.training, **(extra or {}),
                    "data_path": self.track.train_data, "output_dir": str(output_dir),
                    "resume_from_checkpoint": "last", "logging_steps": 10}
        return self.launcher() + [str(REPO_ROOT / "train.py")] + as_cli(settings)

    def merge_grid(self) -> list:
        """A tuned merge row's grid (DARE's points at this job's seed)."""
        from mtlora.merging import merge_grid

        return merge_grid(self.row.flags["method"], seeds=(self.seed,), num_tasks=len(self.library_tasks))

    @property
    def library_tasks(self) -> tuple[str, ...]:
        """The task labels of the track's training data: one library adapter each."""
        return _task_labels(self.track.train_data, data_fingerprint(self.track.train_data))

    def evaluation_command(self, lora_checkpoint: Path | None, model_name_or_path: str | None,
                           suites: tuple[str, ...] | None = None, run_dir: Path | None = None) -> list[str]:
        """The evaluator on the job's suites (or ``suites``), writing under its run folder (or ``run_dir``)."""
        suites = suites or self.suites
        flags = {"run_dir": run_dir or self.run_dir, "suites": ",".join(suites), "model_name_or_path": model_name_or_path,
                 "lora_checkpoint": lora_checkpoint, "heldout_data": self.track.heldout_data,
                 "bbh_dir": self.settings.bbh_dir, "mmlu_dir": self.settings.mmlu_dir,
                 "batch_size": self.scale.eval_batch_size, "uniform_routing": self.kind == "uniform",
                 "device": self.device,
                 "dtype": "bfloat16" if self.settings.use_cuda else "float32"}
        if self.settings.dry_run is not None:
            flags.update(self.settings.dry_run.model_flags())
        flags.update({f"{suite}_limit": self.scale.eval_limits.get(suite) or "none" for suite in suites})
        return [sys.executable, "-m", "mtlora.experiments.evaluate"] + as_cli(flags)

    def library_sample(self) -> list[str]:
        """LoRAHub's modules: a seeded sample of the library's per-task checkpoints."""
        tasks = sorted(p for p in self.depends_on.run_dir.iterdir() if (p / "adapter_config.json").is_file())
        chosen = random.Random(self.seed).sample(tasks, min(LORAHUB_MODULES, len(tasks)))
        return [str(p) for p in sorted(chosen)]


def as_cli(flags: dict) -> list[str]:
    """{"enable_blc": True, "lora_rank": 16, "trainable": ["q_proj"]} -> ["--enable_blc", "--lora_rank", "16", ...]."""
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", *map(str, value)]
        elif value is not False and value is not None:
            args += [f"--{key}", str(value)]
    return args


@lru_cache(maxsize=None)
def _task_labels(train_data: str, fingerprint: str) -> tuple[str, ...]:
    """A training file's task labels, read once per content (every tuned-merge job of a track asks for them)."""
    return tuple(task_labels(read_instruction_records(train_data)))
