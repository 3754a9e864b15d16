"""The pretrain stage on WikiText-2: a tiny model of each family learns well past the unigram
baseline, reloads with its Auto class and serves generate()/fill-mask; bad recipes fail early."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from conftest import shared_file
from test_objectives import bytebpe, train_tokenizer, wikitext_lines, wordpiece  # noqa: F401  (fixtures)

from lmssl.data.text import group_lines
from lmssl.errors import RecipeError
from lmssl.recipe import check_recipe, parse_raw
from lmssl.stages import CONFIGS
from lmssl.runner import run_recipe

BATCH, LENGTH = 16, 64
# family: (objective, tokenizer fixture, Auto class, steps, objective_args, required margin in nats).
# A masked model gets far fewer targets per step than a causal one and sits on the unigram
# plateau longer, so it masks 40% (Wettig et al. 2023) and trains for more steps.
FAMILIES = {
    "bert": ("mlm_nsp", "wordpiece", "AutoModelForPreTraining", 1500, {"mask_rate": 0.4}, 0.4),
    "roberta": ("mlm", "bytebpe", "AutoModelForMaskedLM", 2000, {"mask_rate": 0.4}, 0.35),
    "gpt2": ("causal_lm", "bytebpe", "AutoModelForCausalLM", 250, {}, 0.5),
    "llama": ("causal_lm", "bytebpe", "AutoModelForCausalLM", 250, {"document_attention": True}, 0.5),
}


VALID_LINES = 1500   # the first 1,500 lines of WikiText-2 valid (about 90k tokens) score every model


def valid_slice(folder) -> str:
    """The validation lines as a plain text file (so no test tokenizes the whole split)."""
    path = folder / "valid-slice.txt"
    if not path.exists():
        path.write_text("\n".join(wikitext_lines("valid", limit=VALID_LINES)) + "\n", encoding="utf-8")
    return str(path)


def pretrain_stage(tokenizer_dir, family: str, objective: str, **extra) -> dict:
    stage = {
        "name": "pretrain", "kind": "pretrain", "objective": objective, "tokenizer_from": str(tokenizer_dir),
        "model": {"family": family, "size": "tiny", "dropout": 0.0}, "documents": "blank_lines", "max_length": LENGTH,
        "data": {"path": "text", "files": {"train": str(shared_file("wikitext-2/train.txt.xz")),
                                           "validation": valid_slice(tokenizer_dir.parent)},
                 "eval_split": "validation", "max_samples": 6000},
        "batch_size": BATCH, "learning_rate": 2e-3, "max_steps": 250, "eval_batches": 12, "save_every": None,
        "log_every": 50,
    }
    stage.update(extra)
    return stage


def unigram_entropy(tokenizer, lines: list[str], objective: str) -> float:
    """Entropy (nats) of the validation tokens' own unigram distribution: the loss of the best
    context-free guess, fitted on the very data it is scored on. The targets are the tokens the
    objective predicts: every token plus EOS (causal), non-special tokens (masked)."""
    counts: Counter = Counter()
    for doc in group_lines(lines):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        counts.update(ids + ([tokenizer.eos_token_id] if objective == "causal_lm" else []))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_model_learns_well_past_the_unigram_baseline_and_reloads(family, request, tmp_path):
    import transformers

    objective, tokenizer_fixture, auto_class, steps, options, margin = FAMILIES[family]
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    stage = pretrain_stage(tokenizer_dir, family, objective, max_steps=steps, objective_args=options)
    recipe = parse_raw({"name": f"tiny-{family}", "seed": 0, "stages": [stage]}, CONFIGS)
    check_recipe(recipe)
    result = run_recipe(recipe, run_dir=tmp_path / "run")["pretrain"]
    loss = result.metrics["eval/mlm_loss" if objective == "mlm_nsp" else "eval/loss"]
    baseline = unigram_entropy(tokenizer, wikitext_lines("valid", limit=VALID_LINES), objective)
    print(f"\n{family} {objective}, {steps} steps: eval loss {loss:.3f} nats vs unigram entropy {baseline:.3f}; "
          f"{result.headline}")
    assert loss < baseline - margin

    model = getattr(transformers, auto_class).from_pretrained(result.path)
    assert model.config.model_type == family
    if objective == "causal_lm":
        prompt = tokenizer("The game", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    else:
        fill = transformers.pipeline("fill-mask", model=str(result.path), device="cpu")
        guesses = fill(f"The game was released in {tokenizer.mask_token} .")
        assert len(guesses) == 5 and all(g["token_str"] for g in guesses)


# --------------------------------------------------------------------------- mistakes caught before training

def check(stage: dict) -> None:
    check_recipe(parse_raw({"name": "bad", "stages": [stage]}, CONFIGS))


def test_nsp_with_a_gpt2_model_is_a_recipe_error_naming_the_family(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.model\.family: the mlm_nsp objective needs one of bert"):
        check(pretrain_stage(tmp_path, "gpt2", "mlm_nsp"))
    with pytest.raises(RecipeError, match=r"the sop objective needs one of bert, not 'roberta'"):
        check(pretrain_stage(tmp_path, "roberta", "sop"))
    with pytest.raises(RecipeError, match=r"objective_args\.whole_word: whole-word masking .* mlm objective only"):
        check(pretrain_stage(tmp_path, "bert", "mlm_nsp", objective_args={"whole_word": True}))
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.documents: .*did you mean 'blank_lines'"):
        check(pretrain_stage(tmp_path, "bert", "mlm", documents="blank_line"))


def test_a_block_size_beyond_the_models_positions_is_a_recipe_error(tmp_path, bytebpe):
    stage = pretrain_stage(tmp_path, "gpt2", "causal_lm", max_length=256)
    stage["model"]["overrides"] = {"n_positions": 128}
    with pytest.raises(RecipeError, match=r"max_length 256 is beyond the 128 positions.*overrides\.n_positions"):
        check(stage)
    from transformers import AutoModelForCausalLM

    from lmssl.models import ModelConfig, build_config

    warm = tmp_path / "small-gpt2"
    AutoModelForCausalLM.from_config(build_config(ModelConfig(family="gpt2"), bytebpe, 128)).save_pretrained(warm)
    stage = pretrain_stage(tmp_path, "gpt2", "causal_lm", max_length=256)
    stage["model"] = {"init_from": str(warm)}
    with pytest.raises(RecipeError, match=r"beyond the 128 positions of the model \(stages\.pretrain\.model\.init_from\)"):
        check(stage)


def test_a_corpus_without_multi_sentence_documents_stops_nsp_before_training(tmp_path, wordpiece):
    from lmssl.errors import LmsslError

    titles = tmp_path / "titles.txt"
    titles.write_text("\n".join(f"Title number {i}" for i in range(200)) + "\n")
    wordpiece.save_pretrained(str(tmp_path / "tok"))
    stage = pretrain_stage(tmp_path / "tok", "bert", "mlm_nsp", documents="rows",
                           data={"path": "text", "files": str(titles)})
    recipe = parse_raw({"name": "titles", "stages": [stage]}, CONFIGS)
    check_recipe(recipe)
    with pytest.raises(LmsslError, match="at least two sentences"):
        run_recipe(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "pretrain").exists()          # no half-written output folder


def test_a_streamed_corpus_gives_the_same_rows_as_a_loaded_one(tmp_path):
    from lmssl.data.text import load_splits
    from lmssl.recipe import DataConfig

    files = {"train": str(shared_file("wikitext-2/valid.txt.xz"))}
    loaded, _ = load_splits(DataConfig(path="text", files=files, max_samples=500, eval_fraction=0), 0, "stages.x")
    streamed, _ = load_splits(DataConfig(path="text", files=files, max_samples=500, eval_fraction=0, streaming=True),
                              0, "stages.x")
    assert len(streamed) == 500 and streamed["text"][:500] == loaded["text"][:500]


def test_a_pretrain_stage_continues_from_an_earlier_one_named_by_model_from(tmp_path):
    """model_from: an earlier pretrain stage's weights (and tokenizer) are the warm start; zero steps of
    change would leave them equal, so a learning rate near zero shows the start was that stage's end."""
    import torch
    import yaml
    from transformers import AutoModelForMaskedLM

    from lmssl import load_recipe

    data = {"path": "builtin:pydocs", "max_samples": 200}
    stages = [{"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": data},
              {"name": "first", "kind": "pretrain", "tokenizer_from": "tok", "model": {"family": "bert", "size": "tiny"},
               "data": data, "max_length": 32, "batch_size": 8, "max_steps": 3},
              {"name": "second", "kind": "pretrain", "model_from": "first", "data": data, "max_length": 32,
               "batch_size": 8, "max_steps": 1, "learning_rate": 1e-9, "warmup_steps": 0}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "t", "stages": stages}))
    run_recipe(load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    first = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "first").state_dict()
    second = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "second").state_dict()
    fresh = AutoModelForMaskedLM.from_config(AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "first").config)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(first[key], second[key], atol=1e-6) and not torch.allclose(first[key], fresh.state_dict()[key])
    stages[2]["model"] = {"init_from": str(tmp_path)}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "t", "stages": stages}))
    with pytest.raises(RecipeError, match="give model_from or model.init_from, not both"):
        load_recipe(tmp_path / "r.yaml")
    stages[2].pop("model")
    stages[2]["model_from"] = "tok"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "t", "stages": stages}))
    with pytest.raises(RecipeError, match="stages.second.model_from"):
        load_recipe(tmp_path / "r.yaml")
