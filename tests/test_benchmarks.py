"""The adapter benchmark's correctness path at tiny sizes on the CPU (no timing is asserted)."""

import json

import pytest
import torch

from benchmarks import bench_adapters as bench
from mtlora.checkpoint import is_adapter_checkpoint, save_adapter
from mtlora.experts import routed_expert_mix


@pytest.mark.parametrize("groups", bench.GROUP_COUNTS)
def test_loop_adapter_matches_fused_outputs_and_gradients(groups):
    assert bench.check_adapter_agreement(bench.QUICK, groups, torch.device("cpu")) < 1e-5


def _tiny_model():
    model = bench.build_model("llama-2-7b", bench.QUICK.model_overrides, torch.device("cpu"), torch.float32)
    model.config.use_cache = False
    bench.set_checkpointing(model, True)
    return model.train()


@pytest.mark.parametrize("method", ["hydralora", "block_ffn", "mtlora"])
def test_whole_step_agrees_between_fused_and_loop(method):
    model = _tiny_model()
    params = bench.attach(model, method, bench.QUICK)
    agreement = bench.check_step_agreement(model, params, bench.make_batch(model, bench.QUICK, torch.device("cpu")))
    assert agreement["loss_rel_diff"] < 1e-5
    assert agreement["grad_rel_diff"] < 1e-4


def test_quick_run_end_to_end(tmp_path):
    output = tmp_path / "quick.json"
    results = bench.main(["--quick", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["errors"] == {} and results["errors"] == {}
    assert {row["impl"] for row in saved["adapter"]["rows"]} == {"fused", "loop", "llama_mlp"}
    steps = {(row["method"], row["impl"]) for row in saved["train"]["rows"]}
    assert steps == {("none", "base")} | {(m, i) for m in ("hydralora", "block_ffn", "mtlora") for i in ("fused", "loop")}
    assert {row["task"] for row in saved["eval"]} == {"bbh", "mmlu"}
    assert saved["compile"]["agreement_eager"]["grad_rel_diff"] < 1e-4
    assert {"adapter_speedup_min_5x", "mtlora_step_speedup_1.5x", "mtlora_overhead_over_floor_15pct"} <= set(saved["targets"])
    for name in saved["profile"].values():
        assert (tmp_path / name).is_file()


def test_fused_mix_casts_float32_master_weights_like_a_cast_beforehand():
    generator = torch.Generator().manual_seed(0)
    code = torch.randn(10, 4, generator=generator).bfloat16()
    weights = torch.softmax(torch.randn(10, 2, 3, generator=generator), -1).bfloat16()
    master = torch.randn(3, 16, 4, generator=generator).requires_grad_()
    out = routed_expert_mix(code, weights, master)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, routed_expert_mix(code, weights, master.detach().bfloat16()))
    out.float().sum().backward()
    assert master.grad.dtype == torch.float32 and master.grad.abs().sum() > 0


@pytest.mark.slow
def test_eval_benchmark_quick_run(tmp_path):
    """bench_eval.py --quick: both models, both benchmarks, before and after, agreement with batch size 1."""
    from benchmarks import bench_eval
    from tests.helpers import write_bbh_folder, write_mmlu_folder

    write_bbh_folder(tmp_path / "data" / "bbh")
    write_mmlu_folder(tmp_path / "data" / "mmlu")
    results = bench_eval.main(["--quick", "--data_dir", str(tmp_path / "data"), "--output", str(tmp_path / "eval.json"),
                               "--batch_sizes", "3,auto", "--passes", "2"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["rows"] == results["rows"] and (tmp_path / "eval.md").is_file()
    assert [(r["model"], r["benchmark"], r["variant"], r["batch_size"], r["pass"]) for r in saved["rows"]] == [
        (m, b, *v, p) for m in bench_eval.MODELS for b in bench_eval.BENCHMARKS
        for v in (("before", 64), ("after", 3), ("after", "auto")) for p in (1, 2)]
    assert all(r["items"] == 4 and r["questions_per_s"] > 0 for r in saved["rows"])  # 2 tasks / subjects x 2 items
    # float32 on the CPU: the new path gives the former path's decisions and batch size 1's outputs
    assert all(a["decisions_equal"] == 1.0 and a.get("outputs_equal", 1.0) == 1.0 for a in saved["agreement"])
    assert len(saved["agreement"]) == 8 and set(saved["targets"]) == {
        "smollm2 bbh >= 150/s", "smollm2 mmlu >= 1500/s", "llama7b bbh >= 25/s"}


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["mmlu", "bbh"])
def test_eval_profile_quick_run_with_a_saved_adapter(tmp_path, benchmark):
    """profile_eval.py --quick: the timed and the profiled run score the same items, the forward hooks count the
    calls, every variant runs, and a saved adapter replaces the random one."""
    from benchmarks import bench_eval, profile_eval
    from tests.helpers import write_bbh_folder, write_mmlu_folder

    write_bbh_folder(tmp_path / "data" / "bbh")
    write_mmlu_folder(tmp_path / "data" / "mmlu")
    model, _ = bench_eval.load_model("smollm2", True, torch.device("cpu"), torch.float32)
    config = bench.scale_adapter_config(bench.adapter_config("mtlora", model.config.hidden_size), bench.QUICK)
    save_adapter(model, config, tmp_path / "adapter")
    results = profile_eval.main(["--quick", "--benchmark", benchmark, "--data_dir", str(tmp_path / "data"),
                                 "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "p.json")])
    assert results["run"]["items"] == results["profile"]["items"] == 4  # 2 tasks / subjects x 2 items
    assert results["profile"]["forward_calls"] > 0 and results["profile"]["gpu_busy_s"] is None
    assert [v["variant"] for v in results["variants"]] == list(profile_eval.VARIANTS)
    assert all(v["items"] == 4 for v in results["variants"])
    assert results["meta"]["adapter"] == str(tmp_path / "adapter")
    assert all((tmp_path / f"p.{ext}").is_file() for ext in ("json", "md", "txt"))


def test_training_benchmark_runs_the_runner_s_command_for_each_row(tmp_path):
    """bench_training.py on a tiny model on the CPU: every row trains the asked steps; no timing is asserted."""
    from benchmarks import bench_training
    from tests.helpers import write_multitask_records, write_tiny_model_folder

    model = write_tiny_model_folder(tmp_path / "model")
    data = write_multitask_records(tmp_path / "train.jsonl")
    results = bench_training.main(["--model_name_or_path", model, "--data", str(data), "--rows", "lora", "mtlora",
                                   "--steps", "2", "--output", str(tmp_path / "training.json"),
                                   "--keep_dir", str(tmp_path / "runs")])
    assert [r["row"] for r in results["rows"]] == ["lora", "mtlora"]
    assert all(is_adapter_checkpoint(tmp_path / "runs" / row) for row in ("lora", "mtlora"))
    assert all(r["steps"] == 2 and r["wall_s"] > r["train_s"] > 0 for r in results["rows"])
    assert results["rows"][0]["trainable_params"] < results["rows"][1]["trainable_params"]
    assert "| mtlora | 2 |" in (tmp_path / "training.md").read_text()
    with pytest.raises(SystemExit, match="--rows: naive_average is no trainable row"):
        bench_training.main(["--rows", "naive_average", "--steps", "2"])


@pytest.mark.slow
def test_host_benchmark_times_the_gguf_load_and_splits_mmlu_s_host_work(tmp_path):
    """bench_host.py on two tiny MMLU subjects: both loads timed, the MMLU time split into its parts (not asserted)."""
    from benchmarks import bench_host
    from tests.helpers import write_mmlu_folder

    write_mmlu_folder(tmp_path / "data" / "mmlu")
    results = bench_host.main(["--data_dir", str(tmp_path / "data"), "--output", str(tmp_path / "host.json")])
    assert set(results["model_load"]) == {"gguf_direct_s", "cached_folder_s"}
    mmlu = results["mmlu_host"]
    assert mmlu["questions"] > 0 and mmlu["tokenising_s"] + mmlu["model_forward_s"] <= mmlu["total_s"]
    assert 0 < mmlu["real_tokens"] <= mmlu["token_positions_run"]
    assert "| the same from the cached converted folder |" in (tmp_path / "host.md").read_text()
    with pytest.raises(SystemExit):
        bench_host.main(["--data_dir", str(tmp_path / "nothing")])


@pytest.mark.slow
def test_harness_benchmark_quick_run(tmp_path):
    """bench_harness.py --quick: both engines on lm-eval's three task groups; in float32 every item scores the same."""
    from benchmarks import bench_harness
    from tests.helpers import write_bbh_folder, write_mmlu_folder

    bbh = write_bbh_folder(tmp_path / "data" / "bbh")
    (bbh / "labels.json").rename(bbh / "boolean_expressions.json")
    write_mmlu_folder(tmp_path / "data" / "mmlu")
    results = bench_harness.main(["--quick", "--data_dir", str(tmp_path / "data"), "--subjects", "anatomy",
                                  "--bbh_tasks", "boolean_expressions", "--output", str(tmp_path / "h.json")])
    assert [r["engine"] for r in results["runs"]] == ["hflm", "batched"]
    assert all(r["documents"] == 6 and r["seconds"] > 0 for r in results["runs"])  # 3 tasks x 2 documents
    assert results["runs"][1]["values_equal"] == 1.0 and results["runs"][1]["speedup"] > 0
    assert (tmp_path / "h.md").read_text().count("| batched |") == 1
