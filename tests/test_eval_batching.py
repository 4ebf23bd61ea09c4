"""The batched runner: batch tokenisation, shared exemplar prefixes, per-row stopping, automatic batch sizes and
process sharding all give the same outputs as running each prompt alone."""

from __future__ import annotations

import json
import os
import importlib
import random
import subprocess
import sys

import pytest
import torch

from mtlora.config import AdapterConfig
from mtlora.evaluation import batching, distributed
from mtlora.evaluation.batching import cut_at_stop, generate_batched, group_prompts, next_token_scores
from mtlora.prompts import encode_batch
from mtlora.evaluation.prefix import common_prefix_length, rows_are_independent
from mtlora.injection import attach_adapters
from mtlora.mole import attach_mole, mole_gates
from tests.helpers import REPO, randomize_adapters, tiny_llama, write_bbh_folder, write_lora_checkpoint, write_mmlu_folder

ADAPTER = AdapterConfig(method="mtlora", lora_rank=4, lora_nums=3, lora_dropout=0.0, enable_block_adapter=True,
                        block_adapter_type="both", enable_fine_grained_routing=True, routing_group_size=16)


class IdTokenizer:
    """Minimal tokenizer stand-in for the batching functions (they only need ids and decode)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def shared_prefix_prompts(seed: int = 0) -> tuple[list[list[int]], list[str]]:
    """Two groups whose prompts share a 30-token prefix (suffixes of 1-8 tokens), and one short loner."""
    rng = random.Random(seed)
    prompts, groups = [], []
    for group in ("a", "b"):
        prefix = [1] + [rng.randrange(3, 50) for _ in range(29)]
        for _ in range(4):
            prompts.append(prefix + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 9))])
            groups.append(group)
    return prompts + [[1, 7, 9]], groups + ["c"]


def alone(model, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """The prompt run alone, no padding: next-token logits and plain greedy ``generate`` up to EOS."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=[2])[0, len(prompt):].tolist()
    return logits, generated[:generated.index(2)] if 2 in generated else generated


@pytest.fixture(scope="module")
def adapted():
    return randomize_adapters(attach_adapters(tiny_llama(vocab_size=50), ADAPTER)).eval()


def test_common_prefix_and_groups():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]]) == 2  # leaves one token of the shortest
    assert common_prefix_length([[1, 2, 3]]) == 2 and common_prefix_length([[4, 5], [6]]) == 0
    prompts, groups = shared_prefix_prompts()
    plan = group_prompts(prompts, groups, range(len(prompts)), share_prefix=True)
    assert [len(g.prefix) for g in plan] == [30, 30, 0]  # the loner's 2 tokens are too short to share
    assert [sorted(g.rows) for g in plan] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert all(len(prompts[a]) >= len(prompts[b]) for g in plan for a, b in zip(g.rows, g.rows[1:]))
    assert [g.prefix for g in group_prompts(prompts, groups, range(9), share_prefix=False)] == [[], [], []]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_shared_prefix_scores_and_generations_equal_each_prompt_alone(adapted, share_prefix):
    prompts, groups = shared_prefix_prompts()
    scores = next_token_scores(adapted, IdTokenizer(), prompts, [3, 4, 5], batch_size=3, groups=groups,
                               share_prefix=share_prefix)
    generated = generate_batched(adapted, IdTokenizer(), prompts, max_new_tokens=6, batch_size=3, groups=groups,
                                 share_prefix=share_prefix)
    for index, prompt in enumerate(prompts):
        logits, tokens = alone(adapted, prompt, 6)
        assert scores.greedy_ids[index] == int(logits.argmax())
        torch.testing.assert_close(torch.tensor(scores.candidate_logprobs[index]),
                                   torch.log_softmax(logits, -1)[[3, 4, 5]], rtol=0, atol=1e-5)
        assert generated[index] == IdTokenizer().decode(tokens)


def test_continuation_scores_equal_a_full_forward_of_each_input(adapted):
    inputs = [[5, 6, 7, 8, 9], [5, 6, 7, 1, 2], [11, 12, 13, 14, 15, 16, 17]]
    continuations = [[[9, 10], [3]], [[8, 9, 10, 4]], [[20, 21]]]  # continuation tail of each input + its last token
    scores = batching.score_continuations(adapted, IdTokenizer(), inputs, continuations, batch_size=2)
    for ids, conts, got in zip(inputs, continuations, scores, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(adapted(torch.tensor([ids])).logits[0].float(), -1)  # (len, vocab)
        for cont, (total, greedy) in zip(conts, got, strict=True):
            rows = logprobs[len(ids) - len(cont):]
            assert total == pytest.approx(float(rows[range(len(cont)), cont].sum()), abs=1e-5)
            assert greedy == (rows.argmax(-1).tolist() == cont)
    with pytest.raises(ValueError, match="distinct"):
        batching.score_continuations(adapted, IdTokenizer(), [[1, 2], [1, 2]], [[[3]], [[4]]])


def test_generation_writes_each_step_s_keys_in_place():
    from mtlora.evaluation.prefix import PreallocatedLayer

    prefix_keys, prefix_values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    layer = PreallocatedLayer(6, prefix_keys, prefix_values, rows=2)
    buffer = layer.key_buffer.data_ptr()
    step = torch.randn(2, 2, 1, 4)
    keys, values = layer.update(step, -step)
    assert keys.shape == (2, 2, 4, 4) and layer.get_seq_length() == 4
    assert layer.key_buffer.data_ptr() == buffer  # no copy of the cache per step
    assert torch.equal(keys[:, :, :3], prefix_keys.expand(2, -1, -1, -1)) and torch.equal(keys[:, :, 3:], step)
    assert torch.equal(values[:, :, 3:], -step)
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, keys[1:]) and torch.equal(layer.values, values[1:])
    with pytest.raises(RuntimeError, match="KV cache of 6 positions is full"):
        layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))


def test_stop_strings_end_rows_early_and_cut_the_text(adapted):
    prompts, groups = shared_prefix_prompts(seed=1)
    full = generate_batched(adapted, IdTokenizer(), prompts, max_new_tokens=8, batch_size=4, groups=groups)
    stop = full[0].split(" ")[3]  # a token the first row writes third: it stops there
    stops = [f" {stop} "]
    stopped = generate_batched(adapted, IdTokenizer(), prompts, max_new_tokens=8, batch_size=4, groups=groups,
                               stop_strings=stops)
    assert stopped == [cut_at_stop(text, stops) for text in full]
    assert len(stopped[0]) < len(full[0]) and any(s == f for s, f in zip(stopped, full))


def test_mole_models_run_whole_prompts_and_keep_ended_rows(tmp_path):
    library = [write_lora_checkpoint(tmp_path / f"lora{i}", seed=i, vocab_size=50) for i in range(2)]
    model = tiny_llama(vocab_size=50)
    attach_mole(model, library)
    for gate in mole_gates(model):
        torch.nn.init.normal_(gate.weight, std=3.0)
    assert not rows_are_independent(model) and rows_are_independent(tiny_llama(vocab_size=50))
    prompts, groups = shared_prefix_prompts()
    scores = next_token_scores(model, IdTokenizer(), prompts, [3, 4], batch_size=4, groups=groups)
    generated = generate_batched(model, IdTokenizer(), prompts, max_new_tokens=4, batch_size=4, groups=groups)
    for index, prompt in enumerate(prompts):
        logits, tokens = alone(model, prompt, 4)  # the gates pool over the whole prompt
        assert scores.greedy_ids[index] == int(logits.argmax())
        assert generated[index] == IdTokenizer().decode(tokens)


def test_auto_batch_size_halves_on_out_of_memory(adapted, monkeypatch):
    prompts, groups = shared_prefix_prompts()
    expected = next_token_scores(adapted, IdTokenizer(), prompts, [3], batch_size=1, groups=groups)
    seen = []

    def small_memory(module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        seen.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("fake: more than 2 rows")

    handle = adapted.register_forward_pre_hook(small_memory, with_kwargs=True)
    try:
        monkeypatch.setitem(batching.AUTO_BATCH_START, "cpu", 8)
        auto = next_token_scores(adapted, IdTokenizer(), prompts, [3], batch_size=None, groups=groups)
        with pytest.raises(torch.OutOfMemoryError):  # a batch size the user chose is kept: the error is theirs
            next_token_scores(adapted, IdTokenizer(), prompts, [3], batch_size=4, groups=groups)
    finally:
        handle.remove()
    assert auto.greedy_ids == expected.greedy_ids
    assert max(seen) == 4 and 2 in seen  # tried the group's 4 rows, then halved to 2


def test_encode_batch_equals_one_call_per_text(smollm2_tokenizer, tokenizer):
    texts = ["Q: not True is\nA:", "Question: 2 + 2 = ?\nA. 3\nAnswer: B\n\n", "", "  leading spaces", "é 日本"]
    for tok in (smollm2_tokenizer, tokenizer):
        assert encode_batch(tok, texts) == [tok(t).input_ids for t in texts]
        assert encode_batch(tok, texts, add_special_tokens=False) == [tok.encode(t, add_special_tokens=False)
                                                                      for t in texts]


def test_encode_batch_falls_back_to_the_tokenizer_call():
    class Wrapped:
        """A tokenizer whose Python wrapper adds a token its backend does not."""

        class backend_tokenizer:  # noqa: N801 - mimics the attribute name
            @staticmethod
            def encode_batch_fast(texts, add_special_tokens=True):
                return [type("Encoding", (), {"ids": [ord(c) for c in t]})() for t in texts]

        def __call__(self, texts, add_special_tokens=True):
            one = lambda t: [9] * add_special_tokens + [ord(c) for c in t]  # noqa: E731
            return type("Encoding", (), {"input_ids": one(texts) if isinstance(texts, str) else [one(t) for t in texts]})

    assert encode_batch(Wrapped(), ["ab", "c"]) == [[9, 97, 98], [9, 99]]
    assert encode_batch(Wrapped(), ["ab"], add_special_tokens=False) == [[97, 98]]


def test_shards_interleave_and_gather_restores_the_order(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard([9, 8, 7, 6, 5, 4, 3]) == [8, 5]
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    assert distributed.gather({1: "b", 0: "a"}, 2) == ["a", "b"]
    with pytest.raises(RuntimeError, match="gathered 1 results for 2"):
        distributed.gather({0: "a"}, 2)


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): items are split, gathered, and rank 0 writes the same results,
    for all three evaluators (one launch runs them in turn)."""
    records = tmp_path / "eval.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w, "task_type": t}) + "\n"
                               for w, t in (("yes", "a"), ("no", "a"), ("hi", "b"), ("ok", "b"), ("go", "c"))))
    runs = {"eval_bbh": ["--data_dir", str(write_bbh_folder(tmp_path / "bbh")), "--max_new_tokens", "4"],
            "eval_mmlu": ["--data_dir", str(write_mmlu_folder(tmp_path / "mmlu", num_test=5))],
            "eval_heldout": ["--eval_file", str(records), "--max_new_tokens", "4"]}
    common = ["--model_name_or_path", str(tiny_model_dir), "--batch_size", "2"]
    calls = {name: [*common, *flags, "--output_dir", str(tmp_path / name / "{run}")] for name, flags in runs.items()}
    for name, args in calls.items():
        assert importlib.import_module(name).main([a.format(run="one") for a in args]) == 0
    script = "; ".join(f"import {name}; {name}.main({[a.format(run='two') for a in args]!r})" for name, args in calls.items())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--no-python", sys.executable, "-c", script]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in runs:
        outputs = {run: {path.relative_to(tmp_path / name / run).as_posix(): json.loads(path.read_text())
                         for path in sorted((tmp_path / name / run).rglob("*.json"))} for run in ("one", "two")}
        assert [outputs[run]["summary.json"]["settings"].pop("processes") for run in ("one", "two")] == [1, 2]
        assert len(outputs["one"]) >= 2
        assert_same(outputs["two"], outputs["one"])  # batch partners differ, so log-probs may differ in the last bits


def assert_same(actual, expected, path="") -> None:
    """Equal JSON, floats within 1e-5."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-5), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{index}]")
    else:
        assert actual == expected, path
