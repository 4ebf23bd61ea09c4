"""Prompt construction (BBH, MMLU, held-out) against hand-written strings, and data loading."""

from __future__ import annotations

import json

import pytest

from mtlora.evaluation.bbh import build_bbh_prompt, load_bbh_task, resolve_tasks, task_prompts
from mtlora.evaluation.heldout import limit_per_task
from mtlora.evaluation.mmlu import (build_mmlu_prompt, fit_prompt, format_header, letter_token_ids,
                                    load_mmlu_csv, resolve_subjects, subject_prompts)
from mtlora.prompts import build_training_prompt, encode_prompts
from mtlora.training_data import IGNORE_INDEX, DataFormatError, read_instruction_records, tokenize_records
from tests.helpers import write_bbh_folder, write_mmlu_folder


class CharTokenizer:
    """One token per character (ord), BOS = 1 prepended: enough to test length logic exactly."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        if not isinstance(text, str):  # a batch
            return type("Encoding", (), {"input_ids": [self(t, add_special_tokens).input_ids for t in text]})()
        ids = [ord(c) for c in text]
        return type("Encoding", (), {"input_ids": [self.bos_token_id] + ids if add_special_tokens else ids})()

    def encode(self, text, add_special_tokens=True):
        return self(text, add_special_tokens).input_ids


def decode(ids):
    return "".join(chr(i) for i in ids if i > 2)


EXEMPLARS = [{"input": "1 + 1 =", "target": "2"}, {"input": "Is it?", "target": "Yes"},
             {"input": "Pick: (A) a (B) b", "target": "(B)"}]


def test_bbh_prompt_matches_hand_written():
    expected = ("Q: 1 + 1 =\nA: 2\n\n"
                "Q: Is it?\nA: Yes\n\n"
                "Q: Pick: (A) a (B) b\nA: (B)\n\n"
                "Q: not True is\nA:")
    assert build_bbh_prompt(EXEMPLARS, "not True is") == expected


def test_bbh_exemplars_are_never_scored_and_limit_counts_scored_items():
    items = EXEMPLARS + [{"input": f"q{i}", "target": "t"} for i in range(5)]
    scored, prompts, truncated = task_prompts(CharTokenizer(), items, limit=2, truncation="reference", max_length=10_000)
    assert [it["input"] for it in scored] == ["q0", "q1"]
    assert decode(prompts[0]) == build_bbh_prompt(EXEMPLARS, "q0") and truncated == 0


def test_bbh_overlong_prompt_fit_is_cut_from_the_left_keeping_bos_and_counted():
    items = EXEMPLARS + [{"input": "last question", "target": "t"}]
    _, prompts, truncated = task_prompts(CharTokenizer(), items, limit=None, truncation="fit", max_length=20)
    assert truncated == 1 and len(prompts[0]) == 20 and prompts[0][0] == 1
    assert decode(prompts[0]).endswith("Q: last question\nA:")


def test_bbh_overlong_prompt_reference_keeps_the_first_tokens():
    items = EXEMPLARS + [{"input": "last question", "target": "t"}]
    _, prompts, truncated = task_prompts(CharTokenizer(), items, limit=None, truncation="reference", max_length=20)
    assert truncated == 1 and len(prompts[0]) == 20 and prompts[0][0] == 1
    assert decode(prompts[0]) == build_bbh_prompt(EXEMPLARS, "last question")[:19]


def test_bbh_loads_both_file_formats_and_rejects_others(tmp_path):
    folder = write_bbh_folder(tmp_path / "bbh")
    assert load_bbh_task(folder / "labels.json")[0] == {"input": "not True is", "target": "False"}
    assert load_bbh_task(folder / "choices.json")[1]["target"] == "(A)"
    (folder / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="bad.json"):
        load_bbh_task(folder / "bad.json")
    (folder / "broken.json").write_text('[\n{"input": "a", "target": "b"},\n{oops}\n]')
    with pytest.raises(ValueError, match=r"broken.json:3: invalid JSON"):
        load_bbh_task(folder / "broken.json")


def test_bbh_unknown_task_lists_valid_ones(tmp_path):
    folder = write_bbh_folder(tmp_path / "bbh")
    with pytest.raises(ValueError, match=r"--tasks.*nope.*choices, labels"):
        resolve_tasks(folder, ["nope"])
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        resolve_tasks(tmp_path / "missing", None)


MMLU_DEV = [{"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": "B"},
            {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": "A"}]
MMLU_TEST = {"question": "Largest planet?", "choices": ["Mars", "Venus", "Jupiter", "Earth"], "answer": "C"}


def test_mmlu_prompt_matches_hand_written():
    expected = ("Question: 2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                "Question: Capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer: A\n\n"
                "Question: Largest planet?\nA. Mars\nB. Venus\nC. Jupiter\nD. Earth\nAnswer:")
    assert build_mmlu_prompt(MMLU_DEV, MMLU_TEST) == expected


def test_mmlu_headers():
    assert format_header("none", "high_school_physics") == ""
    assert format_header("", "anatomy") == ""
    assert format_header("hendrycks", "high_school_physics") == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n")
    assert format_header("Subject: {subject}\n", "world_religions") == "Subject: world religions\n"
    assert build_mmlu_prompt([], MMLU_TEST, "H\n").startswith("H\nQuestion: Largest planet?")


def test_mmlu_fit_drops_whole_exemplars_first_then_cuts_left():
    tokenizer = CharTokenizer()
    full = len(tokenizer(build_mmlu_prompt(MMLU_DEV, MMLU_TEST)).input_ids)
    ids, shots, cut = fit_prompt(tokenizer, MMLU_DEV, MMLU_TEST, "", full)
    assert (shots, cut, len(ids)) == (2, "", full)
    ids, shots, cut = fit_prompt(tokenizer, MMLU_DEV, MMLU_TEST, "", full - 1)
    assert (shots, cut) == (1, "") and decode(ids) == build_mmlu_prompt(MMLU_DEV[:1], MMLU_TEST)
    ids, shots, cut = fit_prompt(tokenizer, MMLU_DEV, MMLU_TEST, "", 30)
    assert (shots, cut, len(ids), ids[0]) == (0, "left", 30, 1)
    assert decode(ids).endswith("D. Earth\nAnswer:")


def test_mmlu_truncation_reference_cuts_right_fit_keeps_the_question(smollm2_tokenizer):
    """A prompt over 2,048 tokens: the reference form keeps its first 2,048 (so "Answer:" is lost); fit keeps
    the question whole (prompt + the answer token within the limit)."""
    long_dev = [{"question": "Read this: " + " ".join(f"word{i}" for i in range(500)), "choices": list("abcd"),
                 "answer": "A"}] * 5
    text = build_mmlu_prompt(long_dev, MMLU_TEST)
    full = smollm2_tokenizer(text).input_ids
    assert len(full) > 2048
    [(ids, shots, cut)] = subject_prompts(smollm2_tokenizer, long_dev, [MMLU_TEST], "", "reference", 2048)
    assert (len(ids), shots, cut) == (2048, 5, "right") and ids == full[:2048]
    assert not smollm2_tokenizer.decode(ids).endswith("Answer:")
    [(ids, shots, cut)] = subject_prompts(smollm2_tokenizer, long_dev, [MMLU_TEST], "", "fit", 2048)
    assert len(ids) <= 2047 and shots < 5 and cut == ""
    assert smollm2_tokenizer.decode(ids).endswith("C. Jupiter\nD. Earth\nAnswer:")
    short = subject_prompts(smollm2_tokenizer, MMLU_DEV, [MMLU_TEST] * 2, "", "reference", 2048)
    assert short == [(smollm2_tokenizer(build_mmlu_prompt(MMLU_DEV, MMLU_TEST)).input_ids, 2, "")] * 2


def test_mmlu_csv_formats(tmp_path):
    with_header = tmp_path / "a_test.csv"
    with_header.write_text('question,choice0,choice1,choice2,choice3,answer\n"Q, one?",a,b,c,d,2\nQ2,a,b,c,d,D\n')
    headerless = tmp_path / "b_test.csv"
    headerless.write_text("Q3,a,b,c,d,A\n")
    assert load_mmlu_csv(with_header) == [{"question": "Q, one?", "choices": ["a", "b", "c", "d"], "answer": "C"},
                                          {"question": "Q2", "choices": ["a", "b", "c", "d"], "answer": "D"}]
    assert load_mmlu_csv(headerless)[0]["answer"] == "A"
    bad = tmp_path / "c_test.csv"
    bad.write_text('question,choice0,choice1,choice2,choice3,answer\n"two\nlines",a,b,c,d,1\nQ,a,b,c,d,7\n')
    with pytest.raises(ValueError, match=r"c_test.csv:4: answer '7' is neither"):
        load_mmlu_csv(bad)


def test_mmlu_unknown_subject_lists_valid_ones(tmp_path):
    folder = write_mmlu_folder(tmp_path / "mmlu")
    assert resolve_subjects(folder, None) == ["anatomy", "philosophy"]
    with pytest.raises(ValueError, match=r"--subjects.*astrology.*anatomy, philosophy"):
        resolve_subjects(folder, ["astrology"])


def test_letter_tokens_are_the_space_prefixed_ones(smollm2_tokenizer):  # noqa: F811 - fixture
    ids = letter_token_ids(smollm2_tokenizer)
    assert ids == [smollm2_tokenizer(f" {x}", add_special_tokens=False).input_ids[0] for x in "ABCD"]
    assert [smollm2_tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]


def test_training_prompt_and_heldout_encoding():
    assert build_training_prompt("Translate.", "bonjour") == "Translate.\nbonjour"
    assert build_training_prompt("Say hi.", "") == "Say hi."
    record = {"instruction": "Hi", "input": "x", "output": "o", "task_type": "t"}
    (prompt,) = encode_prompts(CharTokenizer(), [record])
    assert prompt == [1, ord("H"), ord("i"), ord("\n"), ord("x"), 2]
    ((example, _),) = tokenize_records([record], CharTokenizer(), max_seq_length=64)  # training sees the same ids
    assert example["input_ids"][:6] == prompt
    assert example["labels"][:6] == [-100] * 6 and example["input_ids"][6:] == [ord("o"), 2]


def test_one_record_reader_keeps_references_and_names_file_and_line(tmp_path):
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"instruction": "a", "output": "b", "task_type": "t", "references": ["b", "B"]}) + "\n")
    assert read_instruction_records(good)[0] == {"instruction": "a", "input": "", "output": "b", "task_type": "t",
                                                  "references": ["b", "B"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"instruction": "a", "output": "b"}) + "\n" for _ in range(3)) + "{oops\n")
    with pytest.raises(DataFormatError, match=f"{bad}:4: invalid JSON"):
        read_instruction_records(bad, "--eval_file")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=f"{latin}:2: not UTF-8 text"):
        read_instruction_records(latin)
    with pytest.raises(FileNotFoundError, match="--eval_file .*missing.jsonl: no such file"):
        read_instruction_records(tmp_path / "missing.jsonl", "--eval_file")


def test_heldout_limit_is_per_task_in_file_order():
    records = [{"task_type": t, "n": i} for i, t in enumerate("aabab")]
    assert [r["n"] for r in limit_per_task(records, 1)] == [0, 2]
    assert len(limit_per_task(records, None)) == 5


def test_batched_record_encoding_equals_one_encode_call_per_text(smollm2_tokenizer):
    """Training and held-out prompts are encoded in batches: the ids are those of one tokenizer.encode per text,
    truncation included."""
    tok = smollm2_tokenizer
    records = [{"instruction": "Sort the words", "input": " zeta  alpha é", "output": "alpha zeta", "task_type": "a"},
               {"instruction": "Answer:", "input": "", "output": " yes\n", "task_type": "b"},
               {"instruction": "long " * 200, "input": "", "output": "end " * 50, "task_type": "a"}]
    examples = tokenize_records(records, tok, max_seq_length=128)
    for record, (example, truncated) in zip(records, examples):
        text = build_training_prompt(record["instruction"], record["input"])
        prompt = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        response = tok.encode(record["output"], add_special_tokens=False) + [tok.eos_token_id]
        assert encode_prompts(tok, [record]) == [prompt]
        assert truncated == (len(prompt) + len(response) > 128)
        if not truncated:
            assert example["input_ids"] == prompt + response
            assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert examples[2][1] and len(examples[2][0]["input_ids"]) == 128
