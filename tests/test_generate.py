"""generate.py: batched answers equal one-at-a-time answers (base, LoRA, MoLE); bad input fails before loading."""

from __future__ import annotations

import json

import pytest
import torch

import generate
import mtlora.loading
from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig
from mtlora.injection import attach_adapters
from mtlora.mole import mole_gates
from tests.helpers import tiny_llama, write_lora_checkpoint, write_tiny_model_folder

RECORDS = [
    {"instruction": "Reverse the order of these words.", "input": "stone river cloud", "task_type": "reverse"},
    {"instruction": "Say yes.", "input": ""},
    {"prompt": "Which word comes first alphabetically? apple ocean music table green"},
    {"instruction": "Write these words in upper case.", "input": "paper light"},
    {"prompt": "Hi"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = write_tiny_model_folder(root / "model")
    lora = write_lora_checkpoint(root / "lora", seed=1)
    library = [write_lora_checkpoint(root / f"library{i}", seed=10 + i) for i in range(3)]
    gated = attach_adapters(tiny_llama(), AdapterConfig(method="mole", lora_library=library))
    for gate in mole_gates(gated):
        torch.nn.init.normal_(gate.weight, std=3.0)
    save_adapter(gated, AdapterConfig(method="mole", lora_library=library), root / "mole")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {"root": root, "model": model, "lora": lora, "mole": str(root / "mole"), "prompts": str(prompts)}


def _generate(setup, tmp_path, name: str, *extra: str) -> list[dict]:
    out = tmp_path / f"{name}.jsonl"
    generate.main(["--model_name_or_path", setup["model"], "--max_new_tokens", "6", "--output", str(out), *extra])
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("adapter", [None, "lora", "mole"])
def test_batched_answers_equal_one_at_a_time(setup, tmp_path, adapter):
    checkpoint = ["--lora_checkpoint", setup[adapter]] if adapter else []
    batched = _generate(setup, tmp_path, "batched", "--prompts_file", setup["prompts"], "--batch_size", "3", *checkpoint)
    assert [{k: v for k, v in line.items() if k != "generation"} for line in batched] == RECORDS
    single = _generate(setup, tmp_path, "single", "--prompts_file", setup["prompts"], "--batch_size", "1", *checkpoint)
    assert [line["generation"] for line in batched] == [line["generation"] for line in single]
    assert len({line["generation"] for line in batched}) > 1  # real, prompt-dependent text
    one = _generate(setup, tmp_path, "one", "--prompt", RECORDS[4]["prompt"], *checkpoint)
    assert one == [batched[4]]


def test_an_adapter_changes_the_answers(setup, tmp_path):
    base = _generate(setup, tmp_path, "base", "--prompts_file", setup["prompts"])
    for adapter in ("lora", "mole"):
        adapted = _generate(setup, tmp_path, adapter, "--prompts_file", setup["prompts"], "--lora_checkpoint", setup[adapter])
        assert [line["generation"] for line in adapted] != [line["generation"] for line in base]


@pytest.mark.parametrize("case, message", [
    ("bad_line", "prompts.jsonl:2: expected an object with a string \"instruction\""),
    ("bad_json", "prompts.jsonl:1: invalid JSON"),
    ("missing_file", "--prompts_file .*: no such file"),
    ("missing_checkpoint", "--lora_checkpoint .*nothing: expected a folder with adapter_model.safetensors"),
    ("missing_model", "--model_name_or_path .*nowhere: no such file or folder"),
])
def test_bad_input_fails_before_loading_the_model(setup, tmp_path, monkeypatch, case, message):
    class Forbidden:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the model was loaded")

    monkeypatch.setattr(mtlora.loading, "AutoModelForCausalLM", Forbidden)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text({"bad_line": '{"prompt": "ok"}\n{"input": "no instruction"}\n', "bad_json": "{oops\n"}.get(case, ""))
    args = ["--prompts_file", str(prompts) if case in ("bad_line", "bad_json") else setup["prompts"],
            "--model_name_or_path", setup["model"]]
    if case == "missing_file":
        args[1] = str(tmp_path / "none.jsonl")
    if case == "missing_checkpoint":
        args += ["--lora_checkpoint", str(tmp_path / "nothing")]
    if case == "missing_model":
        args[3] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=message):
        generate.main(args)
