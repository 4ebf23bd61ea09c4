"""MoLE: one LoRA is that LoRA, only the gates train, the balance loss, prompt-pooled gates, save -> load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtlora.checkpoint import load_adapter, load_adapter_weights, save_adapter
from mtlora.config import AdapterConfig
from mtlora.injection import adapter_state_dict, attach_adapters
from mtlora.loading import load_model_for_eval
from mtlora.mole import MOLE_BALANCE_ALPHA, attach_mole, gate_balance_loss, mole_balance_loss, mole_gates
from mtlora.training_data import IGNORE_INDEX
from tests.helpers import tiny_llama, write_lora_checkpoint, write_tiny_model_folder

TOKENS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
NO_DROPOUT = AdapterConfig(method="lora", lora_rank=4, lora_dropout=0.0)


@pytest.fixture
def library(tmp_path) -> list[str]:
    return [write_lora_checkpoint(tmp_path / f"lora{i}", seed=i, config=NO_DROPOUT) for i in range(3)]


def _randomize_gates(model, seed: int = 0, scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    for gate in mole_gates(model):
        gate.weight.data.copy_(torch.randn(gate.weight.shape, generator=generator) * scale)
    return model


def test_a_one_lora_library_is_that_lora(library):
    mole = tiny_llama()
    attach_mole(mole, library[:1])
    lora = attach_adapters(tiny_llama(), NO_DROPOUT).eval()
    load_adapter_weights(lora, library[0])
    with torch.no_grad():
        expected = lora(TOKENS).logits
        assert not torch.allclose(tiny_llama()(TOKENS).logits, expected, atol=1e-3)
        torch.testing.assert_close(mole(TOKENS).logits, expected, rtol=1e-6, atol=1e-6)


def test_only_the_gates_train_and_they_are_the_whole_adapter_state(library):
    model = tiny_llama()
    attach_mole(model, library)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.adapter.weight": 3 * 64 for i in range(2)}
    assert set(adapter_state_dict(model)) == set(trainable)  # the stacked LoRAs are not saved with the gates
    with pytest.raises(ValueError, match="already has adapters"):
        attach_mole(model, library)


def test_balance_loss_is_smallest_for_uniform_gates():
    uniform = torch.full((4, 5), 0.2)
    assert gate_balance_loss([uniform, uniform]).item() == pytest.approx(5 * math.log(5))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        gates = [torch.softmax(torch.randn(4, 5, generator=generator), -1) for _ in range(2)]
        assert gate_balance_loss(gates) > gate_balance_loss([uniform])
    # q is the mean over layers and sequences: two opposite one-hot gates average to balanced
    assert gate_balance_loss([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]).item() == pytest.approx(2 * math.log(2))


def test_one_optimisation_step_lowers_the_loss(library):
    model = tiny_llama()
    attach_mole(model, library)
    _randomize_gates(model, scale=0.5)
    model.train()
    labels = TOKENS.clone()
    labels[:, :4] = IGNORE_INDEX  # the first 4 tokens are the prompt
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}

    def loss():
        out = model(input_ids=TOKENS, labels=labels)
        return out.loss + MOLE_BALANCE_ALPHA * mole_balance_loss(model)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < before.detach()
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)


def test_gates_pool_over_the_prompt_and_ignore_padding(library):
    model = tiny_llama()
    attach_mole(model, library)
    _randomize_gates(model)
    model.train()
    labels = TOKENS.clone()
    labels[:, :4] = IGNORE_INDEX
    changed = TOKENS.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 128  # same prompt, different response
    model(input_ids=TOKENS, labels=labels)
    first = [g.record.detach().clone() for g in mole_gates(model)]
    model(input_ids=changed, labels=labels)
    assert all(torch.equal(a, g.record) for a, g in zip(first, mole_gates(model)))
    model.eval()
    with torch.no_grad():  # a left-padded row gates (and predicts) as the prompt alone
        alone = model(input_ids=TOKENS[:1, 3:]).logits[0, -1]
        gates_alone = mole_gates(model)[0].gates.clone()
        mask = torch.ones_like(TOKENS)
        mask[0, :3] = 0
        padded = model(input_ids=TOKENS, attention_mask=mask).logits[0, -1]
        torch.testing.assert_close(mole_gates(model)[0].gates[:1], gates_alone)
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_gates_are_fixed_while_decoding(library):
    model = tiny_llama()
    attach_mole(model, library)
    _randomize_gates(model)
    prompt = TOKENS[:1, :5]
    with torch.no_grad():
        model(input_ids=prompt)
        from_prompt = [g.gates.clone() for g in mole_gates(model)]
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape[1] == 9
        assert all(torch.equal(a, g.gates) for a, g in zip(from_prompt, mole_gates(model)))
        model(input_ids=generated)  # a plain forward of the longer sequence gates on all of it
        assert not torch.equal(from_prompt[0], mole_gates(model)[0].gates)


def test_save_load_is_bit_identical_and_evaluation_loads_it(library, tmp_path):
    model = tiny_llama()
    attach_mole(model, library)
    _randomize_gates(model)
    with torch.no_grad():
        expected = model(TOKENS).logits
    save_adapter(model, AdapterConfig(method="mole", lora_library=library), tmp_path / "mole")
    reloaded = tiny_llama()
    load_adapter(reloaded, tmp_path / "mole")
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, expected)
    folder = write_tiny_model_folder(tmp_path / "base")
    evaluated, _ = load_model_for_eval(folder, str(tmp_path / "mole"))
    assert not evaluated.training and set(adapter_state_dict(evaluated)) == {f"model.layers.{i}.adapter.weight" for i in range(2)}
    for name, tensor in adapter_state_dict(evaluated).items():
        assert torch.equal(tensor, adapter_state_dict(model)[name])


def test_gradient_checkpointing_gives_the_same_gate_gradients(library):
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        attach_mole(model, library)
        _randomize_gates(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(input_ids=TOKENS, labels=TOKENS)
        (out.loss + MOLE_BALANCE_ALPHA * mole_balance_loss(model)).backward()
        grads.append([gate.weight.grad.clone() for gate in mole_gates(model)])
    for plain, checkpointed in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_train_py_trains_mole_gates_and_the_checkpoint_reloads(library, tiny_model_dir, multitask_records, tmp_path):
    from train import main as train_main

    library_dir = tmp_path / "library"
    library_dir.mkdir()
    for index, path in enumerate(library):  # a folder of checkpoints, as the table runner passes it
        (library_dir / f"task{index}").symlink_to(path)
    out = tmp_path / "mole"
    train_main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(multitask_records), "--method", "mole",
                "--lora_library", str(library_dir), "--output_dir", str(out), "--max_steps", "3",
                "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--use_cpu", "--logging_steps", "1"])
    config = AdapterConfig.load(out / "adapter_config.json")
    assert config.is_mole and len(config.lora_library) == 3 and all(Path(p).is_absolute() for p in config.lora_library)
    logged = json.loads((out / "train_summary.json").read_text())["log_history"]
    assert any("mole_balance_loss" in entry for entry in logged)
    model, _ = load_model_for_eval(str(tiny_model_dir), str(out))
    assert set(adapter_state_dict(model)) == {f"model.layers.{i}.adapter.weight" for i in range(2)}
