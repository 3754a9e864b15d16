"""The tokenizer stage on hostile input: native word counts equal the `tokenizers` library's on any
generated text for every spec, a pair of symbol id 0 is merged, the self-check samples the whole
corpus, over-long rows are skipped and counted, unreadable corpus paths and settings out of range
are named (exit 2)."""

from __future__ import annotations

import collections
import gzip
import json
import lzma
import os
import random
from pathlib import Path

import pytest
import yaml

from lmssl.__main__ import main
from lmssl.data import corpus as corpus_module
from lmssl.recipe import DataConfig
from lmssl.schema import field_range, parse_dataclass
from lmssl.stages import tokenizer as stage

native = pytest.importorskip("lmssl.tokenizer_training")
bpe = pytest.importorskip("lmssl._bpe", reason="the native trainers are not built (no C compiler)")

# pieces of generated text: every kind of whitespace the pre-tokenizers tell apart (runs, CR LF, no-break,
# ideographic, line separator, NEL, vertical tab), letters, digits, punctuation, contractions, accents
# composed and combining, CJK, emoji, "▁" already in the text, characters NFKC rewrites (ﬁ ½ ２ ¨)
PIECES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\u3000", "\u00a0", "\u2028", "\u0085", "\x0b", "\u2002",
          "a", "word", "The", "xyz", "12", "7", "3.14", ",", ".", "!", "'s", "'ll", "'", "-", "—", "é", "e\u0301",
          "\u0301", "naïve", "Ü", "東京", "中", "日本語", "🙂", "👩‍👧", "▁", "ﬁ", "½", "２", "¨", "ΟΔΟΣ", "İ", "\x07"]
# the cases that split GPT-2's \s+(?!\S) from a cut at every space: a whitespace run that starts with a
# character other than a space, an ideographic space before spaces, whitespace at the very end
NAMED = ["a\t  b", "a\n    b", "x\r\n  y", "\u3000  x", "x\u3000  y", "a\u00a0 b", "end  \t ", "end\n", "tab\t",
         "  lead", "\t\t  x  \n"]


def _generated(seed: int, count: int, pieces: list[str] = PIECES, longest: int = 14) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, longest))) for _ in range(count)]


def _pipeline(spec: dict, lowercase: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    steps = stage._normalizer_steps(spec, lowercase)
    tokenizer = Tokenizer(models.BPE())
    if steps:
        tokenizer.normalizer = stage._component(steps, stage.NORMALIZERS, normalizers)
    tokenizer.pre_tokenizer = stage._component(spec["pre_tokenizer"], stage.PRE_TOKENIZERS, pre_tokenizers)
    return steps, tokenizer


def _first_text_counted_differently(tokenizer, how, texts: list[str]):
    words_of = native._pipeline(tokenizer)
    for text in texts:
        if native.count_words(tokenizer, how, iter([[text]]))[0] != dict(collections.Counter(words_of(text))):
            return text
    return None


# --------------------------------------------------------------------------- word counts and merges

@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("spec_name", stage.spec_names())
def test_native_word_counts_equal_the_librarys_on_generated_text(spec_name, lowercase):
    spec = stage.load_spec(spec_name)
    steps, tokenizer = _pipeline(spec, lowercase)
    how = native.plan(spec, steps)
    assert how is not None and how["mode"] != "chunks"  # every shipped spec is counted in C
    texts = NAMED + _generated(seed=11, count=600)
    words_of = native._pipeline(tokenizer)
    expected = dict(collections.Counter(word for text in texts for word in words_of(text)))
    words, count, size = native.count_words(tokenizer, how, iter([texts[:250], texts[250:]]))
    if words != expected:
        pytest.fail(f"first text counted differently: {_first_text_counted_differently(tokenizer, how, texts)!r}")
    assert count == len(texts) and size == sum(len(t.encode()) for t in texts)


# pipelines a spec may build from the components the native counter accepts: each is counted exactly or
# refused (plan None: the library trains), never counted wrong
PIPELINES = ["pre_tokenizer: [{type: metaspace, split: false}]",
             "pre_tokenizer: [{type: metaspace, prepend_scheme: always}]",
             "pre_tokenizer: [{type: metaspace, prepend_scheme: first}]",
             "pre_tokenizer: [{type: byte_level, use_regex: false}]",
             "pre_tokenizer: [{type: byte_level, add_prefix_space: true}]",
             "normalizer: [{type: nfkc}]\npre_tokenizer: [{type: byte_level}]",
             "normalizer: [{type: nfd}, {type: strip_accents}]\npre_tokenizer: [{type: byte_level}]",
             "normalizer: [{type: bert}]\npre_tokenizer: [{type: byte_level}]",
             "pre_tokenizer: [{type: digits}]",
             "pre_tokenizer: [{type: punctuation}]",
             "pre_tokenizer: [{type: byte_level, add_prefix_space: false}, {type: digits}]",
             "pre_tokenizer: [{type: whitespace_split}, {type: digits, individual_digits: true}]",
             "normalizer: [{type: bert}]\npre_tokenizer: [{type: whitespace}]",
             "normalizer: [{type: nfd}, {type: strip_accents}, {type: lowercase}]\npre_tokenizer: [{type: bert}]"]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.replace("\n", "; ") for p in PIPELINES])
def test_every_pipeline_of_allowed_components_is_counted_exactly_or_refused(pipeline):
    spec = yaml.safe_load("model: bpe\n" + pipeline)
    steps, tokenizer = _pipeline(spec, False)
    how = native.plan(spec, steps)
    texts = NAMED + _generated(seed=11, count=600) + ["▁x", "▁", "x ▁y", "▁▁ z"]  # "▁" where a prefix would go
    assert how is None or _first_text_counted_differently(tokenizer, how, texts) is None


@pytest.mark.parametrize("spec_name", ["gpt2-bytebpe", "roberta-bytebpe"])
def test_byte_level_words_keep_a_whitespace_run_as_gpt2s_pattern_does(spec_name):
    spec = stage.load_spec(spec_name)
    steps, tokenizer = _pipeline(spec, False)
    words = native.count_words(tokenizer, native.plan(spec, steps), iter([["a\t  b"]]))[0]
    assert words == {"a": 1, "ĉĠ": 1, "Ġb": 1}  # "a", "\t ", " b": the run's last space goes with "b"
    assert _first_text_counted_differently(tokenizer, native.plan(spec, steps), NAMED) is None


@pytest.mark.parametrize("spec_name", ["gpt2-bytebpe", "roberta-bytebpe"])
def test_native_bpe_learns_the_librarys_merges_on_generated_text(spec_name, tmp_path):
    texts = _generated(seed=5, count=2500, pieces=PIECES + ["the", "whale", "sea", "ship", "it's"] * 3, longest=20)
    made = {}
    for engine in ("tokenizers", "lmssl"):
        cfg = stage.Config(name="tok", kind="tokenizer", spec=spec_name, vocab_size=600, engine=engine)
        tokenizer, fed = stage.build(stage.load_spec(spec_name), cfg, iter([texts[:1000], texts[1000:]]))
        tokenizer.save_pretrained(tmp_path / engine)
        made[engine] = json.loads((tmp_path / engine / "tokenizer.json").read_text())["model"], fed.engine
    (library, _), (lmssl, engine) = made["tokenizers"], made["lmssl"]
    assert engine == "lmssl"  # the self-check found no difference, so lmssl itself trained
    assert len(library["merges"]) > 200 and lmssl["merges"] == library["merges"] and lmssl["vocab"] == library["vocab"]


def _library_bpe(words: dict[str, int], specials: list[str], vocab_size: int) -> tuple[list[str], list[tuple]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=0, show_progress=False)
    tokenizer.train_from_iterator([" ".join(w for w, n in words.items() for _ in range(n))], trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


@pytest.mark.parametrize("specials", [[], ["a"]], ids=["no specials", "one-character special"])
def test_a_pair_of_symbol_id_zero_is_merged_like_the_library(specials):
    # "a" is id 0 (first letter, no special token before it, or the special token "a" itself), so the
    # pair (a, a) has the hash key 0 that once marked an empty slot
    words = {"aaaa": 10, "ab": 3}
    vocab, merges = bpe.train_bpe(words, 10, special_tokens=specials)
    assert vocab[0] == "a" and merges[0] == ("a", "a")
    assert (vocab, merges) == _library_bpe(words, specials, 10)


# --------------------------------------------------------------------------- the self-check's sample

def test_the_self_check_sample_is_seeded_and_spread_over_the_whole_corpus():
    n, size = 100_000, native.CHECK_TEXTS

    def drawn(seed: int) -> list[int]:
        sample = native.SpreadSample(size, seed=seed)
        for start in range(0, n, 7_000):  # uneven batches, as a corpus gives them
            sample.add([str(i) for i in range(start, min(n, start + 7_000))])
        return sorted(int(t) for t in sample.texts)

    picked = drawn(0)
    assert len(set(picked)) == size and picked == drawn(0) and picked != drawn(1)
    tenths = collections.Counter(i * 10 // n for i in picked)
    assert all(0.7 * size / 10 < tenths[k] < 1.3 * size / 10 for k in range(10)), tenths  # uniform, to the end
    small = native.SpreadSample(size, seed=0, chars=3)
    small.add(["abcdef", "xy"])
    assert small.texts == ["abc", "xy"]  # a corpus smaller than the sample is taken whole, each text cut short


def test_a_divergence_late_in_the_corpus_reaches_the_self_check(monkeypatch, capsys):
    real = native._pipeline

    def pipeline(tokenizer):  # the library's pipeline, but one it counts differently from lmssl's C splitter
        words_of = real(tokenizer)
        return lambda text: words_of(text) + (["odd"] if "TRIGGER" in text else [])

    monkeypatch.setattr(native, "_pipeline", pipeline)
    texts = [f"plain line {i} of prose" for i in range(19_000)] + [f"TRIGGER {i}" for i in range(1_000)]
    batches = [texts[i:i + 5_000] for i in range(0, len(texts), 5_000)]  # the triggers are all in the last 5%
    cfg = stage.Config(name="tok", kind="tokenizer", spec="gpt2-bytebpe", vocab_size=400)
    tokenizer, fed = stage.build(stage.load_spec(cfg.spec), cfg, iter(batches), reread=lambda: iter(batches))
    assert "on the text 'TRIGGER" in capsys.readouterr().err
    assert fed.engine == "tokenizers" and fed.texts == len(texts) and len(tokenizer) == 400


def test_the_stage_reads_the_corpus_again_for_the_library_when_the_self_check_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native, "disagreement", lambda *args: "line 7")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_lines()) + "\n")
    recipe = _recipe(tmp_path, spec="gpt2-bytebpe", data={"path": "text", "files": str(corpus)})
    assert main(["run", recipe, "--run-dir", str(tmp_path / "run")]) == 0
    assert "training with the tokenizers library instead" in capsys.readouterr().err
    card = json.loads((tmp_path / "run" / "tok" / "report.json").read_text())
    assert card["trained_on"]["engine"] == "tokenizers" and card["trained_on"]["texts"] == 400 - 8  # every row once
    assert card["texts"] == 8  # the held-out rows of the first pass, not doubled by the second


# --------------------------------------------------------------------------- data.max_chars

def _recipe(tmp_path: Path, **stage_fields) -> str:
    entry = {"name": "tok", "kind": "tokenizer", "vocab_size": 400, **stage_fields}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "stages": [entry]}))
    return str(path)


def _lines(count: int = 400) -> list[str]:
    return [f"line {i}: the whale and the ship at sea, {i % 7} days out" for i in range(count)]


@pytest.mark.parametrize("engine", ["lmssl", "tokenizers"])
def test_rows_over_max_chars_are_skipped_counted_and_training_goes_on(tmp_path, capsys, engine):
    lines = _lines()
    lines[200] = "zq" * 3000  # one 6000-character row, far past max_chars
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path, spec="gpt2-bytebpe", engine=engine,
                     data={"path": "text", "files": str(corpus), "max_chars": 1000})
    assert main(["run", recipe, "--run-dir", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    folder = tmp_path / "run" / "tok"
    card = json.loads((folder / "report.json").read_text())
    assert card["trained_on"]["skipped"] == {"too_long": 1} and card["trained_on"]["texts"] == len(lines) - 1 - 8
    record = json.loads((folder / "stage.json").read_text())
    assert record["metrics"]["data/skipped_too_long"] == 1.0
    assert "Skipped 1 row: 1 too long (over data.max_chars = 1,000 characters)." in record["report"]
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any("zqzq" in token for token in vocab)  # the long row taught nothing


def test_max_chars_applies_to_datasets_sources_and_to_held_out_rows(tmp_path):
    rows = [{"text": t} for t in _lines(100)] + [{"text": "x" * 500}, {"text": None}, {"text": 7}]
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = parse_dataclass(DataConfig, {"path": "json", "files": str(source), "max_chars": 100, "eval_fraction": 0},
                           "data")
    batches, _ = stage.corpus(stage.Config(name="tok", kind="tokenizer", data=data), 0, "stages.tok")
    assert [t for batch in batches for t in batch] == _lines(100)
    assert batches.skipped == {"too_long": 1, "missing": 1, "not_text": 1}
    lines = _lines(100)
    lines[49] = "y" * 500  # a held-out row (every 50th) of a one-pass source
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    data = parse_dataclass(DataConfig, {"path": "text", "files": str(corpus), "max_chars": 100}, "data")
    batches, heldout = stage.corpus(stage.Config(name="tok", kind="tokenizer", data=data), 0, "stages.tok")
    assert len([t for batch in batches for t in batch]) == 98 and heldout == [lines[99]]  # filled as it is read


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.txt.xz"], ids=["one pass", "datasets"])
def test_a_byte_bound_read_in_many_blocks_samples_up_to_the_end_of_the_corpus(tmp_path, monkeypatch, name):
    monkeypatch.setattr(corpus_module, "READ_BLOCK", 2_000)  # many blocks, as a large corpus gives them
    monkeypatch.setattr(corpus_module, "BATCH", 100)
    lines = _lines(5_000)
    text = ("\n".join(lines) + "\n").encode()
    (tmp_path / name).write_bytes(lzma.compress(text) if name.endswith(".xz") else text)
    data = parse_dataclass(DataConfig, {"path": "text", "files": str(tmp_path / name)}, "data")
    cfg = stage.Config(name="tok", kind="tokenizer", data=data, max_bytes=len(text) // 4)
    batches, _ = stage.corpus(cfg, 0, "stages.tok")
    train = [t for batch in batches for t in batch]
    assert 0.7 * cfg.max_bytes < sum(len(t.encode()) for t in train) <= cfg.max_bytes
    assert train[-1] in lines[3_750:] and batches.capped  # the sample reaches the last quarter


# --------------------------------------------------------------------------- unreadable corpora: exit 2, named

def _problem_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n")
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    (tmp_path / "corrupt.txt.xz").write_bytes(b"this was never xz\n" * 10)
    (tmp_path / "plain.txt.gz").write_bytes(b"plain text, not gzip\n" * 10)
    whole = lzma.compress(b"hello world\n" * 5000)
    (tmp_path / "cut.txt.xz").write_bytes(whole[:len(whole) // 2])
    return {"directory": (str(folder), "is a directory"), "fifo": (str(pipe), "is a named pipe (FIFO)"),
            "device": (os.devnull, "is a device"), "corrupt xz": (str(tmp_path / "corrupt.txt.xz"), "not a valid xz"),
            "not gzip": (str(tmp_path / "plain.txt.gz"), "not a valid gzip"),
            "truncated xz": (str(tmp_path / "cut.txt.xz"), "not a valid xz")}


@pytest.mark.parametrize("case", ["directory", "fifo", "device", "corrupt xz", "not gzip", "truncated xz"])
def test_an_unreadable_corpus_path_is_named_for_what_it_is(tmp_path, capsys, case):
    path, says = _problem_paths(tmp_path)[case]
    assert main(["validate", _recipe(tmp_path, data={"path": "text", "files": path})]) == 2
    err = capsys.readouterr().err
    assert says in err and repr(path) in err and "Unable to find" not in err and "NUL bytes" not in err, err


def test_a_truncated_gzip_read_in_one_pass_says_it_is_not_valid_gzip(tmp_path):
    whole = gzip.compress("".join(f"line {i} of text\n" for i in range(200_000)).encode())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole[:len(whole) // 2])  # its first 8 KB decompress fine: only reading on finds the cut
    with pytest.raises(stage.LmsslError, match=r"cut\.txt\.gz: it is not a valid gzip file"):
        list(corpus_module.read_lines([str(cut)], None))


@pytest.mark.parametrize("sample", ["spread", "head"])
def test_a_byte_cap_that_cuts_every_row_says_so(tmp_path, capsys, sample):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_lines(50)) + "\n")
    recipe = _recipe(tmp_path, max_bytes=1, sample=sample, data={"path": "text", "files": str(corpus)})
    assert main(["run", recipe, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "stages.tok.max_bytes: the byte cap of 1 bytes left no text" in err and "every row is blank" not in err


def test_max_chars_that_cuts_every_row_says_so(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_lines(50)) + "\n")
    recipe = _recipe(tmp_path, data={"path": "text", "files": str(corpus), "max_chars": 5})
    assert main(["run", recipe, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "every row of the corpus" in err, err
    assert "was skipped (49 too long (over data.max_chars = 5 characters)); raise data.max_chars" in err, err


# --------------------------------------------------------------------------- ranges

def test_every_numeric_field_of_the_tokenizer_stage_has_a_range():
    import dataclasses
    import typing

    hints = typing.get_type_hints(stage.Config)
    numeric = [f.name for f in dataclasses.fields(stage.Config)
               if int in (hints[f.name], *typing.get_args(hints[f.name])) or float in typing.get_args(hints[f.name])]
    assert set(numeric) == {"vocab_size", "min_frequency", "max_length", "max_bytes"}
    assert all(field_range(stage.Config, name) is not None for name in numeric)


@pytest.mark.parametrize("key, value, bound", [("min_frequency", -1, ">= 0"), ("vocab_size", 0, "in [1, "),
                                               ("max_length", 0, ">= 1"), ("max_bytes", 0, ">= 1")])
def test_a_tokenizer_setting_out_of_range_exits_2_at_validate_naming_the_key(tmp_path, capsys, key, value, bound):
    assert main(["validate", _recipe(tmp_path, **{key: value, "data": {"path": "builtin:pydocs"}})]) == 2
    err = capsys.readouterr().err
    assert f"stages.tok.{key}: {value} is out of range; it must be {bound}" in err, err
    with pytest.raises(stage.RecipeError, match=f"stages.tok.{key}: {value} is out of range"):
        stage.Config(name="tok", kind="tokenizer", **{key: value}).check(None, {}, "stages.tok")  # made in code



def test_a_lone_surrogate_from_a_json_escape_is_a_clear_error_naming_the_row(tmp_path, capsys):
    rows = [{"text": t} for t in _lines(100)] + [{"text": "broken \ud800 half of a pair"}]
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))   # json.dumps writes the escape \\ud800
    recipe = _recipe(tmp_path, data={"path": "json", "files": str(source)})
    assert main(["run", recipe, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "surrogate" in err and "row 100" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "tok").exists()
