"""Length-sorted, left-padded batched generation and next-token scoring for decoder-only models.

Both evaluators tokenise their prompts once and hand token-id lists here. Prompts are sorted by
length (longest first, so an out-of-memory error shows up on the first batch) and left-padded, so
every prompt ends at the last position: the next-token logits are then column -1 for every row,
and generation appends after the real tokens. Results come back in the caller's order.

Left padding shifts positions, so position ids are computed from the attention mask (first real
token at position 0), which makes a padded row numerically match the same prompt run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput


@dataclass
class NextTokenScores:
    """Per prompt: the greedy next token id and the log-probabilities of candidate token ids."""

    greedy_ids: list[int]
    candidate_logprobs: list[list[float]]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    if batch_size < 1:
        raise InvalidInput(f"--batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), padded on the left."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting from 0 at each row's first real token (padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def truncate_left(ids: Sequence[int], max_length: int, keep_first: int | None = None) -> list[int]:
    """Keep the last ``max_length`` tokens; ``keep_first`` (e.g. the BOS id) stays in front if it led."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if keep_first is not None and ids and ids[0] == keep_first:
        return [keep_first] + ids[len(ids) - max_length + 1:]
    return ids[len(ids) - max_length:]


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


@torch.inference_mode()
def generate_batched(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, batch_size: int = 8,
                     desc: str = "generate") -> list[str]:
    """Greedy continuations of token-id prompts, decoded up to (excluding) the first EOS."""
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    # A fresh config so sampling defaults shipped with a model cannot leak into greedy decoding.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=eos_ids)
    outputs: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="ex") as progress:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad_id)
            generated = model.generate(input_ids=input_ids.to(model.device),
                                       attention_mask=attention_mask.to(model.device),
                                       generation_config=config)
            for row, index in enumerate(batch):
                new_tokens = _until_eos(generated[row, input_ids.shape[1]:].tolist(), eos_ids)
                outputs[index] = tokenizer.decode(new_tokens, skip_special_tokens=True)
            progress.update(len(batch))
    return outputs


def _until_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


@torch.inference_mode()
def next_token_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      prompts: Sequence[Sequence[int]], candidate_ids: Sequence[int],
                      batch_size: int = 8, desc: str = "score") -> NextTokenScores:
    """One forward pass per batch: greedy next token and log-probs of ``candidate_ids``.

    The greedy id is the argmax of the full-vocabulary next-token logits, i.e. exactly what greedy
    generation of one token would produce; the log-probs are normalised over the full vocabulary.
    """
    pad_id = pad_token_id(tokenizer)
    candidates = torch.tensor(list(candidate_ids), dtype=torch.long)
    greedy: list[int] = [0] * len(prompts)
    logprobs: list[list[float]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="ex") as progress:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad_id)
            logits = model(input_ids=input_ids.to(model.device),
                           attention_mask=attention_mask.to(model.device),
                           position_ids=position_ids_from_mask(attention_mask).to(model.device),
                           use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
            batch_logprobs = torch.log_softmax(logits, dim=-1).cpu()
            for row, index in enumerate(batch):
                greedy[index] = int(logits[row].argmax())
                logprobs[index] = batch_logprobs[row, candidates].tolist()
            progress.update(len(batch))
    return NextTokenScores(greedy_ids=greedy, candidate_logprobs=logprobs)
