"""The tokenizer report card: how a vocabulary fits held-out text (coverage, fertility, bytes per
token, unknowns, exact round trips, longest tokens), alone or beside a reference tokenizer."""

from __future__ import annotations

import glob
import gzip
import json
import lzma
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from lmssl.errors import LmsslError

LONGEST = 10  # longest tokens listed on the card


def report_card(tokenizer, texts: Iterable[str], name: str = "") -> dict[str, Any]:
    """Figures for `tokenizer` on `texts` (no special tokens added; words are whitespace-separated)."""
    texts = [t for t in texts if t]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    tokens = sum(len(row) for row in ids)
    words = sum(len(t.split()) for t in texts)
    size = sum(len(t.encode("utf-8")) for t in texts)
    unk = tokenizer.unk_token_id
    exact = sum(tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
                for row, text in zip(ids, texts))
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    pieces = [(tokenizer.decode([i], clean_up_tokenization_spaces=False), i) for i in range(vocab) if i not in special]
    longest = sorted(pieces, key=lambda p: (-len(p[0].strip()), p[1]))[:LONGEST]
    return {
        "name": name,
        "vocab_size": vocab,
        "vocab_used": len({i for row in ids for i in row}) / vocab,
        "texts": len(texts),
        "bytes": size,
        "words": words,
        "tokens": tokens,
        "fertility": tokens / words if words else 0.0,
        "bytes_per_token": size / tokens if tokens else 0.0,
        "unk_rate": (sum(row.count(unk) for row in ids) / tokens) if tokens and unk is not None else 0.0,
        "roundtrip_exact": exact / len(texts) if texts else 0.0,
        "longest_tokens": [piece for piece, _ in longest],
    }


ROWS = (  # (key, label, format)
    ("vocab_size", "vocabulary size", "{:,}"),
    ("vocab_used", "share of vocabulary used on held-out text", "{:.1%}"),
    ("fertility", "fertility (tokens per word)", "{:.3f}"),
    ("bytes_per_token", "bytes per token", "{:.3f}"),
    ("unk_rate", "unknown-token rate", "{:.3%}"),
    ("roundtrip_exact", "exact round trips (decode(encode(x)) == x)", "{:.1%}"),
    ("texts", "held-out texts", "{:,}"),
    ("bytes", "held-out bytes", "{:,}"),
)


def format_card(card: dict[str, Any], reference: Optional[dict[str, Any]] = None) -> str:
    """Markdown: one column per tokenizer, then each one's longest tokens."""
    cards = [card] + ([reference] if reference else [])
    head = "| | " + " | ".join(c.get("name") or "tokenizer" for c in cards) + " |"
    lines = ["### Tokenizer report card", "", head, "|---" * (len(cards) + 1) + "|"]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(c[key]) for c in cards) + " |")
    lines.append("")
    for c in cards:
        shown = ", ".join(f"`{t.strip()}`" for t in c["longest_tokens"])
        lines.append(f"Longest tokens of {c.get('name') or 'tokenizer'}: {shown}")
    trained = card.get("trained_on")
    if trained:
        who = {"lmssl": "lmssl's native trainer", "tokenizers": "the tokenizers library's trainer"}.get(
            trained.get("engine"), "an unnamed trainer")
        lines += ["", f"Trained on {trained['texts']:,} texts ({trained['bytes'] / 1e6:.1f} MB) by {who}."]
    return "\n".join(lines) + "\n"


def write_card(card: dict[str, Any], folder: Path) -> None:
    (Path(folder) / "report.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (Path(folder) / "report.md").write_text(format_card(card))


def read_texts(patterns: list[str], encoding: str = "utf-8", max_bytes: Optional[int] = 2_000_000) -> list[str]:
    """Non-empty lines of local text files (.xz/.gz read as they are), up to max_bytes."""
    texts, size = [], 0
    for pattern in patterns:
        paths = sorted(glob.glob(os.path.expanduser(pattern)))
        if not paths:
            raise LmsslError(f"--data: no file matches {pattern!r}")
        for path in paths:
            opener = {".xz": lzma.open, ".gz": gzip.open}.get(Path(path).suffix, open)
            try:
                with opener(path, "rt", encoding=encoding) as handle:
                    for line in handle:
                        line = line.rstrip("\n")
                        if not line:
                            continue
                        texts.append(line)
                        size += len(line.encode("utf-8"))
                        if max_bytes is not None and size >= max_bytes:
                            return texts
            except (UnicodeDecodeError, lzma.LZMAError, OSError) as err:
                raise LmsslError(f"--data: cannot read {path} as {encoding} text: {err}") from None
    if not texts:
        raise LmsslError(f"--data: {', '.join(patterns)} holds no text")
    return texts


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise LmsslError(f"{folder!r} is not a folder; give a tokenizer folder (a tokenizer stage's output)")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise LmsslError(f"{folder!r} holds no tokenizer AutoTokenizer can load: {err}") from None


def report_command(folder: str, data: list[str], reference: Optional[str] = None, encoding: str = "utf-8",
                   max_bytes: Optional[int] = 2_000_000) -> str:
    """`lmssl report tokenizer`: the card for one folder (and a reference) on the given text files."""
    texts = read_texts(data, encoding, max_bytes)
    card = report_card(load_tokenizer(folder), texts, name=Path(folder).name)
    other = report_card(load_tokenizer(reference), texts, name=Path(reference).name) if reference else None
    if other and other["name"] == card["name"]:
        card["name"], other["name"] = str(folder), str(reference)
    return format_card(card, other)
