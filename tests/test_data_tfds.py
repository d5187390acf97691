"""TFDS builders: official archive layouts in a manual dir -> array_record -> data_source -> pipeline."""

import json
import os
import zipfile

import numpy as np
import pytest

import tensorflow_datasets as tfds  # noqa: E402

from dipr1_jax.data import pipeline as pl  # noqa: E402
from dipr1_jax.data import read_crowdhuman, tfds_builders as tb  # noqa: E402
from dipr1_jax.data.synthetic import SceneConfig, render_scene  # noqa: E402
from tests.data_testutil import write_image, write_text  # noqa: E402


def _zip(zip_path, files: dict):
    """files: archive name -> local path."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for arc, local in files.items():
            z.write(local, arc)


def _by_id(source):
    out = {}
    for i in range(len(source)):
        ex = source[i]
        out[ex["image_id"].decode()] = ex
    return out


def test_crowdhuman_builder_from_official_archives(tmp_path):
    manual, stage = tmp_path / "manual", tmp_path / "stage"
    manual.mkdir()
    lines = {"train": [("1,a", [10, 5, 20, 30]), ("2,b", [1, 1, 8, 9])], "val": [("3,c", [4, 4, 6, 6])]}
    for split, items in lines.items():
        recs = []
        for j, (iid, box) in enumerate(items):
            local = str(stage / split / f"{iid}.jpg")
            write_image(local, 40 + j, 30, seed=j)
            zname = {"train": f"CrowdHuman_train0{j + 1}.zip", "val": "CrowdHuman_val.zip"}[split]
            _zip(str(manual / zname), {f"Images/{iid}.jpg": local})
            recs.append(json.dumps({"ID": iid, "gtboxes": [
                {"tag": "person", "fbox": box, "vbox": box, "hbox": box, "extra": {}},
                {"tag": "mask", "fbox": [0, 0, 3, 3], "vbox": [0, 0, 3, 3], "hbox": [0, 0, 1, 1]}]}))
        write_text(str(manual / f"annotation_{split}.odgt"), "\n".join(recs) + "\n")
    data = str(tmp_path / "data")
    tb.prepare("dipr1_crowdhuman", data, str(manual), config="full")
    train = _by_id(tfds.data_source("dipr1_crowdhuman/full", split="train", data_dir=data))
    assert sorted(train) == ["1,a", "2,b"]
    ex = train["1,a"]
    np.testing.assert_array_equal(ex["boxes"], [[10, 5, 30, 35], [0, 0, 3, 3]])
    assert list(ex["ignore"]) == [False, True] and [l.decode() for l in ex["labels"]] == ["person", "mask"]
    assert (ex["width"], ex["height"]) == (40, 30)
    with open(stage / "train" / "1,a.jpg", "rb") as f:
        assert ex["image"] == f.read()  # the original encoded bytes, not a re-encode
    val = tfds.data_source("dipr1_crowdhuman/full", split="validation", data_dir=data)
    assert len(val) == 1 and val[0]["image_id"] == b"3,c"
    # The same batch whether the pipeline reads the TFDS source or the reader's records.
    cfg = pl.PipelineConfig(batch_size=2, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                            max_pixels=28 * 28 * 8)
    src = tfds.data_source("dipr1_crowdhuman/full", split="train", data_dir=data)
    order = [src[i]["image_id"].decode() for i in range(len(src))]
    dirs = [os.path.join(str(stage), "train")]
    recs = {r.image_id: r for r in read_crowdhuman(str(manual / "annotation_train.odgt"), dirs)}
    b1 = next(iter(pl.make_dataset(src, cfg)))
    b2 = next(iter(pl.make_dataset([recs[i] for i in order], cfg)))
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)


def test_citypersons_builder(tmp_path):
    manual, stage = tmp_path / "manual", tmp_path / "stage"
    manual.mkdir()
    obj = {"imgHeight": 30, "imgWidth": 40, "objects": [
        {"label": "pedestrian", "bbox": [1, 2, 10, 60], "bboxVis": [1, 2, 10, 60]},
        {"label": "pedestrian", "bbox": [20, 2, 10, 20], "bboxVis": [20, 2, 10, 20]},
        {"label": "rider", "bbox": [5, 5, 5, 5], "bboxVis": [5, 5, 5, 5]}]}
    ann, img = {}, {}
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        a = write_text(str(stage / f"{stem}.json"), json.dumps(obj))
        i = str(stage / f"{stem}.png")
        write_image(i, 40, 30)
        ann[f"gtBboxCityPersons/{split}/{city}/{stem}_gtBboxCityPersons.json"] = a
        img[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = i
    _zip(str(manual / "gtBbox_cityPersons_trainval.zip"), ann)
    _zip(str(manual / "leftImg8bit_trainvaltest.zip"), img)
    data = str(tmp_path / "data")
    tb.prepare("dipr1_citypersons", data, str(manual), config="reasonable")
    ex = tfds.data_source("dipr1_citypersons/reasonable", split="validation", data_dir=data)[0]
    assert ex["image_id"] == b"lindau_000000_000019"
    # h=60 >= 50 stays, h=20 < 50 becomes ignore, rider is ignore.
    assert list(ex["ignore"]) == [False, True, True]
    np.testing.assert_allclose(ex["visibility"], [1, 1, 1])


def test_widerped_and_uavdt_builders(tmp_path):
    manual, stage = tmp_path / "wp", tmp_path / "stage"
    manual.mkdir()
    write_image(str(stage / "img_1.jpg"), 30, 20)
    write_image(str(stage / "img_2.jpg"), 30, 20)
    _zip(str(manual / "train.zip"), {"train/img_1.jpg": str(stage / "img_1.jpg"),
                                     "train/img_2.jpg": str(stage / "img_2.jpg")})
    write_text(str(manual / "train_bbx_gt.txt"), "img_1.jpg 1 1 2 3 4\nimg_2.jpg\n")
    write_text(str(manual / "train_bbx_ignore.txt"), "img_2.jpg 0 0 5 5\n")
    data = str(tmp_path / "data")
    tb.prepare("dipr1_widerped", data, str(manual))
    wp = _by_id(tfds.data_source("dipr1_widerped", split="train", data_dir=data))
    np.testing.assert_array_equal(wp["img_1.jpg"]["boxes"], [[1, 2, 4, 6]])
    assert list(wp["img_2.jpg"]["ignore"]) == [True]

    manual = tmp_path / "uav"
    manual.mkdir()
    frames = {}
    for seq in ("M0101", "M0202"):
        for f in (1, 2):
            p = str(stage / seq / f"img{f:06d}.jpg")
            write_image(p, 48, 24, seed=f)
            frames[f"UAV-benchmark-M/{seq}/img{f:06d}.jpg"] = p
    _zip(str(manual / "UAV-benchmark-M.zip"), frames)
    gt = {}
    for seq in ("M0101", "M0202"):
        gt[f"UAV-benchmark-MOTD_v1.0/GT/{seq}_gt_whole.txt"] = write_text(
            str(stage / f"{seq}_gt_whole.txt"), "1,1,1,2,3,4,1,1,1\n2,1,5,5,5,5,1,1,3\n")
        gt[f"UAV-benchmark-MOTD_v1.0/GT/{seq}_gt_ignore.txt"] = write_text(
            str(stage / f"{seq}_gt_ignore.txt"), "2,-1,0,0,4,4,-1,-1,-1\n")
    _zip(str(manual / "UAV-benchmark-MOTD_v1.0.zip"), gt)
    _zip(str(manual / "M_attr.zip"), {
        "M_attr/train/M0101_attr.txt": write_text(str(stage / "a.txt"), "0,1\n"),
        "M_attr/test/M0202_attr.txt": str(stage / "a.txt")})
    tb.prepare("dipr1_uavdt", data, str(manual))
    test = _by_id(tfds.data_source("dipr1_uavdt", split="test", data_dir=data))
    assert sorted(test) == ["M0202/img000001", "M0202/img000002"]
    ex = test["M0202/img000002"]
    np.testing.assert_array_equal(ex["boxes"], [[5, 5, 10, 10], [0, 0, 4, 4]])
    assert [l.decode() for l in ex["labels"]] == ["bus", "ignore"]
    assert len(tfds.data_source("dipr1_uavdt", split="train", data_dir=data)) == 2


def test_synthetic_builder_and_missing_manual_files(tmp_path):
    cfg = tb.SyntheticConfig(name="tiny", width=64, height=48, difficulty="easy", num_train=3,
                             num_validation=2, seed=4)
    data = str(tmp_path / "data")
    tb.prepare("dipr1_synthetic_crowds", data, config=cfg)
    src = tfds.data_source("dipr1_synthetic_crowds/tiny", split="train", data_dir=data)
    exs = _by_id(src)
    ref = render_scene(1, 4, SceneConfig(width=64, height=48, difficulty="easy"))
    ex = exs[ref.image_id]
    np.testing.assert_array_equal(ex["boxes"], ref.boxes)
    from PIL import Image
    import io
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ex["image"]))), ref.image)  # PNG: lossless
    val = _by_id(tfds.data_source("dipr1_synthetic_crowds/tiny", split="validation", data_dir=data))
    assert len(val) == 2 and not set(val) & set(exs)
    b = next(iter(pl.make_dataset(src, pl.PipelineConfig(batch_size=3, num_epochs=1, shard_index=0,
                                                          shard_count=1, max_pixels=28 * 28 * 4))))
    assert sorted(b["image_id"]) == sorted(exs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="does not exist or is empty"):
        tb.prepare("dipr1_crowdhuman", str(tmp_path / "d2"), str(tmp_path / "empty"), config="full")
    write_text(str(tmp_path / "wrong" / "readme.txt"), "not the archives\n")
    with pytest.raises(FileNotFoundError, match="annotation_train.odgt"):
        tb.prepare("dipr1_crowdhuman", str(tmp_path / "d2"), str(tmp_path / "wrong"), config="full")
    with pytest.raises(FileNotFoundError, match="UAV-benchmark-M.zip"):
        tb.prepare("dipr1_uavdt", str(tmp_path / "d2"), str(tmp_path / "wrong"))
