"""Answer extraction, both scorers of each benchmark on hand-made outputs, and the batching helpers."""

from __future__ import annotations

import pytest
import torch

from mtlora.config import AdapterConfig
from mtlora.evaluation.answers import (CHOICE, FREE, LABEL, NUMBER, answer_line, argmax_letter, exact_match,
                                       extract_answer, infer_answer_kind, lenient_match, normalize, reference_letter,
                                       score_generated_letter)
from mtlora.evaluation.batching import generate_batched, next_token_scores, truncate_left, truncate_right
from mtlora.evaluation.prefix import left_pad, position_ids_from_mask
from mtlora.evaluation.bbh import BBH_DIFFICULTY, BBH_TASKS, accuracy_by_difficulty, score_bbh_task, summarize_bbh
from mtlora.evaluation.heldout import summarize_heldout
from mtlora.evaluation.mmlu import OTHER, STEM, score_subject, summarize_mmlu
from mtlora.injection import attach_adapters
from tests.helpers import randomize_adapters, tiny_llama

YES_NO = frozenset({"yes", "no"})
TRUE_FALSE = frozenset({"true", "false"})
VALID = frozenset({"valid", "invalid"})


@pytest.mark.parametrize(("targets", "kind"), [
    (["(A)", "(C)"], CHOICE), (["Yes", "No"], LABEL), (["True"], LABEL), (["valid", "invalid"], LABEL),
    (["12", "-3"], NUMBER), (["a b c", "d"], FREE), ([") ] }"], FREE),
    (["(A)"] * 40 + ["Monsters, Inc"], CHOICE),  # stray free-text target in movie_recommendation
])
def test_answer_kind_inference(targets, kind):
    assert infer_answer_kind(targets)[0] == kind


@pytest.mark.parametrize(("generation", "kind", "vocabulary", "expected"), [
    (" (B)\n\nQ: next question (A)", CHOICE, frozenset(), "(B)"),
    (" The answer is (c).", CHOICE, frozenset(), "(C)"),
    (" B) because", CHOICE, frozenset(), "(B)"),
    (" A", CHOICE, frozenset(), "(A)"),
    (" I am not sure", CHOICE, frozenset(), ""),
    (" C. Paris", CHOICE, frozenset(), "(C)"),
    (" 1,234 apples", NUMBER, frozenset(), "1234"),
    (" -17\nQ: 3 + 4 = 7", NUMBER, frozenset(), "-17"),
    (" seven", NUMBER, frozenset(), ""),
    (" No, because it rains. Yes.", LABEL, YES_NO, "No"),
    (" So the answer is yes", LABEL, YES_NO, "yes"),
    (" invalid", LABEL, VALID, "invalid"),
    (" The argument is valid, not invalid", LABEL, VALID, "valid"),
    (" False\n\nQ: True and True is\nA: True", LABEL, TRUE_FALSE, "False"),
    (" yesterday", LABEL, YES_NO, ""),
    (" apple banana cherry\nQ: Sort", FREE, frozenset(), "apple banana cherry"),
    ("\n\n ) ] }\n", FREE, frozenset(), ") ] }"),
    ("", FREE, frozenset(), ""),
])
def test_extract_answer(generation, kind, vocabulary, expected):
    assert extract_answer(generation, kind, vocabulary) == expected


def test_answer_line_stops_at_next_question():
    assert answer_line(" (A)\nQ: more") == "(A)"
    assert answer_line("\nQ: nothing answered") == ""


def test_normalise_and_matchers():
    assert normalize("  Apple   Banana. ") == "apple banana"
    assert exact_match("Yes", "yes") and exact_match(") ]", ")  ]") and not exact_match("(A)", "(B)")
    assert lenient_match(" the answer is (a) or (b)", "(A)")  # the paper's scorer: containment
    assert lenient_match(" 12", "1") and not lenient_match(" no", "Yes")


def test_bbh_task_scores_both_ways_and_macro_average():
    items = [{"input": "q", "target": t} for t in ("(A)", "(B)", "(C)", "(A)")]
    generations = [" (A)", " (A) or (B)", " C", " none"]
    result = score_bbh_task("t", items, generations)
    assert [p["extracted_match"] for p in result["predictions"]] == [True, False, True, False]
    assert [p["lenient"] for p in result["predictions"]] == [True, True, False, False]
    assert (result["extracted_match"], result["lenient"], result["answer_kind"]) == (0.5, 0.5, CHOICE)
    other = score_bbh_task("u", [{"input": "q", "target": "Yes"}], [" Yes"])
    for r in (result, other):
        r["num_truncated"] = 0
    summary = summarize_bbh({"t": result, "u": other}, {})
    assert summary["macro_avg"] == {"lenient": 0.75, "extracted_match": 0.75} and summary["num_examples"] == 5


# Table S6 of the paper, mtLoRA column (per-task BBH accuracy, %), and Table 6 (group means) computed from it there.
TABLE_S6_MTLORA = {
    "formal_fallacies": 100.00, "boolean_expressions": 71.66, "movie_recommendation": 84.21,
    "sports_understanding": 63.16, "hyperbaton": 59.51, "navigate": 57.49, "web_of_lies": 50.61,
    "causal_judgement": 51.63, "snarks": 45.71, "object_counting": 38.87, "logical_deduction_three_objects": 47.37,
    "date_understanding": 34.41, "tracking_shuffled_objects_three_objects": 34.82, "disambiguation_qa": 46.15,
    "word_sorting": 29.15, "logical_deduction_five_objects": 33.20, "penguins_in_a_table": 29.37,
    "logical_deduction_seven_objects": 28.34, "reasoning_about_colored_objects": 22.27,
    "salient_translation_error_detection": 17.00, "tracking_shuffled_objects_five_objects": 15.79,
    "tracking_shuffled_objects_seven_objects": 15.79, "dyck_languages": 21.86, "geometric_shapes": 9.72,
    "ruin_names": 22.67, "temporal_sequences": 6.88, "multistep_arithmetic_two": 2.43,
}
TABLE_6_MTLORA = {"Easy": 69.52, "Medium": 41.01, "Hard": 18.78, "Overall": 38.52}


def test_difficulty_groups_reproduce_table_6_from_table_s6():
    assert sorted(t for names in BBH_DIFFICULTY.values() for t in names) == sorted(BBH_TASKS)  # 7 + 8 + 12, each once
    assert {group: len(names) for group, names in BBH_DIFFICULTY.items()} == {"Easy": 7, "Medium": 8, "Hard": 12}
    groups = accuracy_by_difficulty(TABLE_S6_MTLORA)
    assert groups == {group: pytest.approx(value, abs=0.005) for group, value in TABLE_6_MTLORA.items()}


def test_difficulty_groups_of_a_subset_and_in_the_summary():
    assert accuracy_by_difficulty({"navigate": 0.5, "ruin_names": 0.1, "custom_task": 0.3}) == {
        "Easy": 0.5, "Hard": 0.1, "Overall": pytest.approx(0.3)}
    results = {name: score_bbh_task(name, [{"input": "q", "target": "Yes"}], [" Yes" if name == "navigate" else " no"])
               for name in ("navigate", "web_of_lies", "snarks")}
    for result in results.values():
        result["num_truncated"] = 0
    summary = summarize_bbh(results, {})
    assert summary["difficulty"]["lenient"] == {"Easy": 0.5, "Medium": 0.0, "Overall": pytest.approx(1 / 3)}
    assert summary["difficulty_tasks"] == {"Easy": 2, "Medium": 1, "Hard": 0}


def test_kind_comes_from_all_task_targets_when_given():
    # With only "Yes" among the scored items, the label vocabulary must still come from the whole task.
    result = score_bbh_task("t", [{"input": "q", "target": "Yes"}], [" no"], kind_targets=["Yes", "No"])
    assert result["predictions"][0]["extracted"] == "no"


MMLU_SETTINGS = {"num_shots": 5, "category_average": "subjects", "truncation": "reference", "max_length": 2048}


def test_mmlu_scorers_micro_macro_and_categories():
    assert argmax_letter([-1.0, -0.5, -0.5, -3.0]) == "B"  # first on ties
    items = [{"question": "q", "answer": a} for a in "ABC"]
    fits = [(5, "")] * 3
    algebra = score_subject("abstract_algebra", items, fits, [" A", " C", " C"],
                            [[-0.1, -2, -3, -4], [-2, -0.1, -3, -4], [-1, -2, -3, -0.5]])
    assert (algebra["generate"], algebra["loglik"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    anatomy = score_subject("anatomy", [{"question": "q", "answer": "D"}], [(3, "right")], [" A"], [[-4, -3, -2, -1]])
    summary = summarize_mmlu({"abstract_algebra": algebra, "anatomy": anatomy}, MMLU_SETTINGS)
    assert summary["scorers"]["generate"]["micro"] == pytest.approx(2 / 4)
    assert summary["scorers"]["generate"]["macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["scorers"]["loglik"]["micro"] == pytest.approx(3 / 4)
    assert summary["scorers"]["loglik"]["categories"] == {STEM: pytest.approx(2 / 3), OTHER: 1.0}
    assert summary["truncation"] == {"mode": "reference", "max_length": 2048, "prompts_cut": 1,
                                     "prompts_with_dropped_exemplars": 1}


@pytest.mark.parametrize(("token", "letter"), [(" An", "A"), (" All", "A"), (" But", "B"), ("Answer", "A"),
                                               (" Because", "B"), (" Cat", "C"), (" Do", "D")])
def test_reference_mmlu_scorer_takes_the_first_character(token, letter):
    # The reference scripts: generated.strip()[0] == gold, so a longer token that starts with the letter counts.
    assert score_generated_letter(token, letter, "reference") and reference_letter(token) == letter
    assert not score_generated_letter(token, letter, "strict")
    assert score_generated_letter(f" {letter}", letter, "strict") and score_generated_letter(f"{letter}\n", letter)


def test_reference_mmlu_scorer_edge_cases():
    assert reference_letter("") == reference_letter("  \n") == "X"  # empty: "X", never a gold letter
    assert not score_generated_letter(" b", "B", "reference")  # case-sensitive, like the reference
    with pytest.raises(ValueError, match="--mmlu_scorer"):
        score_generated_letter(" A", "A", "lenient")


def test_reference_mmlu_scorer_on_smollm2_tokens(smollm2_tokenizer):
    """Real vocabulary entries that start with a letter but are longer: right for the reference, wrong for strict."""
    ids = [smollm2_tokenizer(text, add_special_tokens=False).input_ids for text in (" An", " All", " But", "Answer")]
    assert all(len(i) == 1 for i in ids)  # each is one token of the vocabulary
    items = [{"question": "q", "answer": a} for a in "AABA"]
    tokens = [smollm2_tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    logprobs = [[-1.0] * 4] * 4
    reference = score_subject("anatomy", items, [(5, "")] * 4, tokens, logprobs, scorer="reference")
    strict = score_subject("anatomy", items, [(5, "")] * 4, tokens, logprobs, scorer="strict")
    assert reference["generate"] == 1.0 and strict["generate"] == 0.0
    assert [p["generated_letter"] for p in reference["predictions"]] == list("AABA")


def test_mmlu_category_average_over_subjects_or_questions():
    """The reference averages subject accuracies within a category; pooling questions weights big subjects."""
    def subject(name, correct, total):
        answers = [{"question": "q", "answer": "A"}] * total
        tokens = [" A"] * correct + [" B"] * (total - correct)
        return score_subject(name, answers, [(5, "")] * total, tokens, [[-1.0, -2.0, -3.0, -4.0]] * total)

    results = {"college_physics": subject("college_physics", 1, 4), "astronomy": subject("astronomy", 6, 8),
               "anatomy": subject("anatomy", 2, 2)}
    by_subject = summarize_mmlu(results, MMLU_SETTINGS)["scorers"]["generate"]["categories"]
    by_question = summarize_mmlu(results, {**MMLU_SETTINGS, "category_average": "questions"})["scorers"]["generate"]
    assert by_subject == {STEM: pytest.approx((1 / 4 + 6 / 8) / 2), OTHER: 1.0}
    assert by_question["categories"] == {STEM: pytest.approx(7 / 12), OTHER: 1.0}
    assert by_question["micro"] == pytest.approx(9 / 14)  # the overall score is over questions either way


def test_heldout_summary_averages_over_tasks():
    predictions = [{"task_type": "a", "exact": True, "lenient": True}, {"task_type": "a", "exact": False, "lenient": True},
                   {"task_type": "b", "exact": False, "lenient": False}]
    summary = summarize_heldout(predictions)
    assert summary["average"] == {"exact": 0.25, "lenient": 0.5}


def test_batching_helpers():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert truncate_left([1, 10, 11, 12], 3, keep_first=1) == [1, 11, 12]
    assert truncate_left([10, 11, 12], 2, keep_first=1) == [11, 12]
    assert truncate_right([1, 10, 11, 12], 3) == [1, 10, 11] and truncate_right([1, 10], 3) == [1, 10]
    with pytest.raises(ValueError, match="--batch_size"):
        next_token_scores(tiny_llama(vocab_size=50), IdTokenizer(), [[1, 2]], [3], batch_size=0)


class IdTokenizer:
    """Minimal tokenizer stand-in for the batching functions (they only need ids and decode)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


ADAPTERS = {
    "base": None,
    "hydralora": AdapterConfig(method="hydralora", lora_rank=4, lora_nums=3, lora_dropout=0.0),
    "mtlora_block_fgr": AdapterConfig(method="mtlora", lora_rank=4, lora_nums=3, lora_dropout=0.0,
                                      enable_block_adapter=True, block_adapter_type="both",
                                      enable_fine_grained_routing=True, routing_group_size=16),
}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_batched_scores_match_one_at_a_time_on_a_random_model(adapter):
    # Routed adapters act per token, so left padding must not change any real token's output either.
    model = tiny_llama(vocab_size=50, seed=0)
    if ADAPTERS[adapter] is not None:
        randomize_adapters(attach_adapters(model, ADAPTERS[adapter])).eval()
    prompts = [[1, 5, 9, 13, 7], [1, 8], [1, 3, 3, 4, 20, 21, 22], [1, 40, 41]]
    batched = next_token_scores(model, IdTokenizer(), prompts, [3, 4, 5], batch_size=3)
    generated = generate_batched(model, IdTokenizer(), prompts, max_new_tokens=5, batch_size=3)
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        reference = torch.log_softmax(logits, -1)[[3, 4, 5]]
        assert batched.greedy_ids[index] == int(logits.argmax())
        assert torch.allclose(torch.tensor(batched.candidate_logprobs[index]), reference, atol=1e-5)
        new_tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                    eos_token_id=[2])[0, len(prompt):].tolist()
        until_eos = new_tokens[:new_tokens.index(2)] if 2 in new_tokens else new_tokens
        assert generated[index] == IdTokenizer().decode(until_eos)
