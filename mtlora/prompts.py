"""The training prompt format, as text and as token ids: one encoder for training and evaluation."""

from __future__ import annotations


def build_training_prompt(instruction: str, input: str = "") -> str:
    """Text before the response, without special tokens: ``instruction[\ninput]`` as in the reference code."""
    return f"{instruction}\n{input}" if input else instruction


def encode_prompt(tokenizer, record: dict) -> list[int]:
    """Token ids of ``{bos}{instruction[\ninput]}{eos}``: what the model sees before its response.

    Built token by token (the text, then the special tokens around it) so training and held-out
    evaluation give the model exactly the same ids.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = build_training_prompt(record["instruction"], record.get("input") or "")
    return bos + tokenizer.encode(prompt, add_special_tokens=False) + [tokenizer.eos_token_id]
