"""Synthetic instruction records with a given token-length distribution: the training data of a dry run.

A dry run (``train.py --random_init``, ``tables/run_table.py --dry_run``) trains a random-weight model to
measure time and memory; what it learns does not matter, but how many tokens each step carries does. The
records here are strings of single-token words whose prompt and response lengths (in tokens of the given
tokenizer) are drawn from a quantile table:

- prompt: ``<bos>instruction<eos>``, the tokens before the response (``mtlora.prompts.encode_prompts``);
- response: ``output<eos>``.

The built-in table, ``BIGBENCH_POOL``, is the measured distribution of the BIG-bench pool of the small scale
(``data/processed/bigbench/train.jsonl``: 64 tasks, 13,646 records, ``scripts/prepare_small_data.sh``) under
the SmolLM2 tokenizer. It stands in for Flan-v2 and Dolly, the paper scale's training sets, which are not at
hand offline and for which no published token-length distribution was found: a stand-in, not their
distribution. ``--lengths_from FILE`` measures the table from any instruction file instead (e.g. a prepared
Flan-v2 or Dolly ``train.jsonl``); :func:`measure_lengths` is also how the built-in table was made.

Draws between two quantiles are interpolated log-linearly; lengths are capped at ``max_tokens`` (training at
512 tokens keeps at most 512 anyway). Every word is a single token with an id below ``max_token_id`` (the
LLaMA-2 vocabulary of 32,000 by default), so the ids fit a LLaMA-2-shaped model whatever the tokenizer.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.sources import DataSourceError
from mtlora.evaluation.reporting import write_json, write_jsonl
from mtlora.prompts import encode_prompts

QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
# measure_lengths(data/processed/bigbench/train.jsonl, SmolLM2 tokenizer): prompt mean 292, response mean 10.8,
# 10.7% of the records longer than 512 tokens.
BIGBENCH_POOL = {"source": "data/processed/bigbench/train.jsonl (64 BIG-bench tasks, 13,646 records), SmolLM2 "
                           "tokenizer; a stand-in for Flan-v2 / Dolly",
                 "quantiles": QUANTILES,
                 "prompt": (6, 17, 25, 54, 118, 253, 521, 844, 2453, 104367),
                 "response": (2, 2, 2, 2, 4, 11, 25, 41, 92, 846)}
MIN_TOKENS = {"prompt": 3, "response": 2}  # <bos> word <eos>; word <eos>
LLAMA2_VOCABULARY = 32_000


def measure_lengths(records: Sequence[dict], tokenizer, source: str) -> dict:
    """The quantile table of ``records``' prompt and response token counts (the format of BIGBENCH_POOL)."""
    prompts = [len(ids) for ids in encode_prompts(tokenizer, records)]
    responses = [len(tokenizer.encode(r["output"], add_special_tokens=False)) + 1 for r in records]
    return {"source": source, "quantiles": QUANTILES,
            "prompt": tuple(int(round(np.quantile(prompts, q))) for q in QUANTILES),
            "response": tuple(int(round(np.quantile(responses, q))) for q in QUANTILES)}


def draw_length(table: dict, part: str, rng: random.Random, max_tokens: int) -> int:
    """One length from the table's quantiles of ``part`` (log-linear between them), in [MIN_TOKENS, max_tokens]."""
    u, quantiles, values = rng.random(), table["quantiles"], table[part]
    upper = next(i for i in range(1, len(quantiles)) if u <= quantiles[i] or i == len(quantiles) - 1)
    low, high = max(values[upper - 1], 1), max(values[upper], 1)
    share = (u - quantiles[upper - 1]) / max(quantiles[upper] - quantiles[upper - 1], 1e-12)
    length = round(math.exp(math.log(low) + share * (math.log(high) - math.log(low))))
    return min(max(length, MIN_TOKENS[part]), max_tokens)


def single_token_words(tokenizer, max_token_id: int) -> list[str]:
    """Lower-case words that are one token both at the start of a text and after a space, with ids below
    ``max_token_id`` (and above the first 1,000, which hold special and byte tokens)."""
    words = []
    for token, index in tokenizer.get_vocab().items():
        word = token[1:]
        if (1000 <= index < max_token_id and token[:1] in ("Ġ", "▁") and word.isalpha() and word.islower()
                and len(tokenizer.encode(word, add_special_tokens=False)) == 1
                and len(tokenizer.encode(f"{word} {word}", add_special_tokens=False)) == 2
                and max(tokenizer.encode(f"{word} {word}", add_special_tokens=False)) < max_token_id):
            words.append(word)
    if len(words) < 100:
        raise DataSourceError(f"--tokenizer: only {len(words)} single-token words with ids below {max_token_id}; "
                              "a word-piece tokenizer with a word vocabulary (e.g. LLaMA's, SmolLM2's) is needed")
    return sorted(words)


def synthetic_records(tokenizer, count: int, table: dict = BIGBENCH_POOL, num_tasks: int = 8, seed: int = 42,
                      max_tokens: int = 2048, max_token_id: int = LLAMA2_VOCABULARY) -> list[dict]:
    """``count`` records {instruction, input, output, task_type} whose token lengths follow ``table``."""
    words, rng = single_token_words(tokenizer, max_token_id), random.Random(seed)
    special = 1 + (tokenizer.bos_token_id is not None)  # <eos> and, when the tokenizer has one, <bos>
    records = []
    for index in range(count):
        prompt = draw_length(table, "prompt", rng, max_tokens)
        response = draw_length(table, "response", rng, max_tokens)
        records.append({"instruction": " ".join(rng.choices(words, k=max(prompt - special, 1))), "input": "",
                        "output": " ".join(rng.choices(words, k=response - 1)),
                        "task_type": f"synthetic_{index % num_tasks:02d}"})
    return records


def prepare_synthetic(output_dir: str | Path, tokenizer_path: str, num_examples: int, num_tasks: int = 8,
                      seed: int = 42, lengths_from: str | None = None, max_tokens: int = 2048,
                      max_token_id: int = LLAMA2_VOCABULARY) -> dict:
    """Write ``train.jsonl`` and ``tasks.json`` (the table used and the lengths the records have)."""
    from mtlora.loading import load_tokenizer
    from mtlora.training_data import read_instruction_records

    tokenizer = load_tokenizer(tokenizer_path, "--tokenizer")
    table = BIGBENCH_POOL if lengths_from is None else measure_lengths(
        read_instruction_records(lengths_from, "--lengths_from"), tokenizer, str(lengths_from))
    records = synthetic_records(tokenizer, num_examples, table, num_tasks, seed, max_tokens, max_token_id)
    write_jsonl(Path(output_dir) / "train.jsonl", records)
    summary = {"lengths": table, "tokenizer": str(tokenizer_path), "seed": seed, "num_examples": len(records),
               "max_tokens": max_tokens, "max_token_id": max_token_id,
               "measured": measure_lengths(records, tokenizer, "these records"),
               "tasks": dict(sorted(Counter(r["task_type"] for r in records).items()))}
    write_json(Path(output_dir) / "tasks.json", summary)
    return summary
