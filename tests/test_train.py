"""The shared trainer: every stage trains a few steps, and a resumed run equals an uninterrupted one."""

import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

from conftest import demo_config
from ofer.checkpoints import read_checkpoint
from ofer.config import ConfigError, config_to_dict
from ofer.io import InputError
from ofer.logs import setup_logging
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
    assert "val/truth_vs_ranked_samples" in EventAccumulator(str(tmp_path / "rank" / "tb")).Reload().Tags()["tensors"]
    after = rank.task.model.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the ranker learns
    assert all(torch.equal(idgen_before[k], v) for k, v in rank.task.idgen.state_dict().items())  # IdGen frozen


def test_step_batches_are_reproducible():
    a = list(StepBatchSampler(10, 4, seed=3, start_step=0, max_steps=5))
    b = list(StepBatchSampler(10, 4, seed=3, start_step=2, max_steps=5))
    assert a[2:] == b
    assert [s for s, _ in a[4]] == [4] * 4


def _train_one_rank(rank: int, world_size: int, port: int, cfg, out: Path) -> None:
    """A torchrun-like worker: log as the training scripts do, join the gloo group, train, write this rank's
    weights and LRs."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    setup_logging("INFO")  # as ofer.train.cli does
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    held = trainer.lock.held
    trainer.fit()
    torch.save({"net": trainer.task.model.state_dict(), "lrs": [g["lr"] for g in trainer.optimizer.param_groups],
                "best": trainer.best, "held_lock": held}, out / f"rank{rank}.pt")


def test_two_ranks_keep_identical_learning_rates_and_weights(synthetic_root, checkpoints, tmp_path, capfd):
    """Without a validation set the plateau scheduler steps on the training loss; each rank sees
    other batches, so only the loss averaged over ranks keeps their LRs (and weights) equal.
    Rank 0 alone logs what is the same on all: the weights loaded and the run's summary."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = demo_config("idgen", synthetic_root, tmp_path / "run", "dataset.validation_data=[]", "train.max_steps=5",
                      "train.val_steps=1", "train.lr_patience=0", "train.checkpoint_steps=5", "train.ema_decay=null",
                      "train.device=cpu", f"train.init_checkpoint={checkpoints['idgen']}")
    torch.multiprocessing.spawn(_train_one_rank, args=(2, port, cfg, tmp_path), nprocs=2)
    logged = capfd.readouterr().err.splitlines()
    assert len([line for line in logged if f"INFO ofer.checkpoints: IdGen weights from {checkpoints['idgen']}" in line]) == 1
    assert len([line for line in logged if "INFO ofer.train.trainer: training IdGen" in line]) == 1
    assert "world size 2" in next(line for line in logged if "training IdGen" in line)
    assert not [line for line in logged if " rank 1 " in line]  # nothing went wrong on rank 1, so it said nothing
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["lrs"] == b["lrs"] and a["best"] == b["best"]
    assert min(a["lrs"]) < cfg.train.arcface_lr  # the scheduler did act (patience 0), so equality means something
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert (tmp_path / "run" / "last.tar").is_file()
    assert (a["held_lock"], b["held_lock"]) == (True, False)  # only rank 0 takes the output folder
    assert not (tmp_path / "run" / ".train.lock").exists()  # and lets go of it at the end


class _Killed(Exception):
    """Stands for a kill -9 right after a checkpoint was written."""


def test_resumed_run_keeps_the_same_best_without_validation(synthetic_root, tmp_path, monkeypatch):
    """`best` then follows the mean training loss since the last validation; a resume must see all of it."""
    decided: list[float] = []  # the values the LR scheduler (and `best`) were given
    plateau_step = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def recording_step(self, metrics, *args, **kwargs):
        decided.append(float(metrics))
        return plateau_step(self, metrics, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", recording_step)
    opts = ["dataset.validation_data=[]", "train.max_steps=4", "train.val_steps=2", "train.checkpoint_steps=1"]
    Trainer(demo_config("idgen", synthetic_root, tmp_path / "a", *opts)).fit()
    straight, decided[:] = list(decided), []

    save = Trainer.save

    def save_then_kill(self, name):
        path = save(self, name)
        if self.step == 3:  # killed inside a validation window: step 3's loss is only in last.tar
            raise _Killed
        return path

    monkeypatch.setattr(Trainer, "save", save_then_kill)
    with pytest.raises(_Killed):
        Trainer(demo_config("idgen", synthetic_root, tmp_path / "b", *opts)).fit()
    monkeypatch.setattr(Trainer, "save", save)
    Trainer(demo_config("idgen", synthetic_root, tmp_path / "b", *opts), resume=True).fit()
    assert decided == straight and len(straight) == 2
    a, b = (read_checkpoint(tmp_path / run / "best.tar") for run in ("a", "b"))
    assert (a["step"], a["best"]) == (b["step"], b["best"])
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


def test_start_removes_only_our_interrupted_checkpoint_writes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ours = [out / ".last.k2_9abcd.tar", out / ".best.0123wxyz.tar"]  # atomic_write names: .<stem>.<8 random>.tar
    others = [out / ".last.tar.bak", out / ".last.toolongname.tar", out / "notes.last.abcdefgh.tar",
              out / ".other.abcdefgh.tar", out / "notes.txt"]
    for path in ours + others:
        path.write_bytes(b"partial")
    Trainer(demo_config("idgen", synthetic_root, out, "dataset.validation_data=[]"))
    assert not any(p.exists() for p in ours)
    assert all(p.read_bytes() == b"partial" for p in others)


def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous_one(synthetic_root, tmp_path, monkeypatch,
                                                                           caplog):
    from ofer.train.cli import main

    out = tmp_path / "run"
    cfg_path = tmp_path / "idgen.yml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(demo_config("idgen", synthetic_root, out, "dataset.validation_data=[]"))))
    argv = ["--cfg", str(cfg_path), "--opt", "train.checkpoint_steps=1"]
    main("idgen", [*argv, "--opt", "train.max_steps=1"])
    before = {name: (out / name).read_bytes() for name in ("best.tar", "last.tar")}

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4096 vs 1024")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as code:
        main("idgen", [*argv, "--opt", "train.max_steps=2", "--resume"])
    assert code.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [(f"{out / 'best.tar'}: could not be written ([enforce fail at inline_container.cc:603] . "
                      "unexpected pos 4096 vs 1024); the previous best.tar is intact")]  # best.tar is written first
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.glob(".*.tar")) == []  # the partial temporary file is gone


def test_unwritable_output_dir_is_refused_before_any_work(synthetic_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match=r"train.output_dir: output folder .*file/run: .*file is a file, not a folder"):
        Trainer(demo_config("idgen", synthetic_root, blocker / "run"))


@pytest.mark.parametrize(("stage", "overrides", "message"), [
    ("idgen", ["varsched.num_steps=10", "test.sampling=ddim", "test.steps=20"],
     ("config keys test.sampling, test.steps = ddim, 20: ddim: steps must be in [1, 10], got 20; this stage's "
      "varsched has 10 diffusion steps")),
    ("expgen", ["test.exp_sampling=ddpm", "test.exp_steps=5"],
     "config keys test.exp_sampling, test.exp_steps = ddpm, 5: sample: a step count applies to ddim, "
     "dpmpp_2m, unipc only, not to ddpm (a fixed sequence)"),
    ("idrank", ["idrank.sampling=ddpm", "idrank.steps=3"],
     "config keys idrank.sampling, idrank.steps = ddpm, 3: sample: a step count applies to ddim"),
])
def test_sampling_settings_validation_would_fail_with_are_refused_before_training(synthetic_root, checkpoints,
                                                                                  tmp_path, stage, overrides, message):
    extra = [f"idrank.idgen_checkpoint={checkpoints['idgen']}"] if stage == "idrank" else []
    with pytest.raises(ConfigError) as err:
        Trainer(demo_config(stage, synthetic_root, tmp_path / "run", *FAST, *extra, *overrides))
    assert str(err.value).startswith(message)


def test_idrank_refuses_another_stage_as_its_idgen(synthetic_root, checkpoints, tmp_path):
    """An ExpGen file as `idrank.idgen_checkpoint` would propose 53-number 'shapes' to FLAME."""
    cfg = demo_config("idrank", synthetic_root, tmp_path / "run", *FAST, f"idrank.idgen_checkpoint={checkpoints['expgen']}")
    with pytest.raises(InputError) as err:
        Trainer(cfg)
    assert str(err.value) == (f"{checkpoints['expgen']}: given as the IdGen checkpoint (idrank.idgen_checkpoint), but "
                              "it holds an ExpGen stage (from its config); set idrank.idgen_checkpoint to another file")


class _Stop(Exception):
    """Raised in place of building the task: what a test checks happens before."""


def _stop_before_the_task(*args):
    raise _Stop


def test_a_folder_with_an_earlier_runs_checkpoints_needs_resume_or_overwrite(synthetic_root, tmp_path, caplog,
                                                                            monkeypatch):
    """Without --resume a new run used to replace last.tar and best.tar (a worse one) of the earlier run."""
    from ofer.train.cli import main

    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.tar", "best.tar"):
        (out / name).write_bytes(b"earlier run")
    cfg = demo_config("idgen", synthetic_root, out)
    with pytest.raises(InputError) as err:
        Trainer(cfg)
    assert str(err.value) == (f"train.output_dir: {out} already holds last.tar and best.tar of an earlier run; pass "
                              "--resume to continue it, --overwrite to start a new run there (removing last.tar and "
                              "best.tar), or set another train.output_dir")
    cfg_path = tmp_path / "idgen.yml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    with pytest.raises(SystemExit) as code:
        main("idgen", ["--cfg", str(cfg_path)])
    assert code.value.code == 2 and [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [str(err.value)]
    (out / "last.tar").unlink()  # --resume with only best.tar would start from scratch and replace it
    with pytest.raises(InputError) as err:
        Trainer(cfg, resume=True)
    assert str(err.value) == (f"train.output_dir: {out} holds best.tar but no last.tar, so --resume cannot continue "
                              "a run there; pass --overwrite to start a new run there (removing best.tar), or set "
                              "another train.output_dir")
    assert (out / "best.tar").read_bytes() == b"earlier run"
    monkeypatch.setattr("ofer.train.trainer.build_task", _stop_before_the_task)
    with pytest.raises(_Stop):
        Trainer(cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == []  # best.tar removed; the lock let go of when the start failed


def test_a_second_run_into_a_folder_in_use_is_refused_before_it_touches_anything(synthetic_root, tmp_path, monkeypatch):
    """The second run used to delete the first's checkpoint write in progress as a stale temporary file."""
    out = tmp_path / "run"
    cfg = demo_config("idgen", synthetic_root, out, "dataset.validation_data=[]")
    first = Trainer(cfg)
    writing = out / ".last.abcd1234.tar"  # the first run's atomic write of last.tar, in progress
    writing.write_bytes(b"partial")
    with pytest.raises(InputError) as err:
        Trainer(cfg)
    assert str(err.value).startswith(f"train.output_dir: output folder {out} is in use by trainIdGen.py pid "
                                     f"{os.getpid()} on {socket.gethostname()} since ")
    assert str(err.value).endswith(f"wait for it to end or set another train.output_dir (if no run is going on, delete "
                                   f"{out / '.train.lock'})")
    assert writing.read_bytes() == b"partial"
    first.close()
    monkeypatch.setattr("ofer.train.trainer.build_task", _stop_before_the_task)
    with pytest.raises(_Stop):
        Trainer(cfg)  # a run that finds the folder free removes what a killed run left, before any work
    assert not writing.exists()


def test_training_needs_at_least_one_data_set(synthetic_root, tmp_path):
    with pytest.raises(ConfigError) as err:
        Trainer(demo_config("idgen", synthetic_root, tmp_path / "run", "dataset.training_data=[]"))
    assert str(err.value) == ("config key 'dataset.training_data': empty; training needs at least one data set, "
                              "e.g. dataset.training_data=[SYNTH]")


@pytest.mark.parametrize("source", ["bundle", "weights"])
def test_resume_from_an_inference_only_file_says_what_to_do_instead(synthetic_root, checkpoints, tmp_path, source):
    out = tmp_path / "run"
    out.mkdir()
    given = Path(__file__).resolve().parents[1] / "models/demo/idgen.tar" if source == "bundle" else checkpoints["idgen"]
    (out / "last.tar").write_bytes(given.read_bytes())
    with pytest.raises(InputError) as err:
        Trainer(demo_config("idgen", synthetic_root, out), resume=True)
    what, missing = {"bundle": ("an inference bundle", "optimizer, scheduler, best, rng"),
                     "weights": ("an inference-only file", "optimizer, scheduler, step, best, rng")}[source]
    assert str(err.value) == (f"{out / 'last.tar'}: holds model weights only ({what}, no {missing}), not a training "
                              "state, so --resume cannot continue from it; to train from these weights, start a new "
                              f"run in another train.output_dir with --opt train.init_checkpoint={out / 'last.tar'}")


def test_init_checkpoint_starts_from_the_files_weights(synthetic_root, checkpoints, tmp_path):
    trainer = Trainer(demo_config("idgen", synthetic_root, tmp_path / "run", f"train.init_checkpoint={checkpoints['idgen']}"))
    trainer.close()
    saved = read_checkpoint(checkpoints["idgen"])["net"]
    for module in (trainer.task.model.net, trainer.ema.module.net):  # the demo config averages weights (EMA)
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
    with pytest.raises(InputError, match=r"given as the IdGen checkpoint \(train.init_checkpoint\), but it holds an "
                                         r"ExpGen stage"):
        Trainer(demo_config("idgen", synthetic_root, tmp_path / "run2", f"train.init_checkpoint={checkpoints['expgen']}"))


def test_resume_applies_new_optimiser_settings_and_refuses_architecture_changes(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    opts = ["dataset.validation_data=[]", "train.checkpoint_steps=1", "train.diff_lr=1e-3"]
    Trainer(demo_config("idgen", synthetic_root, out, *opts, "train.max_steps=1")).fit()
    with caplog.at_level(logging.INFO, logger="ofer.train.trainer"):
        resumed = Trainer(demo_config("idgen", synthetic_root, out, *opts, "train.max_steps=2", "train.diff_lr=1e-7",
                                      "train.lr_patience=3"), resume=True)
    resumed.close()
    lrs = {group["name"]: group["lr"] for group in resumed.optimizer.param_groups}
    assert lrs == {"net": 1e-7, "arcface": 1e-3} and resumed.scheduler.patience == 3 and resumed.step == 1
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume:")] == [
        "--resume: train.diff_lr changed from 0.001 to 1e-07 (applied to the resumed optimiser and LR scheduler)",
        "--resume: train.lr_patience changed from 10 to 3 (applied to the resumed optimiser and LR scheduler)",
        "--resume: train.max_steps changed from 1 to 2 (takes effect)",
    ]
    for change, shown in [("net.dims=[10, 32, 16]", "net.dims [10, 64, 32] -> [10, 32, 16]"),
                          ("train.seed=3", "train.seed 0 -> 3"), ("train.ema_decay=null", "train.ema_decay 0.998 -> None")]:
        with pytest.raises(ConfigError) as err:
            Trainer(demo_config("idgen", synthetic_root, out, *opts, change), resume=True)
        assert str(err.value) == (f"--resume from {out / 'last.tar'}: {shown}: resuming cannot change these (the saved "
                                  "networks, optimiser state and batch order depend on them); drop those overrides to "
                                  "resume, or start a new run in another train.output_dir")
