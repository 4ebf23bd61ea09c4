"""The evaluators on real data with the real SmolLM2-135M (few items), and CLI smoke tests.

The batched scorers must agree with a slow reference loop that runs one example at a time with no
padding: same generations / greedy tokens, log-probs within tolerance.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import eval_bbh
import eval_heldout
import eval_mmlu
from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig
from mtlora.evaluation.bbh import NUM_EXEMPLARS, build_bbh_prompt, load_bbh_task, run_bbh
from mtlora.evaluation.mmlu import NUM_SHOTS, build_mmlu_prompt, letter_token_ids, load_subject, run_mmlu
from mtlora.injection import attach_adapters
from tests.helpers import SHARED_DATA, randomize_adapters, skip_without_shared_data, write_bbh_folder, write_mmlu_folder

BBH_TASKS = ["boolean_expressions", "sports_understanding"]  # the shortest prompts: keeps CPU time low
MMLU_SUBJECTS = ["world_religions", "management"]
ITEMS = 4


@pytest.fixture(scope="module")
def shared_data():
    skip_without_shared_data()
    return SHARED_DATA


def reference_generation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, plain greedy generate."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_bbh_batched_matches_reference_loop(smollm2, shared_data, tmp_path):  # noqa: F811
    model, tokenizer = smollm2
    summary = run_bbh(model, tokenizer, shared_data / "bbh", tasks=BBH_TASKS, limit=ITEMS, batch_size=4,
                      max_new_tokens=16, output_dir=tmp_path)
    assert summary["num_examples"] == 2 * ITEMS and summary["num_truncated"] == 0
    for value in (*summary["macro_avg"].values(), *(t[k] for t in summary["tasks"].values() for k in ("extracted_match", "lenient"))):
        assert 0.0 <= value <= 1.0
    for task in BBH_TASKS:
        items = load_bbh_task(shared_data / "bbh" / f"{task}.json")
        saved = json.loads((tmp_path / "tasks" / f"{task}.json").read_text())
        for item, prediction in zip(items[NUM_EXEMPLARS:NUM_EXEMPLARS + ITEMS], saved["predictions"], strict=True):
            assert prediction["input"] == item["input"]
            expected = reference_generation(model, tokenizer, build_bbh_prompt(items[:NUM_EXEMPLARS], item["input"]), 16)
            assert prediction["generation"] == expected
    assert (tmp_path / "summary.md").read_text().count("\n") >= 4


def test_mmlu_batched_matches_reference_loop(smollm2, shared_data, tmp_path):  # noqa: F811
    model, tokenizer = smollm2
    summary = run_mmlu(model, tokenizer, shared_data / "mmlu", subjects=MMLU_SUBJECTS, limit=ITEMS,
                       batch_size=4, output_dir=tmp_path)
    assert summary["num_examples"] == 2 * ITEMS
    assert summary["truncation"] == {"mode": "reference", "max_length": 2048, "prompts_cut": 0,
                                     "prompts_with_dropped_exemplars": 0}
    for scorer in summary["scorers"].values():
        assert 0.0 <= scorer["micro"] <= 1.0 and 0.0 <= scorer["macro"] <= 1.0 and len(scorer["categories"]) == 2
    letters = letter_token_ids(tokenizer)
    for subject in MMLU_SUBJECTS:
        dev, test = load_subject(shared_data / "mmlu", subject)
        saved = json.loads((tmp_path / "subjects" / f"{subject}.json").read_text())
        for item, prediction in zip(test[:ITEMS], saved["predictions"], strict=True):
            prompt = build_mmlu_prompt(dev[:NUM_SHOTS], item)
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)[letters]
            assert list(prediction["logprobs"].values()) == pytest.approx(logprobs.tolist(), abs=2e-3)
            assert prediction["generated_token"] == reference_generation(model, tokenizer, prompt, 1)
            assert prediction["answer"] == item["answer"]


def test_eval_bbh_cli_smoke(tiny_model_dir, tmp_path, capsys):
    data = write_bbh_folder(tmp_path / "bbh")
    out = tmp_path / "out"
    assert eval_bbh.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(data), "--limit", "2",
                          "--max_new_tokens", "4", "--batch_size", "2", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"choices", "labels"} and summary["num_examples"] == 4
    assert summary["settings"]["model"] == str(tiny_model_dir)
    assert len(json.loads((out / "tasks" / "labels.json").read_text())["predictions"]) == 2
    assert "macro average" in capsys.readouterr().out


def test_eval_bbh_cli_with_adapter_checkpoint(tiny_model_dir, tmp_path):
    from mtlora.loading import load_base_model

    config = AdapterConfig(method="mtlora", lora_rank=4, lora_nums=2, enable_block_adapter=True,
                           enable_fine_grained_routing=True, routing_group_size=32)
    model = randomize_adapters(attach_adapters(load_base_model(str(tiny_model_dir)), config))
    checkpoint = save_adapter(model, config, tmp_path / "adapter")
    data = write_bbh_folder(tmp_path / "bbh")
    args = ["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(data), "--limit", "2",
            "--max_new_tokens", "4"]
    assert eval_bbh.main([*args, "--output_dir", str(tmp_path / "base")]) == 0
    assert eval_bbh.main([*args, "--lora_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "ad")]) == 0
    summary = json.loads((tmp_path / "ad" / "summary.json").read_text())
    assert summary["settings"]["lora_checkpoint"] == str(checkpoint)
    generations = {run: [p["generation"] for task in ("labels", "choices")
                         for p in json.loads((tmp_path / run / "tasks" / f"{task}.json").read_text())["predictions"]]
                   for run in ("base", "ad")}
    assert generations["base"] != generations["ad"]  # the adapter is really applied


def test_eval_mmlu_cli_smoke(tiny_model_dir, tmp_path):
    data = write_mmlu_folder(tmp_path / "mmlu")
    out = tmp_path / "out"
    assert eval_mmlu.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(data), "--limit", "2",
                           "--subjects", "anatomy", "--prompt_header", "hendrycks", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_examples"] == 2 and list(summary["subjects"]) == ["anatomy"]
    assert (out / "subjects" / "anatomy.json").is_file() and (out / "summary.md").is_file()


def test_eval_heldout_cli_smoke(tiny_model_dir, tmp_path):
    records = [{"instruction": f"Say {w}.", "input": "", "output": w, "task_type": t}
               for w, t in (("yes", "a"), ("no", "a"), ("hi", "b"))]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert eval_heldout.main(["--model_name_or_path", str(tiny_model_dir), "--eval_file", str(eval_file),
                              "--max_new_tokens", "3", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_examples"] == 3 and set(summary["tasks"]) == {"a", "b"}


def _bbh_without_target(folder):
    (folder / "labels.json").write_text(json.dumps([{"input": "a", "target": "b"}] * 4 + [{"input": "c"}]))


def _bbh_exemplars_only(folder):
    (folder / "labels.json").write_text(json.dumps([{"input": "a", "target": "b"}] * 3))


def _mmlu_bad_answer(folder):
    with (folder / "test" / "anatomy_test.csv").open("a") as handle:
        handle.write("Q?,w,x,y,z,E\n")


def _mmlu_missing_dev(folder):
    (folder / "dev" / "philosophy_dev.csv").unlink()


BBH_CASES = {
    "missing folder": (lambda f: None, ["--data_dir", "MISSING"], "--data_dir"),
    "item without target": (_bbh_without_target, [], r"labels.json: item 4 \(counting from 0\) has no target"),
    "exemplars only": (_bbh_exemplars_only, [], r"labels.json: 3 items, none left to score after the 3 exemplars"),
    "bad batch size": (lambda f: None, ["--batch_size", "0"], "--batch_size"),
}
MMLU_CASES = {
    "unknown subject": (lambda f: None, ["--subjects", "astrology"], "--subjects.*anatomy, philosophy"),
    "answer not A-D": (_mmlu_bad_answer, [], r"anatomy_test.csv:5: answer 'E' is neither"),
    "missing dev file": (_mmlu_missing_dev, [], r"missing dev exemplars .*philosophy_dev.csv"),
    "unknown header placeholder": (lambda f: None, ["--prompt_header", "About {topic}:"], r"--prompt_header.*\{subject\}"),
    "more shots than exemplars": (lambda f: None, ["--num_shots", "6"], r"--num_shots 6: .*anatomy_dev.csv holds only 5"),
    "bad truncation": (lambda f: None, ["--truncation", "middle"], "--truncation"),
}


@pytest.mark.parametrize("case", list(BBH_CASES) + list(MMLU_CASES))
def test_cli_rejects_bad_input_before_loading_a_model(case, tmp_path, monkeypatch, capsys):
    bbh = case in BBH_CASES
    corrupt, flags, message = (BBH_CASES if bbh else MMLU_CASES)[case]
    folder = write_bbh_folder(tmp_path / "bbh") if bbh else write_mmlu_folder(tmp_path / "mmlu")
    corrupt(folder)
    module = eval_bbh if bbh else eval_mmlu
    monkeypatch.setattr(module, "load_for_eval", lambda args: pytest.fail("model loaded"))
    flags = [str(tmp_path / "missing") if f == "MISSING" else f for f in flags]
    with pytest.raises(SystemExit):
        module.main(["--data_dir", str(folder), *flags])
    assert re.search(message, capsys.readouterr().err)


def test_cli_records_the_protocol_and_device_settings(tiny_model_dir, tmp_path):
    data = write_mmlu_folder(tmp_path / "mmlu")
    out = tmp_path / "out"
    assert eval_mmlu.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(data), "--limit", "1",
                           "--mmlu_scorer", "strict", "--truncation", "fit", "--category_average", "questions",
                           "--num_shots", "2", "--output_dir", str(out)]) == 0
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert {k: settings[k] for k in ("mmlu_scorer", "truncation", "category_average", "num_shots", "max_length",
                                     "batch_size", "dtype", "device", "share_prefix")} == {
        "mmlu_scorer": "strict", "truncation": "fit", "category_average": "questions", "num_shots": 2,
        "max_length": 1024, "batch_size": "auto", "dtype": "float32", "device": "cpu", "share_prefix": True}
    assert eval_mmlu.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(data), "--limit", "1",
                           "--output_dir", str(out)]) == 0  # the defaults: the reference's forms
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert (settings["mmlu_scorer"], settings["truncation"], settings["category_average"], settings["max_length"]) == (
        "reference", "reference", "subjects", 2048)
