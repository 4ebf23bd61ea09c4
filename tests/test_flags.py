"""Flags that do nothing in the chosen configuration are warned about and recorded as the value actually used;
flags that ask for a component the configuration cannot have are refused (the bad-input battery holds those)."""

import json
import warnings

import pytest

from mtlora.config import AdapterConfig
from mtlora.errors import IgnoredFlagWarning
from mtlora.losses import AuxiliaryLosses
from mtlora.training import run_training
from tests.helpers import training_arguments

# flags -> (the warning, the recorded field and value)
IGNORED_ADAPTER_FLAGS = {
    "lora_nums with lora": (dict(method="lora", lora_nums=8), "--lora_nums 8 has no effect with --method lora",
                            ("lora_nums", 1)),
    "group size without fine-grained routing": (dict(routing_group_size=32), "--routing_group_size 32 has no effect "
                                                "without --enable_fine_grained_routing", ("routing_group_size", None)),
    "block rank without block adapter": (dict(block_adapter_rank=4), "--block_adapter_rank 4 has no effect without "
                                         "--enable_block_adapter", ("block_adapter_rank", None)),
    "block type without block adapter": (dict(block_adapter_type="both"), "--block_adapter_type both has no effect",
                                         ("block_adapter_type", "ffn")),
    "targets with block adapter": (dict(method="mtlora", enable_block_adapter=True, trainable=["o_proj"]),
                                   "--trainable o_proj has no effect with --enable_block_adapter", ("trainable", [])),
    "lora rank with block rank": (dict(method="mtlora", enable_block_adapter=True, block_adapter_rank=4, lora_rank=8),
                                  "--lora_rank 8 has no effect", ("lora_rank", 4)),
}
IGNORED_LOSS_FLAGS = {
    "balance weight without the balance loss": (dict(blc_alpha=0.5), "--blc_alpha 0.5 has no effect without "
                                                "--enable_blc", ("blc_alpha", None)),
    "spectral weight without the regulariser": (dict(spectral_reg_lambda=2.0), "--spectral_reg_lambda 2.0 has no "
                                                "effect without --enable_spectral_reg", ("spectral_reg_lambda", None)),
    "frequency with steps": (dict(enable_spectral_reg=True, spectral_reg_steps=5, spectral_reg_frequency=3),
                             "--spectral_reg_frequency 3 has no effect with --spectral_reg_steps",
                             ("spectral_reg_frequency", None)),
}


@pytest.mark.parametrize("case", IGNORED_ADAPTER_FLAGS)
def test_an_ignored_adapter_flag_is_named_and_recorded_as_used(case):
    flags, warning, (field, used) = IGNORED_ADAPTER_FLAGS[case]
    config = AdapterConfig(**flags)
    config.validate()
    assert [line for line in config.ignored_flags() if line.startswith(warning)] != []
    assert getattr(config.effective(), field) == used
    config.effective().validate()  # the recorded config is a valid one
    # the ignored value changes nothing that is built or recorded
    assert AdapterConfig(**{**flags, field: getattr(AdapterConfig(), field)}).effective() == config.effective()


@pytest.mark.parametrize("case", IGNORED_LOSS_FLAGS)
def test_an_ignored_loss_flag_is_named_and_recorded_as_used(case):
    flags, warning, (field, used) = IGNORED_LOSS_FLAGS[case]
    losses = AuxiliaryLosses(**flags)
    assert [line for line in losses.ignored_flags() if line.startswith(warning)] != []
    assert losses.effective()[field] == used


def test_defaults_and_used_flags_are_not_reported():
    assert AdapterConfig().ignored_flags() == [] and AuxiliaryLosses().ignored_flags() == []
    component = AdapterConfig(method="mtlora", lora_nums=4, enable_fine_grained_routing=True, routing_group_size=32)
    block = AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True, block_adapter_type="both",
                          block_adapter_rank=8, lora_rank=8, trainable=[])
    for used in (component, block):
        assert used.ignored_flags() == [] and used.effective() == used
    used_losses = AuxiliaryLosses(enable_blc=True, blc_alpha=0.5, enable_spectral_reg=True, spectral_reg_lambda=2.0)
    assert used_losses.ignored_flags() == []


def test_train_warns_once_and_records_the_configuration_used(tiny_model_dir, multitask_records, tmp_path):
    output = tmp_path / "lora"
    args = training_arguments(tiny_model_dir, multitask_records, output, AdapterConfig(method="lora", lora_nums=8),
                              AuxiliaryLosses(blc_alpha=0.5), max_steps=1, save_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_training(*args)
    ignored = [str(w.message) for w in caught if issubclass(w.category, IgnoredFlagWarning)]
    assert ignored == ["--lora_nums 8 has no effect with --method lora (it has no token router); the run records the value "
                       "actually used", "--blc_alpha 0.5 has no effect without --enable_blc; the run records the value "
                       "actually used"]
    assert json.loads((output / "adapter_config.json").read_text())["lora_nums"] == 1
    recorded = json.loads((output / "train_summary.json").read_text())
    assert recorded["adapter_config"]["lora_nums"] == 1 and recorded["auxiliary_losses"]["blc_alpha"] is None
    assert recorded["ignored_flags"] == summary["ignored_flags"] and len(recorded["ignored_flags"]) == 2
