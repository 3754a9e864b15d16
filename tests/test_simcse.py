"""Unsupervised SimCSE: the loss against a loop over pairs, views that differ by dropout alone, mean
pooling with padding, a saved encoder that reloads with AutoModel and knows its pooling, and, on real
data, SimCSE after a short MLM pretraining raising zero-shot STS-B dev Spearman."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import shared_file
from test_objectives import wordpiece  # noqa: F401  (fixture)

from lmssl.errors import RecipeError
from lmssl.models import ModelConfig
from lmssl.objectives.simcse import Options, SimCSE, mean_pool, pooling_of, read_stsb, simcse_loss
from lmssl.rng import seed_all


def slow_simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's eq. 1, one anchor and one candidate at a time."""
    n, total = z1.shape[0], 0.0
    for i in range(n):
        cos = [torch.dot(z1[i], z2[j]) / (z1[i].norm() * z2[j].norm()) for j in range(n)]
        total = total - torch.log(torch.exp(cos[i] / temperature) / sum(torch.exp(c / temperature) for c in cos))
    return total / n


@pytest.mark.parametrize("n,temperature", [(2, 0.05), (5, 0.05), (8, 0.5), (16, 1.0)])
def test_loss_equals_a_loop_over_pairs_with_gradients(n, temperature):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randn(n, 12, generator=g, dtype=torch.float64)
    fast1, fast2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    slow1, slow2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    fast, hits = simcse_loss(fast1, fast2, temperature)
    slow = slow_simcse_loss(slow1, slow2, temperature)
    fast.backward()
    slow.backward()
    assert torch.allclose(fast, slow, rtol=1e-10)
    assert torch.allclose(fast1.grad, slow1.grad, rtol=1e-8, atol=1e-12)
    assert torch.allclose(fast2.grad, slow2.grad, rtol=1e-8, atol=1e-12)
    cos = torch.nn.functional.normalize(z1, dim=1) @ torch.nn.functional.normalize(z2, dim=1).T
    assert torch.equal(hits, cos.argmax(1) == torch.arange(n))


@pytest.fixture(scope="module")
def small_stsb(tmp_path_factory):
    """Three scored pairs: the unit tests do not need 1,500 pairs encoded at every training_module."""
    path = tmp_path_factory.mktemp("stsb") / "dev.tsv"
    path.write_text("sentence1\tsentence2\tscore\nA man plays.\tA man plays music.\t4.0\n"
                    "A cat sleeps.\tStocks fell.\t0.2\nTwo dogs run.\tDogs are running.\t3.5\n")
    return str(path)


def objective_on(tokenizer, stsb: str, dropout: float, pooling: str = "mean") -> tuple[SimCSE, torch.nn.Module]:
    objective = SimCSE(Options(pooling=pooling, stsb_dev=stsb), tokenizer, 32)
    seed_all(0)
    model = objective.build_model(ModelConfig(family="bert", size="tiny", dropout=dropout))
    return objective, objective.training_module(model)


def batch_of(objective, texts: list[str]) -> dict[str, torch.Tensor]:
    import datasets

    examples = objective.prepare(datasets.Dataset.from_dict({"text": texts}))
    return objective.collate([examples[i] for i in range(len(examples))])


SENTENCES = ["A man is playing a guitar.", "The cat sat on the mat.", "Two dogs run through the snow.",
             "A woman slices an onion.", "The stock market fell sharply today."]


def test_the_two_views_differ_by_dropout_alone(wordpiece, small_stsb):
    objective, module = objective_on(wordpiece, small_stsb, dropout=0.0)
    batch = batch_of(objective, SENTENCES)
    n = len(SENTENCES)
    z = module(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1))   # what `loss` runs
    assert torch.equal(z[:n], z[n:])            # no dropout: one view
    loss, stats = objective.loss(module, batch)
    # The partner is at cosine 1, the best any candidate can be: loss <= log n, and every pair is found.
    assert loss.item() < math.log(n) and stats["pair_accuracy"] == (float(n), float(n))
    same = batch_of(objective, [SENTENCES[0]] * 4)  # identical sentences: every candidate ties the partner
    assert abs(objective.loss(module, same)[0].item() - math.log(4)) < 1e-5

    objective, module = objective_on(wordpiece, small_stsb, dropout=0.1)
    seed_all(7)
    z = module(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1))
    assert not torch.allclose(z[:n], z[n:])     # two dropout masks, two views
    seed_all(7)
    assert torch.equal(z, module(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1)))
    module.eval()                               # the embedding served: dropout off, the same for both copies
    plain = module(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1), project=False)
    assert torch.equal(plain[:n], plain[n:])


def test_mean_pooling_averages_real_tokens_only():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)   # (batch, seq, d)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    by_hand = torch.stack([(hidden[0, 0] + hidden[0, 1] + hidden[0, 2]) / 3, (hidden[1, 0] + hidden[1, 1]) / 2])
    assert torch.equal(mean_pool(hidden, mask), by_hand)


def test_padding_does_not_change_a_sentences_mean_embedding(wordpiece, small_stsb):
    objective, module = objective_on(wordpiece, small_stsb, dropout=0.1)
    module.eval()
    alone = batch_of(objective, SENTENCES[:1])
    padded = batch_of(objective, SENTENCES[:1] + ["A much longer sentence, so that the first one is padded here."])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
    one = module(alone["input_ids"], alone["attention_mask"], project=False)[0]
    two = module(padded["input_ids"], padded["attention_mask"], project=False)[0]
    assert torch.allclose(one, two, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_saved_folder_reloads_with_automodel_knows_its_pooling_and_embeds_the_same(wordpiece, small_stsb, tmp_path,
                                                                                   pooling):
    from accelerate import Accelerator
    from transformers import AutoModel, AutoTokenizer

    from lmssl.objectives.simcse import pool

    objective, module = objective_on(wordpiece, small_stsb, dropout=0.1, pooling=pooling)
    module.eval()
    objective.save(Accelerator(cpu=True), module.encoder, tmp_path)
    assert not any("mlp" in key for key in module.encoder.state_dict())          # the MLP is training-only
    reloaded, tokenizer = AutoModel.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert pooling_of(reloaded.config) == pooling
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        served = pool(reloaded(**enc).last_hidden_state, enc["attention_mask"], pooling_of(reloaded.config))
        trained = module(enc["input_ids"], enc["attention_mask"], project=False)
    assert torch.allclose(served, trained, atol=1e-6)
    with pytest.raises(Exception, match="lmssl_pooling"):
        pooling_of(AutoModel.from_config(reloaded.config.__class__()).config)


def test_stsb_reader_keeps_quotes_and_reads_every_dev_pair(tmp_path):
    first, second, gold = read_stsb(shared_file("glue/STS-B/dev.tsv.xz"))
    assert len(first) == len(second) == len(gold) == 1500 and 0 <= min(gold) and max(gold) <= 5
    path = tmp_path / "dev.tsv"
    path.write_text('index\tsentence1\tsentence2\tscore\n0\t"Quoted" start\tno "end\t2.5\n1\tno score\there\n')
    assert read_stsb(path) == (['"Quoted" start'], ['no "end'], [2.5])


def test_recipe_mistakes_are_recipe_errors():
    from lmssl.schema import parse_dataclass
    from lmssl.stages.pretrain import Config

    stage = parse_dataclass(Config, {"name": "s", "kind": "pretrain", "objective": "simcse", "tokenizer_from": "t",
                                     "documents": "blank_lines"}, "stages.s")
    with pytest.raises(RecipeError, match="stages.s.documents"):
        SimCSE.check(Options(), stage, "stages.s")
    stage.documents = "rows"
    with pytest.raises(RecipeError, match="stages.s.objective_args.stsb_dev"):
        SimCSE.check(Options(stsb_dev="no/such/dev.tsv"), stage, "stages.s")


# Measured (seed 0; tiny BERT, 2 layers of width 64; the 2,000-token WordPiece of test_objectives; the first
# 3,000 lines of WikiText-2 train): zero-shot STS-B dev Spearman of mean-pooled cosines 0.3877 after 100
# MLM steps, 0.5055 after 40 SimCSE steps at 3e-3. With 6,000 lines: 60 MLM steps leave a higher start,
# 0.47 -> 0.50 (30 steps); after 150 MLM steps 0.38 -> 0.50 (3e-3) or 0.45 (1e-3), while cls pooling fell,
# 0.24 -> 0.17 in 100 steps at 1e-3: so the test trains mean pooling.
# Context, not asserted: a randomly initialized tiny BERT already scores 0.62 (mean; 0.56 cls), lexical
# overlap alone carrying STS-B; 100 MLM steps (still on the unigram plateau, 5% masked accuracy) lose that,
# and SimCSE wins part of it back (200 steps: 0.53). This test shows the gain over the MLM encoder only.
MLM_STEPS, SIMCSE_STEPS = 100, 40


def test_simcse_after_mlm_raises_zero_shot_stsb_spearman(wordpiece, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from lmssl import load_recipe, run_recipe
    from lmssl.evaluation import spearman
    from lmssl.objectives.simcse import pool

    train = str(shared_file("wikitext-2/train.txt.xz"))
    wordpiece.save_pretrained(str(tmp_path / "tok"))
    data = {"path": "text", "files": train, "max_samples": 3000}
    run = tmp_path / "run"
    stages = [
        {"name": "mlm", "kind": "pretrain", "objective": "mlm", "objective_args": {"mask_rate": 0.4},
         "tokenizer_from": str(tmp_path / "tok"), "model": {"family": "bert", "size": "tiny"},
         "documents": "blank_lines", "max_length": 32, "data": data, "batch_size": 32, "learning_rate": 2e-3,
         "max_steps": MLM_STEPS, "save_every": None, "eval_batches": 4},
        # model.init_from: the MLM stage's finished folder (model_from: mlm says the same in a recipe)
        {"name": "simcse", "kind": "pretrain", "objective": "simcse",
         "objective_args": {"pooling": "mean", "split_sentences": True}, "model": {"init_from": str(run / "mlm")},
         "max_length": 32, "data": data, "batch_size": 64, "learning_rate": 3e-3, "warmup_steps": 0,
         "max_steps": SIMCSE_STEPS, "save_every": None, "eval_batches": 4},
    ]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "t", "seed": 0, "stages": stages}))
    metrics = run_recipe(load_recipe(tmp_path / "r.yaml"), run_dir=run)["simcse"].metrics
    before, after = metrics["eval/stsb_spearman_before"], metrics["eval/stsb_spearman"]
    assert after > before + 0.05, (before, after)

    # The figures are those of the folders: the MLM encoder as loaded, the saved SimCSE encoder.
    first, second, gold = read_stsb(shared_file("glue/STS-B/dev.tsv.xz"))

    def score(folder, pooling):
        model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        embed = []
        for texts in (first, second):
            enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
            with torch.no_grad():
                embed.append(pool(model(**enc).last_hidden_state, enc["attention_mask"], pooling))
        return spearman(torch.nn.functional.cosine_similarity(*embed, dim=1).tolist(), gold)

    saved_pooling = pooling_of(AutoModel.from_pretrained(run / "simcse").config)
    assert saved_pooling == "mean" and score(run / "simcse", saved_pooling) == pytest.approx(after, abs=1e-4)
    assert score(run / "mlm", "mean") == pytest.approx(before, abs=1e-4)
