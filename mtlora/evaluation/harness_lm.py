"""lm-eval's ``HFLM`` whose greedy generation and log-likelihood scoring run on this package's batched paths.

lm-eval's own loop generates a batch with transformers' ``generate`` until every row of it has met a stop string,
so one long answer keeps the whole batch decoding (up to 256 tokens for ``bbh_fewshot``), and every row recomputes
its task's few-shot exemplars. :func:`mtlora.evaluation.batching.generate_batched` drops each row as it ends and
runs a task's shared exemplar prefix once. The requests, their encoding (lm-eval's own ``tok_batch_encode``, left-
truncated to leave room for ``max_gen_toks``), the stop strings (lm-eval's ``until`` plus the EOS text), the token
budget and the post-processing (:func:`lm_eval.models.utils.postprocess_generated_text`) are lm-eval's, so in
float32 the generations equal lm-eval's loop's (tested); in bf16 batch composition changes rounding, as for every
batched evaluator. Sampling, "thinking" models and lm-eval's own multi-process split fall back to lm-eval's loop.

Log-likelihood requests keep lm-eval's encoding (``loglikelihood`` -> ``_encode_pair``) and are scored by
:func:`mtlora.evaluation.batching.score_continuations`: multiple-choice answers of one token share one forward pass,
and only continuation positions are projected to the vocabulary, so batches can be large. Scores equal lm-eval's up to
float rounding (tested).
"""

from __future__ import annotations

import json

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from mtlora.evaluation.batching import generate_batched, score_continuations


class BatchedLM(HFLM):
    """``HFLM`` whose greedy generation is batched per task with a shared exemplar prefix and whose log-likelihood
    requests are scored in large batches.

    ``rows_per_batch``: rows per forward batch (None: automatic, halving on out-of-memory).
    """

    def __init__(self, *args, rows_per_batch: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_per_batch = rows_per_batch

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        settings = [normalize_gen_kwargs(request.args[1], self.max_gen_toks) for request in requests]
        if (self.backend != "causal" or self.world_size > 1 or self.think_end_token is not None
                or any(s.get("do_sample") for s in settings)):
            return super().generate_until(requests, disable_tqdm)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        plans: dict[str, list[int]] = {}  # requests with the same stop strings and token budget, in request order
        for index, kwargs in enumerate(settings):
            plans.setdefault(json.dumps([kwargs.get("until"), kwargs["max_gen_toks"]], default=str), []).append(index)
        results: list[str | None] = [None] * len(requests)
        for indices in plans.values():
            kwargs = settings[indices[0]]
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            budget = kwargs["max_gen_toks"]
            prompts = [self._context_ids(requests[i].args[0], self.max_length - budget) for i in indices]
            texts = generate_batched(self.model, self.tokenizer, prompts, budget, self.rows_per_batch,
                                     desc="lm-eval generate_until", groups=[requests[i].task_name for i in indices],
                                     stop_strings=[s for s in until if s])
            for i, text in zip(indices, texts, strict=True):
                results[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """lm-eval's (context ids, continuation ids) requests scored by :func:`score_continuations`: the same input
        (context + continuation without its last token, cut from the left to the model's length, as lm-eval
        does) runs once for all its continuations, and only the continuation positions get log-probabilities
        (lm-eval computes them over the vocabulary for every position, which caps its batch)."""
        if self.backend != "causal" or self.world_size > 1:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        inputs: dict[tuple[int, ...], list[list[int]]] = {}
        keys = []
        for _, context_enc, continuation_enc in requests:
            key = tuple((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            inputs.setdefault(key, []).append(continuation_enc)
            keys.append(key)
        scores = score_continuations(self.model, self.tokenizer, list(inputs), list(inputs.values()),
                                     self.rows_per_batch, desc="lm-eval loglikelihood")
        by_input = {key: iter(result) for key, result in zip(inputs, scores, strict=True)}
        results = [next(by_input[key]) for key in keys]  # each input's continuations in request order
        for (request, _, _), answer in zip(requests, results, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def _context_ids(self, context: str, max_context: int) -> list[int]:
        """The context's token ids as lm-eval's generation loop encodes them (special tokens, left truncation)."""
        input_ids, _ = self.tok_batch_encode([context], left_truncate_len=max_context, truncation=self.truncation)
        return input_ids[0].tolist()
