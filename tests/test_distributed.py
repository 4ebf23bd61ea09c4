"""Training on two ranks (torchrun, gloo on the CPU) for every method, and the checks made before loading.

* DDP over 2 ranks x 4 sequences trains like one process with 2 accumulation steps x 4 (the same micro-batches):
  the same loss at every step to float32 rounding (LOSS_RTOL, steps 1 to 20), the same adapter weights on both
  ranks after every step, each checkpoint written once.
* A DDP run killed with SIGKILL after a checkpoint and restarted with --resume_from_checkpoint last ends with
  the uninterrupted run's adapter.
* DeepSpeed ZeRO-2 and ZeRO-3 (when deepspeed is installed) train with the Trainer's torch AdamW and schedule,
  like DDP: the same learning rate at every logged step, the same losses, and the ZeRO-3 adapter saved whole.

All runs of a launch share its processes (tests/distributed_worker.py), so the start-up is paid once per launch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlora.arguments import AdapterTrainingArguments
from mtlora.errors import InvalidInput
from mtlora.injection import attach_adapters, set_task_ids
from mtlora.losses import AuxiliaryLosses, balance_loss, clear_routing_records
from mtlora.training import check_distributed_support, run_training
from tests.helpers import ADAPTER_MATRIX, METHODS, REPO, adapter_config, tiny_llama, write_multitask_records
from mtlora.train_cli import parse_arguments

STEPS = 20
WORKER = REPO / "tests" / "distributed_worker.py"
# The paper's rows at tiny sizes; the balance loss is on in every row, as in the reference scripts.
METHOD_FLAGS = {
    "lora": ["--method", "lora"],
    "hydralora": ["--method", "hydralora", "--lora_nums", "4", "--enable_blc"],
    "mmoelora": ["--method", "mmoelora", "--expert_num", "4"],
    "mtlora": ["--method", "mtlora", "--lora_nums", "4", "--enable_block_adapter", "--enable_fine_grained_routing",
               "--routing_group_size", "32", "--enable_spectral_reg", "--spectral_reg_steps", "10", "--enable_blc"],
}
SPECTRAL_LAMBDA = 10.0  # large enough for its weight to show in the losses (the penalty is ~1e-5 here)
# Largest relative difference allowed between two runs' logged losses, at every one of the 20 steps. Measured on
# two CPU ranks: DDP and the one-process run are identical to the last bit, ZeRO-2/3 within 2e-7 of DDP. What
# it rejects (measured): the balance loss taken over the global batch instead of per micro-batch (2e-5 for
# mtLoRA, 2e-6 for HydraLoRA at step 20), the spectral penalty at half its weight (6e-6).
LOSS_RTOL = 1e-6
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# (DeepSpeed config, method) pairs: every method under ZeRO-3 (mtLoRA without spectral regularisation, refused
# there), the spectral path under ZeRO-2, and each offload config once.
ZERO_RUNS = [("ds_zero2", "mtlora"), ("ds_zero2_offload", "mmoelora"), ("ds_zero3", "lora"), ("ds_zero3", "hydralora"),
             ("ds_zero3", "mmoelora"), ("ds_zero3", "mtlora"), ("ds_zero3_offload", "hydralora")]


def train_flags(model_dir: Path, data: Path, output_dir: Path, method: str, **overrides) -> list[str]:
    values = {"model_name_or_path": model_dir, "data_path": data, "output_dir": output_dir, "max_steps": STEPS,
              "per_device_train_batch_size": 4, "max_seq_length": 48, "lora_rank": 4, "lora_dropout": 0.0,
              "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 10,
              "spectral_reg_lambda": SPECTRAL_LAMBDA, "dataloader_num_workers": 0}
    values.update(overrides)
    flags = METHOD_FLAGS[method] + ["--use_cpu"]
    for name, value in values.items():
        flags += [f"--{name}", str(value)]
    return flags


def launch(spec: dict, folder: Path, expect_kill: bool = False) -> None:
    """One torchrun launch of the worker on 2 CPU ranks (--standalone: rendezvous on a free local port)."""
    spec_path = folder / f"spec{len(list(folder.glob('spec*.json')))}.json"
    spec_path.write_text(json.dumps({"results": str(folder), "runs": spec}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(spec_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if (done.returncode != 0) != expect_kill:
        raise AssertionError(f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def rank_records(folder: Path, name: str) -> list[dict]:
    return [json.loads((folder / f"{name}.rank{rank}.json").read_text()) for rank in (0, 1)]


def logged(record: dict, key: str) -> list[float]:
    return [entry[key] for entry in record["log"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every launch of the module, run once: DDP rows, the killed and resumed run, then DeepSpeed rows."""
    folder = tmp_path_factory.mktemp("distributed")
    data = write_multitask_records(folder / "train.jsonl")
    flags = lambda name, method, **kw: train_flags(tiny_model_dir, data, folder / name, method, **kw)  # noqa: E731
    # The resumed run uses dropout, so that it also checks each rank's RNG state is restored.
    resume = dict(max_steps=6, save_steps=3, lora_dropout=0.1)
    launch([{"name": m, "argv": flags(m, m)} for m in METHODS]
           + [{"name": "straight", "argv": flags("straight", "mtlora", **resume)},
              {"name": "killed", "argv": flags("killed", "mtlora", **resume), "kill_at_step": 4}],
           folder, expect_kill=True)
    killed_files = sorted(p.name for p in (folder / "killed").iterdir())
    second = [{"name": "resumed", "cli": True,
               "argv": flags("killed", "mtlora", **resume) + ["--resume_from_checkpoint", "last"]}]
    if HAS_DEEPSPEED:
        for config, method in ZERO_RUNS:
            spectral = {"enable_spectral_reg": False} if config.startswith("ds_zero3") else {}
            second.append({"name": f"{config}-{method}", "argv": flags(
                f"{config}-{method}", method, deepspeed=REPO / "configs" / f"{config}.json", **spectral)})
    launch(second, folder)
    return {"folder": folder, "flags": flags, "killed_files": killed_files}


@pytest.fixture(scope="module")
def single_process(runs):
    """One process, 2 accumulation steps x 4: the micro-batches the two ranks see, in the same order."""
    summaries, flags = {}, runs["flags"]

    def run(name: str, method: str, **overrides) -> list[dict]:
        if name not in summaries:
            argv = flags(f"single-{name}", method, gradient_accumulation_steps=2, **overrides)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1); a tiny model gains nothing from more
            try:
                summaries[name] = [e for e in run_training(*parse_arguments(argv))["log_history"] if "loss" in e]
            finally:
                torch.set_num_threads(threads)
        return summaries[name]

    return run


def single_process_log(single_process, method: str) -> list[dict]:
    # The spectral penalty is added on one micro-batch per step with lambda per step whatever the accumulation,
    # so the same weight matches DDP without accumulation.
    return single_process(method, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ddp_trains_like_one_process_with_gradient_accumulation(method, runs, single_process):
    folder = runs["folder"]
    ddp = rank_records(folder, method)[0]
    single = single_process_log(single_process, method)
    assert [e["step"] for e in ddp["log"]] == list(range(1, STEPS + 1))
    assert_same_losses(logged(ddp, "loss"), [e["loss"] for e in single])
    assert logged(ddp, "loss")[-1] < logged(ddp, "loss")[0]
    assert logged(ddp, "learning_rate") == [e["learning_rate"] for e in single]
    if method in ("hydralora", "mtlora"):  # the logged balance loss is the mean over ranks and micro-batches
        assert logged(ddp, "balance_loss") == pytest.approx([e["balance_loss"] for e in single], rel=1e-5)


def assert_same_losses(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == STEPS
    assert losses[0] == pytest.approx(reference[0], rel=LOSS_RTOL)  # step 1
    assert losses == pytest.approx(reference, rel=LOSS_RTOL)  # every step up to 20


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ddp_keeps_the_ranks_identical_and_writes_each_checkpoint_once(method, runs):
    folder = runs["folder"]
    records = rank_records(folder, method)
    for record in records:
        assert record["rank_differences"] == [0.0] * STEPS
    # rank 0 writes the adapter of checkpoint-10, checkpoint-20 and the final one; rank 1 writes nothing
    assert [record["adapter_writes"] for record in records] == [3, 0]
    assert records[0]["log"] == records[1]["log"]
    output = folder / method
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= {
        p.name for p in (output / "checkpoint-10").iterdir()}


@pytest.mark.slow
def test_killed_ddp_run_resumes_to_the_uninterrupted_adapter(runs):
    folder = runs["folder"]
    killed = folder / "killed"
    # what the kill left: no adapter, no later checkpoint (the run's identity and progress file aside)
    assert runs["killed_files"] == ["checkpoint-3", "progress.json", "run_identity.json"]
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_step"] == 6
    expected = load_file(str(folder / "straight" / "adapter_model.safetensors"))
    resumed = load_file(str(killed / "adapter_model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)


requires_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")


@pytest.mark.slow
@requires_deepspeed
@pytest.mark.parametrize("config, method", ZERO_RUNS)
def test_zero_trains_like_ddp_with_the_trainers_optimizer_and_schedule(config, method, runs, single_process):
    folder = runs["folder"]
    records = rank_records(folder, f"{config}-{method}")
    zero = records[0]
    assert zero["optimizer"][-1] == "torch.optim.adamw.AdamW" and any("deepspeed" in o for o in zero["optimizer"])
    # the Trainer's own AdamW, fused where the torch release supports it, exactly as DDP's: nothing of DeepSpeed's
    assert zero["fused"] == rank_records(folder, method)[0]["fused"]
    assert zero["lr_scheduler"] == "torch.optim.lr_scheduler.LambdaLR"  # the Trainer's linear decay
    reference = (single_process("mtlora-no-spectral", "mtlora", enable_spectral_reg=False)
                 if config.startswith("ds_zero3") and method == "mtlora" else rank_records(folder, method)[0]["log"])
    assert logged(zero, "learning_rate") == [e["learning_rate"] for e in reference]
    assert_same_losses(logged(zero, "loss"), [e["loss"] for e in reference])
    assert [record["adapter_writes"] for record in records] == [3, 0]  # rank 0 writes, gathered from every rank


@pytest.mark.slow
@requires_deepspeed
def test_zero3_adapter_is_saved_whole_and_loads_back(runs, tiny_model_dir):
    from mtlora.loading import load_model_for_eval

    folder = runs["folder"]
    saved = load_file(str(folder / "ds_zero3-hydralora" / "adapter_model.safetensors"))
    ddp = load_file(str(folder / "hydralora" / "adapter_model.safetensors"))
    assert saved.keys() == ddp.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ddp[name].shape and tensor.numel() > 0
        torch.testing.assert_close(tensor, ddp[name], rtol=1e-4, atol=5e-6)  # float32 sums in another order
    model, _ = load_model_for_eval(str(tiny_model_dir), str(folder / "ds_zero3-hydralora"))
    loaded = {n: p for n, p in model.named_parameters() if ".adapter." in n}
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor)



@pytest.mark.slow
def test_distributed_benchmark_quick_run_on_cpu(tmp_path):
    from benchmarks import bench_distributed as bench

    bench.main(["--quick", "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "distributed_quick.json").read_text())
    rows = {(row["method"], row["mode"]): row for row in saved["runs"]}
    assert set(rows) == {(method, mode) for method in ("mtlora", "hydralora") for mode in ("1gpu", "ddp")}
    for method in ("mtlora", "hydralora"):
        ddp = rows[(method, "ddp")]
        assert ddp["agrees"] and ddp["lr_equal"] and ddp["every_example_full"] and ddp["tokens_per_s"] > 0
        assert ddp["adapter"]["loads"] and ddp["adapter"]["empty"] == 0 and len(ddp["peak_gib"]) == 2
    assert saved["skipped"] == [] and saved["environment"]["device"] == "cpu (gloo)"
    assert (tmp_path / "out" / "distributed_quick.md").read_text().count("| tiny |") == 4


def test_gpu_plan_runs_each_plain_run_before_its_offloaded_runs():
    from benchmarks import bench_distributed as bench

    jobs = bench.gpu_plan()
    order = [run.name for job in jobs for run in job.runs]
    for model in ("smollm2-135m", "llama-2-7b"):  # ZeRO-3 + CPU offload for every method at both shapes
        for method in bench.METHODS:
            offloaded = order.index(f"{model}-{method}-zero3_offload")
            assert order.index(f"{model}-{method}-1gpu") < offloaded
    large_zero3 = [job for job in jobs if any(r.name.startswith("llama-2-7b") and r.mode == "zero3_offload"
                                              for r in job.runs)]
    assert len(large_zero3) == len(bench.METHODS) and all(len(job.runs) == 1 for job in large_zero3)
    assert [job.gpus for job in jobs][-1] == 2  # one-GPU jobs first: a one-GPU selection never waits behind it


# ------------------------------------------------------------------------------ checks before loading (fast)

def _deepspeed_args(tmp_path, config: dict | Path) -> AdapterTrainingArguments:
    if isinstance(config, dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        config = path
    training = AdapterTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
    training.deepspeed = str(config)  # set after construction: building it with DeepSpeed needs the package
    return training


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("ds_*.json")), ids=lambda p: p.stem)
def test_shipped_deepspeed_configs_leave_optimizer_and_schedule_to_the_trainer(config, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    values = json.loads(config.read_text())
    assert "optimizer" not in values and "scheduler" not in values
    assert values["zero_optimization"]["stage"] == (3 if "zero3" in config.stem else 2)
    if "offload" in config.stem:  # the Trainer's torch AdamW steps the offloaded states on the CPU
        assert values["zero_force_ds_cpu_optimizer"] is False
    check_distributed_support(AuxiliaryLosses(enable_blc=True), _deepspeed_args(tmp_path, config))


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_a_deepspeed_optimizer_or_schedule_is_refused_before_loading(section, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    training = _deepspeed_args(tmp_path, {"zero_optimization": {"stage": 2}, section: {"type": "AdamW"}})
    expected = rf"--deepspeed .*ds.json: remove its '{section}' section: .*--lr_scheduler_type"
    with pytest.raises(InvalidInput, match=expected):
        check_distributed_support(AuxiliaryLosses(), training)


def test_spectral_regularisation_is_refused_under_zero3_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    losses = AuxiliaryLosses(enable_spectral_reg=True)
    with pytest.raises(InvalidInput, match="--enable_spectral_reg needs every expert matrix whole on each rank"):
        check_distributed_support(losses, _deepspeed_args(tmp_path, REPO / "configs" / "ds_zero3_offload.json"))
    check_distributed_support(losses, _deepspeed_args(tmp_path, REPO / "configs" / "ds_zero2.json"))


def test_deepspeed_without_a_launcher_or_mpi_is_refused_naming_the_launchers(tmp_path, monkeypatch):
    import mtlora.training

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(mtlora.training, "mpi_available", lambda: False)
    with pytest.raises(InvalidInput, match=r"needs a launcher .*deepspeed --num_gpus N train.py"):
        check_distributed_support(AuxiliaryLosses(), _deepspeed_args(tmp_path, REPO / "configs" / "ds_zero2.json"))


@pytest.mark.parametrize("name", ADAPTER_MATRIX)
def test_every_trainable_parameter_takes_part_in_a_training_step(name, tokenizer):
    """Why DDP runs with find_unused_parameters=False: no adapter parameter is ever left without a gradient."""
    assert AdapterTrainingArguments(output_dir="o", use_cpu=True).ddp_find_unused_parameters is False
    model = attach_adapters(tiny_llama(vocab_size=len(tokenizer)), adapter_config(name)).train()
    tokens = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    set_task_ids(model, torch.tensor([0, 2]))
    clear_routing_records(model)
    loss = model(tokens, labels=tokens).loss
    balance = balance_loss(model)
    (loss if balance is None else loss + balance).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
