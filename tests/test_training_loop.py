"""The one training loop, with a toy objective: gradient accumulation equals a larger batch,
resume from a checkpoint reproduces the uninterrupted run bit for bit, the data order is a
pure function of (seed, step), and non-finite losses are skipped and counted."""

from __future__ import annotations

import math
from dataclasses import replace

import datasets
import pytest
import torch

from lmssl import checkpoint
from lmssl.errors import LmsslError
from lmssl.recipe import TrainingConfig
from lmssl.training import ResumableBatches, lr_lambda, param_groups, train


class Regression:
    """y = w.x + noise, a linear model with a bias, mean squared error per batch."""

    stat_names = ("loss",)

    def __init__(self, poison_steps=()):
        self.poison = set(poison_steps)
        self.calls = 0

    def training_module(self, model):
        return model

    def collate(self, rows):
        return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}

    def loss(self, module, batch):
        pred = module(batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        if module.training:
            self.calls += 1
            if self.calls in self.poison:
                loss = loss * float("nan")
        n = float(batch["y"].shape[0])
        return loss, {"loss": (loss.item() * n, n)}


def make_data(n=256, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g)
    y = x @ w + 0.1 * torch.randn(n, generator=g)
    return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist()})


def make_model(dim=8):
    torch.manual_seed(123)
    return torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def config(**kw):
    base = TrainingConfig(name="toy", kind="pretrain", batch_size=8, learning_rate=1e-2, max_steps=12,
                          save_every=None, log_every=1, warmup_steps=2, schedule="cosine")
    return replace(base, **kw)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test may have made a GPU one
    return Accelerator(cpu=True)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_matches_one_larger_batch(accelerator, tmp_path):
    data = make_data()
    small = make_model()
    train(Regression(), small, data, None, config(batch_size=8), accelerator, tmp_path / "a", None, seed=3,
          accumulation=4)
    large = make_model()
    train(Regression(), large, data, None, config(batch_size=32), accelerator, tmp_path / "b", None, seed=3,
          accumulation=1)
    assert not torch.equal(weights(small), weights(make_model())), "training changed nothing"
    torch.testing.assert_close(weights(small), weights(large), rtol=1e-5, atol=1e-6)


def test_loss_falls_on_a_learnable_problem(accelerator, tmp_path):
    result = train(Regression(), make_model(), make_data(), make_data().select(range(64)), config(max_steps=60),
                   accelerator, tmp_path, None, seed=0, accumulation=1)
    losses = [h["train/loss"] for h in result.history if "train/loss" in h]
    assert losses[-1] < 0.3 * losses[0]
    assert result.metrics["eval/loss"] < 0.3 * losses[0]


def test_resume_mid_epoch_reproduces_uninterrupted_run_bit_for_bit(accelerator, tmp_path):
    data = make_data(200)  # 25 batches per epoch: step 20 of 40 is mid-epoch 0, 30 is mid-epoch 1
    cfg = config(max_steps=40, save_every=10, keep_checkpoints=5)
    full = make_model()
    train(Regression(), full, data, None, cfg, accelerator, tmp_path / "full", tmp_path / "full-ckpt", seed=5,
          accumulation=1)

    # the same run, stopped after step 30 ...
    partial = make_model()
    train(Regression(), partial, data, None, replace(cfg, max_steps=40), accelerator, tmp_path / "p",
          tmp_path / "p-ckpt", seed=5, accumulation=1)
    ckpts = checkpoint.checkpoints(tmp_path / "p-ckpt")
    assert [c.name for c in ckpts][:3] == ["step-00000030", "step-00000020", "step-00000010"]
    # ... then resumed from step 20 (mid-epoch) in a fresh model, as after a crash
    for later in ckpts[:1]:
        import shutil

        shutil.rmtree(later)
    resumed = make_model()
    train(Regression(), resumed, data, None, cfg, accelerator, tmp_path / "r", tmp_path / "p-ckpt", seed=5,
          accumulation=1)
    assert torch.equal(weights(resumed), weights(full))


def test_corrupt_checkpoint_falls_back_to_the_one_before(accelerator, tmp_path):
    data = make_data(200)
    cfg = config(max_steps=30, save_every=10, keep_checkpoints=5)
    train(Regression(), make_model(), data, None, cfg, accelerator, tmp_path / "o", tmp_path / "ckpt", seed=1,
          accumulation=1)
    newest = checkpoint.checkpoints(tmp_path / "ckpt")[0]
    (newest / "optimizer.pt").write_bytes(b"truncated")
    messages = []
    assert checkpoint.latest_valid(tmp_path / "ckpt", log=messages.append).name == "step-00000010"
    assert "incomplete or corrupt" in messages[0]


def test_data_order_is_a_pure_function_of_seed_and_position():
    full = list(ResumableBatches(50, 4, world=1, rank=0, seed=9, start=0, stop=30))
    tail = list(ResumableBatches(50, 4, world=1, rank=0, seed=9, start=17, stop=30))
    assert full[17:] == tail
    epoch0 = [i for batch in full[:12] for _, i in batch]
    assert len(set(epoch0)) == 48  # one epoch = 12 batches of 4 from 50 rows, no repeats
    two = [list(ResumableBatches(50, 4, world=2, rank=r, seed=9, start=0, stop=6)) for r in range(2)]
    one = list(ResumableBatches(50, 8, world=1, rank=0, seed=9, start=0, stop=6))
    for g in range(6):  # two processes together see exactly the one-process batch
        assert [i for _, i in two[0][g] + two[1][g]] == [i for _, i in one[g]]


def test_nonfinite_losses_skip_the_step_and_stop_after_too_many(accelerator, tmp_path):
    result = train(Regression(poison_steps={3, 7}), make_model(), make_data(), None, config(max_steps=10),
                   accelerator, tmp_path / "a", None, seed=0, accumulation=1)
    assert result.metrics["train/nonfinite_steps"] == 2
    assert all(math.isfinite(x) for x in weights(make_model()).tolist())
    # a skipped step is exact, on the device: weights, Adam moments and step count stay as they were, so a run
    # whose step 3 is poisoned ends where the same run stopped after step 2 (a constant rate, no warmup)
    flat = dict(schedule="constant", warmup_steps=0)
    poisoned, clean = make_model(), make_model()
    train(Regression(poison_steps={3}), poisoned, make_data(), None, config(max_steps=3, **flat), accelerator,
          tmp_path / "c", None, seed=0, accumulation=1)
    train(Regression(), clean, make_data(), None, config(max_steps=2, **flat), accelerator, tmp_path / "d", None,
          seed=0, accumulation=1)
    assert torch.equal(weights(poisoned), weights(clean))
    unskipped = make_model()
    train(Regression(), unskipped, make_data(), None, config(max_steps=3, **flat), accelerator, tmp_path / "e",
          None, seed=0, accumulation=1)
    assert not torch.equal(weights(unskipped), weights(clean))   # step 3 would have moved them
    with pytest.raises(LmsslError, match="not finite for 3 steps in a row"):
        train(Regression(poison_steps={2, 3, 4}), make_model(), make_data(), None,
              config(max_steps=10, max_nonfinite_steps=3), accelerator, tmp_path / "b", None, seed=0, accumulation=1)


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 4)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert lr_lambda("linear", 0, 100, 0.0)(50) == pytest.approx(0.5)
    assert lr_lambda("constant", 5, 100, 0.0)(80) == 1.0


def test_only_the_newest_k_checkpoints_are_kept(accelerator, tmp_path):
    train(Regression(), make_model(), make_data(200), None, config(max_steps=45, save_every=10, keep_checkpoints=2),
          accelerator, tmp_path / "o", tmp_path / "ckpt", seed=0, accumulation=1)
    assert [c.name for c in checkpoint.checkpoints(tmp_path / "ckpt")] == ["step-00000040", "step-00000030"]
    assert not list((tmp_path / "ckpt").glob(".tmp-*")), "no temporary folder is left behind"


class DeviceStats(Regression):
    """Regression whose statistics stay tensors, as the objective contract asks."""

    def loss(self, module, batch):
        pred = module(batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        n = float(batch["y"].shape[0])
        return loss, {"loss": (loss.detach() * n, n)}


def test_the_loop_reads_the_device_once_per_log_not_per_step(accelerator, tmp_path, monkeypatch):
    """Every .item(), .tolist(), float(), int() and bool() of a tensor in the loop (lmssl/training.py's train,
    not the sampler, whose permutation is a host tensor) is counted: one read per log_every (the summed
    statistics and non-finite counters at once) and two at the end, whatever the number of steps and
    micro-batches (the end reads the two non-finite counters); a per-step read would add 20 here."""
    import os
    import sys

    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith(f"lmssl{os.sep}training.py") and frame.f_code.co_name != "__iter__":
                reads.append(f"{frame.f_code.co_name}:{frame.f_lineno} {_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    counts = {}
    for steps in (20, 40):
        reads.clear()
        result = train(DeviceStats(), make_model(), make_data(), None, config(max_steps=steps, log_every=10),
                       accelerator, tmp_path / str(steps), None, seed=0, accumulation=2)
        assert result.steps == steps and len([h for h in result.history if "train/loss" in h]) == steps // 10
        counts[steps] = len(reads)
    assert counts[20] == 2 + 2 and counts[40] == 4 + 2, (counts, reads)
