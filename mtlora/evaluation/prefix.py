"""Forward passes over prompts that share a prefix: the prefix runs once, its keys and values serve every row.

The few-shot prompts of one BBH task or MMLU subject share their exemplars. The shared part is found in
token space (the longest common prefix of the prompts' token ids, so tokenisation never changes), run
once with batch 1, and its per-layer keys and values are broadcast over the rows of each batch, which
only run their own suffix. Attention sees the same keys at the same positions as in a full forward pass;
the adapters of this package act per token, so they see the same inputs too. MoLE's gates pool over the
whole prompt, so models carrying them always run whole prompts (:func:`rows_are_independent`).

Without a prefix (``prefix=[]``) the runner does ordinary left-padded forward passes. Generation keeps its keys and
values in buffers allocated once per batch (:class:`PreallocatedLayer`), written in place at every step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token-id lists, leaving at least one token in each."""
    if not prompts:
        return 0
    first = prompts[0]
    length = min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first[:length], other)) if a != b), length))
    return max(length, 0)


def rows_are_independent(model: PreTrainedModel) -> bool:
    """False when a module keeps per-sequence state across forward passes: MoLE's gates pool over the whole
    prompt and are reused while decoding, so a prefix run apart, or a row dropped from the batch, would change them."""
    from mtlora.mole import MoleGate

    return not any(isinstance(module, MoleGate) for module in model.modules())


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


def cache_keyword(model: PreTrainedModel) -> str:
    """The model's keyword for the KV cache (``cache`` in newer transformers, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SharedPrefixLayer(DynamicLayer):
    """One layer's prefix keys/values (batch 1), joined to each forward's new ones without being stored.

    For a single forward pass (scoring): the prefix is broadcast over the rows only inside the layer that
    uses it, so memory holds one layer's expanded prefix at a time instead of all of them.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows = key_states.shape[0]
        return (torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2))


class PreallocatedLayer(DynamicLayer):
    """One layer's keys/values in buffers allocated once for a whole generation, (rows, heads, capacity, dim): each
    forward writes its new keys and values in place and attention reads a view of the filled part.

    A DynamicLayer concatenates instead, copying the whole cache at every decoding step: at LLaMA-2-7B shape, batch 64
    and 1,000-token prompts about 33 GB per step, more than the weights the step reads. ``keys`` / ``values``: a
    shared prefix (1, heads, length, dim), written into every row's buffer.
    """

    def __init__(self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 rows: int = 1):
        super().__init__()
        self.capacity, self.length = capacity, 0
        if keys is not None:
            self.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full ({end} needed)")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        return self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()


class PrefixRunner:
    """Runs batches of suffixes after one shared ``prefix`` (token ids; may be empty).

    ``drop_finished``: generation removes ended rows from the batch (see :func:`rows_are_independent`).
    """

    def __init__(self, model: PreTrainedModel, prefix: Sequence[int], drop_finished: bool = True):
        self.model, self.prefix, self.drop_finished = model, list(prefix), drop_finished
        self.cache_kw = cache_keyword(model)
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------ the shared prefix
    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of the prefix, each (1, kv_heads, prefix_len, head_dim); computed once."""
        if self._prefix_kv is None:
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([self.prefix], device=self.model.device)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                       **{self.cache_kw: cache})
            self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv

    def release_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _cache(self, rows: int, capacity: int | None) -> DynamicCache | None:
        """A cache holding the prefix for ``rows`` rows: in buffers of ``capacity`` positions (generation), or, with
        ``capacity`` None, joined to each layer's new keys without being stored (scoring)."""
        if capacity is None and not self.prefix:
            return None
        cache = DynamicCache(config=self.model.config)
        if capacity is None:
            cache.layers = [SharedPrefixLayer(k, v) for k, v in self.prefix_kv()]
        elif self.prefix:
            cache.layers = [PreallocatedLayer(capacity, k, v, rows) for k, v in self.prefix_kv()]
        else:
            cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
        return cache

    # ---------------------------------------------------------------------------------- forward passes
    def _first_pass(self, suffixes: Sequence[Sequence[int]], pad_id: int, new_tokens: int | None = None,
                    keep: int = 1):
        """Run the left-padded suffixes: (the last ``keep`` positions' logits (rows, keep, vocab) float32, cache, mask,
        last positions). With ``new_tokens`` (generation) the cache keeps room for that many more positions."""
        device = self.model.device
        input_ids, suffix_mask = left_pad(suffixes, pad_id)
        offset = len(self.prefix)
        mask = torch.cat([torch.ones(len(suffixes), offset, dtype=torch.long), suffix_mask], dim=1).to(device)
        positions = (position_ids_from_mask(suffix_mask) + offset).to(device)
        capacity = None if new_tokens is None else offset + input_ids.shape[1] + new_tokens
        cache = self._cache(len(suffixes), capacity)
        logits = self.model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions,
                            use_cache=cache is not None, logits_to_keep=keep, **{self.cache_kw: cache}).logits
        return logits[:, -keep:, :].float(), cache, mask, positions[:, -1]

    def last_logits(self, suffixes: Sequence[Sequence[int]], pad_id: int, keep: int | None = None) -> torch.Tensor:
        """(rows, vocab) float32 next-token logits after prefix + each suffix; with ``keep``, those of the last
        ``keep`` positions, (rows, keep, vocab) (every row ends at the last one: left padding)."""
        logits = self._first_pass(suffixes, pad_id, keep=keep or 1)[0]
        return logits[:, -1] if keep is None else logits

    def greedy(self, suffixes: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int, eos_ids: set[int],
               ended: Callable[[list[int]], bool]) -> list[list[int]]:
        """Greedy new tokens per row, up to (excluding) EOS, or until ``ended(tokens)``."""
        logits, cache, mask, last_position = self._first_pass(suffixes, pad_id, max_new_tokens)
        logits = logits[:, -1]
        new_tokens: list[list[int]] = [[] for _ in suffixes]
        finished: set[int] = set()
        active = list(range(len(suffixes)))  # rows of ``suffixes`` in the batch, in batch order
        for step in range(max_new_tokens):
            next_ids = logits.argmax(-1)  # (len(active),)
            for row, token in zip(active, next_ids.tolist(), strict=True):
                if row in finished:
                    continue
                if token in eos_ids:
                    finished.add(row)
                    continue
                new_tokens[row].append(token)
                if ended(new_tokens[row]):
                    finished.add(row)
            if len(finished) == len(suffixes) or step == max_new_tokens - 1:
                break
            if self.drop_finished and finished.intersection(active):
                keep = [position for position, row in enumerate(active) if row not in finished]
                index = torch.tensor(keep, device=next_ids.device)
                cache.batch_select_indices(index)
                next_ids, mask, last_position = next_ids[index], mask[index], last_position[index]
                active = [active[position] for position in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            last_position = last_position + 1
            logits = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=last_position[:, None],
                                use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}).logits[:, -1, :].float()
        return new_tokens
