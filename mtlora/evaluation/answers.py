"""Answer extraction and scoring for BBH (free-form generations) and MMLU (letter choices).

Two BBH scorers are kept side by side:
- ``lenient``: the reference/paper scorer, a hit when the gold answer occurs anywhere in the
  generation (case-insensitive);
- ``extracted_match``: this package's own stricter scorer, the answer is extracted from the
  generation (first answer line, shaped by the task's answer kind) and compared after normalisation.
  It is not lm-eval's ``bbh_fewshot`` metric (that one compares the raw generation, cut at "Q" or a
  blank line, without extraction or stripping: ``eval_harness.py`` runs it).

Two forms of the MMLU one-token scorer (``MMLU_SCORERS``):
- ``reference``: the reference scripts' rule, the first character of the stripped decoded token
  ("X" when empty) equals the gold letter, so " An", " All" or "Answer" count as "A";
- ``strict``: the whole stripped token equals the gold letter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mtlora.errors import InvalidInput

CHOICE = "choice"  # "(A)" .. "(R)" options
LABEL = "label"  # a small closed vocabulary: yes/no, True/False, valid/invalid
NUMBER = "number"  # integers (object counting, arithmetic)
FREE = "free"  # word lists, dyck sequences, anything else: the whole answer line

KIND_MAJORITY = 0.95  # share of targets that must fit a kind
LABEL_VOCABULARIES = ({"yes", "no"}, {"true", "false"}, {"valid", "invalid"})
_CHOICE_RE = re.compile(r"^\([A-Z]\)$")
_NUMBER_RE = re.compile(r"^-?\d+$")
_FIND_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")
_BARE_CHOICE_RE = re.compile(r"^([A-Z])(?:[).:](?:\s|$)|$)")  # "A", "A)", "A." but not "I am"
_FIND_NUMBER_RE = re.compile(r"-?\d[\d,]*")
_ANSWER_PREFIX_RE = re.compile(r"^(?:so\s+)?(?:the\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
_NEXT_QUESTION_RE = re.compile(r"(?:^|\n)\s*Q:")


def infer_answer_kind(targets: Sequence[str]) -> tuple[str, frozenset[str]]:
    """The answer kind of a task from its gold targets, plus the label vocabulary for ``LABEL``.

    The kind is a property of the task format, so it is inferred once per task (from all its
    targets), never per item. A few stray targets are tolerated (BBH's movie_recommendation and
    ruin_names each hold one or two free-text targets among "(A)".."(E)"): those items are still
    extracted as the task's kind, so they count as exact misses, as in the usual harnesses.
    """
    stripped = [t.strip() for t in targets]
    if _share(stripped, _CHOICE_RE.match) >= KIND_MAJORITY:
        return CHOICE, frozenset()
    lowered = {t.lower() for t in stripped}
    for vocabulary in LABEL_VOCABULARIES:
        if lowered and lowered <= vocabulary:
            return LABEL, frozenset(vocabulary)
    if _share(stripped, _NUMBER_RE.match) >= KIND_MAJORITY:
        return NUMBER, frozenset()
    return FREE, frozenset()


def _share(items: Sequence[str], predicate) -> float:
    return sum(1 for item in items if predicate(item)) / len(items) if items else 0.0


def answer_line(generation: str) -> str:
    """The text the model gave as its answer: before the next "Q:", first non-empty line."""
    text = _NEXT_QUESTION_RE.split(generation, maxsplit=1)[0]
    for line in text.splitlines():
        if line.strip():
            return _ANSWER_PREFIX_RE.sub("", line.strip())
    return ""


def extract_answer(generation: str, kind: str, vocabulary: frozenset[str] = frozenset()) -> str:
    """Extract the answer of ``kind`` from a generation; "" when nothing of that kind is found."""
    line = answer_line(generation)
    if kind == CHOICE:
        return _extract_choice(line)
    if kind == LABEL:
        return _extract_label(line, vocabulary)
    if kind == NUMBER:
        match = _FIND_NUMBER_RE.search(line)
        return match.group(0).replace(",", "") if match else ""
    return line


def _extract_choice(line: str) -> str:
    match = _FIND_CHOICE_RE.search(line)
    if match:
        return f"({match.group(1).upper()})"
    bare = _BARE_CHOICE_RE.match(line)  # "A" / "A)" / "A." without brackets
    return f"({bare.group(1)})" if bare else ""


def _extract_label(line: str, vocabulary: frozenset[str]) -> str:
    # Earliest whole-word hit, so "No, it is not valid" gives "no"; \b keeps "valid" out of "invalid".
    pattern = r"\b(" + "|".join(sorted(vocabulary, key=len, reverse=True)) + r")\b"
    match = re.search(pattern, line, re.IGNORECASE)
    return match.group(1) if match else ""


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding quotes and a trailing period."""
    text = " ".join(text.strip().lower().split())
    text = text.strip("\"'`")
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, target: str) -> bool:
    """Exact match after :func:`normalize`."""
    return normalize(prediction) == normalize(target)


def lenient_match(generation: str, target: str) -> bool:
    """The reference BBH scorer: the gold answer occurs anywhere in the generation (case-insensitive)."""
    return target.strip().lower() in generation.lower()


MMLU_SCORERS = ("reference", "strict")
NO_LETTER = "X"  # the reference's prediction for an empty (or whitespace-only) token


def reference_letter(token_text: str) -> str:
    """The reference scripts' prediction: first character of the stripped token text, "X" when empty."""
    stripped = token_text.strip()
    return stripped[0] if stripped else NO_LETTER


def score_generated_letter(token_text: str, letter: str, scorer: str = "reference") -> bool:
    """The one greedy token against the gold letter: ``reference`` (first character of the stripped
    token) or ``strict`` (the whole stripped token)."""
    if scorer == "reference":
        return reference_letter(token_text) == letter
    if scorer == "strict":
        return token_text.strip() == letter
    raise InvalidInput(f"--mmlu_scorer: unknown {scorer!r}; choose from {', '.join(MMLU_SCORERS)}")


def argmax_letter(logprobs: Sequence[float], letters: Sequence[str] = "ABCD") -> str:
    """The letter with the highest log-probability (first one on ties)."""
    best = max(range(len(letters)), key=lambda i: (logprobs[i], -i))
    return letters[best]
