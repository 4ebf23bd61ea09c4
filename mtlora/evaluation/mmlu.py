"""MMLU, 5-shot with the dev exemplars: prompts, data loading, both scorers, result files.

Prompt format of the paper (METHOD.md gives no header line, so none by default; ``prompt_header``
can add one, e.g. the Hendrycks header via ``HENDRYCKS_HEADER``):
    "Question: {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n" x 5, then the test question
    ending in "Answer:".

Two scorers from one forward pass per batch (the next-token logits after "Answer:"):
- ``generate`` (the paper's): the greedy next token, decoded and stripped, equals the gold letter;
- ``loglik`` (the ecosystem's): argmax over the log-probs of the four letter tokens. The letter
  tokens are the ones the tokenizer produces for "Answer: X" after "Answer:" (see
  :func:`letter_token_ids`); for SmolLM2 they are " A"=330, " B"=389, " C"=340, " D"=422, for
  LLaMA-2 the sentencepiece pieces "▁A".."▁D".
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtlora.errors import InvalidInput, MissingInput
from mtlora.evaluation.answers import argmax_letter, score_generated_letter
from mtlora.evaluation.batching import next_token_scores, truncate_left
from mtlora.evaluation.reporting import markdown_table, mean, write_results
from mtlora.evaluation.selection import select_requested

LETTERS = "ABCD"
NUM_SHOTS = 5
ANSWER_CUE = "Answer:"
HENDRYCKS_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
HEADER_PRESETS = {"none": "", "hendrycks": HENDRYCKS_HEADER}
CSV_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]

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


def build_mmlu_prompt(exemplars: Sequence[dict], item: dict, header: str = "") -> str:
    """The full k-shot prompt text (``header`` already formatted)."""
    return header + "".join(format_exemplar(ex) for ex in exemplars) + format_question(item)


def fit_prompt(tokenizer: PreTrainedTokenizerBase, exemplars: Sequence[dict], item: dict, header: str,
               max_length: int) -> tuple[list[int], int, bool]:
    """Token ids of the longest prompt that fits: (ids, shots used, cut from the left).

    Whole exemplars are dropped first (the last ones, keeping the order of the rest); if the
    zero-shot prompt is still too long it is cut from the left, so "Answer:" always survives.
    """
    for shots in range(len(exemplars), -1, -1):
        ids = tokenizer(build_mmlu_prompt(exemplars[:shots], item, header)).input_ids
        if len(ids) <= max_length:
            return ids, shots, False
    return truncate_left(ids, max_length, keep_first=tokenizer.bos_token_id), 0, True


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


def load_mmlu_csv(path: str | Path) -> list[dict]:
    """Rows of an MMLU CSV as {question, choices, answer letter}.

    Accepts the header ``question,choice0..choice3,answer`` (answer an index 0-3 or a letter) and
    the original headerless files (answer a letter).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if rows and [cell.strip().lower() for cell in rows[0]] == CSV_HEADER:
        rows = rows[1:]
    return [_parse_row(row, path, number) for number, row in enumerate(rows, start=1)]


def _parse_row(row: list[str], path: Path, number: int) -> dict:
    if len(row) != 6:
        raise InvalidInput(f"{path}, row {number}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
    answer = row[5].strip()
    if answer in ("0", "1", "2", "3"):
        answer = LETTERS[int(answer)]
    if answer not in LETTERS:
        raise InvalidInput(f"{path}, row {number}: answer {row[5]!r} is neither a letter A-D nor an index 0-3")
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


def score_subject(subject: str, items: Sequence[dict], fits: Sequence[tuple[int, bool]],
                  generated: Sequence[str], logprobs: Sequence[Sequence[float]]) -> dict:
    """Per-subject result for both scorers, every prediction kept."""
    predictions = []
    for index, (item, (shots, cut), token, scores) in enumerate(zip(items, fits, generated, logprobs, strict=True)):
        loglik_letter = argmax_letter(scores)
        predictions.append({
            "index": index, "question": item["question"], "answer": item["answer"], "generated_token": token,
            "generate_correct": score_generated_letter(token, item["answer"]),
            "loglik_prediction": loglik_letter, "loglik_correct": loglik_letter == item["answer"],
            "logprobs": dict(zip(LETTERS, scores)), "num_shots": shots, "left_truncated": cut,
        })
    return {
        "subject": subject, "category": SUBJECT_CATEGORY.get(subject, "uncategorised"),
        "num_examples": len(items),
        "generate": mean([p["generate_correct"] for p in predictions]),
        "loglik": mean([p["loglik_correct"] for p in predictions]),
        "predictions": predictions,
    }


def run_mmlu(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path,
             subjects: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 8,
             num_shots: int = NUM_SHOTS, prompt_header: str = "", max_length: int | None = None,
             output_dir: str | Path | None = None, metadata: dict | None = None) -> dict:
    """Evaluate MMLU k-shot with both scorers; returns the summary.

    ``max_length`` (default: the model's max positions) bounds prompt + the one answer token.
    ``metadata`` (e.g. the model name) is stored with the settings.
    With ``output_dir``: ``subjects/<subject>.json``, ``summary.json`` and ``summary.md``.
    """
    model.eval()
    names = resolve_subjects(data_dir, subjects)
    max_length = max_length or model.config.max_position_embeddings
    candidates = letter_token_ids(tokenizer)
    per_subject, prompts, fits = {}, [], []
    for subject in names:
        dev, test = load_subject(data_dir, subject)
        test = test[:limit] if limit is not None else test
        header = format_header(prompt_header, subject)
        start = len(prompts)
        for item in test:
            ids, shots, cut = fit_prompt(tokenizer, dev[:num_shots], item, header, max_length - 1)
            prompts.append(ids)
            fits.append((shots, cut))
        per_subject[subject] = (test, start, len(prompts))
    scores = next_token_scores(model, tokenizer, prompts, candidates, batch_size, desc="MMLU")
    generated = [tokenizer.decode([token]) for token in scores.greedy_ids]
    results = {s: score_subject(s, test, fits[a:b], generated[a:b], scores.candidate_logprobs[a:b])
               for s, (test, a, b) in per_subject.items()}
    settings = {**(metadata or {}), "limit": limit, "batch_size": batch_size, "num_shots": num_shots,
                "prompt_header": prompt_header, "max_length": max_length,
                "letter_token_ids": {letter: {"id": i, "token": tokenizer.convert_ids_to_tokens(i)}
                                     for letter, i in zip(LETTERS, candidates)}}
    summary = summarize_mmlu(results, settings)
    if output_dir is not None:
        write_results(output_dir, "subjects", results, summary, mmlu_markdown(summary))
    return summary


def summarize_mmlu(results: dict[str, dict], settings: dict) -> dict:
    """Micro (over questions), macro (over subjects) and per-category accuracy for both scorers."""
    predictions = {s: r["predictions"] for s, r in results.items()}
    scorers = {}
    for scorer in ("generate", "loglik"):
        key = f"{scorer}_correct"
        by_category = {c: [p[key] for s, ps in predictions.items() if results[s]["category"] == c for p in ps]
                       for c in CATEGORIES}
        scorers[scorer] = {
            "micro": mean([p[key] for ps in predictions.values() for p in ps]),
            "macro": mean([r[scorer] for r in results.values()]),
            "categories": {c: mean(v) for c, v in by_category.items() if v},
        }
    all_predictions = [p for ps in predictions.values() for p in ps]
    return {
        "benchmark": "mmlu", "settings": settings, "scorers": scorers,
        "subjects": {s: {k: r[k] for k in ("category", "num_examples", "generate", "loglik")}
                     for s, r in results.items()},
        "num_examples": len(all_predictions),
        "truncation": {
            "prompts_with_dropped_exemplars": sum(p["num_shots"] < settings["num_shots"] for p in all_predictions),
            "prompts_cut_from_left": sum(p["left_truncated"] for p in all_predictions),
        },
    }


def mmlu_markdown(summary: dict) -> str:
    """Markdown: per-subject table, then micro/macro/category averages of both scorers (in %)."""
    rows = [[s, v["category"], v["num_examples"], f"{100 * v['generate']:.1f}", f"{100 * v['loglik']:.1f}"]
            for s, v in summary["subjects"].items()]
    subject_table = markdown_table(["subject", "category", "n", "generate (paper) %", "loglik %"], rows)
    gen, ll = summary["scorers"]["generate"], summary["scorers"]["loglik"]
    average_rows = [["**micro average** (over questions)", f"{100 * gen['micro']:.1f}", f"{100 * ll['micro']:.1f}"],
                    ["macro average (over subjects)", f"{100 * gen['macro']:.1f}", f"{100 * ll['macro']:.1f}"]]
    average_rows += [[c, f"{100 * gen['categories'][c]:.1f}", f"{100 * ll['categories'][c]:.1f}"]
                     for c in CATEGORIES if c in gen["categories"]]
    averages = markdown_table(["average", "generate (paper) %", "loglik %"], average_rows)
    trunc = summary["truncation"]
    note = (f"{summary['num_examples']} questions; prompts with dropped exemplars: "
            f"{trunc['prompts_with_dropped_exemplars']}, cut from the left: {trunc['prompts_cut_from_left']}.")
    return f"{averages}\n\n{note}\n\n{subject_table}"

