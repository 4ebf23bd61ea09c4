"""Save -> load gives bit-identical outputs; loading is strict; plain LoRA exports to PEFT."""

import importlib.util

import pytest
import torch

from mtlora.checkpoint import export_peft_lora, load_adapter, load_adapter_weights, save_adapter
from mtlora.config import AdapterConfig
from mtlora.injection import attach_adapters, set_task_ids
from tests.helpers import ADAPTER_MATRIX, adapter_config, randomize_adapters, tiny_llama

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _trained_looking(config: AdapterConfig):
    return randomize_adapters(attach_adapters(tiny_llama(), config), seed=3, scale=0.1).eval()


@pytest.mark.parametrize("name", ADAPTER_MATRIX)
def test_save_load_round_trip_is_bit_identical(name, tmp_path):
    config = adapter_config(name)
    model = _trained_looking(config)
    set_task_ids(model, torch.tensor([0, 2]))
    expected = model(TOKENS).logits
    save_adapter(model, config, tmp_path)
    reloaded = attach_adapters(tiny_llama(), AdapterConfig.load(tmp_path / "adapter_config.json")).eval()
    load_adapter_weights(reloaded, tmp_path)
    set_task_ids(reloaded, torch.tensor([0, 2]))
    assert torch.equal(reloaded(TOKENS).logits, expected)


def test_loading_into_a_different_adapter_layout_fails_loudly(tmp_path):
    save_adapter(_trained_looking(adapter_config("hydralora")), adapter_config("hydralora"), tmp_path)
    other = attach_adapters(tiny_llama(), AdapterConfig(method="hydralora", lora_nums=4, trainable=["q_proj"]))
    with pytest.raises(ValueError, match="does not match the model: missing \\[\\] \\(0\\), unexpected"):
        load_adapter_weights(other, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_plain_lora_exports_to_peft_with_identical_outputs(tmp_path):
    from peft import PeftModel

    config = AdapterConfig(method="lora", lora_rank=4, lora_alpha=8)
    model = _trained_looking(config)
    expected = model(TOKENS).logits
    export_peft_lora(model, config, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_attaches_and_loads_in_one_call(tmp_path):
    saved = adapter_config("block-both-fgr")
    model = _trained_looking(saved)
    save_adapter(model, saved, tmp_path)
    fresh = tiny_llama()
    config = load_adapter(fresh, tmp_path)
    assert config == saved and not any(p.requires_grad for n, p in fresh.named_parameters() if ".adapter." not in n)
    assert torch.equal(fresh.eval()(TOKENS).logits, model(TOKENS).logits)
    with pytest.raises(FileNotFoundError, match="expected a folder with adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path / "missing")
