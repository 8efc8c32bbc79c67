"""Offline text for calibration and evaluation: Python's own documentation (``pydoc_data.topics``, shipped with
CPython under the PSF license), split by topic so calibration and evaluation never share a topic.

    calibration_texts()   # list of str: the topics whose sorted index i has i % 4 != 0
    evaluation_text()     # one str: the topics with i % 4 == 0, joined by blank lines
"""
from __future__ import annotations


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return [(k, topics[k]) for k in sorted(topics)]


def calibration_texts() -> list[str]:
    return [t for i, (_, t) in enumerate(_topics()) if i % 4 != 0]


def evaluation_text() -> str:
    return "\n\n".join(t for i, (_, t) in enumerate(_topics()) if i % 4 == 0)


def split_keys() -> tuple[list[str], list[str]]:
    """(calibration topic names, evaluation topic names): disjoint."""
    items = _topics()
    return ([k for i, (k, _) in enumerate(items) if i % 4 != 0], [k for i, (k, _) in enumerate(items) if i % 4 == 0])
