"""`compile: true`: torch.compile of the training module gives the eager losses (CPU inductor, a C compiler)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import datasets
import pytest

from test_objectives import train_tokenizer, wikitext_lines


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor on CPU needs a C compiler")
def test_compiled_training_gives_the_eager_losses_over_20_steps(tmp_path):
    from accelerate import Accelerator

    from lmssl.models import ModelConfig
    from lmssl.objectives.causal_lm import CausalLM, Options
    from lmssl.recipe import TrainingConfig
    from lmssl.rng import seed_all
    from lmssl.training import train

    tokenizer = train_tokenizer("bytebpe", tmp_path / "tok", wikitext_lines(limit=600), vocab_size=400)
    objective = CausalLM(Options(), tokenizer, 32)
    blocks = objective.prepare(datasets.Dataset.from_dict({"text": wikitext_lines(limit=600)}))
    cfg = TrainingConfig(name="c", kind="pretrain", batch_size=8, max_steps=20, log_every=1, save_every=None,
                         learning_rate=3e-3, warmup_steps=2)
    losses = {}
    for compiled in (False, True):
        seed_all(0)
        model = objective.build_model(ModelConfig(family="gpt2", size="tiny", overrides={  # no dropout: its random
            "n_layer": 1, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}))     # streams differ when compiled
        result = train(objective, model, blocks, None, replace(cfg, compile=compiled), Accelerator(cpu=True),
                       tmp_path / f"run-{compiled}", None, seed=0, accumulation=1)
        losses[compiled] = [h["train/loss"] for h in result.history if "train/loss" in h]
    assert len(losses[True]) == len(losses[False]) == 20
    assert losses[False][-1] < losses[False][0] - 0.5                 # it trains
    for step, (eager, fast) in enumerate(zip(losses[False], losses[True]), 1):
        assert fast == pytest.approx(eager, rel=1e-4), f"step {step}: compiled {fast} vs eager {eager}"
