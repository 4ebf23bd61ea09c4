"""Hugging Face Trainer with the auxiliary losses and adapter-only checkpoints.

* ``compute_loss`` adds the balance loss (every micro-batch) and the spectral regulariser (on one
  micro-batch of the scheduled optimisation steps) to the language-model loss, and logs each term.
* Checkpoints hold the adapter (safetensors + config) plus the Trainer's optimizer, scheduler, RNG and
  state files and the run's identity, so ``--resume_from_checkpoint`` continues exactly where a killed run
  stopped. Each is written into a hidden folder and renamed into place (``mtlora.run_folder``), so a kill
  during a save never leaves a ``checkpoint-N`` that looks complete.

Across ranks (DDP or DeepSpeed): the language-model loss is normalised by the number of target tokens of the
whole global batch, and the logged ``loss`` is its global value. Each auxiliary term is computed by each rank
on its own micro-batch (the balance loss from that micro-batch's routing means, exactly as one process with
gradient accumulation computes it per micro-batch), its gradient is averaged over ranks with the rest, and
the logged ``balance_loss`` / ``spectral_loss`` is the mean over ranks and micro-batches since the last log.
Only the main process writes the adapter and the run's files (each rank adds its RNG state to a checkpoint);
under DeepSpeed the adapter saved is its float32 master copy, gathered whole from every rank.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mtlora.checkpoint import load_adapter_weights, save_adapter
from mtlora.config import AdapterConfig
from mtlora.evaluation.reporting import write_json
from mtlora.injection import adapter_state_dict, set_task_ids
from mtlora.losses import AuxiliaryLosses, balance_loss, clear_routing_records, spectral_loss
from mtlora.mole import mole_balance_loss
from mtlora.run_folder import TRAINER_STATE, publish_checkpoint, staging_folder, write_identity


AUXILIARY_TERMS = ("balance_loss", "spectral_loss", "mole_balance_loss")


def deepspeed_adapter_weights(model) -> dict[str, torch.Tensor]:
    """Every adapter parameter, whole and in float32, from DeepSpeed's master copies (on the CPU).

    ZeRO partitions them across ranks (and under bf16 the module holds only a bf16 copy); gathering is a
    collective, so every rank must call this.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(model.named_parameters())
    weights = {}
    for name in adapter_state_dict(model):
        param = params[name]
        master = safe_get_full_fp32_param(param)  # None: no master copy (DeepSpeed in float32 without ZeRO)
        weight = (param if master is None else master).detach().float().cpu()
        expected = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(weight.shape) != expected:
            raise RuntimeError(f"gathered {name} has shape {tuple(weight.shape)}, expected {expected}")
        weights[name] = weight
    return weights


class AdapterTrainer(Trainer):
    """Trainer for a base model with mtlora adapters attached."""

    def __init__(self, *args, adapter_config: AdapterConfig, aux_losses: AuxiliaryLosses,
                 run_identity: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.loss_averaging == "micro_batch":  # the reference's per-micro-batch mean (no num_items_in_batch)
            self.model_accepts_loss_kwargs = False
        self.adapter_config = adapter_config
        self.aux_losses = aux_losses
        self.run_identity = run_identity
        self._staging_dir: str | None = None
        self._spectral_applied_at: int | None = None
        batches_per_epoch = math.ceil(len(self.train_dataset) / (self.args.train_batch_size * self.args.world_size))
        self._steps_per_epoch = max(1, math.ceil(batches_per_epoch / self.args.gradient_accumulation_steps))
        self._aux_totals: dict[str, float] = {}
        self._aux_counts: dict[str, int] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        set_task_ids(model, inputs.pop("task_ids", None))
        clear_routing_records(model)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            # When the LM loss is already normalised over the accumulated batch, each micro-batch's
            # auxiliary term must be scaled the same way to keep its weight per optimisation step.
            scale = 1.0 / self.current_gradient_accumulation_steps if (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None) else 1.0
            loss = loss + scale * self._auxiliary_loss(model)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:  # the task ids stay set through the backward pass (gradient checkpointing recomputes with them)
            return super().training_step(model, inputs, num_items_in_batch)
        finally:  # and never outlive their batch: a later forward (evaluation, generation) gets none
            set_task_ids(model, None)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            set_task_ids(model, None)

    def _auxiliary_loss(self, model) -> torch.Tensor | float:
        total = 0.0
        if self.aux_losses.enable_blc:
            blc = balance_loss(model)
            if blc is not None:
                self._record("balance_loss", blc)
                if self.aux_losses.blc_mode == "reference":  # logged and added, no gradient (see --blc_mode)
                    blc = blc.detach()
                total = total + self.aux_losses.blc_alpha * blc
        if self.adapter_config.is_mole:
            gate_balance = mole_balance_loss(model)
            if gate_balance is not None:
                self._record("mole_balance_loss", gate_balance)
                total = total + self.aux_losses.mole_balance_alpha * gate_balance
        if self.aux_losses.enable_spectral_reg and self._spectral_due():
            spectral = spectral_loss(model, self.aux_losses.spectral_reg_form,
                                     self.aux_losses.spectral_reg_max_matrices, step=self.state.global_step)
            self._record("spectral_loss", spectral)
            # Added on one micro-batch of the step, then divided by the accumulation steps with the rest of the
            # loss: scaled back up so the step gets lambda whatever the split (the reference ran it on 2 GPUs
            # without accumulation).
            total = total + self.aux_losses.spectral_reg_lambda * self.current_gradient_accumulation_steps * spectral
        return total

    def _spectral_due(self) -> bool:
        step = self.state.global_step
        if self._spectral_applied_at == step:  # once per optimisation step, on its first micro-batch
            return False
        if not self.aux_losses.spectral_due(step, self._steps_per_epoch):
            return False
        self._spectral_applied_at = step
        return True

    def _record(self, name: str, value: torch.Tensor) -> None:
        # Kept as a tensor on the device: reading it back every step would wait for the GPU.
        self._aux_totals[name] = self._aux_totals.get(name, 0.0) + value.detach().float()
        self._aux_counts[name] = self._aux_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs (called on every rank): add the auxiliary terms since the last log
            logs.update(self._auxiliary_means())
        super().log(logs, start_time)

    def _auxiliary_means(self) -> dict[str, float]:
        """Mean of each auxiliary term over the micro-batches of every rank since the last log."""
        # (term, [total, count]) on this rank, then summed over the ranks
        sums = torch.zeros(len(AUXILIARY_TERMS), 2, dtype=torch.float64, device=self.args.device)
        for row, name in enumerate(AUXILIARY_TERMS):
            if name in self._aux_counts:
                sums[row, 0] = self._aux_totals[name]
                sums[row, 1] = self._aux_counts[name]
        sums = self.accelerator.reduce(sums, reduction="sum")
        self._aux_totals, self._aux_counts = {}, {}
        return {name: round(total / count, 6) for name, (total, count) in zip(AUXILIARY_TERMS, sums.tolist()) if count}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, except under DeepSpeed: there the adapter's float32 master weights are
        gathered whole (a collective, so every rank calls this) and the main process writes them."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, state_dict=deepspeed_adapter_weights(self.model))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_adapter(model, self.adapter_config, output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, f"{output_dir}/training_args.bin")

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into ``.incomplete-checkpoint-N/`` and renamed into place once every
        process has written its part; then the Trainer's rotation (--save_total_limit) on the real folder."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_folder(run_dir, name)
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # rotates inside the staging folder: a no-op
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(str(staging)):  # the Trainer saw the staged path
                self.state.best_model_checkpoint = str(run_dir / name)
                self.state.save_to_json(str(staging / name / TRAINER_STATE))
            if self.run_identity is not None:
                write_identity(staging / name, self.run_identity)
            publish_checkpoint(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


PROGRESS_FILE = "progress.json"


def write_progress(folder: str | Path, what: str, done: int, total: int) -> None:
    """A run's progress for whoever watches it (the table runner shows it on the console)."""
    write_json(Path(folder) / PROGRESS_FILE, {"what": what, "done": done, "total": total})


class ProgressFile(TrainerCallback):
    """Writes the optimisation step and the total to ``<output_dir>/progress.json`` (main process only), at most
    once a second and at the last step."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = output_dir
        self._written = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if state.is_world_process_zero and (now - self._written >= 1.0 or state.global_step == state.max_steps):
            write_progress(self.output_dir, "step", state.global_step, state.max_steps)
            self._written = now


class StepTimes(TrainerCallback):
    """Seconds of every optimisation step, the input tokens of each (padding included; counted when
    --include_num_input_tokens_seen is on) and the run's peak GPU memory: what s/step, tokens/s and memory plans
    are read from (train_summary.json).

    On a GPU a step is timed by CUDA events on the stream, read once at the end of training: timing never makes
    the host wait for the device, which would stall the queue of the next step's kernels (a small model's step is
    as much launch work as GPU work). On the CPU, wall seconds."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.peak_gib: float | None = None
        self._events: list[list] = []  # [start, end] CUDA events of each step (end None until the step ends)
        self._started, self._tokens_before = 0.0, 0

    @staticmethod
    def _on_gpu() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def on_train_begin(self, args, state, control, **kwargs):
        if self._on_gpu():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._tokens_before = state.num_input_tokens_seen
        if self._on_gpu():
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append([start, None])
        else:
            self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._on_gpu():
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
        else:
            self.seconds.append(time.perf_counter() - self._started)
        self.tokens.append(int(state.num_input_tokens_seen - self._tokens_before))

    def on_train_end(self, args, state, control, **kwargs):
        if self._on_gpu():
            torch.cuda.synchronize()
            self.seconds += [start.elapsed_time(end) / 1000 for start, end in self._events if end is not None]
            self._events = []
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30

    def summary(self) -> dict:
        return {"step_seconds": self.seconds, "step_tokens": self.tokens if any(self.tokens) else None,
                "peak_gpu_memory_gib": self.peak_gib}
