"""``--config.data.name`` readers end to end: official layouts on disk -> SFT run -> evaluation.

Every dataset below is written in its official on-disk layout from ONE scene
spec (same image size, same train boxes), so all readers produce identical
batch shapes and identical SFT targets: the trainer compiles once for the
first case and the others reuse its programs.
"""

import json
import os
import re

import pytest

from dipr1_jax.config import Config, DataSection, replace_path
from dipr1_jax.train import data as train_data
from dipr1_jax.train import modes
from dipr1_jax.train.writers import read_metrics
from tests.data_testutil import write_image, write_text

W, H = 112, 84  # every image; 112x84 is a multiple of 28, so the model frame is 112x84 too

# (GT boxes, ignore regions) per image, x1y1x2y2 pixels, all inside the image.
_TRAIN_IMAGE = ([[10, 12, 40, 70], [50, 20, 80, 75]], [[85, 5, 105, 30]])
TRAIN = [_TRAIN_IMAGE, _TRAIN_IMAGE]  # same boxes: same SFT target width in every case
EVAL = [([[8, 10, 30, 60], [40, 12, 70, 80]], [[90, 40, 110, 80]]),
        ([[20, 20, 50, 70]], []),
        ([[5, 5, 25, 45], [30, 10, 55, 60], [60, 20, 100, 82]], [[100, 0, 111, 20]])]
EVAL_GT = sum(len(gt) for gt, _ in EVAL)  # 6 (the 2 ignore regions are not GT)


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


# ----------------------------------------------------------------------------- writers
# Each writes both splits under ``root`` and returns {split: [image ids in order]}.

def write_crowdhuman(root, splits=(("train", TRAIN), ("val", EVAL))):
    out = {}
    for split, images in splits:
        lines, ids = [], []
        for i, (gt, ign) in enumerate(images):
            iid = f"2731{i},{split}{i:02x}"
            write_image(os.path.join(root, "Images", f"{iid}.jpg"), W, H, seed=i)
            boxes = [{"tag": "person", "fbox": _xywh(b), "vbox": _xywh(b),
                      "hbox": [b[0], b[1], 4, 4], "extra": {"box_id": k, "occ": 0}}
                     for k, b in enumerate(gt)]
            # Both ignore conventions: a "mask" box, and a person marked extra.ignore = 1.
            boxes += [{"tag": "mask", "fbox": _xywh(b), "vbox": _xywh(b), "hbox": _xywh(b),
                       "extra": {"ignore": 1}} if i % 2 == 0 else
                      {"tag": "person", "fbox": _xywh(b), "vbox": _xywh(b), "hbox": _xywh(b),
                       "extra": {"ignore": 1}} for b in ign]
            lines.append(json.dumps({"ID": iid, "gtboxes": boxes}))
            ids.append(iid)
        write_text(os.path.join(root, f"annotation_{split}.odgt"), "\n".join(lines) + "\n")
        out[split] = ids
    return out


def write_citypersons(root):
    out = {}
    for split, city, images in (("train", "aachen", TRAIN), ("val", "lindau", EVAL)):
        ids = []
        for i, (gt, ign) in enumerate(images):
            stem = f"{city}_{i:06d}_000019"
            objects = [{"label": "pedestrian", "bbox": _xywh(b), "bboxVis": _xywh(b),
                        "instanceId": 24000 + k} for k, b in enumerate(gt)]
            objects += [{"label": "ignore" if i % 2 == 0 else "rider", "bbox": _xywh(b),
                         "bboxVis": _xywh(b), "instanceId": 0} for b in ign]
            write_text(os.path.join(root, "gtBboxCityPersons", split, city,
                                    f"{stem}_gtBboxCityPersons.json"),
                       json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}, indent=4))
            write_image(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"),
                        W, H, seed=i)
            ids.append(stem)
        out[split] = ids
    return out


def write_widerped(root):
    out = {}
    for split, images in (("train", TRAIN), ("val", EVAL)):
        gt_lines, ign_lines, ids = [], [], []
        for i, (gt, ign) in enumerate(images):
            name = f"{split}_{i:05d}.jpg"
            write_image(os.path.join(root, split, name), W, H, seed=i)
            # label 1 pedestrian, 2 cyclist: both are GT.
            gt_lines.append(" ".join([name] + [str(v) for k, b in enumerate(gt)
                                               for v in [1 + k % 2] + _xywh(b)]))
            if ign:
                ign_lines.append(" ".join([name] + [str(v) for b in ign for v in _xywh(b)]))
            ids.append(name)
        write_text(os.path.join(root, f"{split}_bbx_gt.txt"), "\n".join(gt_lines) + "\n")
        write_text(os.path.join(root, f"{split}_bbx_ignore.txt"), "\n".join(ign_lines) + "\n")
        out[split] = ids
    return out


def write_uavdt(root):
    out = {}
    gt_dir = os.path.join(root, "UAV-benchmark-MOTD_v1.0", "GT")
    for split, seq, images in (("train", "M0101", TRAIN), ("test", "M0201", EVAL)):
        whole, ignore, ids = [], [], []
        for i, (gt, ign) in enumerate(images):
            frame = i + 1
            write_image(os.path.join(root, "UAV-benchmark-M", seq, f"img{frame:06d}.jpg"), W, H,
                        seed=i)
            whole += [",".join(map(str, [frame, k + 1] + _xywh(b) + [1, 1, 1 + k % 3]))
                      for k, b in enumerate(gt)]
            ignore += [",".join(map(str, [frame, -1] + _xywh(b) + [-1, -1, -1])) for b in ign]
            ids.append(f"{seq}/img{frame:06d}")
        write_text(os.path.join(gt_dir, f"{seq}_gt_whole.txt"), "\n".join(whole) + "\n")
        write_text(os.path.join(gt_dir, f"{seq}_gt_ignore.txt"), "\n".join(ignore) + "\n")
        write_text(os.path.join(gt_dir, f"{seq}_gt.txt"), "the MOT file, not read\n")
        write_text(os.path.join(root, "M_attr", split, f"{seq}_attr.txt"), "0,1,0,1\n")
        out[split] = ids
    return out


def write_coco(root):
    out = {}
    for split, images, base in (("train", TRAIN, 100), ("val", EVAL, 200)):
        objs = {"info": {}, "licenses": [], "images": [], "annotations": [],
                "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
        for i, (gt, ign) in enumerate(images):
            iid = base + i
            name = f"{iid:012d}.jpg"
            write_image(os.path.join(root, f"{split}2017", name), W, H, seed=i)
            objs["images"].append({"id": iid, "file_name": name, "width": W, "height": H})
            # A car in every image: another category, left out of the person task.
            for b, crowd, cat in [(b, 0, 1) for b in gt] + [(b, 1, 1) for b in ign] + [
                    ([1, 1, 9, 9], 0, 3)]:
                objs["annotations"].append({
                    "id": len(objs["annotations"]) + 1, "image_id": iid, "category_id": cat,
                    "bbox": _xywh(b), "iscrowd": crowd, "area": 1.0, "segmentation": []})
        write_text(os.path.join(root, "annotations", f"instances_{split}2017.json"),
                   json.dumps(objs))
        out[split] = [str(base + i) for i in range(len(images))]
    return out


def write_tfds(root, manual):
    """The project's CrowdHuman builder prepared (array_record) from the official files."""
    from dipr1_jax.data import tfds_builders as tb

    ids = write_crowdhuman(manual)
    tb.prepare("dipr1_crowdhuman", root, manual, config="full")
    return {"train": ids["train"], "validation": ids["val"]}


# name -> (data.name, train split, eval split)
CASES = {
    "crowdhuman": ("crowdhuman", "train", "val"),
    "citypersons": ("citypersons", "train", "val"),
    "widerped": ("widerped", "train", "val"),
    "uavdt": ("uavdt", "train", "test"),
    "coco": ("coco", "train", "val"),
    "tfds": ("tfds:dipr1_crowdhuman/full", "train", "validation"),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """case -> (root, {split: image ids}); written once for the module."""
    base = tmp_path_factory.mktemp("datasets")
    out = {}
    for case, writer in (("crowdhuman", write_crowdhuman), ("citypersons", write_citypersons),
                         ("widerped", write_widerped), ("uavdt", write_uavdt),
                         ("coco", write_coco)):
        root = str(base / case)
        out[case] = (root, writer(root))
    root = str(base / "tfds")
    out["tfds"] = (root, write_tfds(root, str(base / "tfds_manual")))
    return out


def _config(name, root, train_split, eval_split):
    cfg = Config(mode="sft")
    for path, value in (
            ("model.preset", "tiny"), ("mesh.devices", 1),
            ("data.root", root), ("data.name", name),
            ("data.train_split", train_split), ("data.eval_split", eval_split),
            ("data.max_pixels", W * H), ("data.min_pixels", W * H),
            ("sft.steps", 2), ("sft.batch_size", 2), ("eval.batch_size", 2),
            ("rollout.max_new_tokens", 8), ("eval.num_draw", 1), ("log.tensorboard", False),
            ("log.memory_plan", False)):
        cfg = replace_path(cfg, path, value)
    return cfg


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("case", list(CASES))
def test_sft_run_reads_official_layout(case, datasets, tmp_path):
    name, train_split, eval_split = CASES[case]
    root, ids = datasets[case]
    eval_gt = {iid: len(gt) for iid, (gt, _) in zip(ids[eval_split], EVAL)}
    workdir = str(tmp_path / "run")
    result = modes.run_sft(_config(name, root, train_split, eval_split), workdir)

    recs = read_metrics(workdir)
    final = recs[-1]
    assert final["final"] is True and final["kind"] == "final"
    for model in ("base", "sft"):
        summary = final["eval"][model]
        assert summary["num_images"] == len(EVAL), (model, summary)
        # Ignore regions (and COCO's other category) never count as GT.
        assert summary["num_gt"] == EVAL_GT, (model, summary)
        assert result[model]["num_gt"] == EVAL_GT
    assert [r["step"] for r in recs if r["kind"] == "sft"] == [1, 2]
    assert all(r["tokens"] > 0 for r in recs if r["kind"] == "sft")
    assert os.path.isfile(os.path.join(workdir, "export", "config.json"))
    with open(os.path.join(workdir, "samples.jsonl"), encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    # The evaluation saw exactly the eval split's images (not the train split's), each
    # with the GT boxes written for it.
    seen = {s["image_id"]: s["num_gt"] for s in samples if s.get("eval") == "sft"}
    assert seen == eval_gt


# ----------------------------------------------------------------------------- bad input

# case -> (a split that is not there, what the message names, the splits found)
MISSING_SPLIT = {
    "crowdhuman": ("test", "annotation_test.odgt", "train, val"),
    "citypersons": ("test", "gtBboxCityPersons/test/", "train, val"),
    "widerped": ("test", "test_bbx_gt.txt", "train, val"),
    "uavdt": ("val", "M_attr/val/ sequence list", "all, test, train"),
    "coco": ("test", "annotations/instances_test2017.json", "train, val"),
    "tfds": ("test", "has no split 'test'", "train, validation"),
}


def _broken_layout(case, root):
    """A layout whose split file is there but a file or folder it needs is not; returns
    (split, the missing path or name the error must give)."""
    if case == "crowdhuman":
        write_text(os.path.join(root, "annotation_val.odgt"), '{"ID": "1,a", "gtboxes": []}\n')
        return "val", os.path.join(root, "Images")
    if case == "citypersons":
        write_text(os.path.join(root, "gtBboxCityPersons", "val", "lindau", "x.json"), "{}")
        return "val", os.path.join(root, "leftImg8bit", "val")
    if case == "widerped":
        write_text(os.path.join(root, "val_bbx_gt.txt"), "missing_0001.jpg 1 1 1 5 5\n")
        return "val", "missing_0001.jpg"
    if case == "uavdt":
        write_text(os.path.join(root, "M_attr", "test", "M0201_attr.txt"), "0\n")
        return "test", os.path.join(root, "UAV-benchmark-MOTD_v1.0", "GT")
    if case == "coco":
        write_text(os.path.join(root, "annotations", "instances_val2017.json"),
                   '{"images": [], "annotations": [], "categories": []}')
        return "val", os.path.join(root, "val2017")
    os.makedirs(root)  # tfds: a data_dir without the prepared dataset
    return "validation", "is not prepared"


@pytest.mark.parametrize("case", list(CASES))
def test_missing_root_split_or_file_names_the_path(case, datasets, tmp_path):
    name = CASES[case][0]
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.root={absent!r}")):
        train_data.source(DataSection(name=name, root=absent), "train")

    root, _ = datasets[case]
    split, what, found = MISSING_SPLIT[case]
    with pytest.raises(FileNotFoundError) as e:
        train_data.source(DataSection(name=name, root=root), split)
    msg = str(e.value)
    assert msg.startswith(f"data.root={root}: "), msg
    assert what in msg and f"split {split!r}" in msg and f"(found splits: {found})" in msg, msg

    broken = str(tmp_path / "broken")
    split, missing = _broken_layout(case, broken)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)) as e:
        train_data.source(DataSection(name=name, root=broken), split)
    assert str(e.value).startswith(f"data.root={broken}: ")


def test_coco_category_must_exist(datasets):
    root, _ = datasets["coco"]
    with pytest.raises(ValueError, match=r"instances_val2017.json: category 'dog' not in"):
        train_data.source(DataSection(name="coco", root=root, category="dog"), "val")
    cars = train_data.source(DataSection(name="coco", root=root, category="car"), "val")
    assert [r.num_boxes for r in cars] == [1, 1, 1] and set(cars[0].labels) == {"car"}


def test_check_data_at_start_up(tmp_path):
    """``check_data`` (run before the model loads) names a missing root, says that a bucket
    path must be copied to local disk first, and accepts a present one."""
    from dipr1_jax.config import Config, replace_paths

    def cfg(root):
        return replace_paths(Config(), {"data.name": "crowdhuman", "data.root": root})

    with pytest.raises(FileNotFoundError, match=re.escape(f"data.root='{tmp_path}/x'")) as e:
        train_data.check_data(cfg(f"{tmp_path}/x"))
    assert "local disk" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="read from local disk: copy it there first"):
        train_data.check_data(cfg("gs://bucket/crowdhuman"))
    train_data.check_data(cfg(str(tmp_path)))  # a directory: the reader checks the rest
    train_data.check_data(Config())  # synthetic: nothing to check
