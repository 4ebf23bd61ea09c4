"""MMLU, 5-shot with the dev exemplars: prompts, data loading, both scorers, result files.

Prompt format of the paper (METHOD.md gives no header line, so none by default; ``prompt_header``
can add one, e.g. the Hendrycks header via ``HENDRYCKS_HEADER``):
    "Question: {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n" x 5, then the test question
    ending in "Answer:".

Two scorers from one forward pass per batch (the next-token logits after the prompt):
- ``generate`` (the paper's): the greedy next token, decoded, against the gold letter, in the
  reference's form (its first character, so " An" counts as "A") or the ``strict`` one (the whole
  stripped token); see :mod:`mtlora.evaluation.answers`;
- ``loglik`` (the ecosystem's): argmax over the log-probs of the four letter tokens. The letter
  tokens are the ones the tokenizer produces for "Answer: X" after "Answer:" (see
  :func:`letter_token_ids`); for SmolLM2 they are " A"=330, " B"=389, " C"=340, " D"=422, for
  LLaMA-2 the sentencepiece pieces "▁A".."▁D".

Over-long prompts (``TRUNCATIONS``): ``reference`` cuts the token ids on the right at 2,048, as the
reference scripts' tokenizer call does (with LLaMA-2 this removes "Answer:" from 510 prompts);
``fit`` drops whole exemplars, then cuts from the left, so the question and "Answer:" are kept whole.
Category scores (``CATEGORY_AVERAGES``): the mean of the category's subject accuracies (``subjects``,
the reference's) or the accuracy over the category's pooled questions (``questions``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput, MissingInput
from mtlora.evaluation import distributed
from mtlora.evaluation.answers import MMLU_SCORERS, argmax_letter, reference_letter, score_generated_letter
from mtlora.evaluation.batching import (REFERENCE_MAX_LENGTH, TRUNCATIONS, next_token_scores, truncate_left,
                                        truncate_right)
from mtlora.evaluation.reporting import markdown_table, mean, write_results
from mtlora.evaluation.selection import check_choice, select_requested
from mtlora.prompts import encode_batch

LETTERS = "ABCD"
NUM_SHOTS = 5
ANSWER_CUE = "Answer:"
HENDRYCKS_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
HEADER_PRESETS = {"none": "", "hendrycks": HENDRYCKS_HEADER}
CSV_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
CATEGORY_AVERAGES = ("subjects", "questions")

STEM, HUMANITIES, SOCIAL, OTHER = "STEM", "humanities", "social sciences", "other (business, health, misc.)"
CATEGORIES = (STEM, HUMANITIES, SOCIAL, OTHER)
# Subject -> category, from the subcategory/category tables of the MMLU repo (hendrycks/test, categories.py).
SUBJECT_CATEGORY = {
    "abstract_algebra": STEM, "anatomy": OTHER, "astronomy": STEM, "business_ethics": OTHER,
    "clinical_knowledge": OTHER, "college_biology": STEM, "college_chemistry": STEM,
    "college_computer_science": STEM, "college_mathematics": STEM, "college_medicine": OTHER,
    "college_physics": STEM, "computer_security": STEM, "conceptual_physics": STEM, "econometrics": SOCIAL,
    "electrical_engineering": STEM, "elementary_mathematics": STEM, "formal_logic": HUMANITIES,
    "global_facts": OTHER, "high_school_biology": STEM, "high_school_chemistry": STEM,
    "high_school_computer_science": STEM, "high_school_european_history": HUMANITIES,
    "high_school_geography": SOCIAL, "high_school_government_and_politics": SOCIAL,
    "high_school_macroeconomics": SOCIAL, "high_school_mathematics": STEM, "high_school_microeconomics": SOCIAL,
    "high_school_physics": STEM, "high_school_psychology": SOCIAL, "high_school_statistics": STEM,
    "high_school_us_history": HUMANITIES, "high_school_world_history": HUMANITIES, "human_aging": OTHER,
    "human_sexuality": SOCIAL, "international_law": HUMANITIES, "jurisprudence": HUMANITIES,
    "logical_fallacies": HUMANITIES, "machine_learning": STEM, "management": OTHER, "marketing": OTHER,
    "medical_genetics": OTHER, "miscellaneous": OTHER, "moral_disputes": HUMANITIES,
    "moral_scenarios": HUMANITIES, "nutrition": OTHER, "philosophy": HUMANITIES, "prehistory": HUMANITIES,
    "professional_accounting": OTHER, "professional_law": HUMANITIES, "professional_medicine": OTHER,
    "professional_psychology": SOCIAL, "public_relations": SOCIAL, "security_studies": SOCIAL,
    "sociology": SOCIAL, "us_foreign_policy": SOCIAL, "virology": OTHER, "world_religions": HUMANITIES,
}


def format_question(item: dict) -> str:
    """One question with its four options, ending in "Answer:"."""
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, item["choices"], strict=True))
    return f"Question: {item['question']}\n{options}{ANSWER_CUE}"


def format_exemplar(item: dict) -> str:
    """A solved exemplar: the question, " {letter}" and a blank line."""
    return f"{format_question(item)} {item['answer']}\n\n"


def format_header(template: str, subject: str) -> str:
    """The header line for ``subject`` (underscores as spaces); ``template`` may use {subject}."""
    return HEADER_PRESETS.get(template, template).format(subject=subject.replace("_", " "))


def check_header(template: str) -> None:
    """Raise naming --prompt_header when ``template`` uses a placeholder other than {subject} (or a stray brace)."""
    try:
        format_header(template, "subject")
    except (KeyError, IndexError, ValueError) as error:
        raise InvalidInput(f"--prompt_header {template!r}: only the placeholder {{subject}} is known "
                           f"(write a literal brace as {{{{ or }}}}); got {type(error).__name__}: {error}") from None


def build_mmlu_prompt(exemplars: Sequence[dict], item: dict, header: str = "") -> str:
    """The full k-shot prompt text (``header`` already formatted)."""
    return header + "".join(format_exemplar(ex) for ex in exemplars) + format_question(item)


def fit_prompt(tokenizer: PreTrainedTokenizerBase, exemplars: Sequence[dict], item: dict, header: str,
               max_length: int) -> tuple[list[int], int, str]:
    """Token ids of the longest prompt that fits (the ``fit`` truncation): (ids, shots used, "left" if cut).

    Whole exemplars are dropped first (the last ones, keeping the order of the rest); if the
    zero-shot prompt is still too long it is cut from the left, so "Answer:" always survives.
    """
    for shots in range(len(exemplars), -1, -1):
        ids = tokenizer(build_mmlu_prompt(exemplars[:shots], item, header)).input_ids
        if len(ids) <= max_length:
            return list(ids), shots, ""
    return truncate_left(ids, max_length, keep_first=tokenizer.bos_token_id), 0, "left"


def subject_prompts(tokenizer: PreTrainedTokenizerBase, exemplars: Sequence[dict], items: Sequence[dict],
                    header: str, truncation: str, max_length: int) -> list[tuple[list[int], int, str]]:
    """(token ids, shots used, cut side "right" / "left" / "") per question; one tokenizer call for all.

    ``reference``: the first ``max_length`` tokens of the k-shot prompt. ``fit``: prompt and the answer
    token within ``max_length`` (:func:`fit_prompt`, for the prompts that are too long).
    """
    full = encode_batch(tokenizer, [build_mmlu_prompt(exemplars, item, header) for item in items])
    if truncation == "reference":
        return [(truncate_right(ids, max_length), len(exemplars), "right" if len(ids) > max_length else "")
                for ids in full]
    return [(ids, len(exemplars), "") if len(ids) <= max_length - 1
            else fit_prompt(tokenizer, exemplars, item, header, max_length - 1) for ids, item in zip(full, items)]


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, letters: str = LETTERS) -> list[int]:
    """Ids of the tokens that follow "Answer:" in "Answer: X", one per letter.

    Tokenising in context matters: after "Answer:" the letter is usually the space-prefixed token
    (" A" in BPE vocabularies, "▁A" in sentencepiece), not the bare "A".
    """
    cue = tokenizer(ANSWER_CUE, add_special_tokens=False).input_ids
    ids = []
    for letter in letters:
        full = tokenizer(f"{ANSWER_CUE} {letter}", add_special_tokens=False).input_ids
        if full[:len(cue)] != cue or len(full) != len(cue) + 1:
            raise ValueError(f"tokenizer does not encode 'Answer: {letter}' as 'Answer:' plus one letter token")
        ids.append(full[-1])
    return ids


# ------------------------------------------------------------------------------------------------ data

def load_mmlu_csv(path: str | Path) -> list[dict]:
    """Rows of an MMLU CSV as {question, choices, answer letter}.

    Accepts the header ``question,choice0..choice3,answer`` (answer an index 0-3 or a letter) and
    the original headerless files (answer a letter). A bad row raises naming ``file:line``.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        rows = [(reader.line_num, row) for row in reader]
    if rows and [cell.strip().lower() for cell in rows[0][1]] == CSV_HEADER:
        rows = rows[1:]
    return [_parse_row(row, path, line) for line, row in rows]


def _parse_row(row: list[str], path: Path, line: int) -> dict:
    if len(row) != 6:
        raise InvalidInput(f"{path}:{line}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
    answer = row[5].strip()
    if answer in ("0", "1", "2", "3"):
        answer = LETTERS[int(answer)]
    if answer not in LETTERS:
        raise InvalidInput(f"{path}:{line}: answer {row[5]!r} is neither a letter A-D nor an index 0-3")
    return {"question": row[0], "choices": row[1:5], "answer": answer}


def available_subjects(data_dir: str | Path) -> list[str]:
    """Subjects with a test file ``test/<subject>_test.csv`` under ``data_dir``."""
    test_dir = Path(data_dir) / "test"
    if not test_dir.is_dir():
        raise MissingInput(
            f"--data_dir {data_dir}: expected folders dev/ and test/ of <subject>_{{dev,test}}.csv "
            "(run `python data/prepare.py mmlu` or point it at an MMLU folder)")
    subjects = sorted(p.name[:-len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise MissingInput(f"--data_dir {data_dir}: test/ holds no <subject>_test.csv files")
    return subjects


def resolve_subjects(data_dir: str | Path, subjects: Sequence[str] | None) -> list[str]:
    """The requested subjects (all when None); unknown names raise, listing the valid ones."""
    return select_requested(subjects, available_subjects(data_dir), "--subjects", data_dir)


def load_subject(data_dir: str | Path, subject: str) -> tuple[list[dict], list[dict]]:
    """(dev exemplars, test questions) of one subject."""
    dev_path = Path(data_dir) / "dev" / f"{subject}_dev.csv"
    if not dev_path.is_file():
        raise MissingInput(f"--data_dir {data_dir}: missing dev exemplars {dev_path}")
    return load_mmlu_csv(dev_path), load_mmlu_csv(Path(data_dir) / "test" / f"{subject}_test.csv")


def load_mmlu(data_dir: str | Path, subjects: Sequence[str] | None = None, num_shots: int = NUM_SHOTS,
              prompt_header: str = "") -> dict[str, tuple[list[dict], list[dict]]]:
    """{subject: (its first ``num_shots`` dev exemplars, its test questions)}, every file read and checked.

    Cheap (a few MB of CSV), so the CLI runs it before loading a model: a bad answer, a missing dev
    file, a subject with fewer dev rows than --num_shots or no questions, and an unknown placeholder in
    --prompt_header all fail here, naming the flag or ``file:line``.
    """
    check_header(prompt_header)
    if num_shots < 0:
        raise InvalidInput(f"--num_shots must be >= 0, got {num_shots}")
    data = {}
    for subject in resolve_subjects(data_dir, subjects):
        dev, test = load_subject(data_dir, subject)
        if num_shots > len(dev):
            raise InvalidInput(f"--num_shots {num_shots}: {Path(data_dir) / 'dev' / f'{subject}_dev.csv'} holds only "
                               f"{len(dev)} exemplars")
        if not test:
            raise InvalidInput(f"{Path(data_dir) / 'test' / f'{subject}_test.csv'}: no questions to score")
        data[subject] = (dev[:num_shots], test)
    return data


# --------------------------------------------------------------------------------------------- scoring

def score_subject(subject: str, items: Sequence[dict], fits: Sequence[tuple[int, str]], generated: Sequence[str],
                  logprobs: Sequence[Sequence[float]], scorer: str = "reference") -> dict:
    """Per-subject result for both scorers, every prediction kept. ``fits``: (shots used, cut side) per item;
    ``scorer``: the form of the ``generate`` scorer (``MMLU_SCORERS``)."""
    predictions = []
    for index, (item, (shots, cut), token, scores) in enumerate(zip(items, fits, generated, logprobs, strict=True)):
        loglik_letter = argmax_letter(scores)
        predictions.append({
            "index": index, "question": item["question"], "answer": item["answer"], "generated_token": token,
            "generated_letter": reference_letter(token) if scorer == "reference" else token.strip(),
            "generate_correct": score_generated_letter(token, item["answer"], scorer),
            "loglik_prediction": loglik_letter, "loglik_correct": loglik_letter == item["answer"],
            "logprobs": dict(zip(LETTERS, scores)), "num_shots": shots, "cut": cut,
        })
    return {
        "subject": subject, "category": SUBJECT_CATEGORY.get(subject, "uncategorised"),
        "num_examples": len(items),
        "generate": mean([p["generate_correct"] for p in predictions]),
        "loglik": mean([p["loglik_correct"] for p in predictions]),
        "predictions": predictions,
    }


def run_mmlu(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path,
             subjects: Sequence[str] | None = None, limit: int | None = None, batch_size: int | None = 8,
             num_shots: int = NUM_SHOTS, prompt_header: str = "", max_length: int | None = None,
             output_dir: str | Path | None = None, metadata: dict | None = None, scorer: str = "reference",
             truncation: str = "reference", category_average: str = "subjects", share_prefix: bool = True) -> dict:
    """Evaluate MMLU k-shot with both scorers; returns the summary.

    ``scorer`` / ``truncation`` / ``category_average``: the reference's forms by default, the corrected
    ones on request (module docstring). ``max_length``: the prompt's token limit, by default 2,048 under
    ``reference`` and the model's max positions (prompt + answer token) under ``fit``. ``batch_size=None``
    chooses it automatically; ``share_prefix`` runs each subject's exemplars once (the same results up to
    floating-point rounding). ``metadata`` (e.g. the model name) is stored with the settings.
    With ``output_dir``: ``subjects/<subject>.json``, ``summary.json`` and ``summary.md``.
    """
    check_choice("--mmlu_scorer", scorer, MMLU_SCORERS)
    check_choice("--truncation", truncation, TRUNCATIONS)
    check_choice("--category_average", category_average, CATEGORY_AVERAGES)
    model.eval()
    data = load_mmlu(data_dir, subjects, num_shots, prompt_header)
    if max_length is None:
        max_length = REFERENCE_MAX_LENGTH if truncation == "reference" else model.config.max_position_embeddings
    candidates = letter_token_ids(tokenizer)
    per_subject, prompts, fits, groups = {}, [], [], []
    for subject, (exemplars, test) in data.items():
        test = test[:limit] if limit is not None else test
        fitted = subject_prompts(tokenizer, exemplars, test, format_header(prompt_header, subject), truncation,
                                 max_length)
        per_subject[subject] = (test, len(prompts), len(prompts) + len(fitted))
        prompts += [ids for ids, _, _ in fitted]
        fits += [(shots, cut) for _, shots, cut in fitted]
        groups += [subject] * len(fitted)
    scores = next_token_scores(model, tokenizer, prompts, candidates, batch_size, desc="MMLU", groups=groups,
                               share_prefix=share_prefix)
    generated = [tokenizer.decode([token], skip_special_tokens=True) for token in scores.greedy_ids]
    results = {s: score_subject(s, test, fits[a:b], generated[a:b], scores.candidate_logprobs[a:b], scorer)
               for s, (test, a, b) in per_subject.items()}
    settings = {**(metadata or {}), "limit": limit, "batch_size": batch_size or "auto", "num_shots": num_shots,
                "prompt_header": prompt_header, "max_length": max_length, "mmlu_scorer": scorer,
                "truncation": truncation, "category_average": category_average, "share_prefix": share_prefix,
                "letter_token_ids": {letter: {"id": i, "token": tokenizer.convert_ids_to_tokens(i)}
                                     for letter, i in zip(LETTERS, candidates)}}
    summary = summarize_mmlu(results, settings)
    if output_dir is not None and distributed.is_main():
        write_results(output_dir, "subjects", results, summary, mmlu_markdown(summary))
    return summary


def category_scores(results: dict[str, dict], scorer: str, average: str) -> dict[str, float]:
    """Per category: the mean of its subjects' accuracies (``subjects``) or the accuracy over its questions
    (``questions``)."""
    scores = {}
    for category in CATEGORIES:
        members = [r for r in results.values() if r["category"] == category]
        if not members:
            continue
        if average == "subjects":
            scores[category] = mean([r[scorer] for r in members])
        else:
            scores[category] = mean([p[f"{scorer}_correct"] for r in members for p in r["predictions"]])
    return scores


def summarize_mmlu(results: dict[str, dict], settings: dict) -> dict:
    """Micro (over questions), macro (over subjects) and per-category accuracy for both scorers; the
    categories as ``settings["category_average"]`` says."""
    scorers = {scorer: {"micro": mean([p[f"{scorer}_correct"] for r in results.values() for p in r["predictions"]]),
                        "macro": mean([r[scorer] for r in results.values()]),
                        "categories": category_scores(results, scorer, settings["category_average"])}
               for scorer in ("generate", "loglik")}
    predictions = [p for r in results.values() for p in r["predictions"]]
    return {
        "benchmark": "mmlu", "settings": settings, "scorers": scorers,
        "subjects": {s: {k: r[k] for k in ("category", "num_examples", "generate", "loglik")}
                     for s, r in results.items()},
        "num_examples": len(predictions),
        "truncation": {
            "mode": settings["truncation"], "max_length": settings["max_length"],
            "prompts_cut": sum(bool(p["cut"]) for p in predictions),
            "prompts_with_dropped_exemplars": sum(p["num_shots"] < settings["num_shots"] for p in predictions),
        },
    }


def mmlu_markdown(summary: dict) -> str:
    """Markdown: micro/macro/category averages of both scorers (in %), then the per-subject table."""
    settings = summary["settings"]
    rows = [[s, v["category"], v["num_examples"], f"{100 * v['generate']:.1f}", f"{100 * v['loglik']:.1f}"]
            for s, v in summary["subjects"].items()]
    generate = f"generate ({settings['mmlu_scorer']}) %"
    subject_table = markdown_table(["subject", "category", "n", generate, "loglik %"], rows)
    gen, ll = summary["scorers"]["generate"], summary["scorers"]["loglik"]
    average_rows = [["**micro average** (over questions)", f"{100 * gen['micro']:.1f}", f"{100 * ll['micro']:.1f}"],
                    ["macro average (over subjects)", f"{100 * gen['macro']:.1f}", f"{100 * ll['macro']:.1f}"]]
    average_rows += [[f"{c} (over {settings['category_average']})", f"{100 * gen['categories'][c]:.1f}",
                      f"{100 * ll['categories'][c]:.1f}"] for c in CATEGORIES if c in gen["categories"]]
    averages = markdown_table(["average", generate, "loglik %"], average_rows)
    trunc = summary["truncation"]
    note = (f"{summary['num_examples']} questions; truncation {trunc['mode']} at {trunc['max_length']} tokens: "
            f"{trunc['prompts_cut']} prompts cut, {trunc['prompts_with_dropped_exemplars']} with dropped exemplars.")
    return f"{averages}\n\n{note}\n\n{subject_table}"
