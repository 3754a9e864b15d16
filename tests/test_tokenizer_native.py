"""lmssl's native tokenizer trainers against the `tokenizers` library's own: the same word counts for
every shipped spec on real and adversarial text, the same BPE merges, the same WordPiece vocabulary,
a fallback when a pipeline cannot be counted chunk by chunk, and a one-pass reader that cuts lines
exactly as `datasets` does."""

from __future__ import annotations

import collections
import json
import sys

import pytest
from conftest import shared_file

from lmssl.data import corpus as corpus_module
from lmssl.errors import LmsslError, RecipeError
from lmssl.recipe import DataConfig
from lmssl.schema import parse_dataclass
from lmssl.stages import tokenizer as stage
from lmssl.tokenizer_report import read_texts

native = pytest.importorskip("lmssl.tokenizer_training")
bpe = pytest.importorskip("lmssl._bpe", reason="the native trainers are not built (no C compiler)")

SPECS = ["bert-wordpiece", "roberta-bytebpe", "gpt2-bytebpe", "llama-bpe", "unigram"]
# Text that stresses the chunk rule: runs of spaces, tabs, no-break and ideographic spaces that NFKC
# turns into spaces, contractions, combining marks at a chunk start, "▁" already in the text, CJK, emoji.
ADVERSARIAL = ["naïve café — 東京タワー 🙂🙃 x\u00a0y  z\tq", "ΟΔΟΣ İstanbul ﬁnance Ⅻ ½ ２０２６年", "  leading",
               "trailing   ", "a\u3000b", "it's we'll 'quoted' don't I'M", "tab\there\t", "x  \u00a0 y",
               "▁already▁ ▁", "ﬀ ＡＢＣ", "\u0301acute start", "e\u0301 combining", "digits 12345 and 3.14",
               "\x00control\x07chars\x7f", "crlf\r\nand\rcr", "  ", "'s 've  'll", "[CLS] <s> </s>"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    wiki = read_texts([str(shared_file("wikitext-2/valid.txt.xz"))], max_bytes=400_000)
    book = read_texts([str(shared_file("gutenberg_nltk/melville-moby_dick.txt.xz"))], encoding="latin-1",
                      max_bytes=200_000)
    return wiki + book + ADVERSARIAL


def _pipeline_tokenizer(spec_name: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    spec = stage.load_spec(spec_name)
    steps = stage._normalizer_steps(spec, spec.get("lowercase", False))
    tokenizer = Tokenizer(models.BPE())
    if steps:
        tokenizer.normalizer = stage._component(steps, stage.NORMALIZERS, normalizers)
    tokenizer.pre_tokenizer = stage._component(spec["pre_tokenizer"], stage.PRE_TOKENIZERS, pre_tokenizers)
    return spec, steps, tokenizer


@pytest.mark.parametrize("spec_name", SPECS)
def test_word_counts_equal_the_librarys_pipeline_for_every_spec(spec_name, texts):
    spec, steps, tokenizer = _pipeline_tokenizer(spec_name)
    how = native.plan(spec, steps)
    assert how is not None and how["mode"] != "chunks"  # every shipped spec has a C splitter
    words, count, size = native.count_words(tokenizer, how, iter([texts[:5000], texts[5000:]]))
    words_of = native._pipeline(tokenizer)
    expected = collections.Counter(word for text in texts for word in words_of(text))
    assert words == dict(expected)
    assert count == len(texts) and size == sum(len(t.encode()) for t in texts)


def test_chunk_counter_cuts_before_a_space_that_follows_a_non_space():
    counter = bpe.ChunkCounter()  # mode "chunks": everything is left to the caller
    counter.update(["a  b c", "  x", "y   "])
    assert counter.pending == len("a  b c  xy   ")
    with pytest.raises(RuntimeError, match="call drain"):
        counter.words()
    assert counter.drain() == {"a": 1, "  b": 1, " c": 1, "  x": 1, "y": 1, "   ": 1}
    assert counter.words() == {} and counter.pending == 0
    counter.update(["a b"])  # counting goes on after a drain
    assert counter.drain() == {"a": 1, " b": 1} and counter.texts == 4
    with pytest.raises(TypeError, match="item 1 is int"):
        bpe.ChunkCounter().update(["ok", 3])
    with pytest.raises(ValueError, match="unknown mode"):
        bpe.ChunkCounter("sentencepiece")


def test_text_without_spaces_is_drained_in_bounded_pieces_with_the_same_counts():
    spec, steps, tokenizer = _pipeline_tokenizer("bert-wordpiece")  # splits every CJK character
    lines = ["日本語のテキストと中文文本" * (1 + i % 5) + f"第{i}行" for i in range(3000)]
    how = native.plan(spec, steps)
    once = native.count_words(tokenizer, how, iter([lines[:1500], lines[1500:]]))
    drained = native.count_words(tokenizer, how, iter([lines[i:i + 100] for i in range(0, 3000, 100)]),
                                 pending_bytes=10_000)
    assert once == drained
    words_of = native._pipeline(tokenizer)
    assert once[0] == dict(collections.Counter(word for text in lines for word in words_of(text)))


def _library_and_native(spec_name: str, texts: list[str], tmp_path, vocab_size: int = 1500):
    made = {}
    for engine in ("tokenizers", "lmssl"):
        cfg = stage.Config(name="tok", kind="tokenizer", spec=spec_name, vocab_size=vocab_size, engine=engine)
        tokenizer, fed = stage.build(stage.load_spec(spec_name), cfg, iter([texts]))
        tokenizer.save_pretrained(tmp_path / engine)
        made[engine] = (json.loads((tmp_path / engine / "tokenizer.json").read_text()), fed)
    return made


@pytest.mark.parametrize("spec_name", ["llama-bpe", "gpt2-bytebpe"])
def test_native_bpe_learns_the_same_merges_as_the_library(spec_name, texts, tmp_path):
    made = _library_and_native(spec_name, texts, tmp_path)
    library, native_json = made["tokenizers"][0]["model"], made["lmssl"][0]["model"]
    assert native_json["merges"] == library["merges"] and native_json["vocab"] == library["vocab"]
    assert made["lmssl"][1].bytes == made["tokenizers"][1].bytes and made["lmssl"][1].texts == len(texts)


def test_native_wordpiece_learns_the_same_vocabulary_as_the_library(texts, tmp_path):
    made = _library_and_native("bert-wordpiece", texts, tmp_path)
    library, native_json = made["tokenizers"][0]["model"], made["lmssl"][0]["model"]
    assert set(native_json["vocab"]) == set(library["vocab"])  # the library numbers "##x" forms in hash order
    assert native_json["vocab"]["[PAD]"] == 0 and native_json["continuing_subword_prefix"] == "##"


def test_native_training_is_reproducible(texts, tmp_path):
    runs = []
    for attempt in range(2):
        cfg = stage.Config(name="tok", kind="tokenizer", spec="bert-wordpiece", vocab_size=1200, engine="lmssl")
        tokenizer, _ = stage.build(stage.load_spec("bert-wordpiece"), cfg, iter([texts[:3000], texts[3000:]]))
        tokenizer.save_pretrained(tmp_path / str(attempt))
        runs.append((tmp_path / str(attempt) / "tokenizer.json").read_bytes())
    assert runs[0] == runs[1]


def test_train_bpe_limits_the_alphabet_and_stops_at_min_frequency():
    words = {"abab": 10, "abc": 3, "xyz": 1, "ézé": 1}
    vocab, merges = bpe.train_bpe(words, 100, min_frequency=4, limit_alphabet=4, special_tokens=["<unk>"])
    assert vocab[:5] == ["<unk>", "a", "b", "c", "z"]  # the 4 most frequent characters, in code point order
    assert merges == [("a", "b"), ("ab", "ab")]  # then (ab, c) occurs 3 times, below min_frequency
    vocab, merges = bpe.train_bpe({"hug": 5, "pug": 3}, 20, continuing_subword_prefix="##")
    assert ("##u", "##g") == merges[0] and "##ug" in vocab and "hug" in vocab
    with pytest.raises(TypeError, match="str to int"):
        bpe.train_bpe({"a": "many"}, 10)
    with pytest.raises(ValueError, match="negative count"):
        bpe.train_bpe({"ab": -1}, 10)


def test_engine_lmssl_refuses_a_pipeline_it_cannot_count_and_auto_falls_back(texts, tmp_path):
    spec_file = tmp_path / "strip.yaml"
    spec_file.write_text("model: bpe\nnormalizer: [{type: strip}]\npre_tokenizer: [{type: whitespace_split}]\n"
                         "special_tokens: {unk: '<unk>'}\n")
    cfg = stage.Config(name="tok", kind="tokenizer", spec=str(spec_file), vocab_size=500, engine="lmssl")
    with pytest.raises(RecipeError, match=r"stages\.tok\.engine: .*cannot be counted chunk by chunk"):
        stage.build(stage.load_spec(cfg.spec), cfg, iter([texts[:500]]))
    cfg.engine = "auto"
    tokenizer, fed = stage.build(stage.load_spec(cfg.spec), cfg, iter([texts[:500]]))
    assert len(tokenizer) == 500 and fed.texts == 500


def test_a_disagreeing_self_check_trains_with_the_library_instead(texts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native, "disagreement", lambda *args: "the odd text")
    cfg = stage.Config(name="tok", kind="tokenizer", spec="llama-bpe", vocab_size=1000)
    batches = [texts[:2000], texts[2000:4000]]
    tokenizer, fed = stage.build(stage.load_spec("llama-bpe"), cfg, iter(batches), reread=lambda: iter(batches))
    assert "on the text 'the odd text'; training with the tokenizers library instead" in capsys.readouterr().err
    assert fed.texts == 4000 and len(tokenizer) == 1000 and fed.engine == "tokenizers"
    with pytest.raises(LmsslError, match=r"stages\.tok: .*disagrees .*'the odd text'; set engine: tokenizers"):
        stage.build(stage.load_spec("llama-bpe"), cfg, iter(batches))  # nothing to read again: say so


def test_reading_text_files_cuts_lines_like_datasets(tmp_path):
    import datasets

    raw = "first\r\nsecond\rthird\n\nbad \xff byte\n  spaced  \nlast without newline".encode("latin-1")
    path = tmp_path / "mixed.txt"
    path.write_bytes(raw)
    wiki = str(shared_file("wikitext-2/valid.txt.xz"))
    for files in ([str(path)], [wiki]):
        expected = datasets.load_dataset("text", data_files=files, split="train", encoding_errors="replace",
                                         cache_dir=str(tmp_path / "cache"))["text"]
        assert [line for block in corpus_module.read_lines(files, None) for line in block] == expected


def test_one_pass_reading_holds_out_every_50th_row_and_spreads_a_byte_bound(tmp_path):
    lines = [f"line {i} " + "word " * (i % 7) for i in range(20_000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = parse_dataclass(DataConfig, {"path": "text", "files": str(path)}, "data")
    cfg = stage.Config(name="tok", kind="tokenizer", data=data)
    batches, heldout = stage.corpus(cfg, seed=0, where="stages.tok")
    train = [t for batch in batches for t in batch]
    assert heldout == lines[49::50] and train == [t for i, t in enumerate(lines) if i % 50 != 49]
    cfg.max_bytes = path.stat().st_size // 4
    train = [t for batch in stage.corpus(cfg, 0, "stages.tok")[0] for t in batch]
    size = sum(len(t.encode()) for t in train)
    assert 0.7 * cfg.max_bytes < size <= cfg.max_bytes and train[-1] in lines[15_000:]  # reaches the end
    cfg.max_bytes, cfg.data.max_samples = None, 100
    assert len([t for batch in stage.corpus(cfg, 0, "stages.tok")[0] for t in batch]) == 98


def test_stage_reads_local_text_without_an_arrow_cache(tmp_path, monkeypatch):
    import datasets

    def forbidden(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called for a plain local text file")

    monkeypatch.setattr(datasets, "load_dataset", forbidden)
    data = parse_dataclass(DataConfig, {"path": "text", "files": str(shared_file("wikitext-2/valid.txt.xz"))}, "d")
    cfg = stage.Config(name="tok", kind="tokenizer", spec="gpt2-bytebpe", vocab_size=1000, data=data)
    batches, heldout = stage.corpus(cfg, 0, "stages.tok")
    tokenizer, fed = stage.build(stage.load_spec(cfg.spec), cfg, batches)
    assert len(tokenizer) == 1000 and fed.bytes > 1_000_000 and len(heldout) > 50
    assert "lmssl._bpe" in sys.modules


def test_native_unigram_compresses_held_out_text_at_least_as_well_as_the_library(texts, tmp_path):
    from transformers import AutoTokenizer

    from lmssl.tokenizer_report import report_card

    pytest.importorskip("lmssl._unigram")
    held = read_texts([str(shared_file("gutenberg_nltk/carroll-alice.txt.xz"))], encoding="latin-1", max_bytes=60_000)
    cards = {}
    for engine in ("tokenizers", "lmssl"):
        cfg = stage.Config(name="tok", kind="tokenizer", spec="unigram", vocab_size=2000, engine=engine)
        tokenizer, _ = stage.build(stage.load_spec("unigram"), cfg, iter([texts]))
        tokenizer.save_pretrained(tmp_path / engine)
        loaded = AutoTokenizer.from_pretrained(tmp_path / engine)
        assert len(loaded) == 2000 and loaded.unk_token == "<unk>" and loaded.convert_ids_to_tokens(1) == "<unk>"
        cards[engine] = report_card(loaded, held)
    assert cards["lmssl"]["unk_rate"] == 0.0 and cards["lmssl"]["roundtrip_exact"] >= cards["tokenizers"]["roundtrip_exact"]
    assert cards["lmssl"]["bytes_per_token"] >= 0.97 * cards["tokenizers"]["bytes_per_token"]
    assert cards["lmssl"]["fertility"] <= 1.03 * cards["tokenizers"]["fertility"]
