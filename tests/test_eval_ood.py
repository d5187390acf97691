"""Out-of-domain evaluation sets (``--config.eval.ood``): each set is evaluated next to the
held-out split and logged under its own name; a missing set fails before any compute."""

import json
import os

import pytest
from absl import flags

from dipr1_jax import cli
from dipr1_jax.config import Config, ConfigError, parse_ood, replace_path, to_dict
from dipr1_jax.train import data as train_data
from dipr1_jax.train import modes
from dipr1_jax.train.checkpoint import config_diff
from dipr1_jax.train.writers import read_metrics
from tests.data_testutil import write_image, write_text

W, H = 112, 84  # the synthetic held-out images' size too: every set has the same shapes

# Two OOD sets with different image and GT counts, so that a summary shows which set it
# was computed on. (GT boxes, ignore regions) per image, x1y1x2y2 pixels.
CITY = [([[10, 12, 40, 70], [50, 20, 80, 75]], [[85, 5, 105, 30]]),
        ([[20, 20, 50, 70]], [])]                                          # 2 images, 3 GT
WIDER = [([[8, 10, 30, 60]], []),
         ([[5, 5, 25, 45], [30, 10, 55, 60], [60, 20, 100, 82]], [[100, 0, 111, 20]]),
         ([[40, 12, 70, 80], [72, 10, 90, 50]], [])]                       # 3 images, 6 GT


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def write_citypersons_val(root):
    for i, (gt, ign) in enumerate(CITY):
        stem = f"lindau_{i:06d}_000019"
        objects = [{"label": "pedestrian", "bbox": _xywh(b), "bboxVis": _xywh(b),
                    "instanceId": 24000 + k} for k, b in enumerate(gt)]
        objects += [{"label": "ignore", "bbox": _xywh(b), "bboxVis": _xywh(b), "instanceId": 0}
                    for b in ign]
        write_text(os.path.join(root, "gtBboxCityPersons", "val", "lindau",
                                f"{stem}_gtBboxCityPersons.json"),
                   json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}))
        write_image(os.path.join(root, "leftImg8bit", "val", "lindau", f"{stem}_leftImg8bit.png"),
                    W, H, seed=i)


def write_widerped_val(root):
    gt_lines, ign_lines = [], []
    for i, (gt, ign) in enumerate(WIDER):
        name = f"val_{i:05d}.jpg"
        write_image(os.path.join(root, "val", name), W, H, seed=10 + i)
        gt_lines.append(" ".join([name] + [str(v) for b in gt for v in [1] + _xywh(b)]))
        if ign:
            ign_lines.append(" ".join([name] + [str(v) for b in ign for v in _xywh(b)]))
    write_text(os.path.join(root, "val_bbx_gt.txt"), "\n".join(gt_lines) + "\n")
    write_text(os.path.join(root, "val_bbx_ignore.txt"), "\n".join(ign_lines) + "\n")


def _config(ood: str) -> Config:
    """``eval`` mode of a random-init ``tiny`` policy; synthetic held-out split of 4 images."""
    cfg = Config(mode="eval")
    for path, value in (
            ("model.preset", "tiny"), ("mesh.devices", 1), ("data.synthetic_eval_size", 4),
            ("data.synthetic_width", W), ("data.synthetic_height", H),
            ("data.max_pixels", W * H), ("data.min_pixels", W * H),
            ("eval.batch_size", 4), ("rollout.max_new_tokens", 8), ("eval.num_draw", 1),
            ("log.tensorboard", False), ("log.memory_plan", False), ("eval.ood", ood)):
        cfg = replace_path(cfg, path, value)
    return cfg


def test_eval_mode_evaluates_each_ood_set_under_its_own_name(tmp_path):
    city, wider = str(tmp_path / "citypersons"), str(tmp_path / "widerped")
    write_citypersons_val(city)
    write_widerped_val(wider)
    ood = f"citypersons:{city}:val, widerped@pedestrian:{wider}:val"
    workdir = str(tmp_path / "run")
    evals = modes.run_eval(_config(ood), workdir)

    assert list(evals) == ["model", "model/citypersons", "model/widerped"]
    # (images, GT) of each set: the synthetic split, then the two OOD trees (ignore
    # regions are not GT).
    expected = {"model": 4, "model/citypersons": 2, "model/widerped": 3}
    for name, n in expected.items():
        assert evals[name]["num_images"] == n, name
    assert evals["model/citypersons"]["num_gt"] == 3
    assert evals["model/widerped"]["num_gt"] == 6
    # metrics.jsonl: one eval object per set, and the final object holds all three.
    records = read_metrics(workdir)
    logged = [next(iter(r["eval"])) for r in records if r["kind"] == "eval"]
    assert logged == list(expected)
    final = records[-1]
    assert final["final"] is True and list(final["eval"]) == list(expected)
    for name in expected:
        assert final["eval"][name]["num_images"] == expected[name]
    # Drawings per set; the image ids come from the set's own files.
    drawn = os.listdir(os.path.join(workdir, "report", "model", "citypersons"))
    assert len(drawn) == 1 and drawn[0].startswith("lindau_000000")
    samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
    wider_ids = {s["image_id"] for s in samples if s.get("eval") == "model/widerped"}
    assert wider_ids and wider_ids <= {f"val_{i:05d}.jpg" for i in range(3)}
    # config.json holds the entries as given and compares equal to the command's config
    # (what a resume checks).
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["eval"]["ood"] == ood
    assert config_diff(saved, to_dict(modes.resolve(_config(ood)))) == []


def test_missing_ood_data_fails_before_the_model_is_built(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the OOD data was checked")

    monkeypatch.setattr(modes, "load_policy", no_model)
    missing = str(tmp_path / "nowhere" / "citypersons")
    with pytest.raises(FileNotFoundError) as e:
        modes.run_eval(_config(f"citypersons:{missing}:val"), str(tmp_path / "a"))
    assert missing in str(e.value) and "eval.ood entry citypersons" in str(e.value)
    # A root without the split names the split's folder and the splits that exist.
    city = str(tmp_path / "citypersons")
    write_citypersons_val(city)
    with pytest.raises(FileNotFoundError, match=r"gtBboxCityPersons/test/.*found splits: val"):
        modes.run_eval(_config(f"citypersons:{city}:test"), str(tmp_path / "b"))


def test_ood_flag_parses_and_bad_entries_name_the_field():
    fv = flags.FlagValues()
    cli.define_config_flags(Config(), flag_values=fv)
    fv(["prog", "--config.eval.ood=citypersons:/d/cp:val,uavdt@vehicle:gs://b/uavdt:test"])
    cfg = cli.config_from_flags(fv)
    sets = parse_ood(cfg.eval.ood)
    assert [(s.name, s.root, s.split, s.category) for s in sets] == [
        ("citypersons", "/d/cp", "val", ""), ("uavdt", "gs://b/uavdt", "test", "vehicle")]
    # The set's data section: its reader, root, split and category; the rest the run's.
    d = train_data.ood_section(cfg.data, sets[1])
    assert (d.name, d.root, d.eval_split, d.category) == ("uavdt", "gs://b/uavdt", "test",
                                                          "vehicle")
    assert d.max_pixels == cfg.data.max_pixels
    assert train_data.ood_section(cfg.data, sets[0]).category == cfg.data.category
    for bad, msg in (("citypersons:/d/cp", "name\\[@category\\]:root:split"),
                     ("kitti:/d/k:val", "not one of"),
                     ("widerped:/a:val,widerped:/b:val", "listed twice")):
        with pytest.raises(ConfigError, match=f"EvalSection.ood: .*{msg}"):
            replace_path(Config(), "eval.ood", bad)
