"""Sentence pairs for next-sentence (BERT) and sentence-order (ALBERT) prediction, cut once from
tokenized documents with seeded, cached `datasets.map` calls; masks on them are drawn per batch."""

from __future__ import annotations

import random
from lmssl.data.text import split_sentences
from lmssl.errors import LmsslError

IS_NEXT, NOT_NEXT = 0, 1          # BertForPreTraining's next_sentence_label: 0 = B continues A
IN_ORDER, SWAPPED = 0, 1          # sentence_order_label of ALBERT's SOP
DOCS_PER_BATCH = 1000             # random B segments come from other documents of the same map batch


def tokenize_sentences(dataset, tokenizer, column: str = "text"):
    """One row per document: `sentences` (token ids per sentence) and `n_sentences`."""

    def encode(batch):
        per_doc = [split_sentences(text or "") for text in batch[column]]
        flat = [s for sentences in per_doc for s in sentences]
        ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, k = [], 0
        for sentences in per_doc:
            out.append([x for x in ids[k:k + len(sentences)] if x])
            k += len(sentences)
        keep = [i for i, s in enumerate(out) if s]
        return {"sentences": [out[i] for i in keep], "n_sentences": [len(out[i]) for i in keep]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="sentences")


def _flat(segments: list[list[int]]) -> list[int]:
    return [t for s in segments for t in s]


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> None:
    """Trim the longer side until both fit: A loses tokens at its start, B at its end, so the
    junction between them (the thing NSP and SOP judge) is never cut away."""
    while len(a) + len(b) > max_tokens:
        if len(a) > len(b):
            del a[0]
        else:
            b.pop()


def _target_length(rng: random.Random, max_tokens: int, short_seq_prob: float) -> int:
    """BERT trains on shorter sequences now and then so the model also sees short inputs."""
    return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens


def nsp_pairs(documents: list[list[list[int]]], index: int, rng: random.Random, max_tokens: int,
              short_seq_prob: float = 0.1) -> list[dict]:
    """BERT's pairs from document `index`: segment A is one or more sentences; B is the true
    continuation (label IS_NEXT) half the time, else a span of another document (NOT_NEXT).
    A chunk bound for a true continuation grows until it has two sentences, so labels stay
    balanced; a one-sentence document gives no pairs (it still serves as another's random B).
    Each pair says where B came from (`b_doc`), so tests can check it."""
    doc = documents[index]
    others = [j for j in range(len(documents)) if j != index and documents[j]]
    if len(doc) < 2:
        return []
    pairs, chunk, length, i, random_b = [], [], 0, 0, None
    target = _target_length(rng, max_tokens, short_seq_prob)
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        last = i == len(doc) - 1
        if last or length >= target:
            if random_b is None:
                random_b = bool(others) and rng.random() < 0.5
            if not random_b and len(chunk) == 1 and not last:
                i += 1
                continue
            random_b = random_b or len(chunk) == 1
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = _flat(chunk[:a_end])
            if random_b and others:
                label, b_doc = NOT_NEXT, rng.choice(others)
                other = documents[b_doc]
                start, b = rng.randint(0, len(other) - 1), []
                for sentence in other[start:]:
                    b.extend(sentence)
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # the unused sentences of A's chunk start the next chunk
            else:
                label, b_doc, b = IS_NEXT, index, _flat(chunk[a_end:])
            truncate_pair(a, b, max_tokens)
            if a and b:
                pairs.append({"a": a, "b": b, "label": label, "b_doc": b_doc})
            chunk, length, random_b = [], 0, None
            target = _target_length(rng, max_tokens, short_seq_prob)
        i += 1
    return pairs


def sop_pairs(documents: list[list[list[int]]], index: int, rng: random.Random, max_tokens: int,
              short_seq_prob: float = 0.1) -> list[dict]:
    """ALBERT's pairs: two consecutive spans of sentences of one document, in order (IN_ORDER)
    or swapped (SWAPPED) with probability 1/2. A last chunk of a single sentence is skipped."""
    doc = documents[index]
    pairs, chunk, length = [], [], 0
    target = _target_length(rng, max_tokens, short_seq_prob)
    for i, sentence in enumerate(doc):
        chunk.append(sentence)
        length += len(sentence)
        if len(chunk) >= 2 and (i == len(doc) - 1 or length >= target):
            a_end = rng.randint(1, len(chunk) - 1)
            a, b = _flat(chunk[:a_end]), _flat(chunk[a_end:])
            truncate_pair(a, b, max_tokens)
            label = SWAPPED if rng.random() < 0.5 else IN_ORDER
            if label == SWAPPED:
                a, b = b, a
            pairs.append({"a": a, "b": b, "label": label, "b_doc": index})
            chunk, length = [], 0
            target = _target_length(rng, max_tokens, short_seq_prob)
    return pairs


PAIR_BUILDERS = {"nsp": nsp_pairs, "sop": sop_pairs}


def build_pair_dataset(documents, tokenizer, kind: str, max_length: int, seed: int, short_seq_prob: float,
                       where: str = "pretrain"):
    """Tokenized sentence documents -> rows of input_ids ([CLS] A [SEP] B [SEP]), token_type_ids
    and `pair_label`. Fails before training when no document has two sentences."""
    if len(documents) == 0 or max(documents["n_sentences"]) < 2:
        raise LmsslError(
            f"{where}: the {kind.upper()} objective needs documents of at least two sentences, and this corpus has "
            "none; set `documents: blank_lines` for text where blank lines separate documents, or use mlm/causal_lm"
        )
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise LmsslError(f"{where}: the {kind} objective needs a tokenizer with [CLS] and [SEP] tokens")
    builder, max_tokens = PAIR_BUILDERS[kind], max_length - 3

    def make(batch, indices):
        rng = random.Random(seed * 1_000_003 + indices[0])
        docs = batch["sentences"]
        out: dict[str, list] = {"input_ids": [], "token_type_ids": [], "pair_label": []}
        for d in range(len(docs)):
            for pair in builder(docs, d, rng, max_tokens, short_seq_prob):
                a, b = pair["a"], pair["b"]
                out["input_ids"].append([cls] + a + [sep] + b + [sep])
                out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
                out["pair_label"].append(pair["label"])
        return out

    return documents.map(make, batched=True, batch_size=DOCS_PER_BATCH, with_indices=True,
                         remove_columns=documents.column_names, desc=f"{kind} pairs")

