"""lm-eval's own tasks through mtlora.evaluation.harness: local data, lm-eval's names, and equivalence
of our MMLU letter scorer with lm-eval's ``acc`` when the prompts are identical.

Every test runs with the network blocked: lm-eval must read only the local files.
"""

from __future__ import annotations

import contextlib
import json
import socket

import pytest
import yaml

import eval_harness
from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig
from mtlora.evaluation.answers import argmax_letter
from mtlora.evaluation.batching import next_token_scores
from mtlora.evaluation.harness import resolve_benchmarks, run_harness
from mtlora.evaluation.harness_tasks import BBH_FILTERS, BENCHMARKS, leaf_tasks
from mtlora.evaluation.mmlu import HENDRYCKS_HEADER, LETTERS, SUBJECT_CATEGORY, letter_token_ids, load_subject
from mtlora.injection import attach_adapters
from tests.helpers import (SHARED_DATA, randomize_adapters, skip_without_shared_data, tiny_llama, write_bbh_folder,
                           write_mmlu_folder)

ADAPTER = AdapterConfig(method="mtlora", lora_rank=4, lora_nums=2, enable_block_adapter=True)
OVERRIDDEN_KEYS = {"include", "dataset_path", "dataset_name", "dataset_kwargs"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def adapted_tiny(smollm2_tokenizer):
    """A random 2-layer LLaMA with the SmolLM2 vocabulary and a random mtLoRA adapter attached."""
    model = tiny_llama(vocab_size=len(smollm2_tokenizer))
    return randomize_adapters(attach_adapters(model, ADAPTER)), smollm2_tokenizer


@pytest.fixture
def stops_at_once(adapted_tiny):
    """``adapted_tiny`` with the EOS logit raised, so every BBH generation ends at its first token
    (a random model never emits lm-eval's stop strings and would generate 256 tokens per item)."""
    model, tokenizer = adapted_tiny
    eos = model.generation_config.eos_token_id

    def raise_eos(module, args, logits):
        logits[..., eos] += 30.0

    handle = model.lm_head.register_forward_hook(raise_eos)
    yield model, tokenizer
    handle.remove()


@pytest.fixture(scope="module")
def shared_mmlu():
    skip_without_shared_data()
    return SHARED_DATA / "mmlu"


@pytest.fixture
def local_data(tmp_path):
    """2 MMLU subjects (4 test items each) and one BBH task (6 items) named as lm-eval names it."""
    mmlu = write_mmlu_folder(tmp_path / "mmlu", num_test=4)
    bbh = write_bbh_folder(tmp_path / "bbh")
    (bbh / "labels.json").rename(bbh / "boolean_expressions.json")  # "not True is" -> "False"
    return mmlu, bbh


def lm_eval_mmlu_prompt(exemplars: list[dict], item: dict, subject: str) -> str:
    """lm-eval's mmlu prompt, written out: header, stripped question without "Question: ", " X" answers."""
    def question(x: dict) -> str:
        options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, x["choices"], strict=True))
        return f"{x['question'].strip()}\n{options}Answer:"
    shots = "".join(f"{question(ex)} {ex['answer']}\n\n" for ex in exemplars)
    return HENDRYCKS_HEADER.format(subject=subject.replace("_", " ")) + shots + question(item)


def assert_letter_scorer_matches_lm_eval(model, tokenizer, mmlu_dir, subjects, summary, shots: int) -> None:
    """Score lm-eval's prompts with our scorer; compare prompt, log-probs, prediction and acc per item."""
    candidates = letter_token_ids(tokenizer)
    for subject in subjects:
        task = f"mmlu_{subject}"
        samples = sorted(summary["samples"][task], key=lambda s: s["doc_id"])
        dev, test = load_subject(mmlu_dir, subject)
        prompts = [lm_eval_mmlu_prompt(dev[:shots], test[s["doc_id"]], subject) for s in samples]
        assert [s["arguments"][0][0] for s in samples] == prompts  # identical prompts
        ours = next_token_scores(model, tokenizer, [tokenizer(p).input_ids for p in prompts], candidates, batch_size=3)
        correct = []
        for sample, item, logprobs in zip(samples, (test[s["doc_id"]] for s in samples), ours.candidate_logprobs,
                                          strict=True):
            theirs = [loglik for loglik, _ in sample["filtered_resps"]]
            assert logprobs == pytest.approx(theirs, abs=1e-4)
            assert argmax_letter(logprobs) == LETTERS[max(range(4), key=theirs.__getitem__)]
            correct.append(argmax_letter(logprobs) == item["answer"])
            assert correct[-1] == bool(sample["acc"])
        assert summary["results"][task]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_harness_runs_lm_eval_tasks_on_local_data(stops_at_once, local_data, tmp_path):
    model, tokenizer = stops_at_once
    mmlu, bbh = local_data
    out = tmp_path / "out"
    summary = run_harness(model, tokenizer, list(BENCHMARKS), mmlu_dir=mmlu, bbh_dir=bbh, limit=2, batch_size=4,
                          output_dir=out, metadata={"model": "tiny"})
    expected = {"mmlu_anatomy": {"acc,none"}, "mmlu_philosophy": {"acc,none"},
                "mmlu_anatomy_continuation": {"acc,none", "acc_norm,none"},
                "mmlu_philosophy_continuation": {"acc,none", "acc_norm,none"},
                "bbh_fewshot_boolean_expressions": {"exact_match,none", "exact_match,remove_whitespace"}}
    assert set(summary["results"]) == set(expected) and summary["groups"] == {}  # a subset: no group averages
    for task, metrics in expected.items():
        values = summary["results"][task]
        assert metrics <= set(values) and summary["n-samples"][task]["effective"] == 2
        for key in metrics:
            metric, filter_name = key.split(",")
            per_item = [s[metric] for s in summary["samples"][task] if s["filter"] == filter_name]
            assert len(per_item) == 2 and values[key] == pytest.approx(sum(per_item) / 2)
    bbh_prompt = summary["samples"]["bbh_fewshot_boolean_expressions"][0]["arguments"][0][0]
    assert bbh_prompt.startswith("Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True ) ) is")
    assert bbh_prompt.endswith("Q: not True is\nA:")  # lm-eval's fixed exemplars, then our first item
    assert summary["settings"]["n-shot"] == {"mmlu": 0, "mmlu_continuation": 0, "bbh_fewshot": 3}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"])) and saved["settings"]["model"] == "tiny"
    assert "exact_match,none" in (out / "summary.md").read_text()
    assert json.loads((out / "lm_eval_results.json").read_text())["n-samples"] == summary["n-samples"]
    assert len(json.loads((out / "samples" / "mmlu_anatomy.json").read_text())["samples"]) == 2
    for task in expected:  # each config is lm-eval's yaml with the data location replaced (+ BBH's filters)
        config = yaml.safe_load((out / "lm_eval_tasks" / "configs" / f"{task}.yaml").read_text())
        bbh = task.startswith("bbh")
        assert set(config) == OVERRIDDEN_KEYS | ({"filter_list"} if bbh else set()) and config["dataset_path"] == "json"
        assert "/lm_eval/tasks/" in config["include"] and config.get("filter_list", BBH_FILTERS) == BBH_FILTERS
    assert not (out / "lm_eval_tasks" / "hf_cache").exists()


@contextlib.contextmanager
def steered(model, remember, adjust):
    """``model`` with a forward pre-hook ``remember(module, args, kwargs)`` that sees each call's inputs and a hook
    ``adjust(module, args, logits)`` that edits the LM head's logits in place."""
    handles = [model.register_forward_pre_hook(remember, with_kwargs=True), model.lm_head.register_forward_hook(adjust)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def answers_with_a_space(adapted_tiny):
    """``adapted_tiny`` made to answer " False" and stop: lm-eval's literal exact_match is 0, stripped it is not."""
    model, tokenizer = adapted_tiny
    answer = tokenizer(" False", add_special_tokens=False).input_ids
    assert len(answer) == 1
    last_token = {}

    def remember_input(module, args, kwargs):
        last_token["id"] = int(kwargs["input_ids"][0, -1])

    def force(module, args, logits):
        logits[..., :] = -1e4
        logits[..., model.generation_config.eos_token_id if last_token["id"] == answer[0] else answer[0]] = 1e4

    with steered(model, remember_input, force):
        yield model, tokenizer


def test_bbh_fewshot_reports_the_literal_and_the_whitespace_filtered_match(answers_with_a_space, local_data):
    model, tokenizer = answers_with_a_space
    summary = run_harness(model, tokenizer, ["bbh_fewshot"], bbh_dir=local_data[1], limit=2, batch_size=1)
    samples = summary["samples"]["bbh_fewshot_boolean_expressions"]
    by_filter = {s["filter"]: s for s in samples if s["doc_id"] == 0}
    assert by_filter["none"]["filtered_resps"] == [" False"] and by_filter["remove_whitespace"]["filtered_resps"] == ["False"]
    values = summary["results"]["bbh_fewshot_boolean_expressions"]
    assert values["exact_match,none"] == 0.0  # targets "False", "True": the leading space fails lm-eval's literal match
    assert values["exact_match,remove_whitespace"] == 0.5


def test_bbh_fewshot_scores_every_item(stops_at_once, local_data):
    model, tokenizer = stops_at_once
    summary = run_harness(model, tokenizer, ["bbh_fewshot"], bbh_dir=local_data[1], batch_size=6)
    assert summary["n-samples"]["bbh_fewshot_boolean_expressions"] == {"original": 6, "effective": 6}
    samples = summary["samples"]["bbh_fewshot_boolean_expressions"]
    for filter_name in ("none", "remove_whitespace"):
        assert sorted(s["doc_id"] for s in samples if s["filter"] == filter_name) == list(range(6))


def test_full_mmlu_gets_lm_eval_group_averages(adapted_tiny, tmp_path):
    model, tokenizer = adapted_tiny
    mmlu = write_mmlu_folder(tmp_path / "mmlu", subjects=sorted(SUBJECT_CATEGORY), num_test=1)
    summary = run_harness(model, tokenizer, ["mmlu"], mmlu_dir=mmlu, limit=1, batch_size=8)
    categories = ["mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"]
    assert sorted(summary["groups"]) == ["mmlu", *categories] and len(summary["results"]) == 57
    for group in categories:  # lm-eval's category mean, weighted by size (1 item per subject here)
        members = summary["group_subtasks"][group]
        assert summary["groups"][group]["acc,none"] == pytest.approx(
            sum(summary["results"][t]["acc,none"] for t in members) / len(members))
    assert summary["groups"]["mmlu"]["acc,none"] == pytest.approx(
        sum(v["acc,none"] for v in summary["results"].values()) / 57)


def test_letter_scorer_equals_lm_eval_acc_per_item(adapted_tiny, local_data):
    model, tokenizer = adapted_tiny
    mmlu = local_data[0]
    summary = run_harness(model, tokenizer, ["mmlu"], mmlu_dir=mmlu, num_fewshot=5, batch_size=3)
    assert summary["settings"]["n-shot"] == {"mmlu": 5}
    assert_letter_scorer_matches_lm_eval(model, tokenizer, mmlu, ["anatomy", "philosophy"], summary, shots=5)


def test_letter_scorer_equals_lm_eval_acc_per_item_smollm2(shared_mmlu, smollm2):
    model, tokenizer = smollm2
    subjects = ["world_religions", "management"]
    summary = run_harness(model, tokenizer, ["mmlu"], mmlu_dir=shared_mmlu, subjects=subjects, limit=3, batch_size=3)
    assert_letter_scorer_matches_lm_eval(model, tokenizer, shared_mmlu, subjects, summary, shots=0)


def test_cli_with_adapter_checkpoint(tiny_model_dir, local_data, tmp_path):
    from mtlora.loading import load_base_model

    model = randomize_adapters(attach_adapters(load_base_model(str(tiny_model_dir)), ADAPTER))
    checkpoint = save_adapter(model, ADAPTER, tmp_path / "adapter")
    mmlu, bbh = local_data
    args = ["--model_name_or_path", str(tiny_model_dir), "--tasks", "mmlu", "--mmlu_dir", str(mmlu),
            "--subjects", "anatomy", "--limit", "2"]
    assert eval_harness.main([*args, "--output_dir", str(tmp_path / "base")]) == 0
    assert eval_harness.main([*args, "--lora_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "ad")]) == 0
    summary = json.loads((tmp_path / "ad" / "summary.json").read_text())
    assert summary["settings"]["lora_checkpoint"] == str(checkpoint) and list(summary["results"]) == ["mmlu_anatomy"]
    scores = {run: [s["filtered_resps"] for s in json.loads(
        (tmp_path / run / "samples" / "mmlu_anatomy.json").read_text())["samples"]] for run in ("base", "ad")}
    assert scores["base"] != scores["ad"]  # the adapter is really applied inside lm-eval's HFLM


@pytest.mark.parametrize(("flags", "named"), [
    (["--tasks", "hellaswag"], "--tasks"),
    (["--tasks", "mmlu", "--mmlu_dir", "MISSING"], "--mmlu_dir"),
    (["--tasks", "bbh_fewshot", "--bbh_dir", "MISSING"], "--bbh_dir"),
    (["--tasks", "mmlu", "--subjects", "astrology"], "--subjects"),
    (["--tasks", "bbh_fewshot", "--bbh_tasks", "labels"], "--bbh_tasks"),  # a file, but not an lm-eval task
    (["--num_fewshot", "-1"], "--num_fewshot"),
])
def test_cli_rejects_bad_input_before_loading_a_model(flags, named, local_data, tmp_path, monkeypatch, capsys):
    mmlu, bbh = local_data
    (bbh / "labels.json").write_text("[]")
    monkeypatch.setattr(eval_harness, "load_for_eval", lambda args: pytest.fail("model loaded"))
    flags = [str(tmp_path / f) if f == "MISSING" else f for f in flags]
    with pytest.raises(SystemExit):
        eval_harness.main(["--mmlu_dir", str(mmlu), "--bbh_dir", str(bbh), *flags])
    assert named in capsys.readouterr().err


def test_selection_follows_lm_eval_task_lists(local_data):
    mmlu, bbh = local_data
    assert len(leaf_tasks(BENCHMARKS["mmlu"])) == 57 and len(leaf_tasks(BENCHMARKS["bbh_fewshot"])) == 27
    mmlu_sel, continuation, bbh_sel = resolve_benchmarks(list(BENCHMARKS), mmlu, bbh)
    assert mmlu_sel.requests == ["mmlu_anatomy", "mmlu_philosophy"] and not mmlu_sel.complete
    assert continuation.requests == ["mmlu_anatomy_continuation", "mmlu_philosophy_continuation"]
    assert bbh_sel.names == ["boolean_expressions"]  # choices.json is not a BBH task: ignored
    assert resolve_benchmarks(["mmlu"], mmlu, None, subjects=["philosophy"])[0].tasks == ["mmlu_philosophy"]


@pytest.fixture(scope="module")
def context_sensitive_tiny(smollm2_tokenizer):
    """``adapted_tiny`` with large random weights, so that what it writes depends on the prompt."""
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), initializer_range=1.0)
    return randomize_adapters(attach_adapters(model, ADAPTER)), smollm2_tokenizer


@pytest.fixture
def stops_by_position(context_sensitive_tiny):
    """``context_sensitive_tiny`` made to write "Q" (one of bbh_fewshot's stop strings) at every 5th position: a row's
    stop depends on its own prompt length only, whatever batch it is in."""
    model, tokenizer = context_sensitive_tiny
    stop = tokenizer("Q", add_special_tokens=False).input_ids
    assert len(stop) == 1
    last = {}

    def remember_position(module, args, kwargs):  # the row's real tokens so far (the mask marks the padding)
        last["positions"] = kwargs["attention_mask"].sum(-1)

    def raise_stop(module, args, logits):
        logits[..., stop[0]] += 1e6 * (last["positions"] % 5 == 0).to(logits.dtype)[:, None]

    with steered(model, remember_position, raise_stop):
        yield model, tokenizer


def test_batched_generation_equals_lm_eval_s_own_loop(stops_by_position, tmp_path):
    model, tokenizer = stops_by_position
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    items = [{"input": " and ".join(["not True"] * n) + " is", "target": "False"} for n in range(1, 7)]
    (bbh / "boolean_expressions.json").write_text(json.dumps(items))
    runs = {engine: run_harness(model, tokenizer, ["bbh_fewshot"], bbh_dir=bbh, batch_size=4,
                                engine=engine, rows_per_batch=3)
            for engine in ("hflm", "batched")}
    outputs = {engine: {(s["doc_id"], s["filter"]): s["filtered_resps"] for s in summary["samples"][
        "bbh_fewshot_boolean_expressions"]} for engine, summary in runs.items()}
    assert outputs["batched"] == outputs["hflm"] and len(outputs["hflm"]) == 12
    lengths = {len(resps[0]) for (_, name), resps in outputs["hflm"].items() if name == "none"}
    assert len(lengths) > 2 and max(lengths) > 0  # rows end at different points, none at the 256-token budget alone
    assert runs["batched"]["results"] == runs["hflm"]["results"]
    assert runs["batched"]["settings"]["engine"] == "batched"
    with pytest.raises(ValueError, match="--harness_engine"):
        run_harness(model, tokenizer, ["bbh_fewshot"], bbh_dir=bbh, engine="vllm")


def test_batched_loglikelihoods_equal_lm_eval_s(adapted_tiny, tmp_path):
    """mmlu (one-token letters, 4 per prompt: one forward) and mmlu_continuation (multi-token answer texts): every
    item's log-likelihoods, greedy flags and metrics as lm-eval's HFLM computes them."""
    model, tokenizer = adapted_tiny
    mmlu = write_mmlu_folder(tmp_path / "mmlu", num_test=4)
    for path in (mmlu / "test").glob("*.csv"):  # answers of several tokens, of different lengths
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0]] + [f"{line.split(',')[0]},the left ventricle,a bone of the inner ear,"
                                                 f"nerve {i},the distal phalanx of the hand,{i % 4}"
                                                 for i, line in enumerate(lines[1:])]) + "\n")
    runs = {engine: run_harness(model, tokenizer, ["mmlu", "mmlu_continuation"], mmlu_dir=mmlu, batch_size=2,
                                num_fewshot=2, engine=engine, rows_per_batch=3)
            for engine in ("hflm", "batched")}
    for task, theirs in runs["hflm"]["samples"].items():
        ours = {s["doc_id"]: s for s in runs["batched"]["samples"][task]}
        assert len(ours) == len(theirs) == 4
        for sample in theirs:
            mine = ours[sample["doc_id"]]
            assert [lp for lp, _ in mine["resps"][0]] == pytest.approx([lp for lp, _ in sample["resps"][0]], abs=1e-4)
            assert [g for _, g in mine["resps"][0]] == [g for _, g in sample["resps"][0]]
            assert all(mine[m] == sample[m] for m in ("acc", "acc_norm") if m in sample)
    continuation = runs["hflm"]["samples"]["mmlu_anatomy_continuation"][0]["arguments"]
    assert len(tokenizer(continuation[0][1], add_special_tokens=False).input_ids) > 1  # multi-token answers covered
    assert runs["batched"]["results"].keys() == runs["hflm"]["results"].keys()
    for task, values in runs["hflm"]["results"].items():
        assert runs["batched"]["results"][task]["acc,none"] == values["acc,none"]
