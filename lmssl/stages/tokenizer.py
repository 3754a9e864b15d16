"""The `tokenizer` stage: fit a tokenizer described by a YAML spec (tokenizers/*.yaml) to a corpus,
in bounded memory, and save it as a folder AutoTokenizer loads, with a report card beside it."""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

import yaml

from lmssl.data.corpus import corpus, local_files, unusable  # noqa: F401  (the stage's corpus API)
from lmssl.errors import LmsslError, RecipeError
from lmssl.recipe import DataConfig, StageConfig
from lmssl.schema import Range, check_ranges

SPEC_DIRS = (Path(__file__).resolve().parent.parent.parent / "tokenizers",
             Path(sys.prefix) / "share" / "lmssl" / "tokenizers")
SPEC_KEYS = {"description", "model", "model_options", "trainer_options", "alphabet", "byte_fallback", "lowercase",
             "normalizer", "pre_tokenizer", "decoder", "special_tokens", "template", "token_type_ids"}
SPECIAL_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
MODELS = ("bpe", "wordpiece", "unigram")
BYTE_ALPHABET = 256  # byte-level and byte-fallback vocabularies always hold one symbol per byte


@dataclass
class Config(StageConfig):
    spec: str = "bert-wordpiece"
    """A spec in tokenizers/ (bert-wordpiece, roberta-bytebpe, gpt2-bytebpe, llama-bpe, unigram) or a path to a .yaml spec."""
    vocab_size: Annotated[int, Range(1, 2**31 - 1)] = 8000
    """Target vocabulary size, special tokens included (8k suits a few MB of text; BERT uses 30522)."""
    min_frequency: Annotated[int, Range(0)] = 2
    """A merge or word piece must occur this often (2 drops one-off noise; Unigram ignores it)."""
    lowercase: Optional[bool] = None
    """Lowercase text first; None keeps the spec's choice."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Override the spec's special tokens by role (bos, eos, unk, sep, pad, cls, mask), e.g. {mask: "<mask>"}."""
    max_length: Annotated[int, Range(1)] = 512
    """model_max_length written into the tokenizer config."""
    max_bytes: Optional[Annotated[int, Range(1)]] = None
    """Train on at most this many bytes of text (bounded memory on huge corpora); None reads all."""
    engine: Literal["auto", "lmssl", "tokenizers"] = "auto"
    """Who trains: lmssl's native trainers (word counts in C, then BPE/WordPiece/Unigram; several times faster),
    the `tokenizers` library's trainers, or auto: lmssl's where they are built and the spec's pipeline allows."""
    sample: Literal["spread", "head"] = "spread"
    """With max_bytes: spread takes a seeded random sample of rows over the whole corpus, head the first rows (streaming always reads the head)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text to fit the tokenizer on (2% is held out for the report card unless data.eval_split is set)."""

    def fingerprint_inputs(self) -> list[str]:
        """The spec file's text: editing a spec re-runs the stage."""
        path = find_spec(self.spec)
        return [path.read_text(encoding="utf-8")] if path else []

    def check(self, recipe, earlier, where: str) -> None:
        check_ranges(self, where)  # a recipe's values are checked as it is parsed; this covers configs made in code
        spec = load_spec(self.spec, f"{where}.spec")
        unknown = sorted(set(self.special_tokens) - set(SPECIAL_ROLES))
        if unknown:
            raise RecipeError(f"{where}.special_tokens: unknown role {unknown[0]!r}; roles: {', '.join(SPECIAL_ROLES)}")
        smallest = minimum_vocab(spec, self.special_tokens)
        if self.vocab_size < smallest:
            raise RecipeError(
                f"{where}.vocab_size: {self.vocab_size} leaves no room to learn anything: spec {self.spec!r} needs "
                f"{smallest - 1} entries for its alphabet and special tokens alone; use a few hundred more at least")
        self.data.check(f"{where}.data")
        for path in local_files(self.data):
            why = unusable(path)
            if why:
                raise RecipeError(f"{where}.data.files: {str(path)!r} {why}")


# --------------------------------------------------------------------------- specs

def spec_names() -> list[str]:
    """Every spec name found in the spec folders, for error messages and docs."""
    return sorted({p.stem for d in SPEC_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def find_spec(name: str) -> Optional[Path]:
    """A spec name in tokenizers/ (then the installed share/lmssl/tokenizers), or a .yaml path."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        return path if path.is_file() else None
    for folder in SPEC_DIRS:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None


def load_spec(name: str, where: str = "spec") -> dict[str, Any]:
    """Read and validate a spec; mistakes are RecipeErrors naming the key."""
    path = find_spec(name)
    if path is None:
        near = difflib.get_close_matches(name, spec_names(), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise RecipeError(f"{where}: unknown tokenizer spec {name!r}; {hint}known: {', '.join(spec_names())} "
                          "(or a path to an existing .yaml spec file)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: spec file {path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: spec file {path} must be a mapping")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise RecipeError(f"{where}: spec {path} has unknown key {unknown[0]!r}; keys: {', '.join(sorted(SPEC_KEYS))}")
    if spec.get("model") not in MODELS:
        raise RecipeError(f"{where}: spec {path} needs `model:` one of {', '.join(MODELS)}, got {spec.get('model')!r}")
    roles = sorted(set(spec.get("special_tokens") or {}) - set(SPECIAL_ROLES))
    if roles:
        raise RecipeError(f"{where}: spec {path} has unknown special-token role {roles[0]!r}")
    for key, table in (("normalizer", NORMALIZERS), ("pre_tokenizer", PRE_TOKENIZERS), ("decoder", DECODERS)):
        for step in spec.get(key) or []:
            if not isinstance(step, dict) or step.get("type") not in table:
                raise RecipeError(f"{where}: spec {path} {key} step {step!r} needs `type:` one of {', '.join(table)}")
    spec["path"] = str(path)
    return spec


def specials_of(spec: dict, overrides: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Special tokens by role: the spec's, with the recipe's overrides."""
    return {**(spec.get("special_tokens") or {}), **(overrides or {})}


def _distinct(specials: dict[str, str]) -> list[str]:
    return list(dict.fromkeys(specials.values()))


def minimum_vocab(spec: dict, overrides: Optional[dict[str, str]] = None) -> int:
    """The smallest vocab_size that can work: known alphabet (bytes) + specials + one learned token."""
    alphabet = BYTE_ALPHABET if spec.get("alphabet") == "bytes" or spec.get("byte_fallback") else 0
    return alphabet + len(_distinct(specials_of(spec, overrides))) + 1


# --------------------------------------------------------------------------- components

# Component names a spec may use, with the tokenizers class each builds (imported lazily, so
# `lmssl validate` checks specs without loading the library).
NORMALIZERS = {"bert": "BertNormalizer", "nfc": "NFC", "nfkc": "NFKC", "nfd": "NFD", "nfkd": "NFKD",
               "lowercase": "Lowercase", "strip_accents": "StripAccents", "replace": "Replace",
               "prepend": "Prepend", "strip": "Strip"}
PRE_TOKENIZERS = {"bert": "BertPreTokenizer", "byte_level": "ByteLevel", "metaspace": "Metaspace",
                  "whitespace": "Whitespace", "whitespace_split": "WhitespaceSplit", "split": "Split",
                  "digits": "Digits", "punctuation": "Punctuation"}
DECODERS = {"wordpiece": "WordPiece", "byte_level": "ByteLevel", "metaspace": "Metaspace", "replace": "Replace",
            "byte_fallback": "ByteFallback", "fuse": "Fuse", "strip": "Strip"}


def _component(steps: list[dict], table: dict[str, str], module):
    """One component (or a Sequence of them) from spec steps like {type: replace, pattern: " ", content: "▁"}."""
    built = [getattr(module, table[s["type"]])(**{k: v for k, v in s.items() if k != "type"}) for s in steps]
    return built[0] if len(built) == 1 else module.Sequence(built)


def _normalizer_steps(spec: dict, lowercase: bool) -> list[dict]:
    """The spec's normalizer steps with the effective lowercasing applied (BertNormalizer has its own flag)."""
    steps = [dict(s) for s in spec.get("normalizer") or [] if lowercase or s["type"] != "lowercase"]
    bert = [s for s in steps if s["type"] == "bert"]
    for step in bert:
        step["lowercase"] = lowercase
    if lowercase and not bert and not any(s["type"] == "lowercase" for s in steps):
        steps.append({"type": "lowercase"})
    return steps


def build(spec: dict, cfg: Config, texts: Iterator[list[str]],
          reread: Optional[Callable[[], Iterator[list[str]]]] = None):
    """Train the spec's tokenizer on batches of texts; return (a transformers fast tokenizer, what it was fed).
    `reread` gives the same batches again, for the library to train on should the native count's
    self-check fail after the pass (without it, that failure is an error)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = specials_of(spec, cfg.special_tokens)
    tokens = _distinct(specials)
    unk = specials.get("unk")
    lowercase = spec.get("lowercase", False) if cfg.lowercase is None else cfg.lowercase
    kind = spec["model"]
    model_options = dict(spec.get("model_options") or {})
    trainer_options = dict(spec.get("trainer_options") or {})
    common = dict(vocab_size=cfg.vocab_size, special_tokens=tokens, show_progress=False, **trainer_options)
    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(unk_token=unk, **common)
    else:
        model_cls, trainer_cls = {"bpe": (models.BPE, trainers.BpeTrainer),
                                  "wordpiece": (models.WordPiece, trainers.WordPieceTrainer)}[kind]
        if spec.get("byte_fallback"):  # room for the 256 byte tokens added after training
            common["vocab_size"] = cfg.vocab_size - BYTE_ALPHABET
        if spec.get("alphabet") == "bytes":
            common["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
        tokenizer = Tokenizer(model_cls(unk_token=unk, **model_options) if unk else model_cls(**model_options))
        trainer = trainer_cls(min_frequency=cfg.min_frequency, **common)

    steps = _normalizer_steps(spec, lowercase)
    if steps:
        tokenizer.normalizer = _component(steps, NORMALIZERS, normalizers)
    if spec.get("pre_tokenizer"):
        tokenizer.pre_tokenizer = _component(spec["pre_tokenizer"], PRE_TOKENIZERS, pre_tokenizers)
    if spec.get("decoder"):
        tokenizer.decoder = _component(spec["decoder"], DECODERS, decoders)

    fed = _Counter(texts)
    try:
        model = _native(spec, cfg, tokenizer, steps, fed, tokens, unk, trainer_options, model_options,
                        common.get("vocab_size", cfg.vocab_size), common.get("initial_alphabet", []))
    except _Disagreement as err:
        text = str(err)
        shown = repr(text[:80]) + ("..." if len(text) > 80 else "")
        if reread is None:
            raise LmsslError(f"stages.{cfg.name}: lmssl's fast word count disagrees with the tokenizer's pipeline on "
                             f"the text {shown}; set engine: tokenizers (and please report this)") from None
        print(f"[lmssl] stages.{cfg.name}: the fast word count disagrees with the tokenizer's pipeline on the text "
              f"{shown}; training with the tokenizers library instead", file=sys.stderr)
        fed, model = _Counter(reread()), None
    if model is not None:
        tokenizer.model = model
        tokenizer.add_special_tokens(tokens)
        fed.engine = "lmssl"
    else:
        try:
            tokenizer.train_from_iterator(fed, trainer=trainer)
        except Exception as err:  # the Rust trainers raise plain Exceptions for impossible settings
            raise LmsslError(f"stages.{cfg.name}: training the {cfg.spec!r} tokenizer failed: {err} (vocab_size "
                             f"{cfg.vocab_size}; is it below the corpus alphabet plus special tokens?)") from None
    if fed.bytes == 0:
        raise LmsslError(_nothing_left(cfg, fed))
    if spec.get("byte_fallback"):
        tokenizer = _with_byte_tokens(tokenizer, tokens, unk, model_options)
    learned = tokenizer.get_vocab_size()
    if learned > cfg.vocab_size:
        raise LmsslError(
            f"stages.{cfg.name}.vocab_size: {cfg.vocab_size} is below the alphabet of this corpus plus special tokens: the smallest "
            f"{spec['model']} vocabulary that covers its characters has {learned} entries; raise vocab_size well above {learned}")

    template = spec.get("template")
    if template:
        used = [t for t in tokens if t in template["single"] + " " + template.get("pair", "")]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template["single"], pair=template.get("pair"),
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in used])
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "sep": "sep_token", "pad": "pad_token",
             "cls": "cls_token", "mask": "mask_token"}
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if spec.get("token_type_ids") else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=cfg.max_length,
                                   clean_up_tokenization_spaces=False, model_input_names=inputs,
                                   **{names[role]: token for role, token in specials.items()}), fed


class _Disagreement(Exception):
    """The fast word count differed from the library's pipeline on this text (a bug in lmssl)."""


def _native(spec, cfg, tokenizer, steps, fed, tokens, unk, trainer_options, model_options, vocab_size, alphabet):
    """Train with lmssl's native trainers when allowed and possible; None leaves it to the library.

    A seeded sample of texts spread over the whole corpus, drawn as the words are counted, is counted
    the library's way too; a difference raises _Disagreement before anything is trained."""
    from lmssl import tokenizer_training as native

    if cfg.engine == "tokenizers":
        return None
    how = native.plan(spec, steps)
    why = native.missing(spec) or (None if how else "its normalizer or pre-tokenizer cannot be counted chunk by chunk")
    if why:
        if cfg.engine == "lmssl":
            raise RecipeError(f"stages.{cfg.name}.engine: lmssl cannot train spec {cfg.spec!r} itself: {why}; "
                              "use engine: auto or tokenizers")
        return None
    sample = native.SpreadSample(native.CHECK_TEXTS, seed=0)
    words, fed.texts, fed.bytes = native.count_words(tokenizer, how, fed.batches, sample=sample)
    differs = native.disagreement(tokenizer, how, sample.texts)
    if differs is not None:
        raise _Disagreement(differs)
    try:
        return native.train_model(spec, words, vocab_size, tokens, unk, cfg.min_frequency, trainer_options,
                                  model_options, list(alphabet))
    except ValueError as err:  # e.g. a vocabulary smaller than the corpus alphabet
        raise LmsslError(f"stages.{cfg.name}.vocab_size: training the {cfg.spec!r} tokenizer failed: {err}") from None


def _with_byte_tokens(tokenizer, specials: list[str], unk: Optional[str], model_options: dict):
    """Rebuild a trained BPE with byte fallback: specials, then <0x00>..<0xFF>, then the learned pieces."""
    from tokenizers import Tokenizer, models

    state = json.loads(tokenizer.to_str())
    learned = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    order = specials + [f"<0x{b:02X}>" for b in range(256)]
    fixed = set(order)
    order += [piece for piece, _ in learned if piece not in fixed]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    model = models.BPE({piece: i for i, piece in enumerate(order)}, merges, unk_token=unk, byte_fallback=True,
                       **model_options)
    rebuilt = Tokenizer(model)
    rebuilt.normalizer, rebuilt.pre_tokenizer, rebuilt.decoder = (
        tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder)
    rebuilt.add_special_tokens(specials)
    return rebuilt


def _nothing_left(cfg: Config, fed: "_Counter") -> str:
    """Why no text reached the trainer: the byte cap, skipped rows, or a corpus of blank rows."""
    where = f"stages.{cfg.name}"
    if fed.capped:
        return (f"{where}.max_bytes: the byte cap of {cfg.max_bytes} bytes left no text to train on (the rows it "
                "reached are longer, or blank); raise max_bytes, or set it to null to read everything")
    corpus_is = f"the corpus (path {cfg.data.path!r}, files {cfg.data.files!r}, column {cfg.data.column!r})"
    if fed.skipped:
        return (f"{where}.data: every row of {corpus_is} was skipped ({_reasons(fed.skipped, cfg.data.max_chars)}); "
                "raise data.max_chars or check the column")
    return f"{where}.data: {corpus_is} holds no text: every row is blank; point it at a text corpus"


def _reasons(skipped: dict[str, int], max_chars: int) -> str:
    """Rows skipped as bad, in words: "2 too long (over data.max_chars = 1,000 characters), 1 missing"."""
    named = {"too_long": f"too long (over data.max_chars = {max_chars:,} characters)", "not_text": "not text"}
    return ", ".join(f"{n:,} {named.get(reason, reason)}" for reason, n in sorted(skipped.items()))


def _skipped_line(skipped: dict[str, int], max_chars: int) -> str:
    """The report's sentence on rows left out as bad ("" when none were)."""
    total = sum(skipped.values())
    return f"\nSkipped {total:,} row{'s' * (total != 1)}: {_reasons(skipped, max_chars)}.\n" if total else ""


class _Counter:
    """Wraps the batch iterator handed to the trainer and counts what it fed (bytes, texts), and who trained;
    rows the corpus reader left out (skipped as bad, cut by max_bytes) are read from the batches it made."""

    def __init__(self, batches: Iterator[list[str]]):
        self.batches, self.bytes, self.texts, self.engine = batches, 0, 0, "tokenizers"

    @property
    def skipped(self) -> dict[str, int]:
        return dict(getattr(self.batches, "skipped", {}))

    @property
    def capped(self) -> bool:
        return bool(getattr(self.batches, "capped", False))

    def __iter__(self):
        for batch in self.batches:
            self.bytes += sum(len(t.encode("utf-8")) for t in batch)
            self.texts += len(batch)
            yield batch


def run(cfg: Config, ctx):
    with ctx.phase("prepare"):  # the first stage of a run pays for importing transformers here
        from transformers import AutoTokenizer

        from lmssl.stages.base import StageResult
        from lmssl.tokenizer_report import format_card, report_card, write_card

    where = f"stages.{cfg.name}"
    spec = load_spec(cfg.spec, f"{where}.spec")
    if ctx.is_main:
        with ctx.phase("train"):  # the corpus is read as the trainer consumes it: reading counts as training
            batches, heldout = corpus(cfg, ctx.seed, where)
            tokenizer, fed = build(spec, cfg, batches, reread=lambda: corpus(cfg, ctx.seed, where)[0])
        with ctx.phase("save"):
            tokenizer.save_pretrained(ctx.out_dir)
        with ctx.phase("eval"):
            card = report_card(AutoTokenizer.from_pretrained(ctx.out_dir), heldout, name=cfg.spec)
            card["trained_on"] = {"bytes": fed.bytes, "texts": fed.texts, "engine": fed.engine, "skipped": fed.skipped}
            write_card(card, ctx.out_dir)
    ctx.accelerator.wait_for_everyone()  # other processes wait here, then load what the main one saved
    AutoTokenizer.from_pretrained(ctx.out_dir)  # every process checks that the saved folder loads
    card = json.loads((ctx.out_dir / "report.json").read_text())
    skipped = {f"data/skipped_{reason}": float(n) for reason, n in card["trained_on"].get("skipped", {}).items()}
    metrics = {**{k: v for k, v in card.items() if isinstance(v, (int, float))}, **skipped}
    headline = {k: metrics[k] for k in ("vocab_size", "fertility", "bytes_per_token", "roundtrip_exact") if k in metrics}
    report = format_card(card) + _skipped_line(card["trained_on"].get("skipped", {}), cfg.data.max_chars)
    if ctx.is_main:
        from lmssl.hub import is_hub_id, write_model_card

        with ctx.phase("save"):
            write_model_card(
                ctx.out_dir, title=f"{cfg.spec} tokenizer ({cfg.name})",
                summary=(f"A {cfg.spec} tokenizer with {metrics.get('vocab_size', cfg.vocab_size):,} entries, trained by lmssl "
                         f"on {card['trained_on']['texts']:,} texts ({card['trained_on']['bytes']:,} bytes) of "
                         f"`{cfg.data.path}` ({card['trained_on']['engine']}). Load it with AutoTokenizer."),
                recipe_raw=ctx.recipe_raw, stage_name=cfg.name, metrics=headline, tags=("tokenizer", cfg.spec),
                license_id=ctx.license, datasets=(cfg.data.path,) if is_hub_id(cfg.data.path) else (),
                extra_sections=("## Report card\n\n" + report.strip(),))
    return StageResult(ctx.out_dir, metrics, headline={**headline, **skipped}, report=report)
