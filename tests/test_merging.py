"""Merge baselines: exact on identical adapters, TIES by hand, DARE seeded, the merged model is a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import merge_loras
from mtlora.checkpoint import load_adapter_weights
from mtlora.config import AdapterConfig
from mtlora.injection import attach_adapters
from mtlora.library import lora_factors, read_lora_modules
from mtlora.merging import (DARE_SEEDS, GRIDS, MERGE_METHODS, MergeSpec, delta_weight, merge_grid, merge_into_model,
                            merge_updates)
from tests.helpers import tiny_llama, write_lora_checkpoint, write_tiny_model_folder

TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
HOST = "model.layers.1.self_attn.v_proj"


def _updates(checkpoints: list[str], host: str = HOST) -> list[torch.Tensor]:
    config, modules = read_lora_modules(checkpoints)
    return [delta_weight(*lora_factors(m)[host], config.scaling) for m in modules]


@pytest.fixture
def library(tmp_path) -> list[str]:
    return [write_lora_checkpoint(tmp_path / f"lora{i}", seed=i) for i in range(3)]


def test_two_copies_of_one_adapter_merge_back_to_it(library):
    config, modules = read_lora_modules([library[0], library[0]])
    single = tiny_llama()
    merge_into_model(single, config, modules[:1], MergeSpec("task_arithmetic", 1.0))  # == the adapter's forward, below
    for spec in (MergeSpec("task_arithmetic", 0.5), MergeSpec("ties", 1.0, density=1.0)):
        original, copy = _updates([library[0], library[0]])
        torch.testing.assert_close(merge_updates([original, copy], spec), original, rtol=1e-6, atol=1e-7)
        merged = tiny_llama()
        merge_into_model(merged, config, modules, spec)
        for name, param in merged.named_parameters():
            torch.testing.assert_close(param, single.get_parameter(name), rtol=1e-6, atol=1e-7)


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    tasks = [torch.tensor([[3.0, -1.0], [0.5, 2.0]]),
             torch.tensor([[-2.0, -4.0], [1.0, -0.1]]),
             torch.tensor([[1.0, -2.0], [-3.0, 0.2]])]
    # keep 2 of 4 per task: [[3, 0], [0, 2]], [[-2, -4], [0, 0]], [[0, -2], [-3, 0]]
    # elected signs (total mass): +, -, -, +; means of the agreeing kept entries: 3, (-4 - 2) / 2, -3, 2
    expected = torch.tensor([[3.0, -3.0], [-3.0, 2.0]])
    torch.testing.assert_close(merge_updates(tasks, MergeSpec("ties", 0.5, density=0.5)), 0.5 * expected)


def test_dare_at_density_one_equals_its_deterministic_counterpart():
    generator = torch.Generator().manual_seed(0)
    tasks = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    torch.testing.assert_close(merge_updates(tasks, MergeSpec("dare_linear", 0.7, 1.0, seed=0)),
                               merge_updates(tasks, MergeSpec("task_arithmetic", 0.7)), rtol=0, atol=0)
    torch.testing.assert_close(merge_updates(tasks, MergeSpec("dare_ties", 0.7, 1.0, seed=0)),
                               merge_updates(tasks, MergeSpec("ties", 0.7, 1.0)), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_repeats_with_a_seed_differs_across_seeds_and_leaves_the_global_generator(library, method):
    config, modules = read_lora_modules(library)
    merged = []
    for seed in (0, 0, 1):
        model = tiny_llama()
        rng_state = torch.get_rng_state()
        merge_into_model(model, config, modules, MergeSpec(method, 1.0, 0.8, seed=seed))
        assert torch.equal(torch.get_rng_state(), rng_state)
        merged.append(model.get_submodule(HOST).weight.detach().clone())
    assert torch.equal(merged[0], merged[1]) and not torch.equal(merged[0], merged[2])


def test_merged_single_adapter_equals_the_adapter_forward(library):
    config, modules = read_lora_modules([library[1]])
    merged = tiny_llama()
    stats = merge_into_model(merged, config, modules, MergeSpec("task_arithmetic", 1.0))
    adapted = attach_adapters(tiny_llama(), AdapterConfig(method="lora", lora_rank=4)).eval()
    load_adapter_weights(adapted, library[1])
    with torch.no_grad():
        expected = adapted(TOKENS).logits
        assert not torch.allclose(tiny_llama()(TOKENS).logits, expected, atol=1e-3)
        torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    assert stats["merged_layers"] == 4 and stats["mean_update_norm_ratio"] > 0


def test_grid_holds_the_defaults_and_every_point_is_valid():
    for method in MERGE_METHODS:
        grid = merge_grid(method)
        assert MergeSpec.default(method) in grid and len(set(grid)) == len(grid)
        for spec in grid:
            spec.validate()
    dare = merge_grid("dare_ties")
    assert {s.seed for s in dare} == set(DARE_SEEDS) and len(dare) == 3 * len({(s.weight, s.density) for s in dare})
    assert MergeSpec.default("dare_linear") == MergeSpec("dare_linear", 1.0, 0.8, 0)
    assert MergeSpec("ties", 1.0, 0.2).name == "ties_d0.2_l1"
    # the summing rules also try uniform averaging, lambda = 1/N for a library of N tasks; the averaging ones do not
    assert merge_grid("task_arithmetic", num_tasks=64)[0] == MergeSpec("task_arithmetic", 1 / 64)
    assert len(merge_grid("task_arithmetic", num_tasks=64)) == len(merge_grid("task_arithmetic")) + 1
    dare_linear = merge_grid("dare_linear", seeds=(0,), num_tasks=4)
    assert {s.weight for s in dare_linear} == {0.25, *GRIDS["dare_linear"]["weight"]}
    assert merge_grid("ties", num_tasks=64) == merge_grid("ties")
    assert merge_grid("task_arithmetic", num_tasks=10) == merge_grid("task_arithmetic")  # 0.1 is on the grid already


@pytest.fixture
def model_folder(tmp_path) -> str:
    return write_tiny_model_folder(tmp_path / "base")


def test_cli_writes_a_plain_model_folder_and_summary(library, model_folder, tmp_path):
    out = tmp_path / "merged"
    merge_loras.main(["--lora_checkpoints", str(tmp_path), "--method", "ties", "--model_name_or_path", model_folder,
                      "--output_dir", str(out)])  # a folder of checkpoints: lora0..2 (the model folder is not one)
    summary = json.loads((out / "merge_summary.json").read_text())
    assert summary["lora_checkpoints"] == library and summary["density"] == 0.2 and summary["lambda"] == 1.0
    assert summary["majority_sign"] == "total" and summary["seed"] is None and summary["merged_layers"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    config, modules = read_lora_modules(library)
    expected = AutoModelForCausalLM.from_pretrained(model_folder)
    merge_into_model(expected, config, modules, MergeSpec.default("ties"))
    assert torch.equal(reloaded.get_submodule(HOST).weight, expected.get_submodule(HOST).weight)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--method", "task_arithmetic", "--density", "0.5"], "--density: task_arithmetic keeps every entry"),
    (["--method", "ties", "--seed", "1"], "--seed: ties is deterministic"),
    (["--method", "ties", "--density", "0"], "--density must be in \\(0, 1\\]"),
    (["--method", "dare_linear", "--lora_checkpoints", "MISSING"], "--lora_checkpoints .*missing: expected a folder"),
    (["--method", "dare_linear", "--lora_checkpoints", "RANK2"], "r2: adapter config differs .* \\['lora_rank'\\]"),
    (["--method", "dare_linear", "--lora_checkpoints", "WIDER"], "wide: adapter of model.layers.0.self_attn.q_proj maps 96"),
])
def test_cli_bad_input_fails_before_loading_the_model(library, model_folder, tmp_path, monkeypatch, extra, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(merge_loras, "load_base_model", forbidden)
    special = {"MISSING": str(tmp_path / "missing"),
               "RANK2": f"{library[0]},{write_lora_checkpoint(tmp_path / 'r2', 5, AdapterConfig(method='lora', lora_rank=2))}",
               "WIDER": write_lora_checkpoint(tmp_path / "wide", 6, hidden_size=96)}
    extra = [special.get(value, value) for value in extra]
    args = ["--lora_checkpoints", ",".join(library), "--model_name_or_path", model_folder,
            "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit, match=message):
        merge_loras.main(args)
