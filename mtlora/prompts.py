"""Prompt text shared by training and held-out evaluation (instruction records).

A record is ``{"instruction", "input", "output", "task_type"}``. As in the reference code, the
training sequence is ``{bos}{prompt}{eos}{output}{eos}`` with ``prompt = instruction[\\ninput]``,
and the loss is on the response only.
"""

from __future__ import annotations


def build_training_prompt(instruction: str, input: str) -> str:  # noqa: A002 - the record's field name
    """The text before the response, without special tokens: instruction, plus "\\n" + input if any."""
    return f"{instruction}\n{input}" if input else instruction


def build_generation_text(instruction: str, input: str, bos_token: str | None, eos_token: str | None) -> str:  # noqa: A002
    """What the model reads before it must produce the response: ``{bos}{prompt}{eos}``."""
    return f"{bos_token or ''}{build_training_prompt(instruction, input)}{eos_token or ''}"
