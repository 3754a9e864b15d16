"""Objectives on real text: masking statistics, whole words, NSP/SOP pairs, causal blocks, errors.

Tokenizers are trained here with the `tokenizers` library on a slice of WikiText-2 (the tokenizer
stage is tested elsewhere): a lowercased WordPiece for BERT, a byte-level BPE for RoBERTa/GPT-2.
"""

from __future__ import annotations

import lzma
import random
from collections import Counter

import pytest
import torch
from conftest import shared_file

from lmssl.data.pairs import IS_NEXT, SWAPPED, build_pair_dataset, nsp_pairs, sop_pairs, tokenize_sentences
from lmssl.data.text import group_lines, split_sentences, to_documents
from lmssl.errors import LmsslError
from lmssl.objectives import OBJECTIVES
from lmssl.objectives.causal_lm import document_positions
from lmssl.objectives.mlm import Options

TRAIN_LINES = 6000   # about 600 KB of WikiText-2: enough for a 2,000-token vocabulary


def wikitext_lines(split: str = "train", limit: int = TRAIN_LINES) -> list[str]:
    with lzma.open(shared_file(f"wikitext-2/{split}.txt.xz"), "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for _, line in zip(range(limit), f)]


def train_tokenizer(kind: str, folder, lines: list[str], vocab_size: int = 2000):
    """A small tokenizer of `kind` (wordpiece: BERT's; bytebpe: RoBERTa/GPT-2's), saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                 show_progress=False))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="session")
def wordpiece(tmp_path_factory):
    return train_tokenizer("wordpiece", tmp_path_factory.mktemp("wordpiece"), wikitext_lines())


@pytest.fixture(scope="session")
def bytebpe(tmp_path_factory):
    return train_tokenizer("bytebpe", tmp_path_factory.mktemp("bytebpe"), wikitext_lines())


def wikitext_documents(limit: int = 1500):
    import datasets

    lines = datasets.Dataset.from_dict({"text": wikitext_lines(limit=limit)})
    return to_documents(lines, "text", "blank_lines")


@pytest.fixture(scope="module")
def documents():
    return wikitext_documents()


def flat_stream(documents_tokens) -> list[int]:
    return [t for sentence in documents_tokens for t in sentence]


def contains(haystack: list[int], needle: list[int]) -> bool:
    """Whether `needle` occurs as a contiguous run of `haystack`."""
    as_text = lambda ids: "," + ",".join(map(str, ids)) + ","  # noqa: E731
    return as_text(needle) in as_text(haystack)


# --------------------------------------------------------------------------- masking

def test_masking_rate_and_80_10_10_split_are_measured_within_tolerance(wordpiece, documents):
    objective = OBJECTIVES["mlm"](Options(), wordpiece, 128)
    blocks = objective.prepare(documents, "text")
    examples = [blocks[i] for i in range(64)]
    chosen = masked = randomized = kept = maskable_total = special_chosen = 0
    torch.manual_seed(0)
    for _ in range(20):
        batch = objective.collate(examples)
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e["input_ids"]) for e in examples], batch_first=True,
                                              padding_value=wordpiece.pad_token_id)
        special = torch.isin(ids, objective.special_ids)
        picked = batch["labels"] != -100
        assert torch.equal(batch["labels"][picked], ids[picked])               # labels hold the original tokens
        special_chosen += int((picked & special).sum())
        maskable_total += int((~special).sum())
        chosen += int(picked.sum())
        masked += int((picked & (batch["input_ids"] == wordpiece.mask_token_id)).sum())
        kept += int((picked & (batch["input_ids"] == ids)).sum())
        randomized += int((picked & (batch["input_ids"] != ids) & (batch["input_ids"] != wordpiece.mask_token_id)).sum())
    assert special_chosen == 0
    assert abs(chosen / maskable_total - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    assert abs(randomized / chosen - 0.1) < 0.01
    assert abs(kept / chosen - 0.1) < 0.01


def test_masks_are_fresh_for_every_batch_draw(wordpiece, documents):
    objective = OBJECTIVES["mlm"](Options(), wordpiece, 128)
    blocks = objective.prepare(documents, "text")
    examples = [blocks[i] for i in range(8)]
    first, second = objective.collate(examples)["labels"], objective.collate(examples)["labels"]
    assert not torch.equal(first, second)


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(wordpiece, documents):
    objective = OBJECTIVES["mlm"](Options(whole_word=True), wordpiece, 128)
    blocks = objective.prepare(documents, "text")
    examples = [blocks[i] for i in range(64)]
    # word starts agree with WordPiece's own marking: a piece starting with ## continues a word
    # (after [CLS] and the block's first token, which always starts a word of its own)
    for e in examples[:8]:
        pieces = wordpiece.convert_ids_to_tokens(e["input_ids"])
        assert [int(not p.startswith("##")) for p in pieces[2:]] == e["word_starts"][2:]
    torch.manual_seed(1)
    batch = objective.collate(examples)
    picked = batch["labels"] != -100
    multi_piece_masked = 0
    for i, e in enumerate(examples):
        words = torch.tensor(e["word_starts"]).cumsum(0)
        for w in words.unique():
            where = (words == w).nonzero().squeeze(1)
            states = picked[i, where]
            assert states.all() or not states.any(), f"word {w} of row {i} is partly masked"
            multi_piece_masked += int(states.all() and len(where) > 1)
    assert multi_piece_masked > 20
    assert abs(picked.sum().item() / (batch["attention_mask"].sum().item() - 2 * len(examples)) - 0.15) < 0.05


def test_sparse_mlm_head_loss_equals_the_full_head_loss(wordpiece, documents):
    from transformers import BertForMaskedLM

    from lmssl.models import ModelConfig, build_config

    objective = OBJECTIVES["mlm"](Options(), wordpiece, 64)
    model = BertForMaskedLM(build_config(ModelConfig(family="bert", size="tiny", dropout=0.0), wordpiece, 64)).eval()
    blocks = objective.prepare(documents, "text")
    batch = objective.collate([blocks[i] for i in range(4)])
    sparse, _ = objective.loss(objective.training_module(model), batch)
    full = model(**batch).loss
    assert torch.allclose(sparse, full, atol=1e-5)


# --------------------------------------------------------------------------- sentence pairs

def test_sentences_split_on_punctuation_but_not_after_abbreviations_or_initials():
    text = 'Dr. Smith met J. R. Tolkien in Oxford. They talked. "Why?" he asked! It was 1937.\nA new line'
    assert split_sentences(text) == ["Dr. Smith met J. R. Tolkien in Oxford.", "They talked.", '"Why?" he asked!',
                                     "It was 1937.", "A new line"]
    assert group_lines([" = A = ", " ", "one", "two", "", "three"]) == ["= A =", "one\ntwo", "three"]


def sentence_documents(documents, tokenizer):
    return tokenize_sentences(documents, tokenizer).to_dict()["sentences"]


def test_nsp_pairs_are_half_true_continuations_from_one_document_and_half_from_another(wordpiece, documents):
    docs = sentence_documents(documents, wordpiece)
    rng, pairs = random.Random(0), []
    for d in range(len(docs)):
        for pair in nsp_pairs(docs, d, rng, 61):
            pairs.append((d, pair))
    labels = Counter(p["label"] for _, p in pairs)
    assert len(pairs) > 500
    assert abs(labels[IS_NEXT] / len(pairs) - 0.5) < 0.08
    for d, pair in pairs:
        assert len(pair["a"]) + len(pair["b"]) <= 61
        if pair["label"] == IS_NEXT:
            assert pair["b_doc"] == d and contains(flat_stream(docs[d]), pair["a"] + pair["b"])
        else:
            assert pair["b_doc"] != d and contains(flat_stream(docs[pair["b_doc"]]), pair["b"])
            assert contains(flat_stream(docs[d]), pair["a"])


def test_pair_rows_never_exceed_max_length_and_mark_segments(wordpiece, documents):
    rows = build_pair_dataset(tokenize_sentences(documents, wordpiece), wordpiece, "nsp", 64, seed=0,
                              short_seq_prob=0.1)
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert max(lengths) <= 64 and min(lengths) >= 5
    assert sum(1 for n in lengths if n < 40) > 0.03 * len(lengths)   # short_seq_prob makes some short pairs
    row = rows[0]
    sep = row["input_ids"].index(wordpiece.sep_token_id)
    assert row["input_ids"][0] == wordpiece.cls_token_id and row["input_ids"][-1] == wordpiece.sep_token_id
    assert row["token_type_ids"] == [0] * (sep + 1) + [1] * (len(row["input_ids"]) - sep - 1)
    again = build_pair_dataset(tokenize_sentences(documents, wordpiece), wordpiece, "nsp", 64, seed=0,
                               short_seq_prob=0.1)
    assert again["pair_label"] == rows["pair_label"]                   # seeded: the same pairs every time


def test_sop_swaps_about_half_the_pairs_and_both_segments_come_from_one_document(wordpiece, documents):
    docs = sentence_documents(documents, wordpiece)
    rng, pairs = random.Random(0), []
    for d in range(len(docs)):
        pairs += [(d, p) for p in sop_pairs(docs, d, rng, 61)]
    swapped = sum(p["label"] == SWAPPED for _, p in pairs)
    assert len(pairs) > 300 and abs(swapped / len(pairs) - 0.5) < 0.08
    for d, pair in pairs:
        first, second = (pair["b"], pair["a"]) if pair["label"] == SWAPPED else (pair["a"], pair["b"])
        assert pair["a"] and pair["b"] and contains(flat_stream(docs[d]), first + second)


def test_nsp_and_sop_refuse_a_corpus_without_multi_sentence_documents(wordpiece):
    import datasets

    titles = datasets.Dataset.from_dict({"text": ["Valkyria Chronicles", "Tower Building", "Robert Boulter"] * 10})
    for name in ("mlm_nsp", "sop"):
        objective = OBJECTIVES[name](OBJECTIVES[name].Options(), wordpiece, 64)
        with pytest.raises(LmsslError, match="at least two sentences"):
            objective.prepare(titles, "text")


# --------------------------------------------------------------------------- causal blocks

def test_causal_blocks_reassemble_into_exactly_the_original_token_stream(bytebpe, documents):
    objective = OBJECTIVES["causal_lm"](OBJECTIVES["causal_lm"].Options(), bytebpe, 64)
    blocks = objective.prepare(documents, "text")["input_ids"]
    expected = []
    for text in documents["text"]:
        expected += bytebpe(text, add_special_tokens=False)["input_ids"] + [bytebpe.eos_token_id]
    assert [t for block in blocks for t in block] == expected
    assert all(len(b) == 64 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 64


def test_document_positions_restart_after_every_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, 7, 8, 9, eos, 4], [eos, 3, 3, 3, eos, eos, 1, 1]])
    assert document_positions(ids, eos).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_document_attention_keeps_a_document_blind_to_the_one_before(bytebpe, family):
    from transformers import AutoModelForCausalLM

    from lmssl.models import ModelConfig, build_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(ModelConfig(family=family, dropout=0.0), bytebpe, 64)).eval()
    eos = bytebpe.eos_token_id
    first = bytebpe("The game began development in 2010 .")["input_ids"] + [eos]
    second = bytebpe(" It met with positive sales in Japan .")["input_ids"] + [eos]
    packed = torch.tensor([first + second])
    alone = model.base_model(input_ids=torch.tensor([second])).last_hidden_state
    module = OBJECTIVES["causal_lm"].training_module(None, model)
    positions = document_positions(packed, eos)
    isolated = module.model.base_model(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state
    mixed = module.model.base_model(input_ids=packed, use_cache=False).last_hidden_state
    assert torch.allclose(isolated[0, len(first):], alone[0], atol=1e-5)
    assert not torch.allclose(mixed[0, len(first):], alone[0], atol=1e-3)


def test_shifted_causal_loss_on_real_tokens_equals_the_library_loss(bytebpe, documents):
    from transformers import AutoModelForCausalLM

    from lmssl.models import ModelConfig, build_config

    objective = OBJECTIVES["causal_lm"](OBJECTIVES["causal_lm"].Options(), bytebpe, 64)
    model = AutoModelForCausalLM.from_config(build_config(ModelConfig(family="llama", dropout=0.0), bytebpe, 64))
    blocks = objective.prepare(documents, "text")
    short = {"input_ids": blocks[0]["input_ids"][:40]}
    batch = objective.collate([blocks[1], short])                     # the short row is padded
    ours, stats = objective.loss(objective.training_module(model), batch)
    assert stats["loss"][1] == 63 + 39                                 # predictions only where a real next token exists
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("name", ["mlm_nsp", "sop"])
def test_sparse_pretraining_heads_equal_bert_for_pretraining_loss(wordpiece, documents, name):
    from transformers import BertForPreTraining

    from lmssl.models import ModelConfig

    objective = OBJECTIVES[name](OBJECTIVES[name].Options(), wordpiece, 64)
    model = objective.build_model(ModelConfig(family="bert", size="tiny", dropout=0.0)).eval()
    assert isinstance(model, BertForPreTraining)
    pairs = objective.prepare(documents, "text")
    batch = objective.collate([pairs[i] for i in range(8)])
    ours, stats = objective.loss(objective.training_module(model), batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], labels=batch["labels"],
                      next_sentence_label=batch["pair_label"]).loss
    assert torch.allclose(ours, reference, atol=1e-5)
    assert set(stats) == set(objective.stat_names) and stats[f"{name[-3:]}_accuracy"][1] == 8


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_fused_head_cross_entropy_matches_autograd_on_full_logits(chunk):
    """LinearCrossEntropy (chunks of the vocabulary head scored and differentiated at once) against
    F.cross_entropy on all logits: the same summed loss, correct count and gradients of hidden and weight,
    with unscored (-100) rows contributing nothing."""
    import torch.nn.functional as F

    from lmssl.objectives.causal_lm import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(97, (50,), generator=g)
    targets[[3, 17, 49]] = -100
    total, correct = LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    (2.5 * total).backward()
    fused = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (2.5 * expected).backward()
    assert torch.allclose(total.double(), expected, rtol=1e-6)
    keep = targets != -100
    assert int(correct) == int(((logits.argmax(-1) == targets) & keep).sum()) > 0
    assert torch.allclose(fused[0], hidden.grad, atol=1e-5) and torch.allclose(fused[1], weight.grad, atol=1e-5)
    assert fused[0][~keep].abs().max() == 0              # an unscored row gets no gradient


def test_masked_rows_by_host_positions_equal_the_boolean_selection():
    """The collator's flat masked_positions pick the same hidden rows and labels, in the same order, as the
    boolean mask labels != -100 (which would need the device's count of masked tokens)."""
    from lmssl.objectives.mlm import masked_rows

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 5, generator=g)
    labels = torch.where(torch.rand(3, 7, generator=g) < 0.3, torch.randint(50, (3, 7), generator=g), -100)
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    by_positions, by_mask = masked_rows(hidden, labels, positions), masked_rows(hidden, labels)
    assert positions.numel() > 0
    assert torch.equal(by_positions[0], by_mask[0]) and torch.equal(by_positions[1], by_mask[1])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_encoder_mask_gives_the_hidden_states_of_the_padding_mask(implementation):
    """models.encoder_mask (what the text objectives hand the encoder, built without reading the device): for a
    padded batch under SDPA the 4D boolean key mask, under other attention the 2D mask as it is; for a batch
    without padding no mask. Each must give the encoder's hidden states for the plain 2D padding mask."""
    from transformers import BertConfig, BertModel

    from lmssl.models import encoder_mask, is_padded

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, attn_implementation=implementation)).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    assert is_padded(rows) and not is_padded([[1, 2], [3, 4]])
    ids = torch.tensor([r + [0] * (6 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (6 - len(r)) for r in rows])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        given = encoder_mask(model, mask, padded=True)
        assert given.ndim == (4 if implementation == "sdpa" else 2)
        ours = model(input_ids=ids, attention_mask=given).last_hidden_state
        unmasked = model(input_ids=ids, attention_mask=None).last_hidden_state
        assert encoder_mask(model, torch.ones_like(mask), padded=False) is None
        full = model(input_ids=ids, attention_mask=torch.ones_like(mask)).last_hidden_state
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)
    assert (unmasked - plain).abs().max() > 1e-3               # the mask matters in this batch
    torch.testing.assert_close(unmasked, full, rtol=0, atol=1e-6)
