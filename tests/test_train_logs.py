"""What a training run tells a person: the start summary, config.yaml, tensorboard's config, hparams and
pictures, and the line an interrupted run ends with."""

import logging
import re

import cv2
import numpy as np
import torch
import yaml
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from conftest import demo_config
from ofer.checkpoints import read_checkpoint
from ofer.config import config_from_dict, config_to_dict, load_config
from ofer.encoders.normalise import crop_to_clip_input
from ofer.io import read_image
from ofer.models.stages import DiffusionStage
from ofer.train import tasks
from ofer.train.trainer import Trainer, flat_config

FAST = ["train.val_steps=2", "train.checkpoint_steps=2", "train.val_batches=1", "train.log_steps=1", "test.steps=2"]
SUMMARY = re.compile(r"training (\w+) \((\w+)\) from step (\d+) to (\d+); train: (\d+) actors, (\d+) images \(SYNTH\); "
                     r"val: (\d+) actors, (\d+) images \(SYNTHVAL\); parameters: ([\d,]+) trained, ([\d,]+) frozen; "
                     r"device cpu, world size 1; config \(also in (.+)\):\n")


def _events(folder):
    """The run's tensorboard data, as tensorboard's own loader reads it."""
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def _summary(caplog):
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    assert len(lines) == 1
    return lines[0]


def _decoded_image(acc, tag):
    """The last image logged under `tag` as (H, W, 3) uint8 BGR."""
    width, height, png = tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto)[:3]  # the image plugin's order
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (int(height), int(width))
    return image


def test_a_run_logs_its_summary_writes_config_yaml_and_logs_the_config_and_inputs(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    opts = ["train.max_steps=2", *FAST, "dataset.occlusion.enabled=false"]  # inputs shown as the files hold them
    cfg = demo_config("idgen", synthetic_root, out, *opts)
    with caplog.at_level(logging.INFO, logger="ofer.train.trainer"):
        Trainer(cfg).fit()
    summary = _summary(caplog)
    stage, name, start, stop, actors, images, val_actors, val_images, trained, frozen, where = (
        SUMMARY.match(summary).groups())
    # The fixture's data set: 4 training actors, 2 validation actors, 2 images each.
    assert (stage, name, start, stop, actors, images, val_actors, val_images) == (
        "IdGen", "demo_idgen", "0", "2", "4", "8", "2", "4")
    adam = read_checkpoint(out / "last.tar")["optimizer"]["state"]  # what the optimiser did update
    assert int(trained.replace(",", "")) == sum(s["exp_avg"].numel() for s in adam.values()) and frozen == "0"
    assert where == str(out / "config.yaml")
    assert load_config(out / "config.yaml") == cfg  # a config that --cfg takes, the same as the run's
    assert config_from_dict(yaml.safe_load(summary.split("\n", 1)[1])) == cfg  # the logged one too

    acc = _events(out / "tb")
    assert [p.name for p in (out / "tb").iterdir() if p.is_dir()] == []  # hparams in this run, not a sub-run
    text = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert config_from_dict(yaml.safe_load(text)) == cfg
    content = acc.PluginTagToContent("hparams")
    started = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {key: getattr(value, value.WhichOneof("kind")) for key, value in started.session_start_info.hparams.items()}
    assert set(hparams) == set(flat_config(cfg))
    assert hparams["train.diff_lr"] == cfg.train.diff_lr and hparams["net.dims"] == str(cfg.net.dims)
    assert (hparams["model.tiny_encoders"], hparams["train.grad_clip"]) == ("true", "null")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == ["train/loss", "val/vertex_error_mm"] and set(metrics) <= set(acc.Tags()["tensors"])

    # The first batch's inputs: 2 actors x 2 images, each cell the 224 crop and the 112 input (enlarged).
    sheet = _decoded_image(acc, "train/inputs")
    assert sheet.shape == (4 + 16 + 224 + 4, 4 * (448 + 4) + 4, 3)
    crop = sheet[20:244, 4:228].astype(int)
    files = sorted((synthetic_root / "SYNTH" / "arcface_input").rglob("*.jpg"))
    assert min(np.abs(crop - crop_to_clip_input(read_image(f))).max() for f in files) <= 1  # one of the crops
    assert _decoded_image(acc, "val/truth_vs_sample").shape[2] == 3


def test_a_resumed_run_rewrites_config_yaml(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    opts = ["dataset.validation_data=[]", "train.checkpoint_steps=1"]
    Trainer(demo_config("idgen", synthetic_root, out, *opts, "train.max_steps=1")).fit()
    resumed = demo_config("idgen", synthetic_root, out, *opts, "train.max_steps=2")
    with caplog.at_level(logging.INFO, logger="ofer.train.trainer"):
        Trainer(resumed, resume=True).close()
    assert load_config(out / "config.yaml") == resumed
    assert _summary(caplog).startswith("training IdGen (demo_idgen) from step 1 to 2; train: 4 actors, 8 images "
                                       "(SYNTH); val: none (the training loss decides the LR and best.tar); ")


def test_idrank_counts_its_idgen_as_frozen_and_pictures_the_samples_by_score(synthetic_root, checkpoints, tmp_path,
                                                                              caplog, monkeypatch):
    cfg = demo_config("idrank", synthetic_root, tmp_path / "run", "idrank.numsamples=4",
                      "idrank.steps=2", f"idrank.idgen_checkpoint={checkpoints['idgen']}")
    with caplog.at_level(logging.INFO, logger="ofer.train.trainer"):
        trainer = Trainer(cfg)
    trained, frozen = SUMMARY.match(_summary(caplog)).groups()[8:10]
    idgen = DiffusionStage(config_from_dict(read_checkpoint(checkpoints["idgen"])["config"]), load_weights=False)
    assert int(frozen.replace(",", "")) == sum(p.numel() for p in idgen.parameters())
    assert int(trained.replace(",", "")) == sum(p.numel() for p in trainer.task.model.parameters())

    drawn = []  # the meshes the picture renders, in order
    render = tasks.frontal_view
    monkeypatch.setattr(tasks, "frontal_view", lambda vertices, faces: drawn.append(vertices) or render(vertices, faces))
    batch = next(iter(trainer._loader(trainer.val_set, 0, 1, 5, rank=0)))
    for shown, ranks in [(8, [0, 1, 2, 3]), (3, [0, 2, 3])]:  # all 4 samples; or 3 spread over the ranking
        drawn.clear()
        picture = trainer.task.picture(batch, torch.Generator().manual_seed(1), shown=shown)
        meshes, truth, scores, _ = trainer.task._ranking(batch, torch.Generator().manual_seed(1))
        assert picture.shape == (2 * (160 + 16 + 4) + 4, (1 + len(ranks)) * (160 + 4) + 4, 3)  # 2 images: 2 rows
        for i in range(2):
            row = drawn[i * (1 + len(ranks)) : (i + 1) * (1 + len(ranks))]
            np.testing.assert_array_equal(row[0], truth[i].numpy())
            which = [next(j for j in range(4) if np.array_equal(m, meshes[i, j].numpy())) for m in row[1:]]
            by_score = scores[i].argsort(descending=True).tolist()
            assert which == [by_score[r] for r in ranks]
    trainer.close()


def _interrupt_at(step):
    """Trainer._mean_over_ranks that raises as Ctrl-C (or SIGTERM, which the scripts turn into it) does, after
    the update of `step`."""
    mean = Trainer._mean_over_ranks

    def mean_or_interrupt(self, value):
        if self.step == step:
            raise KeyboardInterrupt
        return mean(self, value)

    return mean_or_interrupt


def _exit_code(main, *args):
    """The code `main(*args)` exits with (an uncaught KeyboardInterrupt would stop pytest itself, not fail a test)."""
    try:
        main(*args)
    except SystemExit as exit:
        return exit.code
    except KeyboardInterrupt:
        return "KeyboardInterrupt not handled"
    return 0


def test_an_interrupted_run_says_what_resume_continues_from_and_exits_130(synthetic_root, tmp_path, caplog,
                                                                           monkeypatch):
    from ofer.train.cli import main

    out = tmp_path / "run"
    cfg_path = tmp_path / "idgen.yml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(demo_config("idgen", synthetic_root, out,
                                                                  "dataset.validation_data=[]"))))
    argv = ["--cfg", str(cfg_path), *(f"--opt={o}" for o in ("train.checkpoint_steps=2", "train.max_steps=5",
                                                            "train.log_steps=1"))]
    monkeypatch.setattr(Trainer, "_mean_over_ranks", _interrupt_at(3))
    assert _exit_code(main, "idgen", argv) == 130
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [(f"interrupted after 3 of 5 steps; the last checkpoint is {out / 'last.tar'} (step 2): "
                         "--resume continues from it")]
    assert read_checkpoint(out / "last.tar")["step"] == 2 and not (out / ".train.lock").exists()
    assert [e.step for e in _events(out / "tb").Tensors("train/loss")] == [1, 2]  # what was logged is kept

    def interrupted_start(*args):
        raise KeyboardInterrupt

    caplog.clear()
    monkeypatch.setattr("ofer.train.trainer.build_task", interrupted_start)
    assert _exit_code(main, "idgen", [*argv, "--opt", f"train.output_dir={tmp_path / 'other'}"]) == 130
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "interrupted while starting, before the first training step; no checkpoint was written"]
