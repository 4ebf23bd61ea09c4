"""The training prompt format, as text and as token ids: one encoder for training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence


def encode_batch(tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of ``texts`` (special tokens added as ``tokenizer(text, add_special_tokens=...)`` adds them), in
    one call.

    A fast tokenizer's Rust backend encodes the whole list in parallel, without the offsets the Python
    wrapper asks for; its ids are checked against ``tokenizer(text)`` on the first text and the wrapper
    is used instead if they differ.
    """
    texts = list(texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        ids = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        if ids[0] == list(tokenizer(texts[0], add_special_tokens=add_special_tokens).input_ids):
            return ids
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens).input_ids]


def build_training_prompt(instruction: str, input: str = "") -> str:
    """Text before the response, without special tokens: ``instruction[\ninput]`` as in the reference code."""
    return f"{instruction}\n{input}" if input else instruction


def encode_prompts(tokenizer, records: Sequence[dict]) -> list[list[int]]:
    """Per record, the token ids of ``{bos}{instruction[\ninput]}{eos}``: what the model sees before its response.

    Built token by token (the text, then the special tokens around it) so training and held-out
    evaluation give the model exactly the same ids; the texts are encoded in one batch.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    texts = [build_training_prompt(r["instruction"], r.get("input") or "") for r in records]
    return [bos + ids + [tokenizer.eos_token_id] for ids in encode_batch(tokenizer, texts, add_special_tokens=False)]
