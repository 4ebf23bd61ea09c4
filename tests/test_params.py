"""Trainable-parameter counts on the LLaMA-2-7B architecture (meta device) match the paper."""

import subprocess
import sys
from pathlib import Path

import pytest

from mtlora.config import AdapterConfig
from mtlora.injection import attach_adapters
from mtlora.loading import load_base_model
from mtlora.params import count_parameters, routed_adapter_formula

D, LAYERS = 4096, 32
PAPER_ROWS = [  # (config, paper's count in millions, closed form)
    (dict(method="hydralora"), 75.5, 2 * LAYERS * routed_adapter_formula(D, D, 16, 16)),
    (dict(method="mtlora", enable_block_adapter=True), 37.7, LAYERS * routed_adapter_formula(D, D, 16, 16)),
    (dict(method="mtlora", enable_block_adapter=True, enable_fine_grained_routing=True, routing_group_size=2048),
     39.8, LAYERS * routed_adapter_formula(D, D, 16, 16, groups=2)),
]


@pytest.mark.parametrize("values, paper_millions, formula", PAPER_ROWS)
def test_counts_match_the_paper_on_llama2_7b(values, paper_millions, formula, llama7b_config_dir):
    model = load_base_model(str(llama7b_config_dir))
    assert next(model.parameters()).device.type == "meta"
    attach_adapters(model, AdapterConfig(**values))
    trainable, total = count_parameters(model)
    assert trainable == formula
    assert abs(trainable / 1e6 - paper_millions) < 0.05


LLAMA13B = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-2-13b"  # Table S7's shape
D13, LAYERS13 = 5120, 40


@pytest.mark.parametrize("values, paper_millions, formula", [
    (dict(method="hydralora"), 117.9, 2 * LAYERS13 * routed_adapter_formula(D13, D13, 16, 16)),
    (dict(method="mtlora", enable_block_adapter=True, enable_fine_grained_routing=True, routing_group_size=512),
     88.5, LAYERS13 * routed_adapter_formula(D13, D13, 16, 16, groups=10)),
])
def test_counts_match_table_s7_on_llama2_13b(values, paper_millions, formula):
    model = load_base_model(str(LLAMA13B))
    attach_adapters(model, AdapterConfig(**values))
    trainable, _ = count_parameters(model)
    assert trainable == formula and abs(trainable / 1e6 - paper_millions) < 0.1  # 117.96M: the paper truncates


def test_mmoelora_as_the_reference_builds_it_is_a_rank_16_lora_plus_gates(llama7b_config_dir):
    """The reference module splits the rank over its experts (16 / 4 each): a rank-16 LoRA's size on q_proj and
    v_proj plus one task embedding and gate per adapted module, 8.4M (the paper gives no count for it)."""
    model = load_base_model(str(llama7b_config_dir))
    attach_adapters(model, AdapterConfig(method="mmoelora"))
    trainable, _ = count_parameters(model)
    lora = 2 * LAYERS * 16 * (D + D)
    assert lora < trainable < lora + 2 * LAYERS * 2_000 and abs(trainable / 1e6 - 8.4) < 0.05


def test_count_params_only_cli_prints_the_count(llama7b_config_dir):
    result = subprocess.run(
        [sys.executable, "train.py", "--method", "mtlora", "--enable_block_adapter", "--enable_fine_grained_routing",
         "--routing_group_size", "2048", "--model_name_or_path", str(llama7b_config_dir), "--count_params_only"],
        capture_output=True, text=True, check=True)
    assert "trainable params: 39845888 (39.8M)" in result.stdout
