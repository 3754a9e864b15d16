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


def clean_texts(dataset, column: str, max_chars: int, where: str, keep_blank: bool = False):
    """(dataset without bad rows, {metric name: count}). With keep_blank, blank rows stay (they
    separate documents) and bad rows become blank; otherwise bad and blank rows are dropped.
    Raises when nothing usable remains."""

    def mark(batch):
        return {"_skip": [_reason(t, max_chars) for t in batch[column]]}

    marked = dataset.map(mark, batched=True, desc="checking rows")
    counts = Counter(r for r in marked["_skip"] if r and not (keep_blank and r == "empty"))
    if keep_blank:
        def blank_bad(batch):
            return {column: ["" if r else t for t, r in zip(batch[column], batch["_skip"])]}

        cleaned = marked.map(blank_bad, batched=True, desc="blanking bad rows") if counts else marked
        usable = sum(1 for r in marked["_skip"] if not r)
    else:
        cleaned = marked.filter(lambda batch: [not r for r in batch["_skip"]], batched=True, desc="dropping bad rows")
        usable = len(cleaned)
    if usable == 0:
        detail = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.most_common())
        raise LmsslError(f"{where}: no usable text in column {column!r} ({detail or 'only blank rows'})")
    return cleaned.remove_columns("_skip"), {f"data/skipped_{reason}": float(n) for reason, n in counts.items()}
