"""Evaluators: BBH 3-shot, MMLU 5-shot and held-out instruction accuracy."""

from mtlora.evaluation.bbh import run_bbh
from mtlora.evaluation.heldout import evaluate_heldout
from mtlora.evaluation.mmlu import run_mmlu

__all__ = ["evaluate_heldout", "run_bbh", "run_mmlu"]
