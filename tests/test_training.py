"""Training: one step lowers the loss for every method, a real short run on SmolLM2 learns, a killed
run resumes to the same state, and bad input is rejected before any loading."""

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mtlora.config import AdapterConfig
from mtlora.injection import attach_adapters, set_task_ids
from mtlora.losses import AuxiliaryLosses, balance_loss
from mtlora.training import run_training
from mtlora.training_data import InstructionDataset, PaddingCollator, read_instruction_records
from tests.helpers import (METHODS, adapter_config, requires_smollm2, saved_adapter_tensors, tiny_llama,
                           training_arguments)
from train import main as train_main


@pytest.mark.parametrize("name", METHODS)
def test_one_optimisation_step_lowers_the_loss(name, multitask_records, tokenizer):
    model = attach_adapters(tiny_llama(vocab_size=len(tokenizer)), adapter_config(name)).train()
    dataset = InstructionDataset(read_instruction_records(multitask_records)[:8], tokenizer, max_seq_length=64)
    batch = PaddingCollator(tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    set_task_ids(model, batch.pop("task_ids"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model(**batch).loss
    total = before + (0.01 * balance_loss(model) if balance_loss(model) is not None else 0)
    total.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < before


class _KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_killed_run_resumes_to_the_same_state(tiny_model_dir, multitask_records, tmp_path):
    straight = tmp_path / "straight"
    run_training(*training_arguments(tiny_model_dir, multitask_records, straight))
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_training(*training_arguments(tiny_model_dir, multitask_records, killed), callbacks=[_KillAtStep(4)])
    assert (killed / "checkpoint-3").is_dir() and not (killed / "adapter_model.safetensors").exists()
    summary = run_training(*training_arguments(tiny_model_dir, multitask_records, killed, resume_from_checkpoint="last"))
    assert summary["resumed_from"].endswith("checkpoint-3")
    expected, resumed = saved_adapter_tensors(straight), saved_adapter_tensors(killed)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)


@requires_smollm2
def test_short_mtlora_run_on_smollm2_lowers_the_loss(multitask_records, tmp_path):
    output = tmp_path / "smollm2"
    summary = run_training(*training_arguments(None, multitask_records, output, max_steps=20, per_device_train_batch_size=8,
                                  logging_steps=2, save_steps=100, learning_rate=1e-3))
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert any("balance_loss" in e for e in summary["log_history"]) and any("spectral_loss" in e for e in summary["log_history"])
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 20


BAD_INPUTS = [
    (["--method", "adalora"], "--method: unknown value 'adalora'"),
    (["--lora_rank", "0"], "--lora_rank must be >= 1"),
    (["--lora_nums", "0"], "--lora_nums must be >= 1"),
    (["--enable_fine_grained_routing", "--routing_group_size", "48"], "--routing_group_size 48 does not divide the output width 64"),
    (["--blc_alpha", "-1"], "--blc_alpha must be >= 0"),
    (["--model_name_or_path", "./no/such/model"], "--model_name_or_path ./no/such/model: no such file or folder"),
    (["--data_path", "missing.jsonl"], "--data_path missing.jsonl: no such file"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_fails_fast_naming_the_flag(extra, message, tiny_model_dir, multitask_records, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(multitask_records),
            "--output_dir", str(tmp_path / "out"), "--use_cpu"] + extra
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert message in str(exit_info.value)
    assert not (tmp_path / "out").exists()


def test_malformed_record_is_reported_with_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "o")])
    assert f"{data}:2: field 'output' must be a string" in str(exit_info.value)


def test_records_may_contain_unicode_line_separators(tmp_path):
    data = tmp_path / "records.jsonl"
    record = {"instruction": "split\u2028here", "input": "a\x85b", "output": "ok"}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    assert [r["instruction"] for r in read_instruction_records(data)] == ["split\u2028here"] * 2


@requires_smollm2
def test_a_folder_saved_from_the_gguf_model_loads_as_a_trainable_float_model(tmp_path):
    from transformers.trainer_utils import validate_quantization_for_training

    from mtlora.loading import load_base_model

    load_base_model(None).save_pretrained(tmp_path / "smollm2")
    model = attach_adapters(load_base_model(str(tmp_path / "smollm2")), AdapterConfig(method="lora"))
    validate_quantization_for_training(model)
    assert getattr(model.config, "quantization_config", None) is None


@requires_smollm2
def test_a_gguf_file_is_converted_once_to_what_loading_it_gives(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtlora.loading import converted_gguf, default_model_path, load_base_model, load_tokenizer

    monkeypatch.setenv("MTLORA_CACHE_DIR", str(tmp_path / "cache"))
    gguf = Path(default_model_path())
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = load_base_model(str(gguf)), load_tokenizer(str(gguf))
    folder = Path(converted_gguf(str(gguf.parent), gguf.name))
    assert folder.parent == tmp_path / "cache" / "gguf" and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    texts = ["Q: Is 7 prime?\nA:", " leading space", "<|im_start|>user\nhi<|im_end|>", "émoji 🚀\tx"]
    assert [tokenizer(t).input_ids for t in texts] == [direct_tokenizer(t).input_ids for t in texts]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.chat_template) == (
        direct_tokenizer.bos_token_id, direct_tokenizer.eos_token_id, direct_tokenizer.chat_template)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_base_model(str(gguf))  # read from the folder, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_compiled_decoder_layers_match_eager_loss_and_gradients():
    from mtlora.losses import clear_routing_records
    from mtlora.training import compile_decoder_layers

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    config = AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True, enable_fine_grained_routing=True,
                           routing_group_size=32, lora_dropout=0.0)

    def loss_and_grads(compiled: bool):
        model = attach_adapters(tiny_llama(), config)
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(6))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if compiled:
            compile_decoder_layers(model)
        clear_routing_records(model)
        loss = model(tokens, labels=tokens).loss + 0.01 * balance_loss(model)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert (compiled_grads - eager_grads).norm() / eager_grads.norm() < 1e-4


def test_train_per_task_writes_a_library_the_merges_read(tiny_model_dir, multitask_records, tmp_path):
    from mtlora.library import resolve_lora_checkpoints

    model_args, data_args, adapter, losses, training = training_arguments(
        tiny_model_dir, multitask_records, tmp_path / "library", AdapterConfig(method="lora", lora_rank=4),
        AuxiliaryLosses(), max_steps=2)
    data_args.train_per_task = True
    summary = run_training(model_args, data_args, adapter, losses, training)
    assert sorted(summary["tasks"]) == ["first", "reverse", "upper"]
    assert all(task["train_examples"] == 32 and task["global_step"] == 2 for task in summary["tasks"].values())
    checkpoints = resolve_lora_checkpoints(str(tmp_path / "library"))
    assert [Path(c).name for c in checkpoints] == ["first", "reverse", "upper"]
    assert AdapterConfig.load(Path(checkpoints[0]) / "adapter_config.json").task_names == ["first"]
    weights = (tmp_path / "library" / "first" / "adapter_model.safetensors").read_bytes()
    again = run_training(model_args, data_args, AdapterConfig(method="lora", lora_rank=4), losses, training)
    assert again["tasks"] == summary["tasks"]  # finished tasks are skipped
    assert (tmp_path / "library" / "first" / "adapter_model.safetensors").read_bytes() == weights


def test_task_ids_do_not_outlive_their_batch(tiny_model_dir, multitask_records, tmp_path):
    """MMoELoRA's task gates read the task ids of the batch being trained; a later forward in the same
    process (evaluation after training) must not reuse the last training batch's ids."""
    from mtlora.adapters import TaskGatedLoRA
    from mtlora.loading import load_base_model

    model = load_base_model(str(tiny_model_dir))
    args = training_arguments(tiny_model_dir, multitask_records, tmp_path / "run", adapter=adapter_config("mmoelora"),
                              losses=AuxiliaryLosses(), max_steps=2, gradient_checkpointing=True)
    run_training(*args, base_model=model)
    gates = [m for m in model.modules() if isinstance(m, TaskGatedLoRA)]
    assert gates and all(m.task_ids is None for m in gates)
    with torch.no_grad():  # a batch of another size runs (stale ids of the training batch would not broadcast)
        model(input_ids=torch.ones(3, 5, dtype=torch.long))


def test_step_times_on_a_gpu_never_wait_for_the_device(monkeypatch):
    """Step timing on a GPU uses CUDA events read once at the end: a per-step synchronize would stall the
    queue of the next step's kernels. (Fakes stand in for the CUDA calls on this CPU machine.)"""
    from types import SimpleNamespace

    from mtlora.trainer import StepTimes

    clock = {"now": 0.0, "syncs": 0}

    class FakeEvent:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            self.at = clock["now"]

        def elapsed_time(self, end):  # milliseconds, like torch.cuda.Event
            return 1000 * (end.at - self.at)

    monkeypatch.setattr(StepTimes, "_on_gpu", staticmethod(lambda: True))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: clock.update(syncs=clock["syncs"] + 1))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    times, state = StepTimes(), SimpleNamespace(num_input_tokens_seen=0)
    times.on_train_begin(None, state, None)
    for duration in (0.5, 0.25):
        times.on_step_begin(None, state, None)
        clock["now"] += duration
        state.num_input_tokens_seen += 100
        times.on_step_end(None, state, None)
    times.on_step_begin(None, state, None)  # a step that never ended (training stopped) is not counted
    assert clock["syncs"] == 0
    times.on_train_end(None, state, None)
    assert clock["syncs"] == 1 and times.summary() == {"step_seconds": [0.5, 0.25], "step_tokens": [100, 100],
                                                        "peak_gpu_memory_gib": 3.0}


@pytest.mark.parametrize("averaging", ["micro_batch", "tokens"])
def test_loss_averaging_over_accumulated_micro_batches(averaging, tiny_model_dir, tokenizer, tmp_path):
    """--loss_averaging micro_batch (the reference's transformers 4.36): the step's loss is the mean of each
    micro-batch's token mean; tokens: the token mean over the whole accumulated batch. Two records of very
    different lengths, one per micro-batch, two accumulation steps: the logged first-step loss is one or the other."""
    from mtlora.loading import load_base_model

    records = [{"instruction": "Say yes.", "input": "", "output": "yes", "task_type": "a"},
               {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(40)), "task_type": "a"}]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = load_base_model(str(tiny_model_dir))  # the adapters start as the identity: step 1 sees the base model
    dataset = InstructionDataset(read_instruction_records(data), tokenizer, max_seq_length=64)
    means, sums, counts = [], [], []
    with torch.no_grad():
        for example in dataset.examples:
            batch = PaddingCollator(tokenizer.pad_token_id)([example])
            batch.pop("task_ids")
            mean = model(**batch).loss.item()
            count = int((batch["labels"][:, 1:] != -100).sum())
            means.append(mean), sums.append(mean * count), counts.append(count)
    expected = {"micro_batch": sum(means) / 2, "tokens": sum(sums) / sum(counts)}
    assert abs(expected["micro_batch"] - expected["tokens"]) > 0.05  # the two forms are told apart
    args = training_arguments(tiny_model_dir, data, tmp_path / averaging, adapter=adapter_config("lora"),
                              losses=AuxiliaryLosses(), max_seq_length=64, max_steps=1, per_device_train_batch_size=1,
                              gradient_accumulation_steps=2, loss_averaging=averaging, save_strategy="no")
    summary = run_training(*args)
    logged = next(entry["loss"] for entry in summary["log_history"] if "loss" in entry)
    assert logged == pytest.approx(expected[averaging], abs=2e-3)


@pytest.mark.parametrize("base_dtype, expected", [("auto", torch.bfloat16), ("float32", torch.float32),
                                                  ("bfloat16", torch.bfloat16)])
def test_base_dtype_with_bf16(base_dtype, expected, tiny_model_dir):
    """--base_dtype auto (default) loads the base in bfloat16 under --bf16; float32 keeps it in float32 under bf16
    autocast, as the reference runs loaded it."""
    from types import SimpleNamespace

    from mtlora.arguments import ModelArguments
    from mtlora.training import load_model

    model = load_model(ModelArguments(str(tiny_model_dir), base_dtype=base_dtype),
                       SimpleNamespace(bf16=True, deepspeed=None, device="cpu"))
    assert {p.dtype for p in model.parameters()} == {expected}


def test_nan_inf_filter_is_off_by_default_and_can_be_set():
    """The Trainer's per-micro-batch NaN/inf check of the logged loss (a host-device sync each micro-batch) is off
    by default; --logging_nan_inf_filter true restores the Trainer's (and the reference runs') behaviour."""
    from mtlora.train_cli import parse_arguments

    assert parse_arguments(["--output_dir", "x"])[-1].logging_nan_inf_filter is False
    assert parse_arguments(["--output_dir", "x", "--logging_nan_inf_filter", "true"])[-1].logging_nan_inf_filter is True
