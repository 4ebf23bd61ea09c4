"""Which BBH tasks or MMLU subjects to evaluate (checked against the data folder), and checked option values."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtlora.errors import InvalidInput


def select_requested(requested: Sequence[str] | None, present: list[str], flag: str, data_dir: str | Path) -> list[str]:
    """The requested names in order without repeats (all of ``present`` when none); unknown names raise,
    listing the valid ones."""
    if not requested:
        return present
    unknown = [name for name in requested if name not in present]
    if unknown:
        raise InvalidInput(f"{flag}: unknown {unknown}; available in {data_dir}: {', '.join(present)}")
    return list(dict.fromkeys(requested))



def check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
    """Raise naming ``flag`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidInput(f"{flag}: unknown {value!r}; choose from {', '.join(choices)}")
