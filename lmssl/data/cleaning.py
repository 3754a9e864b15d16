"""Bad rows are skipped and counted, never a crash in the middle of a run: empty or missing
texts, text that was not valid UTF-8 (decoded with replacement characters), absurdly long rows.
"""

from __future__ import annotations

from collections import Counter

from lmssl.errors import LmsslError

REPLACEMENT = "\ufffd"  # what invalid UTF-8 decodes to with encoding_errors="replace"


def _reason(text, max_chars: int) -> str:
    if text is None:
        return "missing"
    if not isinstance(text, str):
        return "not_text"
    if not text.strip():
        return "empty"
    if REPLACEMENT in text:
        return "invalid_utf8"
    if len(text) > max_chars:
        return "too_long"
    return ""


def clean_texts(dataset, column: str, max_chars: int, where: str):
    """(dataset without bad rows, {reason: count}). Raises when nothing usable remains."""
    reasons = [_reason(t, max_chars) for t in dataset[column]]
    counts = Counter(r for r in reasons if r)
    if counts:
        keep = [i for i, r in enumerate(reasons) if not r]
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        detail = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.most_common())
        raise LmsslError(f"{where}: no usable text in column {column!r} ({detail or 'no rows'})")
    return dataset, {f"data/skipped_{reason}": float(n) for reason, n in counts.items()}
