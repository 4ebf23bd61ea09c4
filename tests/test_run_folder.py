"""An output folder belongs to one run: another run's folder is refused before loading, checkpoints are written
atomically, resuming skips checkpoints that are incomplete or not this run's, and a malformed adapter is named."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as real_save_file

from mtlora import checkpoint as checkpoint_module
from mtlora.arguments import AdapterTrainingArguments
from mtlora.checkpoint import read_adapter_config, save_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput, UsageError
from mtlora.injection import attach_adapters
from mtlora.run_folder import (RUN_IDENTITY, check_resume_checkpoint, checkpoint_problem, claim_output_dir,
                               read_identity, run_identity, write_identity)
from mtlora.trainer import AdapterTrainer
from mtlora.training import run_training
from tests.helpers import random_adapter_checkpoint, saved_adapter_tensors, tiny_llama, training_arguments

LORA = AdapterConfig(method="lora", lora_rank=4)
IDENTITY = {"model": {"config_sha256": "a"}, "adapter": LORA.to_dict(), "training": {"learning_rate": 0.001},
            "data": {"sha256": "d"}}


def _other(identity: dict, section: str, **changes) -> dict:
    return {**identity, section: {**identity[section], **changes}}


def _trainer_checkpoint(folder, identity: dict | None = IDENTITY, step: int = 2):
    """A checkpoint as the Trainer leaves it: adapter, trainer state, a torch archive, the run's identity."""
    random_adapter_checkpoint(folder, LORA)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"state": {}}, folder / "optimizer.pt")
    if identity is not None:
        write_identity(folder, identity)
    return folder


# ------------------------------------------------------------------------------------- run identity

def test_identity_holds_what_decides_the_result_and_nothing_else(tiny_model_dir, multitask_records, tmp_path):
    def identity(data=multitask_records, **training):
        args = AdapterTrainingArguments(**{"output_dir": str(tmp_path / "a"), "use_cpu": True, **training})
        return run_identity(str(tiny_model_dir), str(data), 48, LORA, {"enable_blc": False}, args)

    base = identity()
    assert identity(output_dir=str(tmp_path / "b"), logging_steps=3, save_steps=7, gradient_checkpointing=True) == base
    copy = tmp_path / "copy.jsonl"
    shutil.copy(multitask_records, copy)
    assert identity(data=copy) == base  # the data's content, not its path
    assert identity(per_device_train_batch_size=8, gradient_accumulation_steps=2) == identity(
        per_device_train_batch_size=16)  # the effective batch size
    assert identity(learning_rate=1e-3)["training"]["learning_rate"] != base["training"]["learning_rate"]
    copy.write_text(copy.read_text() + copy.read_text().splitlines()[0] + "\n")
    assert identity(data=copy)["data"]["sha256"] != base["data"]["sha256"]
    assert identity(max_steps=5)["training"]["num_train_epochs"] is None  # overridden by --max_steps


def test_a_folder_holding_another_run_is_refused_before_loading(tiny_model_dir, multitask_records, tmp_path,
                                                                 monkeypatch):
    output = tmp_path / "run"
    run_training(*training_arguments(tiny_model_dir, multitask_records, output, max_steps=2, save_steps=2))
    first = saved_adapter_tensors(output)
    other = training_arguments(tiny_model_dir, multitask_records, output, max_steps=2, save_steps=2,
                               learning_rate=1e-3, resume_from_checkpoint="last")
    with monkeypatch.context() as patch:
        patch.setattr("mtlora.training.load_base_model", lambda *a, **k: pytest.fail("model loaded"))
        with pytest.raises(InvalidInput, match=r"holds another run \(checkpoint-2, adapter_model.safetensors, "
                                               r"adapter_config.json\); .* training.learning_rate: 0.005 -> 0.001"):
            run_training(*other)
        with pytest.raises(InvalidInput, match="already holds this run .* pass --resume_from_checkpoint last"):
            run_training(*training_arguments(tiny_model_dir, multitask_records, output, max_steps=2, save_steps=2))
    untouched = saved_adapter_tensors(output)
    assert all(torch.equal(untouched[name], tensor) for name, tensor in first.items())
    other[-1].overwrite_output_dir = True
    summary = run_training(*other)
    assert summary["resumed_from"] is None and summary["global_step"] == 2
    assert read_identity(output)["training"]["learning_rate"] == 1e-3
    assert read_identity(output / "checkpoint-2")["training"]["learning_rate"] == 1e-3


@pytest.mark.parametrize("case", ["no identity", "same run, no resume", "identity only", "overwrite"])
def test_claiming_an_output_folder(case, tmp_path, capsys):
    folder = tmp_path / "out"
    _trainer_checkpoint(folder / "checkpoint-2")
    (folder / "train.log").write_text("log")
    (folder / ".incomplete-checkpoint-4").mkdir()
    if case == "no identity":
        with pytest.raises(InvalidInput, match=f"--output_dir {folder} holds checkpoint-2 but no readable {RUN_IDENTITY}"):
            claim_output_dir(str(folder), IDENTITY, overwrite=False, resuming=True)
    elif case == "same run, no resume":
        write_identity(folder, IDENTITY)
        with pytest.raises(InvalidInput, match="already holds this run"):
            claim_output_dir(str(folder), IDENTITY, overwrite=False, resuming=False)
        claim_output_dir(str(folder), IDENTITY, overwrite=False, resuming=True)
        assert not (folder / ".incomplete-checkpoint-4").exists()  # an unfinished save is cleared
    elif case == "identity only":  # a run that stopped before its first checkpoint: nothing of it to mix with
        shutil.rmtree(folder / "checkpoint-2")
        write_identity(folder, _other(IDENTITY, "training", learning_rate=0.1))
        claim_output_dir(str(folder), IDENTITY, overwrite=False, resuming=False)
        assert read_identity(folder) == IDENTITY
    else:
        write_identity(folder, _other(IDENTITY, "data", sha256="e"))
        (folder / "eval").mkdir()
        claim_output_dir(str(folder), IDENTITY, overwrite=True, resuming=False)
        assert sorted(p.name for p in folder.iterdir()) == ["eval", RUN_IDENTITY, "train.log"]
        assert "--overwrite_output_dir: deleted the run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- resuming

def test_checkpoint_problems_are_named(tmp_path):
    good = _trainer_checkpoint(tmp_path / "checkpoint-2")
    assert checkpoint_problem(good, IDENTITY) is None
    assert "belongs to another run (run_identity.json differs in training.learning_rate: 0.001 -> 0.1)" in \
        checkpoint_problem(good, _other(IDENTITY, "training", learning_rate=0.1))
    optimizer = good / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:50])
    assert checkpoint_problem(good) == f"{optimizer} is truncated or not a torch archive"
    (good / "trainer_state.json").unlink()
    assert checkpoint_problem(good).startswith(f"{good / 'trainer_state.json'} is missing or not valid JSON")


def test_explicit_resume_may_continue_other_settings_but_not_another_adapter(tmp_path, capsys):
    other_settings = _trainer_checkpoint(tmp_path / "a" / "checkpoint-2", _other(IDENTITY, "training", learning_rate=0.1))
    assert check_resume_checkpoint(str(other_settings), IDENTITY) == ["training.learning_rate: 0.1 -> 0.001"]
    assert "continuing a run that differs from this one in training.learning_rate" in capsys.readouterr().err
    other_adapter = _trainer_checkpoint(tmp_path / "b" / "checkpoint-2", _other(IDENTITY, "adapter", lora_rank=8))
    with pytest.raises(InvalidInput, match="trained with another base model or adapter .adapter.lora_rank: 8 -> 4"):
        check_resume_checkpoint(str(other_adapter), IDENTITY)
    (other_settings / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(InvalidInput, match="adapter_model.safetensors: not a complete safetensors file"):
        check_resume_checkpoint(str(other_settings), IDENTITY)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_last_skips_a_truncated_checkpoint_and_resumes_exactly(tiny_model_dir, multitask_records, tmp_path,
                                                                      capsys):
    output = tmp_path / "run"
    args = dict(max_steps=4, save_steps=2)
    run_training(*training_arguments(tiny_model_dir, multitask_records, output, **args))
    expected = saved_adapter_tensors(output)
    _truncate(output / "checkpoint-4" / "adapter_model.safetensors")  # what a kill during a plain write leaves
    summary = run_training(*training_arguments(tiny_model_dir, multitask_records, output, **args,
                                               resume_from_checkpoint="last"))
    assert f"skipping {output / 'checkpoint-4'}: {output / 'checkpoint-4' / 'adapter_model.safetensors'}: not a " \
           "complete safetensors file" in capsys.readouterr().err
    assert summary["resumed_from"] == str(output / "checkpoint-2") and summary["global_step"] == 4
    assert checkpoint_problem(output / "checkpoint-4") is None  # written again
    resumed = saved_adapter_tensors(output)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_kill_during_a_save_leaves_no_checkpoint(tiny_model_dir, multitask_records, tmp_path, monkeypatch):
    output = tmp_path / "run"
    args = dict(max_steps=4, save_steps=2)
    save_rng_state = AdapterTrainer._save_rng_state

    def killed_at_step_4(self, output_dir):  # the RNG files come after the adapter and the optimizer
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated kill during the save")
        save_rng_state(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(AdapterTrainer, "_save_rng_state", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            run_training(*training_arguments(tiny_model_dir, multitask_records, output, **args))
    staged = output / ".incomplete-checkpoint-4" / "checkpoint-4"
    assert (staged / "adapter_model.safetensors").is_file() and (staged / "optimizer.pt").is_file()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    summary = run_training(*training_arguments(tiny_model_dir, multitask_records, output, **args,
                                               resume_from_checkpoint="last"))
    assert summary["resumed_from"] == str(output / "checkpoint-2") and summary["global_step"] == 4
    assert not list(output.glob(".incomplete-*")) and checkpoint_problem(output / "checkpoint-4") is None


def test_save_rotation_keeps_the_trainers_limit(tiny_model_dir, multitask_records, tmp_path):
    output = tmp_path / "run"
    run_training(*training_arguments(tiny_model_dir, multitask_records, output, max_steps=3, save_steps=1,
                                     save_total_limit=2))
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(("adapter", "checkpoint", "run_", "train_"))) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "checkpoint-3", RUN_IDENTITY,
        "train_summary.json"]


# ----------------------------------------------------------------------------------- adapter files

def test_a_failed_save_leaves_no_file_under_the_real_name(tmp_path, monkeypatch):
    def half_written(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        _truncate(Path(path))
        raise KeyboardInterrupt("killed while writing")

    model = attach_adapters(tiny_llama(), LORA)
    monkeypatch.setattr(checkpoint_module, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, LORA, tmp_path)
    assert list(tmp_path.iterdir()) == []


BROKEN_ADAPTERS = {
    "config not JSON": ("adapter_config.json", lambda path: path.write_text("{not json"),
                        "adapter_config.json: not a valid JSON adapter config"),
    "unknown key": ("adapter_config.json", lambda path: path.write_text(json.dumps({**LORA.to_dict(), "rank": 4})),
                    "adapter_config.json: unknown keys ['rank']"),
    "wrong type": ("adapter_config.json", lambda path: path.write_text(json.dumps({**LORA.to_dict(), "lora_rank": "4"})),
                   "adapter_config.json: lora_rank must be int, got '4'"),
    "invalid value": ("adapter_config.json", lambda path: path.write_text(json.dumps({**LORA.to_dict(), "lora_rank": 0})),
                      "adapter_config.json: --lora_rank must be >= 1, got 0"),
    "truncated weights": ("adapter_model.safetensors", _truncate,
                          "adapter_model.safetensors: not a complete safetensors file"),
}


@pytest.mark.parametrize("case", BROKEN_ADAPTERS)
def test_a_malformed_adapter_names_the_file_and_the_problem(case, tmp_path):
    name, damage, message = BROKEN_ADAPTERS[case]
    random_adapter_checkpoint(tmp_path, LORA)
    damage(tmp_path / name)
    with pytest.raises(UsageError) as error:
        read_adapter_config(tmp_path)
    assert f"{tmp_path}/{message}" in str(error.value)
