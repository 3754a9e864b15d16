"""The tokenizer stage on real text: every spec trains, reloads with AutoTokenizer and round-trips;
the report card equals a hand computation; bad input exits 2 with a message naming the problem."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import pytest
from conftest import shared_file

from lmssl.__main__ import main
from lmssl.errors import RecipeError
from lmssl.recipe import DataConfig
from lmssl.schema import parse_dataclass
from lmssl.stages import tokenizer as stage
from lmssl.tokenizer_report import read_texts, report_card

BYTE_LEVEL = ["roberta-bytebpe", "gpt2-bytebpe", "llama-bpe"]
UNICODE = ["Café naïve façade — “quotes” and ½ señor", "emoji 😀🚀👩‍👩‍👧 and flags 🇫🇷",
           "日本語のテキストと中文文本，한국어 텍스트", "  two  leading spaces\tand a tab\n", "Ωμέγα Ελληνικά ÅÄÖ",
           "<unk> literal specials </s> <|endoftext|> [MASK]", ""]


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    """About 400 KB of real English: WikiText-2 train and an Austen novel (read as latin-1)."""
    wiki = read_texts([str(shared_file("wikitext-2/train.txt.xz"))], max_bytes=300_000)
    book = read_texts([str(shared_file("gutenberg_nltk/austen-emma.txt.xz"))], encoding="latin-1", max_bytes=100_000)
    return wiki + book


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return read_texts([str(shared_file("gutenberg_nltk/carroll-alice.txt.xz"))], encoding="latin-1", max_bytes=30_000)


def _trained(spec_name: str, texts: list[str], folder: Path, **fields):
    from transformers import AutoTokenizer

    cfg = stage.Config(name="tok", kind="tokenizer", spec=spec_name, **{"vocab_size": 1200, **fields})
    spec = stage.load_spec(cfg.spec)
    tokenizer, fed = stage.build(spec, cfg, iter([texts[i:i + 1000] for i in range(0, len(texts), 1000)]))
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder), fed


@pytest.mark.parametrize("spec_name", BYTE_LEVEL)
def test_byte_level_specs_round_trip_any_unicode_exactly(spec_name, corpus_texts, heldout, tmp_path):
    tok, _ = _trained(spec_name, corpus_texts, tmp_path)
    assert tok.is_fast and len(tok) <= 1200 and tok.model_max_length == 512
    for text in UNICODE + heldout[:300]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert report_card(tok, heldout)["unk_rate"] == 0.0


def test_bert_wordpiece_pairs_have_cls_sep_and_token_type_ids(corpus_texts, tmp_path):
    tok, _ = _trained("bert-wordpiece", corpus_texts, tmp_path, max_length=128)
    assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token, tok.unk_token) == (
        "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")
    assert tok.model_max_length == 128
    pair = tok("The whale surfaced.", "Emma smiled.")
    tokens = tok.convert_ids_to_tokens(pair["input_ids"])
    first_sep = tokens.index("[SEP]")
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
    assert pair["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert tok.decode(tok("Hello, World!", add_special_tokens=False)["input_ids"]) == "hello, world!"


def test_bert_wordpiece_lowercase_override_keeps_case(corpus_texts, tmp_path):
    tok, _ = _trained("bert-wordpiece", corpus_texts, tmp_path, lowercase=False)
    assert "The" in tok.tokenize("The end")


def test_unigram_learns_subwords_on_varied_text(corpus_texts, heldout, tmp_path):
    tok, _ = _trained("unigram", corpus_texts, tmp_path, special_tokens={"mask": "[MASK]"})
    assert tok.mask_token == "[MASK]"
    pieces = [p.lstrip("▁") for p in tok.get_vocab() if p not in tok.all_special_tokens]
    assert sum(len(p) >= 4 for p in pieces) > len(pieces) / 2  # mostly multi-character pieces
    card = report_card(tok, heldout)
    # characters alone would give ~1 byte per token and ~5.5 tokens per word
    assert card["bytes_per_token"] > 2.0 and card["fertility"] < 3.0 and len(card["longest_tokens"][0]) >= 10
    assert tok.convert_ids_to_tokens(tok("the house")["input_ids"])[-1] == "</s>"


def test_report_card_equals_a_hand_computation():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "mat": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    card = report_card(tok, ["the cat sat", "the dog", ""])
    # ids: [1, 2, 3] and [1, 0]: 5 tokens, 5 words, 11 + 7 bytes, one [UNK], 4 of 5 ids used
    assert card["tokens"] == 5 and card["words"] == 5 and card["bytes"] == 18 and card["texts"] == 2
    assert card["fertility"] == 1.0 and card["bytes_per_token"] == 18 / 5 and card["unk_rate"] == 1 / 5
    assert card["vocab_used"] == 4 / 5 and card["roundtrip_exact"] == 1 / 2  # "the [UNK]" != "the dog"
    assert card["longest_tokens"] == ["the", "cat", "sat", "mat"]


def _recipe(tmp_path: Path, **stage_fields) -> str:
    import yaml

    entry = {"name": "tok", "kind": "tokenizer", "vocab_size": 1000, **stage_fields}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "stages": [entry]}))
    return str(path)


def _run(tmp_path: Path, capsys, **stage_fields) -> tuple[int, str]:
    code = main(["run", _recipe(tmp_path, **stage_fields), "--run-dir", str(tmp_path / "run")])
    return code, capsys.readouterr().err


def test_stage_writes_report_card_and_cli_compares_with_reference(tmp_path, capsys):
    wiki = str(shared_file("wikitext-2/valid.txt.xz"))
    code, _ = _run(tmp_path, capsys, spec="gpt2-bytebpe", max_bytes=200_000, data={"path": "text", "files": wiki})
    assert code == 0
    folder = tmp_path / "run" / "tok"
    card = json.loads((folder / "report.json").read_text())
    assert card["roundtrip_exact"] == 1.0 and card["vocab_size"] == 1000 and card["trained_on"]["bytes"] <= 200_000
    assert card["trained_on"]["engine"] == "lmssl"  # the report says who trained
    alice = str(shared_file("gutenberg_nltk/carroll-alice.txt.xz"))
    assert main(["report", "tokenizer", str(folder), "--data", alice, "--encoding", "latin-1",
                 "--reference", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "| bytes per token |" in out and out.count("Longest tokens of") == 2


def test_max_bytes_bounds_a_corpus_four_times_larger_and_samples_all_of_it(tmp_path):
    files = [str(shared_file("wikitext-2/valid.txt.xz")), str(shared_file("gutenberg_nltk/blake-poems.txt.xz"))]
    data = parse_dataclass(DataConfig, {"path": "text", "files": files, "encoding": "latin-1"}, "data")
    cfg = stage.Config(name="tok", kind="tokenizer", max_bytes=300_000, data=data)  # corpus is ~1.3 MB
    batches, heldout = stage.corpus(cfg, seed=0, where="stages.tok")
    texts = [t for batch in batches for t in batch]
    size = sum(len(t.encode()) for t in texts)
    assert 200_000 < size <= 300_000 and heldout
    assert any("Tyger" in t or "Lamb" in t for t in texts)  # spread sampling reaches the last file
    cfg.sample = "head"
    head = [t for batch in stage.corpus(cfg, 0, "stages.tok")[0] for t in batch]
    assert not any("Tyger" in t for t in head) and sum(len(t.encode()) for t in head) <= 300_000


def test_streaming_gzip_json_lines_with_a_column_train_in_bounded_memory(tmp_path):
    rows = [{"id": i, "body": t} for i, t in enumerate(read_texts([str(shared_file("wikitext-2/valid.txt.xz"))]))]
    source = tmp_path / "corpus.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    data = parse_dataclass(DataConfig, {"path": "json", "files": str(source), "column": "body", "streaming": True}, "d")
    cfg = stage.Config(name="tok", kind="tokenizer", spec="llama-bpe", vocab_size=800, max_bytes=150_000, data=data)
    batches, heldout = stage.corpus(cfg, 0, "stages.tok")
    tok, fed = stage.build(stage.load_spec(cfg.spec), cfg, batches)
    assert 100_000 < fed.bytes <= 150_000 and heldout and len(tok) == 800
    assert tok.decode(tok(UNICODE[1], add_special_tokens=False)["input_ids"]) == UNICODE[1]


def test_quickstart_tokenizer_stage_keeps_bert_specials(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, spec="bert-wordpiece", vocab_size=3000, max_bytes=300_000,
                     data={"path": "builtin:pydocs"})
    assert code == 0, err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "tok")
    assert {"[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"} <= set(tok.all_special_tokens)


def test_every_shipped_spec_loads_and_tokenizers_folder_is_data_only():
    assert {"bert-wordpiece", "roberta-bytebpe", "gpt2-bytebpe", "llama-bpe", "unigram"} <= set(stage.spec_names())
    for name in stage.spec_names():
        assert stage.load_spec(name)["model"] in stage.MODELS
    assert not (stage.SPEC_DIRS[0] / "__init__.py").exists()


def test_spec_given_as_a_yaml_path_and_bad_spec_keys(tmp_path):
    text = Path(stage.find_spec("unigram")).read_text()
    (tmp_path / "mine.yaml").write_text(text)
    assert stage.load_spec(str(tmp_path / "mine.yaml"))["model"] == "unigram"
    (tmp_path / "bad.yaml").write_text(text + "\nvocab: 5\n")
    with pytest.raises(RecipeError, match="unknown key 'vocab'"):
        stage.load_spec(str(tmp_path / "bad.yaml"))


# --------------------------------------------------------------------------- bad input: exit 2, clear message

def test_unknown_spec_exits_2_naming_it(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, spec="bert-wordpeice")
    assert code == 2 and "unknown tokenizer spec 'bert-wordpeice'" in err and "did you mean 'bert-wordpiece'" in err


def test_byte_level_vocab_below_alphabet_is_rejected_by_validate(tmp_path, capsys):
    wiki = str(shared_file("wikitext-2/valid.txt.xz"))
    assert main(["validate", _recipe(tmp_path, spec="gpt2-bytebpe", vocab_size=200,
                                     data={"path": "text", "files": wiki})]) == 2
    err = capsys.readouterr().err
    assert "vocab_size: 200 leaves no room" in err and "needs 257 entries" in err


def test_wordpiece_vocab_below_corpus_alphabet_exits_2_at_run_time(tmp_path, capsys):
    wiki = str(shared_file("wikitext-2/valid.txt.xz"))
    code, err = _run(tmp_path, capsys, spec="bert-wordpiece", vocab_size=30, max_bytes=50_000,
                     data={"path": "text", "files": wiki})
    assert code == 2 and "stages.tok.vocab_size: 30 is below the alphabet" in err
    assert not (tmp_path / "run" / "tok").exists()


def test_unigram_vocab_below_corpus_alphabet_exits_2_at_run_time(tmp_path, capsys):
    wiki = str(shared_file("wikitext-2/valid.txt.xz"))
    code, err = _run(tmp_path, capsys, spec="unigram", vocab_size=60, max_bytes=50_000,
                     data={"path": "text", "files": wiki})
    assert code == 2 and "stages.tok.vocab_size" in err and "distinct characters" in err


def test_binary_file_exits_2_before_training(tmp_path, capsys):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    code, err = _run(tmp_path, capsys, data={"path": "text", "files": str(blob)})
    assert code == 2 and "looks binary" in err and "weights.bin" in err


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\n"])
def test_empty_corpus_exits_2(tmp_path, capsys, content):
    empty = tmp_path / "empty.txt.xz"
    empty.write_bytes(lzma.compress(content))
    code, err = _run(tmp_path, capsys, data={"path": "text", "files": str(empty)})
    assert code == 2 and ("empty" in err or "no text" in err), err


def test_missing_file_is_rejected_by_validate(tmp_path, capsys):
    assert main(["validate", _recipe(tmp_path, data={"path": "text", "files": str(tmp_path / "nope.txt")})]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_report_command_on_a_folder_without_tokenizer_exits_2(tmp_path, capsys):
    assert main(["report", "tokenizer", str(tmp_path), "--data", str(shared_file("wikitext-2/valid.txt.xz"))]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_without_native_trainers_auto_uses_the_library_and_lmssl_engine_says_why(corpus_texts, monkeypatch):
    from lmssl import tokenizer_training

    monkeypatch.setattr(tokenizer_training, "native_trainers", lambda: {})  # as on a machine without a C compiler
    cfg = stage.Config(name="tok", kind="tokenizer", spec="llama-bpe", vocab_size=900)
    tokenizer, fed = stage.build(stage.load_spec(cfg.spec), cfg, iter([corpus_texts]))
    assert len(tokenizer) == 900 and fed.texts == len(corpus_texts)
    cfg.engine = "lmssl"
    with pytest.raises(RecipeError, match=r"stages\.tok\.engine: .*lmssl\._bpe is not built"):
        stage.build(stage.load_spec(cfg.spec), cfg, iter([corpus_texts]))
