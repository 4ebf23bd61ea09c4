"""The figure analyses run end to end on a tiny model and give the known values in known cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.common import parse_labelled_paths, sample_records_by_task
from analysis.gradient_conflict import gradient_conflict
from analysis.routing_entropy import routing_entropy
from analysis.routing_patterns import routing_patterns
from analysis.spectral_alignment import expert_svd, main as spectral_main, spectral_alignment, subspace_alignment
from mtlora.config import AdapterConfig
from tests.helpers import random_adapter_checkpoint, requires_smollm2, write_multitask_records

E = 4
COMPONENT = AdapterConfig(method="hydralora", lora_rank=4, lora_nums=E)
BLOCK = AdapterConfig(method="mtlora", lora_rank=4, lora_nums=E, enable_block_adapter=True,
                      enable_fine_grained_routing=True, routing_group_size=32)
DATA_KWARGS = dict(samples_per_task=3, batch_size=3, max_seq_length=64)


_checkpoint = random_adapter_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny LLaMA with the SmolLM2 tokenizer, a 3-task data file and three checkpoints."""
    root = tmp_path_factory.mktemp("analysis")
    vocab = len(tokenizer)
    return {
        "model": str(tiny_model_dir), "data": str(write_multitask_records(root / "data.jsonl", count=12)),
        "component": _checkpoint(root / "component", COMPONENT, vocab_size=vocab),
        "block": _checkpoint(root / "block", BLOCK, vocab_size=vocab),
        "uniform": _checkpoint(root / "uniform", COMPONENT, vocab_size=vocab, zero_router=True),
    }


@requires_smollm2
def test_routing_entropy_is_log_e_for_a_zero_router_and_bounded_otherwise(setup, tmp_path):
    data = routing_entropy([("0.0", setup["uniform"]), ("1.0", setup["block"])], setup["data"], str(tmp_path),
                           setup["model"], **DATA_KWARGS)
    uniform, trained = data["checkpoints"]["0.0"], data["checkpoints"]["1.0"]
    assert uniform["mean_entropy"] == pytest.approx(math.log(E), abs=1e-12)
    assert uniform["normalised_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < trained["mean_entropy"] < math.log(E)
    assert set(trained["per_layer"]) == {"0", "1"} and set(trained["per_task"]) == {"first", "reverse", "upper"}
    assert (tmp_path / "routing_entropy.png").stat().st_size > 0
    assert json.loads((tmp_path / "routing_entropy.json").read_text())["checkpoints"]["0.0"]["num_experts"] == E


@requires_smollm2
def test_routing_patterns_rows_are_distributions(setup, tmp_path):
    data = routing_patterns(setup["component"], setup["data"], str(tmp_path), model_name_or_path=setup["model"],
                            **DATA_KWARGS)
    assert data["tasks"] == ["first", "reverse", "upper"] and set(data["layers"]) == {"0", "1"}
    for matrix in [data["average"], *data["layers"].values()]:
        assert torch.tensor(matrix).shape == (3, E)
        assert torch.tensor(matrix).sum(1).tolist() == pytest.approx([1.0] * 3)
    uniform = routing_patterns(setup["uniform"], setup["data"], str(tmp_path), layers=[1],
                               model_name_or_path=setup["model"], **DATA_KWARGS)
    assert torch.tensor(uniform["average"]).flatten().tolist() == pytest.approx([1 / E] * 3 * E)
    assert (tmp_path / "routing_patterns.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--layers"):
        routing_patterns(setup["component"], setup["data"], str(tmp_path), layers=[7],
                         model_name_or_path=setup["model"], **DATA_KWARGS)


@requires_smollm2
def test_gradient_conflict_compares_two_configurations(setup, tmp_path):
    data = gradient_conflict(setup["data"], str(tmp_path), [("component", setup["component"]), ("block", setup["block"])],
                             model_name_or_path=setup["model"], **DATA_KWARGS)
    for result in data["configurations"].values():
        for layer in result["per_layer"].values():
            matrix = torch.tensor(layer["cosine_matrix"])
            assert torch.diagonal(matrix).tolist() == pytest.approx([1.0] * 3)  # a task with itself
            assert torch.allclose(matrix, matrix.t()) and matrix.abs().max() <= 1 + 1e-9
            assert 0.0 <= layer["conflict"] <= 1.0 and 0.0 <= layer["negative_fraction"] <= 1.0
    ratio = data["conflict_ratio"]
    assert ratio["ratio"] == pytest.approx(data["configurations"]["block"]["conflict"]
                                           / data["configurations"]["component"]["conflict"])
    assert (tmp_path / "gradient_conflict.png").stat().st_size > 0


@requires_smollm2
def test_gradient_conflict_with_fresh_adapters_records_the_noise(setup, tmp_path):
    data = gradient_conflict(setup["data"], str(tmp_path), fresh=COMPONENT, init_noise=1e-3,
                             model_name_or_path=setup["model"], **DATA_KWARGS)
    assert list(data["configurations"]) == ["component", "block"]
    assert data["fresh_adapters_init_noise"] == 1e-3 and data["conflict_ratio"] is not None
    assert data["configurations"]["block"]["adapter_config"]["enable_block_adapter"] is True


def test_expert_svd_matches_the_full_product():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 20, generator=generator), torch.randn(12, 4, generator=generator)
    u, s = expert_svd(a, b)
    u_full, s_full, _ = torch.linalg.svd((b @ a).double())
    assert torch.allclose(s, s_full[:4], atol=1e-10)
    assert subspace_alignment(u[:, :2], u_full[:, :2]) == pytest.approx(1.0)


def test_spectral_alignment_of_identical_experts_is_one(tmp_path):
    same = _checkpoint(tmp_path / "same", COMPONENT, identical_experts=True)
    random = _checkpoint(tmp_path / "random", BLOCK)
    lora = _checkpoint(tmp_path / "lora", AdapterConfig(method="lora", lora_rank=4))
    data = spectral_alignment([("same", same), ("random", random), ("lora", lora)], str(tmp_path / "out"), top_k=2)
    same_r, random_r, lora_r = (data["checkpoints"][k] for k in ("same", "random", "lora"))
    assert same_r["top_k_alignment"] == pytest.approx(1.0) and same_r["bottom_k_alignment"] == pytest.approx(1.0)
    assert 0.0 < random_r["top_k_alignment"] < 1.0
    assert lora_r["top_k_alignment"] is None and lora_r["num_experts"] == 1  # no pairs with one expert
    for result in data["checkpoints"].values():
        spectrum = result["mean_normalised_spectrum"]
        assert spectrum[0] == pytest.approx(1.0) and all(x >= y - 1e-12 for x, y in zip(spectrum, spectrum[1:]))
        assert result["top_k_energy_fraction"] is not None and 0.5 <= result["top_k_energy_fraction"] <= 1.0
    assert (tmp_path / "out" / "spectral_alignment.png").stat().st_size > 0


def test_cli_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--checkpoints .*adapter_model.safetensors"):
        spectral_main(["--checkpoints", f"x={tmp_path}", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--top_k"):
        spectral_main(["--checkpoints", _checkpoint(tmp_path / "c", COMPONENT), "--top_k", "9",
                       "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unique"):
        parse_labelled_paths(["a=x", "a=y"])
    with pytest.raises(ValueError, match="task_type"):
        sample_records_by_task(write_multitask_records(tmp_path / "d.jsonl", count=1), 4, min_tasks=2)
