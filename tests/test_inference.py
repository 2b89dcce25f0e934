"""test.py end to end on synthetic demo images (untrained tiny checkpoints): files, shapes, failures."""

import hashlib
import json
import logging
import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, demo_config
from ofer.flame import FLAME
from ofer.inference.cli import main as run_test
from ofer.inference.cli import read_list
from ofer.io import InputError, read_image, read_mesh

NOW7 = [36, 39, 42, 45, 33, 48, 54]


FAST_SAMPLING = ("--sampler", "ddim", "--steps", "2", "--exp-sampler", "ddim", "--exp-steps", "2")


def run(synthetic_root, checkpoints, list_file, image_dir, out, *extra, sampling=FAST_SAMPLING):
    flame = synthetic_root / "flame"
    return run_test([
        "--cfg", str(REPO / "configs" / "demo" / "test.yml"),
        "--opt", f"model.flame_model_path={flame / 'generic_model.pkl'}",
        "--opt", f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
        "--opt", f"model.front_indices_path={flame / 'frontindices.npy'}",
        "--checkpoint1", str(checkpoints["idrank"]), "--checkpoint2", str(checkpoints["idgen"]),
        "--checkpoint3", str(checkpoints["expgen"]),
        "--filename", str(list_file), "--imagepath", str(image_dir), "--outputpath", str(out),
        "--num-shapes", "4", "--num-expressions", "3", *sampling, "--device", "cpu",
        "--opt", "test.num_saved_expressions=2", *extra,
    ])


def test_outputs_of_three_images(synthetic_root, checkpoints, tmp_path):
    out = tmp_path / "out"
    names = (synthetic_root / "test" / "list.txt").read_text().split()
    assert len(names) == 3
    assert run(synthetic_root, checkpoints, synthetic_root / "test" / "list.txt", synthetic_root / "test", out,
               "--batch", "2") == 0
    flame = FLAME(synthetic_root / "flame" / "generic_model.pkl")
    for name in names:
        verts, faces = read_mesh(out / "shapesample" / f"{name}_0.ply")
        assert verts.shape == (flame.num_vertices, 3) and np.array_equal(faces, flame.faces.numpy())
        for k in range(2):
            assert read_mesh(out / "flamesample" / f"{name}_0_{k}.ply")[0].shape == (flame.num_vertices, 3)
        assert not (out / "flamesample" / f"{name}_0_2.ply").exists()
        params = np.load(out / f"{name}.npz")
        n_shape = demo_config("idgen", synthetic_root, tmp_path).net.flame_dim
        n_exp = demo_config("expgen", synthetic_root, tmp_path).model.n_exp
        assert params["shapes"].shape == (4, n_shape) and params["scores"].shape == (4,)
        assert params["expressions"].shape == (3, n_exp) and params["jaws"].shape == (3, 3)
        assert int(params["best"]) == int(np.argmax(params["scores"]))
        kpt68, kpt7 = np.load(out / name / "kpt68.npy"), np.load(out / name / "kpt7.npy")
        assert kpt68.shape == (68, 3) and kpt7.shape == (7, 3)
        assert np.allclose(kpt7, kpt68[NOW7])
        # landmarks lie on the neutral mesh, in mm like it (within the face's extent)
        assert np.abs(kpt7).max() < np.abs(verts).max()
        assert read_image(out / name / "overlay.png").shape[0] > 100
        assert read_image(out / name / "samples.png").shape[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["reconstructed"]) == sorted(names) and summary["failed"] == {}
    assert summary["listed"] == names
    # Loading is reported apart: the per-image time is what is left of the run, per image.
    assert 0 < summary["load_seconds"] < summary["seconds"]
    assert summary["seconds_per_image"] == pytest.approx((summary["seconds"] - summary["load_seconds"]) / 3, abs=0.01)
    # Each checkpoint is recorded by its content, so a file replaced under the same name is told apart.
    for stage, path in checkpoints.items():
        recorded = summary["settings"][stage]
        assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        assert recorded["path"] == str(path.resolve())
        assert json.loads((out / names[0] / "done.json").read_text())["settings"][stage] == recorded


def forged_png(path, width, height):
    """A small valid PNG whose header claims width x height pixels (decoding it would allocate them)."""
    data = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    path.write_bytes(bytes(data))


def test_bad_inputs_fail_alone_and_nothing_of_them_is_written(synthetic_root, checkpoints, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic_root / "test", images)
    good = (images / "list.txt").read_text().split()[0]
    arcface = np.load(images / f"{good}.npy")
    bad = {  # name -> (what makes it bad, text expected in its reason)
        "corrupt": ("jpg", "corrupt.jpg: not a readable image"),
        "nonpy": ("jpg", "nonpy.npy: file not found"),
        "bytes": ("npy", "bytes.npy: expected a numeric array, found dtype |S"),
        "nan": ("npy", "nan.npy: 1 of 37632 values are NaN or infinite"),
        "inf": ("npy", "inf.npy: 2 of 37632 values are NaN or infinite"),
        "pixels": ("npy", "pixels.npy: values span [0, 255], expected within [-1.05, 1.05]"),
        "shape": ("npy", "shape.npy: expected an array of shape (3, 112, 112), found (112, 112, 3)"),
        "huge": ("png", "huge.png: image is too large"),  # by its header, before decoding
    }
    for name in bad:
        shutil.copy(images / f"{good}.jpg", images / f"{name}.jpg")
        shutil.copy(images / f"{good}.npy", images / f"{name}.npy")
    (images / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    (images / "nonpy.npy").unlink()
    np.save(images / "bytes.npy", np.full((3, 112, 112), b"0.5"))
    np.save(images / "nan.npy", np.where(np.arange(arcface.size).reshape(arcface.shape) == 7, np.nan, arcface))
    np.save(images / "inf.npy", np.concatenate([[[[np.inf, -np.inf]]], arcface.reshape(1, 1, -1)[..., 2:]], -1)
            .reshape(arcface.shape))
    np.save(images / "pixels.npy", np.linspace(0, 255, arcface.size).reshape(arcface.shape))
    np.save(images / "shape.npy", arcface.transpose(1, 2, 0))
    forged_png(images / "huge.png", 40000, 40000)
    names = ["huge.png", *[n for n in bad if n != "huge"], good]
    (images / "list.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    assert run(synthetic_root, checkpoints, images / "list.txt", images, out) == 1  # some images failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconstructed"] == [good] and summary["not_processed"] == {}
    assert sorted(summary["failed"]) == sorted(bad)
    for name, (_, reason) in bad.items():
        assert reason in summary["failed"][name], summary["failed"][name]
        assert not (out / name).exists() and not (out / f"{name}.npz").exists()
        assert not [p for folder in ("shapesample", "flamesample") for p in (out / folder).glob(f"{name}_*.ply")]
    assert (out / "shapesample" / f"{good}_0.ply").is_file()

    # A re-run skips the finished image and says which settings made it; --overwrite redoes it.
    stamp = (out / "shapesample" / f"{good}_0.ply").stat().st_mtime_ns
    (images / "list.txt").write_text(f"{good}\n")
    assert run(synthetic_root, checkpoints, images / "list.txt", images, out, "--seed", "7") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] == [good] and summary["reconstructed"] == []
    assert summary["settings"]["seed"] == 7
    [made_by] = summary["output_settings"]
    assert made_by["images"] == [good] and made_by["settings"]["seed"] == 0 and made_by["settings"]["steps"] == 2
    assert any("--overwrite" in note for note in summary["notes"])
    assert (out / "shapesample" / f"{good}_0.ply").stat().st_mtime_ns == stamp
    assert run(synthetic_root, checkpoints, images / "list.txt", images, out, "--seed", "7", "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconstructed"] == [good] and summary["notes"] == []
    assert [g["settings"]["seed"] for g in summary["output_settings"]] == [7]
    assert json.loads((out / good / "done.json").read_text())["settings"]["seed"] == 7


def test_missing_assets_give_a_clear_error_and_exit_code(synthetic_root, checkpoints, tmp_path, caplog):
    assert run(synthetic_root, checkpoints, tmp_path / "no_list.txt", tmp_path, tmp_path / "out") == 2
    assert "no_list.txt: image list not found" in caplog.text
    (tmp_path / "list.txt").write_text("a\n")
    missing = dict(checkpoints, idgen=tmp_path / "model_idgen_flame20.tar")
    assert run(synthetic_root, missing, tmp_path / "list.txt", tmp_path, tmp_path / "out") == 2
    assert "model_idgen_flame20.tar: checkpoint not found" in caplog.text


def as_original_file(ours, path):
    """Rewrite one of our checkpoints as the original trainer stores it: module entries only, no config."""
    ckpt = torch.load(ours, weights_only=True)
    torch.save({k: ckpt[k] for k in ("net", "var_sched", "arcface", "farl") if k in ckpt}, path)
    return path


def test_original_test_sh_command_writes_the_original_paths(synthetic_root, checkpoints, tmp_path):
    """`--numcheckpoint 3`, `--imagepath data/X/`, entries `arcface_input/<stem>.jpg`, original-format files."""
    data = tmp_path / "data" / "PICKPIK"
    stems = (synthetic_root / "test" / "list.txt").read_text().split()[:2]
    (data / "arcface_input").mkdir(parents=True)
    (data / "other").mkdir()
    for stem, folder in zip(stems, ("arcface_input", "other")):
        for suffix in (".jpg", ".npy"):
            shutil.copy(synthetic_root / "test" / f"{stem}{suffix}", data / folder / f"{stem}{suffix}")
    (data / "list.txt").write_text(f"arcface_input/{stems[0]}.jpg\nother/{stems[1]}.jpg\n")
    original = {k: as_original_file(v, tmp_path / f"model_{k}.tar") for k, v in checkpoints.items()}
    stage_configs = [f"test.{stage}_config={REPO / 'configs' / 'demo' / f'{stage}.yml'}"
                     for stage in ("idgen", "expgen", "idrank")]
    out = tmp_path / "output"
    assert run(synthetic_root, original, data / "list.txt", f"{data}/", out, "--numcheckpoint", "3",
               *(a for o in stage_configs for a in ("--opt", o))) == 0
    assert (out / "shapesample" / f"{stems[0]}_0.ply").is_file()
    assert sorted(p.name for p in (out / "flamesample").glob(f"{stems[0]}_*.ply")) == [
        f"{stems[0]}_0_0.ply", f"{stems[0]}_0_1.ply"]
    assert not (out / "shapesample" / "arcface_input").exists() and not list(out.rglob("*_3.ply"))
    assert (out / "shapesample" / "other" / f"{stems[1]}_0.ply").is_file()  # other sub-folders are kept
    assert (out / "flamesample" / "other" / f"{stems[1]}_0_1.ply").is_file()
    assert (out / stems[0] / "kpt7.npy").is_file() and (out / f"{stems[0]}.npz").is_file()
    assert (out / stems[0] / "done.json").is_file()


def test_list_entries_that_would_share_outputs_are_refused(tmp_path):
    (tmp_path / "list.txt").write_text("arcface_input/a.jpg\na.jpg\n")
    with pytest.raises(InputError, match="'arcface_input/a.jpg' and 'a.jpg' would both write outputs named 'a'"):
        read_list(tmp_path / "list.txt", tmp_path)
    (tmp_path / "list.txt").write_text("arcface_input/a.jpg\nsub/arcface_input/b\nc.png\n")
    assert [n for n, _ in read_list(tmp_path / "list.txt", tmp_path)] == ["a", "sub/b", "c"]


@pytest.mark.parametrize(("flags", "message"), [
    (("--exp-steps", "1001"), ("config keys test.exp_sampling, test.exp_steps = ddim, 1001: ddim: steps must be "
                               "in [1, 1000], got 1001; the ExpGen of {expgen} has 1000 diffusion steps")),
    (("--exp-sampler", "dpmpp_2m", "--exp-steps", "1000"), ("config keys test.exp_sampling, test.exp_steps = "
                                                            "dpmpp_2m, 1000: dpmpp_2m: steps must be in [1, 999]")),
    (("--opt", "test.jaw_limits=[1, 2]"), "config key test.jaw_limits: jaw limits must be 6 finite numbers"),
])
def test_settings_every_image_would_fail_with_are_refused_before_any_image(synthetic_root, checkpoints, tmp_path,
                                                                           caplog, flags, message):
    listing, out = synthetic_root / "test" / "list.txt", tmp_path / "out"
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", out, *flags) == 2
    assert message.format(expgen=checkpoints["expgen"]) in caplog.text
    assert not (out / "flamesample").exists()


def test_a_fixed_sequence_sampler_flag_drops_the_configs_steps_but_refuses_explicit_ones(synthetic_root,
                                                                                         checkpoints, tmp_path, caplog):
    """configs/demo/test.yml samples IdGen with ddim 25: `--sampler ddim_legacy` alone takes the fixed
    sequence (the YAML's steps were meant for ddim); `--steps` given with it is refused before any image."""
    name = (synthetic_root / "test" / "list.txt").read_text().split()[0]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{name}\n")
    exp = ("--exp-sampler", "ddim", "--exp-steps", "2")
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "a",
               sampling=("--sampler", "ddim_legacy", *exp)) == 0
    settings = json.loads((tmp_path / "a" / name / "done.json").read_text())["settings"]
    assert (settings["sampling"], settings["steps"]) == ("ddim_legacy", None)
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "b",
               sampling=("--sampler", "ddim_legacy", "--steps", "5", *exp)) == 2
    assert ("config keys test.sampling, test.steps = ddim_legacy, 5: sample: a step count applies to ddim, "
            "dpmpp_2m, unipc only, not to ddim_legacy (a fixed sequence)") in caplog.text
    assert not (tmp_path / "b" / name).exists()


def test_a_checkpoint_in_the_wrong_slot_is_refused(synthetic_root, checkpoints, tmp_path, caplog):
    (tmp_path / "list.txt").write_text("a\n")
    swapped = dict(checkpoints, idgen=checkpoints["expgen"])
    assert run(synthetic_root, swapped, tmp_path / "list.txt", tmp_path, tmp_path / "out") == 2
    assert (f"{checkpoints['expgen']}: given as the IdGen checkpoint (--checkpoint2), but it holds an ExpGen "
            f"stage (from its config)") in caplog.text
    assert not (tmp_path / "out" / "shapesample").exists()


def test_batch_is_chosen_automatically_and_the_report_written_unless_told_not_to(synthetic_root, checkpoints, tmp_path, caplog, capsys):
    listing = synthetic_root / "test" / "list.txt"
    caplog.set_level(logging.INFO, logger="ofer.test")
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "auto") == 0
    assert "3 image(s) per batch (--batch auto)" in caplog.text  # the CPU rule, at most the images there are
    assert (tmp_path / "auto" / "report" / "index.html").is_file()  # the HTML report, by default
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "quiet", "--no-report",
               "--batch", "3") == 0
    assert not (tmp_path / "quiet" / "report").exists()
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as code:
            run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "bad", "--batch", bad)
        assert code.value.code == 2 and "--batch" in capsys.readouterr().err
