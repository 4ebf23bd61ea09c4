"""The adapter benchmark's correctness path at tiny sizes on the CPU (no timing is asserted)."""

import json

import pytest
import torch

from benchmarks import bench_adapters as bench
from mtlora.experts import routed_expert_mix, routed_expert_mix_loop
from mtlora.injection import adapter_modules


@pytest.mark.parametrize("groups", bench.GROUP_COUNTS)
def test_loop_adapter_matches_fused_outputs_and_gradients(groups):
    assert bench.check_adapter_agreement(bench.QUICK, groups, torch.device("cpu")) < 1e-5


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_reference_loop_mix_matches_package_loop(groups):
    generator = torch.Generator().manual_seed(groups)
    code = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    weights = torch.softmax(torch.randn(12, groups, 3, generator=generator, dtype=torch.float64), -1)
    up = torch.randn(3, 16, 4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(bench.reference_loop_mix(code, weights, up), routed_expert_mix_loop(code, weights, up))


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


def test_detach_adapters_restores_the_base_model():
    model = _tiny_model().eval()
    ids = torch.randint(3, 200, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        bench.attach(model, "mtlora", bench.QUICK)
        with_adapters = model(input_ids=ids).logits
        bench.detach_adapters(model)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, with_adapters)  # random experts: the adapters did change the output
    torch.testing.assert_close(before, after)
    assert not adapter_modules(model)
    assert not any(p.requires_grad for p in model.parameters())


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
