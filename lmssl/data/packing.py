"""Tokenize documents and pack them into fixed-length blocks, so no compute goes to padding.

Documents are tokenized once (batched `datasets.map`, cached by fingerprint) and concatenated
with a separator; blocks are cut from the stream and the last, shorter block is kept, not dropped.
"""

from __future__ import annotations


def tokenize_column(dataset, tokenizer, column: str, desc: str = "tokenizing"):
    def encode(batch):
        texts = [t for t in batch[column] if t and t.strip()]
        return {"ids": tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=desc)


def pack_blocks(dataset, content_length: int, separator: list[int], prefix: list[int], suffix: list[int],
                desc: str = "packing"):
    """Concatenate token lists (separator between documents) into blocks of
    prefix + content_length tokens + suffix. The remainder of each map batch is kept as a
    shorter block rather than dropped."""

    def pack(batch):
        stream: list[int] = []
        for ids in batch["ids"]:
            if not ids:
                continue
            if stream and separator:
                stream.extend(separator)
            stream.extend(ids)
        blocks = [prefix + stream[i:i + content_length] + suffix for i in range(0, len(stream), content_length)]
        return {"input_ids": blocks}

    return dataset.map(pack, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc=desc)
