"""Readers: each test writes files in the official layout and checks values derived by hand."""

import json
import os

import numpy as np
import pytest

from dipr1_jax.data import (
    DataFormatError, read_citypersons, read_coco, read_crowdhuman, read_uavdt, read_widerped,
)
from tests.data_testutil import write_image, write_text


def _odgt(tmp_path, lines, images=None, name="ann.odgt"):
    for image_id, (w, h) in (images or {}).items():
        write_image(str(tmp_path / "Images" / f"{image_id}.jpg"), w, h)
    text = "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n"
    return write_text(str(tmp_path / name), text), str(tmp_path / "Images")


# ----------------------------------------------------------------------------- CrowdHuman

CH_LINES = [
    {"ID": "273271,aaa", "unknown_top": [1, 2], "gtboxes": [
        {"tag": "person", "fbox": [10, 20, 30, 60], "vbox": [12, 25, 20, 40], "hbox": [20, 20, 8, 8],
         "head_attr": {"ignore": 0, "occ": 0}, "extra": {"box_id": 0, "occ": 1, "new_key": "x"}},
        {"tag": "mask", "fbox": [50, 5, 20, 10], "vbox": [50, 5, 20, 10], "hbox": [50, 5, 20, 10],
         "extra": {"ignore": 1}},
        {"tag": "person", "fbox": [70, 30, 10, 20], "vbox": [70, 30, 10, 20],
         "hbox": [72, 30, 4, 4], "extra": {"ignore": 1}},
    ]},
    {"ID": "empty", "gtboxes": []},
    {"ID": "ignore_only", "gtboxes": [
        {"tag": "mask", "fbox": [1, 1, 5, 5], "vbox": [1, 1, 5, 5], "hbox": [1, 1, 5, 5], "extra": {}}]},
    {"ID": "zero", "gtboxes": [
        {"tag": "person", "fbox": [5, 5, 0, 10], "vbox": [5, 5, 0, 10], "hbox": [5, 5, 1, 1], "extra": {}},
        {"tag": "person", "fbox": [1, 2, 3, 4], "vbox": [1, 2, 3, 4], "hbox": [1, 2, 1, 1], "extra": {}}]},
]
CH_SIZES = {"273271,aaa": (100, 80), "empty": (40, 30), "ignore_only": (20, 20), "zero": (16, 12)}


def test_crowdhuman_full_boxes(tmp_path):
    odgt, images = _odgt(tmp_path, CH_LINES, CH_SIZES)
    recs = read_crowdhuman(odgt, images, box="full")
    assert [r.image_id for r in recs] == ["273271,aaa", "empty", "ignore_only", "zero"]
    a = recs[0]
    assert (a.width, a.height) == (100, 80)
    assert a["image_path"] == os.path.join(images, "273271,aaa.jpg")
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 80], [50, 5, 70, 15], [70, 30, 80, 50]])
    assert a.boxes.dtype == np.float32
    assert list(a.labels) == ["person", "mask", "person"]
    assert list(a.ignore) == [False, True, True]
    np.testing.assert_array_equal(a.visible_boxes[0], [12, 25, 32, 65])
    # vbox lies inside fbox: visible share = 20*40 / (30*60).
    assert a.visibility[0] == pytest.approx(800 / 1800, rel=1e-6)
    assert (a.source, a.line) == (odgt, 1)
    assert recs[1].boxes.shape == (0, 4) and recs[1].ignore.shape == (0,)
    assert list(recs[2].ignore) == [True] and (recs[2].width, recs[2].height) == (20, 20)
    # The zero-width box is dropped and counted, the other kept.
    np.testing.assert_array_equal(recs[3].boxes, [[1, 2, 4, 6]])
    assert recs.dropped["zero-size box"] == 1 and recs.num_skipped == 0


def test_crowdhuman_visible_and_head_boxes(tmp_path):
    odgt, images = _odgt(tmp_path, CH_LINES[:1], CH_SIZES)
    vis = read_crowdhuman(odgt, images, box="visible")[0]
    np.testing.assert_array_equal(vis.boxes[0], [12, 25, 32, 65])
    head = read_crowdhuman(odgt, images, box="head")[0]
    np.testing.assert_array_equal(head.boxes[2], [72, 30, 76, 34])
    with pytest.raises(ValueError, match="box must be one of"):
        read_crowdhuman(odgt, images, box="bbox")


@pytest.mark.parametrize("bad_line,message", [
    ('{"ID": "x", "gtboxes": [', "not valid JSON"),
    ('{"ID": "x", "gtboxes": {}}', "'gtboxes' must be a list"),
    ('{"gtboxes": []}', "non-empty string 'ID'"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, 1, -2, 5]}]}', "negative size"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, 1, 2]}]}', "must be 4 numbers"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, "a", 2, 2]}]}', "non-numeric"),
    ('{"ID": "x", "gtboxes": [{"tag": "car", "fbox": [1, 1, 2, 2]}]}', "unknown tag 'car'"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "vbox": [1, 1, 2, 2]}]}', "missing 'fbox'"),
    ('{"ID": "nofile", "gtboxes": []}', "image file not found"),
    ('{"ID": "x", "gtboxes": []}', "duplicate ID 'x'"),
])
def test_crowdhuman_bad_input_names_file_and_line(tmp_path, bad_line, message):
    odgt, images = _odgt(tmp_path, ['{"ID": "x", "gtboxes": []}', bad_line], {"x": (8, 8)})
    with pytest.raises(DataFormatError, match=message) as e:
        read_crowdhuman(odgt, images)
    assert str(e.value).startswith(f"{odgt}:2")


def test_crowdhuman_skip_mode_counts_every_reason(tmp_path):
    lines = [
        '{"ID": "ok", "gtboxes": [{"tag": "person", "fbox": [1, 1, -3, 2]},'
        ' {"tag": "person", "fbox": [1, 1, 3, 2]}]}',
        "this is not json",
        '{"ID": "missing", "gtboxes": []}',
    ]
    odgt, images = _odgt(tmp_path, lines, {"ok": (10, 10)})
    recs = read_crowdhuman(odgt, images, on_error="skip")
    assert [r.image_id for r in recs] == ["ok"]
    np.testing.assert_array_equal(recs[0].boxes, [[1, 1, 4, 3]])
    assert dict(recs.skipped) == {"negative-size box": 1, "malformed line": 1, "missing image": 1}
    assert "3 records" not in recs.summary() and "1 missing image" in recs.summary()
    assert any(s.startswith(f"{odgt}:2") for s in recs.skip_examples)


# ----------------------------------------------------------------------------- CityPersons

def _cp(tmp_path, files, write_images=True):
    ann, img = tmp_path / "gtBboxCityPersons", tmp_path / "leftImg8bit"
    for stem, obj in files.items():
        write_text(str(ann / "train" / "aachen" / f"{stem}_gtBboxCityPersons.json"),
                   obj if isinstance(obj, str) else json.dumps(obj, indent=4))
        if write_images:
            write_image(str(img / "train" / "aachen" / f"{stem}_leftImg8bit.png"), 40, 20)
    return str(ann), str(img)


CP_MAIN = {"imgHeight": 200, "imgWidth": 400, "extra_field": True, "objects": [
    {"instanceId": 24000, "label": "pedestrian", "bbox": [100, 50, 30, 80], "bboxVis": [100, 50, 30, 60]},
    {"instanceId": 24001, "label": "pedestrian", "bbox": [10, 10, 20, 40], "bboxVis": [10, 10, 20, 40]},
    {"instanceId": 24002, "label": "pedestrian", "bbox": [200, 20, 40, 100], "bboxVis": [200, 20, 20, 50]},
    {"instanceId": 25000, "label": "rider", "bbox": [300, 30, 20, 60], "bboxVis": [300, 30, 20, 60]},
    {"instanceId": 0, "label": "ignore", "bbox": [0, 0, 50, 50], "bboxVis": [0, 0, 0, 0], "foo": 1},
    {"instanceId": 0, "label": "person group", "bbox": [350, 10, 40, 90], "bboxVis": [350, 10, 40, 90]},
]}


def test_citypersons_default_and_reasonable(tmp_path):
    files = {"aachen_000000_000019": CP_MAIN,
             "aachen_000001_000019": {"imgHeight": 200, "imgWidth": 400, "objects": []},
             "aachen_000002_000019": {"imgHeight": 200, "imgWidth": 400, "objects": [
                 {"label": "ignore", "bbox": [1, 2, 3, 4], "bboxVis": [0, 0, 0, 0]}]}}
    ann, img = _cp(tmp_path, files)
    recs = read_citypersons(ann, img)
    assert [r.image_id for r in recs] == list(files)
    r = recs[0]
    assert (r.width, r.height) == (400, 200)  # from the JSON, not the image header
    assert r.image_path == os.path.join(img, "train", "aachen", "aachen_000000_000019_leftImg8bit.png")
    np.testing.assert_array_equal(r.boxes, [[100, 50, 130, 130], [10, 10, 30, 50], [200, 20, 240, 120],
                                            [300, 30, 320, 90], [0, 0, 50, 50], [350, 10, 390, 100]])
    assert list(r.labels) == ["pedestrian", "pedestrian", "pedestrian", "rider", "ignore", "person group"]
    assert list(r.category_ids) == [1, 1, 1, 2, 0, 5]
    assert list(r.ignore) == [False, False, False, True, True, True]
    np.testing.assert_allclose(r.visibility[:3], [60 / 80, 1.0, 1000 / 4000])
    assert r.visibility[4] == 0.0
    np.testing.assert_array_equal(r.visible_boxes[0], [100, 50, 130, 110])
    # Reasonable: only the first pedestrian (h 80 >= 50, visibility .75 >= .65) stays positive.
    rr = read_citypersons(ann, img, reasonable=True)[0]
    assert list(rr.ignore) == [False, True, True, True, True, True]
    assert recs[1].boxes.shape == (0, 4)
    assert list(recs[2].ignore) == [True]
    riders = read_citypersons(ann, img, positive_labels=("pedestrian", "rider"))[0]
    assert list(riders.ignore) == [False, False, False, False, True, True]


@pytest.mark.parametrize("objects,message", [
    ([{"label": "cyclist", "bbox": [1, 1, 2, 2]}], "unknown label 'cyclist'"),
    ([{"label": "pedestrian", "bbox": [1, 1, 2, -2]}], "negative size"),
    ([{"label": "pedestrian"}], "missing 'bbox'"),
    ([{"label": "pedestrian", "bbox": [1, 1, 2, 2], "bboxVis": [1, 1, -1, 2]}], "bboxVis must be"),
    ([{"label": "pedestrian", "bbox": [1, 1, 2, float("nan")]}], "non-finite"),
])
def test_citypersons_bad_objects(tmp_path, objects, message):
    ann, img = _cp(tmp_path, {"aachen_000000_000019": {"imgHeight": 20, "imgWidth": 40,
                                                         "objects": [{"label": "ignore", "bbox": [0, 0, 1, 1]}] + objects}})
    path = os.path.join(ann, "train", "aachen", "aachen_000000_000019_gtBboxCityPersons.json")
    with pytest.raises(DataFormatError, match=message) as e:
        read_citypersons(ann, img)
    assert str(e.value).startswith(f"{path} (objects[1])")


def test_citypersons_bad_files(tmp_path):
    ann, img = _cp(tmp_path, {"a_0_0": '{"imgHeight": 20,\n "imgWidth": 40,\n "objects": [}'})
    with pytest.raises(DataFormatError, match=r"_gtBboxCityPersons.json:3: not valid JSON"):
        read_citypersons(ann, img)
    ann, img = _cp(tmp_path / "b", {"a_0_0": {"imgHeight": 20, "objects": []}})
    with pytest.raises(DataFormatError, match="imgWidth/imgHeight must be positive"):
        read_citypersons(ann, img)
    ann, img = _cp(tmp_path / "c", {"a_0_0": {"imgHeight": 20, "imgWidth": 40, "objects": []}},
                   write_images=False)
    with pytest.raises(DataFormatError, match="image file not found: .*a_0_0_leftImg8bit.png"):
        read_citypersons(ann, img)
    skipped = read_citypersons(ann, img, on_error="skip")
    assert len(skipped) == 0 and skipped.skipped["missing image"] == 1


# ----------------------------------------------------------------------------- WiderPedestrian

def _wp(tmp_path, ann_text, ignore_text=None, images=("img1.jpg", "img2.jpg", "img3.jpg")):
    for i, name in enumerate(images):
        write_image(str(tmp_path / "images" / name), 50 + i, 40)
    ann = write_text(str(tmp_path / "train_bbx_gt.txt"), ann_text)
    ign = write_text(str(tmp_path / "train_ignore.txt"), ignore_text) if ignore_text else None
    return ann, str(tmp_path / "images"), ign


def test_widerped_boxes_labels_and_ignore(tmp_path):
    ann, images, ign = _wp(tmp_path, "img1.jpg 1 10 20 30 40 2 5 6 10 20\nimg2.jpg\n\nimg3.jpg\n",
                           "img1.jpg 0 0 5 5\nimg3.jpg 1 2 3 4 5 6 7 8\n")
    recs = read_widerped(ann, images, ignore_file=ign)
    assert [r.image_id for r in recs] == ["img1.jpg", "img2.jpg", "img3.jpg"]
    assert [(r.width, r.height) for r in recs] == [(50, 40), (51, 40), (52, 40)]
    np.testing.assert_array_equal(recs[0].boxes, [[10, 20, 40, 60], [5, 6, 15, 26], [0, 0, 5, 5]])
    assert list(recs[0].labels) == ["pedestrian", "cyclist", "ignore"]
    assert list(recs[0].category_ids) == [1, 2, 0]
    assert list(recs[0].ignore) == [False, False, True]
    assert recs[0].line == 1 and recs[2].line == 4
    assert recs[1].boxes.shape == (0, 4)
    np.testing.assert_array_equal(recs[2].boxes, [[1, 2, 4, 6], [5, 6, 12, 14]])
    assert list(recs[2].ignore) == [True, True]
    no_ignore = read_widerped(ann, images)
    assert no_ignore[0].num_boxes == 2 and no_ignore[2].num_boxes == 0


@pytest.mark.parametrize("ann_line,ignore_text,message,where", [
    ("img2.jpg 1 10 20 30", None, "groups of 5 fields", "gt:2"),
    ("img2.jpg 3 10 20 30 40", None, "unknown label '3'", "gt:2 (box 0)"),
    ("img2.jpg 1 10 20 -30 40", None, "negative size", "gt:2 (box 0)"),
    ("img2.jpg 1 10 x 30 40", None, "non-numeric", "gt:2"),
    ("nope.jpg", None, "image file not found", "gt:2"),
    ("img1.jpg", None, "duplicate image 'img1.jpg' \\(first on line 1\\)", "gt:2"),
    ("img2.jpg", "img2.jpg 1 2 3\n", "groups of 4 numbers", "ignore:1"),
    ("img2.jpg", "img9.jpg 1 2 3 4\n", "does not list", "ignore:1"),
    ("img2.jpg", "img2.jpg 1 2 3 -4\n", "negative size", "ignore:1 (region 0)"),
])
def test_widerped_bad_input(tmp_path, ann_line, ignore_text, message, where):
    ann, images, ign = _wp(tmp_path, f"img1.jpg 1 1 1 2 2\n{ann_line}\n", ignore_text)
    with pytest.raises(DataFormatError, match=message) as e:
        read_widerped(ann, images, ignore_file=ign)
    path = ign if where.startswith("ignore") else ann
    assert str(e.value).startswith(path + where[where.index(":"):])


def test_widerped_skip_mode(tmp_path):
    ann, images, _ = _wp(tmp_path, "img1.jpg 1 1 1 2 2 7 1 1 2 2\nimg2.jpg 1 2\nnope.jpg\nimg3.jpg\n")
    recs = read_widerped(ann, images, on_error="skip")
    assert [r.image_id for r in recs] == ["img1.jpg", "img3.jpg"]
    assert dict(recs.skipped) == {"unknown label": 1, "malformed line": 1, "missing image": 1}


# ----------------------------------------------------------------------------- UAVDT

def _uavdt(tmp_path, whole, ignore=None, frames=(1, 2, 3, 4)):
    gt, img = tmp_path / "GT", tmp_path / "UAV-benchmark-M"
    for f in frames:
        write_image(str(img / "M0101" / f"img{f:06d}.jpg"), 64, 34)
    write_text(str(gt / "M0101_gt_whole.txt"), whole)
    write_text(str(gt / "M0101_gt.txt"), "not read\n")  # the MOT file must be left alone
    if ignore is not None:
        write_text(str(gt / "M0101_gt_ignore.txt"), ignore)
    return str(gt), str(img)


def test_uavdt_frames_boxes_ignore(tmp_path):
    gt, img = _uavdt(tmp_path, "1,1,10,20,30,4,1,1,1\n1,2,50,6,10,20,2,3,2\n3,1,12,22,30,4,1,4,3\n",
                     "2,-1,0,0,50,20,-1,-1,-1\n")
    recs = read_uavdt(gt, img)
    assert [r.image_id for r in recs] == ["M0101/img000001", "M0101/img000002", "M0101/img000003"]
    assert all((r.width, r.height) == (64, 34) for r in recs)
    assert recs[0].image_path == os.path.join(img, "M0101", "img000001.jpg")
    np.testing.assert_array_equal(recs[0].boxes, [[10, 20, 40, 24], [50, 6, 60, 26]])
    assert list(recs[0].labels) == ["car", "truck"] and list(recs[0].category_ids) == [1, 2]
    assert list(recs[0].attrs["occlusion"]) == [1, 3] and list(recs[0].attrs["out_of_view"]) == [1, 2]
    assert list(recs[0].attrs["target_id"]) == [1, 2] and recs[0].line == 1
    # Frame 2 has only an ignore region.
    np.testing.assert_array_equal(recs[1].boxes, [[0, 0, 50, 20]])
    assert list(recs[1].ignore) == [True] and list(recs[1].labels) == ["ignore"]
    assert list(recs[2].labels) == ["bus"]
    allf = read_uavdt(gt, img, include_unannotated=True)
    assert [r.image_id for r in allf][-1] == "M0101/img000004" and allf[-1].num_boxes == 0


@pytest.mark.parametrize("whole,message,line", [
    ("1,1,10,20,30,40,1,1\n", "expected 9 comma-separated fields", 1),
    ("1,1,10,20,30,40,1,1,1\n1,1,10,20,30,40,1,1,4\n", "unknown category 4", 2),
    ("1,1,10,20,-30,40,1,1,1\n", "negative size", 1),
    ("0,1,10,20,30,40,1,1,1\n", "frame index must be >= 1", 1),
    ("1,1,10,20,30,40,1,a,1\n", "non-integer", 1),
    ("1,1,10,20,30,40,1,1,1\n9,1,10,20,30,40,1,1,1\n", "image file not found: .*img000009.jpg", 2),
])
def test_uavdt_bad_input(tmp_path, whole, message, line):
    gt, img = _uavdt(tmp_path, whole)
    with pytest.raises(DataFormatError, match=message) as e:
        read_uavdt(gt, img)
    assert str(e.value).startswith(os.path.join(gt, "M0101_gt_whole.txt") + f":{line}")


def test_uavdt_sequence_selection_and_skip(tmp_path):
    gt, img = _uavdt(tmp_path, "1,1,10,20,30,4,1,1,1\n2,1,1,1,1\n9,1,1,1,1,1,1,1,1\n")
    recs = read_uavdt(gt, img, sequences=["M0101"], on_error="skip")
    assert [r.image_id for r in recs] == ["M0101/img000001"]
    assert dict(recs.skipped) == {"malformed line": 1, "missing image": 1}
    with pytest.raises(FileNotFoundError, match="M0999"):
        read_uavdt(gt, img, sequences=["M0999"])


# ----------------------------------------------------------------------------- COCO

def _coco(tmp_path, anns, images=None):
    write_image(str(tmp_path / "img" / "a.jpg"), 30, 20)
    write_image(str(tmp_path / "img" / "b.jpg"), 30, 20)
    obj = {"info": {"x": 1}, "licenses": [],
           "images": images or [{"id": 7, "file_name": "a.jpg", "width": 300, "height": 200},
                                {"id": 8, "file_name": "b.jpg", "width": 300, "height": 200}],
           "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
           "annotations": anns}
    return write_text(str(tmp_path / "instances.json"), json.dumps(obj)), str(tmp_path / "img")


def test_coco_subset_and_ignore(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0,
             "segmentation": [[1, 2, 3]], "area": 12},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [20, 20, 5, 8], "ignore": 1}]
    js, img = _coco(tmp_path, anns)
    recs = read_coco(js, img, categories=["person"])
    assert [r.image_id for r in recs] == ["7", "8"]
    assert (recs[0].width, recs[0].height) == (300, 200)
    np.testing.assert_array_equal(recs[0].boxes, [[1, 2, 4, 6], [0, 0, 10, 10], [20, 20, 25, 28]])
    assert list(recs[0].ignore) == [False, True, True]
    assert recs[1].boxes.shape == (0, 4)
    assert recs.dropped["other category"] == 1
    both = read_coco(js, img)
    assert list(both[0].labels) == ["person", "car", "person", "person"]
    assert list(read_coco(js, img, categories=[3])[0].category_ids) == [3]


@pytest.mark.parametrize("ann,message", [
    ({"id": 5, "image_id": 99, "category_id": 1, "bbox": [1, 1, 1, 1]}, "unknown image_id 99"),
    ({"id": 5, "image_id": 7, "category_id": 2, "bbox": [1, 1, 1, 1]}, "unknown category_id 2"),
    ({"id": 5, "image_id": 7, "category_id": 1, "bbox": [1, 1, -1, 1]}, "negative size"),
    ({"id": 5, "image_id": 7, "category_id": 1, "bbox": [1, 1, 1]}, "must be 4 numbers"),
    ({"id": 5, "image_id": 7, "category_id": 1}, "needs 'image_id' and 'bbox'"),
])
def test_coco_bad_annotations(tmp_path, ann, message):
    js, img = _coco(tmp_path, [{"id": 4, "image_id": 7, "category_id": 1, "bbox": [1, 1, 1, 1]}, ann])
    with pytest.raises(DataFormatError, match=message) as e:
        read_coco(js, img)
    assert str(e.value).startswith(f"{js} (annotations[1], id=5)")


def test_coco_bad_images_and_categories(tmp_path):
    js, img = _coco(tmp_path, [], images=[{"id": 7, "file_name": "zz.jpg", "width": 3, "height": 2}])
    with pytest.raises(DataFormatError, match=r"\(images\[0\], id=7\): image file not found"):
        read_coco(js, img)
    js, img = _coco(tmp_path, [], images=[{"id": 7, "file_name": "a.jpg", "width": 0, "height": 2}])
    with pytest.raises(DataFormatError, match="width/height must be positive"):
        read_coco(js, img)
    with pytest.raises(ValueError, match="category 'dog' not in"):
        read_coco(js, img, categories=["dog"])


# ----------------------------------------------------------------------------- remaining bad paths

@pytest.mark.parametrize("bad_line,message", [
    ('{"ID": "x", "gtboxes": ["person"]}', "each gtbox must be an object"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, 1, 2, 2], "extra": 3}]}', "'extra' must be an object"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, 1, 2, Infinity]}]}', "non-finite"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [true, 1, 2, 2]}]}', "non-finite or boolean"),
    ('{"ID": "bad", "gtboxes": []}', "cannot read image"),
])
def test_crowdhuman_more_bad_input(tmp_path, bad_line, message):
    odgt, images = _odgt(tmp_path, ['{"ID": "ok", "gtboxes": []}', bad_line], {"ok": (8, 8), "x": (8, 8)})
    write_text(os.path.join(images, "bad.jpg"), "this is not a jpeg")
    with pytest.raises(DataFormatError, match=message) as e:
        read_crowdhuman(odgt, images)
    assert str(e.value).startswith(f"{odgt}:2")
    with pytest.raises(ValueError, match="check_images=True"):
        read_crowdhuman(odgt, images, check_images=False)


def test_crowdhuman_unusable_vbox_is_counted(tmp_path):
    odgt, images = _odgt(tmp_path, [{"ID": "x", "gtboxes": [
        {"tag": "person", "fbox": [1, 1, 4, 4], "vbox": [1, 1, 0, 4]}]}], {"x": (8, 8)})
    recs = read_crowdhuman(odgt, images)
    assert np.isnan(recs[0].visible_boxes[0]).all() and np.isnan(recs[0].visibility[0])
    assert recs.dropped["unusable vbox (visible box set to NaN)"] == 1
    # box="visible": the zero-size vbox itself is the box, so it is dropped and counted.
    vis = read_crowdhuman(odgt, images, box="visible")
    assert vis[0].num_boxes == 0 and vis.dropped["zero-size box"] == 1


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object"),
    ('{"imgHeight": 20, "imgWidth": 40, "objects": {}}', "'objects' must be a list"),
    ('{"imgHeight": 20, "imgWidth": 40, "objects": [7]}', r"\(objects\[0\]\): each object must be"),
])
def test_citypersons_more_bad_input(tmp_path, content, message):
    ann, img = _cp(tmp_path, {"a_0_0": content})
    with pytest.raises(DataFormatError, match=message):
        read_citypersons(ann, img)
    with pytest.raises(ValueError, match="unknown positive labels"):
        read_citypersons(ann, img, positive_labels=("cyclist",))
    with pytest.raises(FileNotFoundError, match="annotation folder not found"):
        read_citypersons(str(tmp_path / "nope"), img)


def test_widerped_non_finite_and_uavdt_bad_ignore_file(tmp_path):
    ann, images, _ = _wp(tmp_path, "img1.jpg 1 1 1 nan 2\n")
    with pytest.raises(DataFormatError, match="gt.txt:1: non-finite"):
        read_widerped(ann, images)
    gt, img = _uavdt(tmp_path / "u", "1,1,1,1,2,2,1,1,1\n", "1,-1,0,0,4\n")
    with pytest.raises(DataFormatError, match=r"M0101_gt_ignore.txt:1: expected 9 comma-separated"):
        read_uavdt(gt, img)
    gt, img = _uavdt(tmp_path / "v", "1,1,1,1,2,2,1,1,1\n", "1,-1,0,0,-4,4,-1,-1,-1\n")
    with pytest.raises(DataFormatError, match=r"M0101_gt_ignore.txt:1: ignore region has negative size"):
        read_uavdt(gt, img)
    with pytest.raises(FileNotFoundError, match="GT folder not found"):
        read_uavdt(str(tmp_path / "none"), img)


@pytest.mark.parametrize("mutate,message", [
    (lambda o: o.update(images=o["images"] + [dict(o["images"][0])]), r"images\[2\], id=7\): duplicate image id"),
    (lambda o: o["images"][0].pop("file_name"), r"images\[0\], id=7\): image entry needs"),
    (lambda o: o.update(categories=[{"id": "1", "name": "person"}]), r"categories\[0\]\): needs integer"),
    (lambda o: o.update(annotations={}), "top-level 'annotations' must be a list"),
])
def test_coco_more_bad_input(tmp_path, mutate, message):
    js, img = _coco(tmp_path, [])
    with open(js) as f:
        obj = json.load(f)
    mutate(obj)
    write_text(js, json.dumps(obj))
    with pytest.raises(ValueError, match=message) as e:
        read_coco(js, img)
    assert str(e.value).startswith(js)


def test_coco_invalid_json_names_line(tmp_path):
    js = write_text(str(tmp_path / "x.json"), '{"images": [],\n "annotations": [\n}')
    with pytest.raises(ValueError, match=r"x.json:3: not valid JSON"):
        read_coco(js, str(tmp_path))
