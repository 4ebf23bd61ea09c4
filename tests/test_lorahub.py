"""LoRAHub composition: exact at one-hot weights, the search improves on its start, the result reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compose_lorahub import main as compose_main
from mtlora.checkpoint import load_adapter_weights, save_adapter
from mtlora.config import AdapterConfig
from mtlora.injection import adapter_modules, attach_adapters
from mtlora.loading import load_model_for_eval
from mtlora.library import read_lora_modules
from mtlora.lorahub import bbh_exemplar_examples, compose_lora_modules, minimize_cma, records_to_examples, set_composition
from tests.helpers import requires_smollm2, tiny_llama, write_lora_checkpoint

LORA = AdapterConfig(method="lora", lora_rank=4)
TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _lora_checkpoint(folder, seed: int, config: AdapterConfig = LORA, vocab_size: int = 128) -> str:
    return write_lora_checkpoint(folder, seed, config, vocab_size=vocab_size)


def test_one_hot_weights_reproduce_a_module_exactly(tmp_path):
    first, second = _lora_checkpoint(tmp_path / "a", 1), _lora_checkpoint(tmp_path / "b", 2)
    _, modules = read_lora_modules([first, second])
    composed = attach_adapters(tiny_llama(), LORA).eval()
    set_composition(composed, modules, [1.0, 0.0])
    reference = attach_adapters(tiny_llama(), LORA).eval()
    load_adapter_weights(reference, first)
    with torch.no_grad():
        assert torch.equal(composed(TOKENS).logits, reference(TOKENS).logits)
        set_composition(composed, modules, [0.5, 0.5])
        assert not torch.equal(composed(TOKENS).logits, reference(TOKENS).logits)


def test_search_beats_the_uniform_start_and_is_deterministic():
    target = np.array([0.9, -0.6, 0.2, 1.3])

    def objective(w):
        return float(np.sum((w - target) ** 2))

    start = np.full(4, 0.25)
    best, value, history = minimize_cma(objective, start, budget=40, seed=7)
    assert len(history) == 40 and history[0][1] == objective(start)
    assert value < 0.5 * objective(start) and value == objective(best)
    assert all(np.all(np.abs(x) <= 1.5) for x, _ in history)
    again, _, _ = minimize_cma(objective, start, budget=40, seed=7)
    assert np.array_equal(best, again)


def test_modules_must_be_compatible_lora(tmp_path):
    lora = _lora_checkpoint(tmp_path / "a", 1)
    with pytest.raises(ValueError, match="--lora_checkpoints .*lora_rank"):
        read_lora_modules([lora, _lora_checkpoint(tmp_path / "b", 2, AdapterConfig(method="lora", lora_rank=2))])
    with pytest.raises(ValueError, match="expected a --method lora adapter, got hydralora"):
        read_lora_modules([lora, _lora_checkpoint(tmp_path / "c", 3, AdapterConfig(method="hydralora", lora_nums=2))])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny LLaMA with the SmolLM2 tokenizer, three LoRA modules and a 2-task BBH folder."""
    root = tmp_path_factory.mktemp("lorahub")
    modules = [_lora_checkpoint(root / f"lora{i}", 10 + i, vocab_size=len(tokenizer)) for i in range(3)]
    (root / "bbh").mkdir()
    for task in ("navigate", "web_of_lies"):
        items = [{"input": f"{task} question {k}?", "target": "Yes" if k % 2 else "No"} for k in range(5)]
        (root / "bbh" / f"{task}.json").write_text(json.dumps(items))
    return {"root": root, "model": str(tiny_model_dir), "modules": modules, "tokenizer": tokenizer}


@requires_smollm2
def test_bbh_exemplars_use_the_eval_prompt_without_their_own_answer(tiny):
    examples = bbh_exemplar_examples(tiny["root"] / "bbh", tiny["tokenizer"])
    assert len(examples) == 6  # 3 exemplars x 2 tasks; items 3 and 4 are never used
    first = examples[0]
    prompt = tiny["tokenizer"].decode([t for t, y in zip(first["input_ids"], first["labels"]) if y == -100])
    target = tiny["tokenizer"].decode([y for y in first["labels"] if y != -100])
    assert prompt.endswith("Q: navigate question 0?\nA:") and "Q: navigate question 1?\nA: Yes\n\n" in prompt
    assert prompt.count("navigate question 0") == 1 and target == " No"


def _fitted_lora(folder, model_dir: str, examples: list[dict], tokenizer, steps: int = 30) -> str:
    """A LoRA module trained for a few steps on ``examples``: composing it can lower their loss."""
    from mtlora.loading import load_base_model
    from mtlora.training_data import PaddingCollator

    model = attach_adapters(load_base_model(model_dir), LORA).train()
    torch.nn.init.normal_(adapter_modules(model)["model.layers.0.self_attn.q_proj.adapter"].lora_B, std=0.01)
    batch = PaddingCollator(tokenizer.pad_token_id)([{**e, "task_id": 0} for e in examples])
    batch.pop("task_ids")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    save_adapter(model, LORA, folder)
    return str(folder)


def test_compose_improves_the_loss_and_reloads_for_evaluation(tiny, tmp_path):
    from mtlora.loading import load_base_model

    records = [{"instruction": "Say yes.", "input": "", "output": "Yes", "task_type": "t"}] * 4
    examples = records_to_examples(records, tiny["tokenizer"], 64)
    modules = [_fitted_lora(tmp_path / "fitted", tiny["model"], examples, tiny["tokenizer"]), *tiny["modules"][:2]]
    model, trace = load_base_model(tiny["model"]), []
    weights, config = compose_lora_modules(model, modules, examples, tiny["tokenizer"], budget=12, seed=0,
                                           trace=trace)
    assert len(weights) == 3 and len(trace) == 12 and config.method == "lora"
    assert trace[0]["weights"] == [0.0, 0.0, 0.0]
    assert min(t["objective"] for t in trace) < trace[0]["objective"]  # a strict improvement on the start
    # found through the module that fits the examples (A and B are both scaled, so w and -w give one update)
    assert abs(weights[0]) > 0.1
    save_adapter(model, config, tmp_path / "composed")
    reloaded, _ = load_model_for_eval(tiny["model"], str(tmp_path / "composed"))
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model.eval()(TOKENS).logits)


@requires_smollm2
def test_cli_writes_checkpoint_and_summary(tiny, tmp_path):
    out = tmp_path / "hub"
    compose_main(["--lora_checkpoints", ",".join(tiny["modules"]), "--fewshot_from_bbh", str(tiny["root"] / "bbh"),
                  "--budget", "6", "--output_dir", str(out), "--model_name_or_path", tiny["model"]])
    summary = json.loads((out / "lorahub_summary.json").read_text())
    assert len(summary["weights"]) == 3 and len(summary["trace"]) == 6 and summary["num_examples"] == 6
    assert summary["best_objective"] == min(t["objective"] for t in summary["trace"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    with pytest.raises(SystemExit, match="--fewshot_path .*no such file"):
        compose_main(["--lora_checkpoints", tiny["modules"][0], "--fewshot_path", str(tmp_path / "none.jsonl"),
                      "--output_dir", str(out), "--model_name_or_path", tiny["model"]])
