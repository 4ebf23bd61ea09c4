"""Batched greedy generation and next-token scoring for decoder-only models.

Both evaluators tokenise their prompts (:func:`mtlora.prompts.encode_batch`) and hand token-id lists here, with a
group per prompt (its BBH task or MMLU subject). Within a group the prompts share their few-shot
exemplars: the longest common prefix of their token ids is run once and its keys and values are
reused for every row (:mod:`mtlora.evaluation.prefix`), so each row only runs its own suffix.
Suffixes are sorted by length (longest first, so an out-of-memory error shows up on the first
batch) and left-padded, so every row ends at the last position: the next-token logits are column
-1 for every row, and generation appends after the real tokens. Results come back in the caller's
order.

Left padding shifts positions, so position ids are computed from the attention mask (first real
token at position 0, or the prefix length with a shared prefix), which makes a padded row
numerically match the same prompt run alone. Generation is a greedy loop that drops a row from the
batch once it has ended (EOS, or one of ``stop_strings`` when given).

``batch_size=None`` picks it automatically: it starts large on a GPU and halves on out-of-memory.
Under ``torchrun`` / ``accelerate launch`` the rows are split across processes and the results
gathered on every process (:mod:`mtlora.evaluation.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput
from mtlora.evaluation import distributed
from mtlora.evaluation.prefix import PrefixRunner, common_prefix_length, rows_are_independent

TRUNCATIONS = ("reference", "fit")  # over-long prompts: cut on the right at 2,048 / fit the context (see bbh, mmlu)
REFERENCE_MAX_LENGTH = 2048  # the reference scripts' tokenizer max_length (truncation on the right)
AUTO_BATCH_START = {"cuda": 1024, "cpu": 8}  # rows per batch that batch_size=None starts from
MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a separate forward pass


@dataclass
class NextTokenScores:
    """Per prompt: the greedy next token id and the log-probabilities of candidate token ids."""

    greedy_ids: list[int]
    candidate_logprobs: list[list[float]]


# ------------------------------------------------------------------------------------------- tokens

def truncate_left(ids: Sequence[int], max_length: int, keep_first: int | None = None) -> list[int]:
    """Keep the last ``max_length`` tokens; ``keep_first`` (e.g. the BOS id) stays in front if it led."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if keep_first is not None and ids and ids[0] == keep_first:
        return [keep_first] + ids[len(ids) - max_length + 1:]
    return ids[len(ids) - max_length:]


def truncate_right(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first ``max_length`` tokens: the tokenizer's ``truncation=True, max_length=...`` (its
    default side), which keeps the BOS and may cut the end of the prompt."""
    return list(ids)[:max_length]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id (any id works under the mask; fall back to EOS, then 0)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends generation: the model's generation config and the tokenizer's EOS."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = ids + [tokenizer.eos_token_id]
    return sorted({int(i) for i in ids if i is not None})


# ----------------------------------------------------------------------------------------- batches

@dataclass
class PromptGroup:
    """Rows that share ``prefix`` (token ids, possibly empty), longest remaining suffix first."""

    prefix: list[int]
    rows: list[int]


def group_prompts(prompts: Sequence[Sequence[int]], groups: Sequence[Hashable] | None, rows: Sequence[int],
                  share_prefix: bool) -> list[PromptGroup]:
    """``rows`` of ``prompts`` by group (in order of first appearance), each with its shared prefix.

    The prefix is the longest common prefix of the group's token ids, leaving at least one token per
    row; it is used only when ``share_prefix`` and at least ``MIN_SHARED_PREFIX`` tokens long.
    """
    members: dict[Hashable, list[int]] = {}
    for row in rows:
        members.setdefault(0 if groups is None else groups[row], []).append(row)
    planned = []
    for group_rows in members.values():
        length = common_prefix_length([prompts[r] for r in group_rows]) if share_prefix else 0
        prefix = list(prompts[group_rows[0]][:length]) if length >= MIN_SHARED_PREFIX else []
        group_rows.sort(key=lambda r: (-len(prompts[r]), r))
        planned.append(PromptGroup(prefix, group_rows))
    return planned


def _run_batched(model: PreTrainedModel, prompts: Sequence[Sequence[int]], groups: Sequence[Hashable] | None,
                 batch_size: int | None, share_prefix: bool, desc: str,
                 run: Callable[[PrefixRunner, list[list[int]]], list]) -> list:
    """``run(runner, suffixes)`` over batches of this process's rows; every process gets all results in order.

    ``batch_size=None``: start at ``AUTO_BATCH_START`` rows and halve on out-of-memory (kept for later batches).
    """
    if batch_size is not None and batch_size < 1:
        raise InvalidInput(f"--batch_size must be >= 1 or auto, got {batch_size}")
    size = batch_size or AUTO_BATCH_START["cuda" if model.device.type == "cuda" else "cpu"]
    independent = rows_are_independent(model)
    mine = distributed.shard(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    sliding = getattr(model.config, "sliding_window", None)  # a window would need the prefix cache to slide too
    plan = group_prompts(prompts, groups, mine, share_prefix and independent and not sliding)
    results: dict[int, object] = {}
    with tqdm(total=len(prompts), desc=desc, unit="ex", disable=not distributed.is_main()) as progress:
        for group in plan:
            runner = PrefixRunner(model, group.prefix, drop_finished=independent)
            start = 0
            while start < len(group.rows):
                rows = group.rows[start:start + size]
                try:
                    outputs = run(runner, [prompts[r][len(group.prefix):] for r in rows])
                except torch.OutOfMemoryError:
                    if batch_size is not None or size == 1:
                        raise
                    outputs = None  # leave the except block first, so the failed batch's tensors can be freed
                if outputs is None:
                    size //= 2
                    runner.release_memory()
                    continue
                results.update(zip(rows, outputs, strict=True))
                start += len(rows)
                progress.update(len(rows) * distributed.world_size())
    return distributed.gather(results, len(prompts))


# ---------------------------------------------------------------------------------------- scoring

@torch.inference_mode()
def next_token_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      prompts: Sequence[Sequence[int]], candidate_ids: Sequence[int],
                      batch_size: int | None = 8, desc: str = "score", groups: Sequence[Hashable] | None = None,
                      share_prefix: bool = True) -> NextTokenScores:
    """One forward pass per batch: greedy next token and log-probs of ``candidate_ids``.

    The greedy id is the argmax of the full-vocabulary next-token logits, i.e. exactly what greedy
    generation of one token would produce; the log-probs are normalised over the full vocabulary.
    ``groups`` (one key per prompt) says which prompts may share a prefix.
    """
    pad_id = pad_token_id(tokenizer)
    candidates = torch.tensor(list(candidate_ids), dtype=torch.long)

    def score(runner: PrefixRunner, suffixes: list[list[int]]) -> list[tuple[int, list[float]]]:
        logits = runner.last_logits(suffixes, pad_id)  # (batch, vocab), float32
        logprobs = torch.log_softmax(logits, dim=-1)[:, candidates.to(logits.device)].cpu()
        return list(zip(logits.argmax(-1).tolist(), logprobs.tolist()))

    scored = _run_batched(model, prompts, groups, batch_size, share_prefix, desc, score)
    return NextTokenScores(greedy_ids=[g for g, _ in scored], candidate_logprobs=[lp for _, lp in scored])


@torch.inference_mode()
def score_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, inputs: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], batch_size: int | None = 8,
                        desc: str = "score continuations") -> list[list[tuple[float, bool]]]:
    """Per input (token ids), per continuation scored on it: (sum of the continuation's log-probabilities, whether
    greedy decoding would produce it). ``inputs[i]`` is context + continuation without the continuation's last token,
    so a continuation of n tokens is predicted by the input's last n positions; inputs shared by several continuations
    (one-token answers to one prompt) run once. Log-probabilities are normalised over the full vocabulary; only the
    positions a continuation needs get logits."""
    pad_id = pad_token_id(tokenizer)
    wanted = {tuple(ids): conts for ids, conts in zip(inputs, continuations, strict=True)}
    if len(wanted) != len(inputs):
        raise ValueError("score_continuations: inputs must be distinct (list every continuation of an input once)")

    def score(runner: PrefixRunner, suffixes: list[list[int]]) -> list[list[tuple[float, bool]]]:
        needed = [wanted[tuple(ids)] for ids in suffixes]
        keep = max(len(cont) for conts in needed for cont in conts)
        logprobs = torch.log_softmax(runner.last_logits(suffixes, pad_id, keep=keep), dim=-1)  # (rows, keep, vocab)
        owners = [(row, cont) for row, conts in enumerate(needed) for cont in conts]
        index = [(row, keep - len(cont) + j, token, k) for k, (row, cont) in enumerate(owners)
                 for j, token in enumerate(cont)]
        rows, positions, tokens, owner = (torch.tensor(column) for column in zip(*index))
        device = logprobs.device
        picked = logprobs[rows.to(device), positions.to(device), tokens.to(device)].cpu()  # one gather for the batch
        totals = torch.zeros(len(owners), dtype=torch.float64).index_add_(0, owner, picked.double()).tolist()
        greedy = logprobs.argmax(-1).cpu().tolist()  # (rows, keep)
        scored: list[list[tuple[float, bool]]] = [[] for _ in needed]
        for k, (row, cont) in enumerate(owners):
            scored[row].append((totals[k], greedy[row][keep - len(cont):] == list(cont)))
        return scored

    return _run_batched(model, inputs, None, batch_size, False, desc, score)


# -------------------------------------------------------------------------------------- generation

@torch.inference_mode()
def generate_batched(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, batch_size: int | None = 8,
                     desc: str = "generate", groups: Sequence[Hashable] | None = None, share_prefix: bool = True,
                     stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy continuations of token-id prompts, decoded up to (excluding) the first EOS.

    With ``stop_strings`` a row also ends at the first of them, and its text is cut before it.
    """
    eos_ids = set(eos_token_ids(model, tokenizer))
    pad_id = pad_token_id(tokenizer)

    def ended(tokens: list[int]) -> bool:
        return bool(stop_strings) and any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop_strings)

    def generate(runner: PrefixRunner, suffixes: list[list[int]]) -> list[str]:
        new_tokens = runner.greedy(suffixes, pad_id, max_new_tokens, eos_ids, ended)
        return [cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop_strings) for tokens in new_tokens]

    return _run_batched(model, prompts, groups, batch_size, share_prefix, desc, generate)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest of ``stop_strings``."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[:min(cuts)] if cuts else text
