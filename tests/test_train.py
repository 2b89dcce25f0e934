"""The shared trainer: every stage trains a few steps, and a resumed run equals an uninterrupted one."""

import pytest
import torch

from conftest import demo_config
from ofer.checkpoints import read_checkpoint
from ofer.train.trainer import StepBatchSampler, Trainer

FAST = ["train.val_steps=3", "train.checkpoint_steps=3", "train.val_batches=1", "train.log_steps=1",
        "test.steps=2", "test.exp_steps=2"]


def params(path):
    return read_checkpoint(path)["net"]


@pytest.mark.parametrize("ema", [["train.ema_decay=null"], ["train.ema_decay=0.9"]], ids=["plain", "ema"])
def test_resume_reaches_the_same_parameters(synthetic_root, tmp_path, ema):
    trainer = Trainer(demo_config("idgen", synthetic_root, tmp_path / "a", "train.max_steps=6", *FAST, *ema))
    initial = {k: v.clone() for k, v in trainer.task.model.net.state_dict().items()}
    straight = trainer.fit()
    Trainer(demo_config("idgen", synthetic_root, tmp_path / "b", "train.max_steps=3", *FAST, *ema)).fit()
    resumed = Trainer(demo_config("idgen", synthetic_root, tmp_path / "b", "train.max_steps=6", *FAST, *ema), resume=True)
    assert resumed.step == 3
    resumed = resumed.fit()
    a, b = params(straight), params(resumed)
    assert read_checkpoint(resumed)["step"] == 6
    assert all(torch.equal(a[k], b[k]) for k in a)
    if ema[0].endswith("0.9"):  # the usual keys hold the average, `train_weights` the raw weights, both resumed exactly
        raw_a, raw_b = (read_checkpoint(p)["train_weights"]["net"] for p in (straight, resumed))
        assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
        assert any(not torch.equal(raw_a[k], a[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # training did change the weights


def test_expgen_and_idrank_train(synthetic_root, tmp_path):
    exp = Trainer(demo_config("expgen", synthetic_root, tmp_path / "exp", "train.max_steps=3", *FAST))
    exp_last = exp.fit()
    assert read_checkpoint(exp_last)["step"] == 3
    assert exp.last_picture.ndim == 3 and exp.last_picture.shape[2] == 3  # truth vs sample, for tensorboard
    assert list((tmp_path / "exp" / "tb").glob("events.out.tfevents.*"))
    idgen_last = Trainer(demo_config("idgen", synthetic_root, tmp_path / "idgen", "train.max_steps=1", *FAST)).fit()
    rank = Trainer(demo_config("idrank", synthetic_root, tmp_path / "rank", "train.max_steps=3",
                               f"idrank.idgen_checkpoint={idgen_last}", "idrank.numsamples=4", "idrank.steps=2", *FAST))
    before = {k: v.clone() for k, v in rank.task.model.net.state_dict().items()}
    idgen_before = {k: v.clone() for k, v in rank.task.idgen.state_dict().items()}
    metrics = rank.validate()
    assert {"val/ranked_error_mm", "val/random_error_mm", "val/oracle_error_mm"} <= set(metrics)
    assert metrics["val/oracle_error_mm"] <= metrics["val/ranked_error_mm"] + 1e-6
    rank.fit()
    after = rank.task.model.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the ranker learns
    assert all(torch.equal(idgen_before[k], v) for k, v in rank.task.idgen.state_dict().items())  # IdGen frozen


def test_step_batches_are_reproducible():
    a = list(StepBatchSampler(10, 4, seed=3, start_step=0, max_steps=5))
    b = list(StepBatchSampler(10, 4, seed=3, start_step=2, max_steps=5))
    assert a[2:] == b
    assert [s for s, _ in a[4]] == [4] * 4
