"""TFDS builders (array_record, no TensorFlow needed) for the four datasets and the synthetic one.

Every builder writes the same features (one example per image, boxes in ORIGINAL pixels):

``image_id`` (text), ``image`` (the encoded file bytes, JPEG/PNG as shipped; PNG
for synthetic scenes), ``width``/``height`` (int32), ``boxes`` float32 [N, 4]
x1y1x2y2, ``labels`` (text sequence), ``ignore`` bool [N], ``category_ids``
int32 [N], ``visible_boxes`` float32 [N, 4] (NaN where unknown),
``visibility`` float32 [N] (NaN where unknown).

Build and read (the user places the official archives in ``manual_dir``)::

    from dipr1_jax.data import tfds_builders as tb
    tb.prepare("dipr1_crowdhuman", data_dir=..., manual_dir=...)
    source = tfds.data_source("dipr1_crowdhuman", split="train", data_dir=...)
    ds = make_dataset(source, PipelineConfig(...))   # dipr1_jax.data.pipeline

Manual-dir layouts (archives may also be given already extracted):

- ``dipr1_crowdhuman`` (configs ``full``, ``visible``): ``annotation_train.odgt``,
  ``annotation_val.odgt``, ``CrowdHuman_train01.zip`` .. ``CrowdHuman_train03.zip``,
  ``CrowdHuman_val.zip`` (each holding ``Images/<ID>.jpg``).
- ``dipr1_citypersons`` (configs ``all``, ``reasonable``): ``gtBbox_cityPersons_trainval.zip``
  (``gtBboxCityPersons/{train,val}/<city>/*.json``) and ``leftImg8bit_trainvaltest.zip``
  (``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``).
- ``dipr1_widerped``: ``<split>_bbx_gt.txt`` (and optional ``<split>_bbx_ignore.txt``)
  for split in train/val, with the images in any folder or zip of ``manual_dir``
  (the folder holding the first listed image is used).
- ``dipr1_uavdt``: ``UAV-benchmark-M.zip`` (``UAV-benchmark-M/<seq>/img*.jpg``) and
  ``UAV-benchmark-MOTD_v1.0.zip`` (``.../GT/<seq>_gt_whole.txt``, ``_gt_ignore.txt``).
  With ``M_attr.zip`` (``M_attr/{train,test}/<seq>_attr.txt``) the splits are
  ``train``/``test`` by those sequence lists, otherwise one split ``all``.
- ``dipr1_synthetic_crowds``: generated, no manual files (configs by difficulty).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dipr1_jax.data.citypersons import read_citypersons
from dipr1_jax.data.crowdhuman import read_crowdhuman
from dipr1_jax.data.records import Record, find_dir
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds
from dipr1_jax.data.uavdt import read_uavdt
from dipr1_jax.data.widerped import read_widerped


def features() -> tfds.features.FeaturesDict:
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "image_id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "width": tfds.features.Scalar(dtype=np.int32),
        "height": tfds.features.Scalar(dtype=np.int32),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32, encoding=zlib),
        "labels": tfds.features.Sequence(tfds.features.Text()),
        "ignore": tfds.features.Tensor(shape=(None,), dtype=np.bool_, encoding=zlib),
        "category_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=zlib),
        "visible_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32, encoding=zlib),
        "visibility": tfds.features.Tensor(shape=(None,), dtype=np.float32, encoding=zlib),
    })


def record_to_example(rec: Record) -> dict:
    """A record as a TFDS example (image as encoded bytes)."""
    if rec.image is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rec.image).save(buf, format="PNG")
        data = buf.getvalue()
    elif rec.image_bytes is not None:
        data = rec.image_bytes
    else:
        with open(rec.image_path, "rb") as f:
            data = f.read()
    n = rec.num_boxes
    nan4 = np.full((n, 4), np.nan, np.float32)
    return {
        "image_id": rec.image_id, "image": data, "width": rec.width, "height": rec.height,
        "boxes": rec.boxes, "labels": [str(v) for v in rec.labels], "ignore": rec.ignore,
        "category_ids": rec.category_ids,
        "visible_boxes": rec.visible_boxes if rec.visible_boxes is not None else nan4,
        "visibility": rec.visibility if rec.visibility is not None else np.full((n,), np.nan, np.float32),
    }


def _extract(dl_manager, path: str) -> str:
    """Extracts a zip once into the download dir (TFDS's extractor needs TensorFlow)."""
    dest = os.path.join(os.fspath(dl_manager.download_dir), "extracted", os.path.basename(path))
    done = os.path.join(dest, ".dipr1_extracted")
    if not os.path.isfile(done):
        with zipfile.ZipFile(path) as z:
            z.extractall(dest)  # zipfile drops absolute paths and ".." components
        open(done, "w").close()
    return dest


def _open(dl_manager, manual: str, name: str) -> str | None:
    """``manual/name`` extracted if it is a zip, the folder of that name if extracted already."""
    path = os.path.join(manual, name)
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        return _extract(dl_manager, path)
    stem = os.path.join(manual, name[:-4]) if name.endswith(".zip") else path
    return stem if os.path.exists(stem) else None


_find = find_dir


def _missing(manual: str, what: str):
    return FileNotFoundError(
        f"{manual}: {what} not found; see the manual-dir layout in "
        "dipr1_jax/data/tfds_builders.py (or the builder's MANUAL_DOWNLOAD_INSTRUCTIONS)")


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared features and example generation; subclasses return records per split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default resolves package paths through the `importlib_resources`
        # backport, which TFDS does not install; the module file is the same answer.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=features(),
                                     description=(self.__doc__ or "").strip())

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(recs)
                for split, recs in self._split_records(dl_manager).items()}

    def _generate_examples(self, records):
        for rec in records:
            yield rec.image_id, record_to_example(rec)

    def _split_records(self, dl_manager) -> dict:
        raise NotImplementedError


class Dipr1Crowdhuman(_RecordBuilder):
    """CrowdHuman (full-body or visible-body boxes; mask and ignore boxes as ignore regions)."""

    name = "dipr1_crowdhuman"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="full"), tfds.core.BuilderConfig(name="visible")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place annotation_train.odgt, annotation_val.odgt, "
                                    "CrowdHuman_train0{1,2,3}.zip and CrowdHuman_val.zip in manual_dir.")

    def _split_records(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        out = {}
        for split, zips in (("train", ["CrowdHuman_train01.zip", "CrowdHuman_train02.zip",
                                       "CrowdHuman_train03.zip"]),
                            ("validation", ["CrowdHuman_val.zip"])):
            odgt = os.path.join(manual, f"annotation_{'train' if split == 'train' else 'val'}.odgt")
            if not os.path.isfile(odgt):
                continue
            roots = [r for z in zips if (r := _open(dl_manager, manual, z))] or [manual]
            image_dirs = [d for r in roots if (d := _find(r, lambda p: os.path.basename(p) == "Images"))]
            if not image_dirs:
                raise _missing(manual, f"Images/ for {split} ({', '.join(zips)})")
            out[split] = read_crowdhuman(odgt, image_dirs, box=self.builder_config.name)
        if not out:
            raise _missing(manual, "annotation_train.odgt / annotation_val.odgt")
        return out


class Dipr1Citypersons(_RecordBuilder):
    """CityPersons (pedestrians; other person classes as ignore regions)."""

    name = "dipr1_citypersons"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="all"), tfds.core.BuilderConfig(name="reasonable")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place gtBbox_cityPersons_trainval.zip and "
                                    "leftImg8bit_trainvaltest.zip in manual_dir.")

    def _split_records(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        ann_root = _open(dl_manager, manual, "gtBbox_cityPersons_trainval.zip")
        img_root = _open(dl_manager, manual, "leftImg8bit_trainvaltest.zip")
        if ann_root is None or img_root is None:
            raise _missing(manual, "gtBbox_cityPersons_trainval.zip / leftImg8bit_trainvaltest.zip")
        ann = _find(ann_root, lambda p: os.path.basename(p) == "gtBboxCityPersons")
        img = _find(img_root, lambda p: os.path.basename(p) == "leftImg8bit")
        if ann is None or img is None:
            raise _missing(manual, "gtBboxCityPersons/ or leftImg8bit/ inside the archives")
        out = {}
        for split, name in (("train", "train"), ("validation", "val")):
            if os.path.isdir(os.path.join(ann, name)):
                out[split] = read_citypersons(os.path.join(ann, name), os.path.join(img, name),
                                              reasonable=self.builder_config.name == "reasonable")
        return out


class Dipr1Widerped(_RecordBuilder):
    """WiderPedestrian (pedestrians and cyclists; ignore file regions as ignore)."""

    name = "dipr1_widerped"
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place train_bbx_gt.txt / val_bbx_gt.txt (optional "
                                    "*_bbx_ignore.txt) and the image folders or zips in manual_dir.")

    def _split_records(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        roots = [manual] + [_extract(dl_manager, os.path.join(manual, n))
                            for n in sorted(os.listdir(manual)) if n.endswith(".zip")]
        out = {}
        for split, name in (("train", "train"), ("validation", "val")):
            ann = os.path.join(manual, f"{name}_bbx_gt.txt")
            if not os.path.isfile(ann):
                continue
            with open(ann, encoding="utf-8") as f:
                first = next((line.split()[0] for line in f if line.strip()), None)
            if first is None:
                raise ValueError(f"{ann}: no images listed")
            image_dir = next((d for r in roots if (d := _find(
                r, lambda p: os.path.isfile(os.path.join(p, first))))), None)
            if image_dir is None:
                raise _missing(manual, f"a folder holding {first} (first image of {ann})")
            ign = os.path.join(manual, f"{name}_bbx_ignore.txt")
            out[split] = read_widerped(ann, image_dir, ign if os.path.isfile(ign) else None)
        if not out:
            raise _missing(manual, "train_bbx_gt.txt / val_bbx_gt.txt")
        return out


class Dipr1Uavdt(_RecordBuilder):
    """UAVDT detection (cars, trucks, buses; ignore regions from *_gt_ignore.txt)."""

    name = "dipr1_uavdt"
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place UAV-benchmark-M.zip and UAV-benchmark-MOTD_v1.0.zip "
                                    "(and optionally M_attr.zip for the train/test split) in manual_dir.")

    def _split_records(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        img_root = _open(dl_manager, manual, "UAV-benchmark-M.zip")
        gt_root = _open(dl_manager, manual, "UAV-benchmark-MOTD_v1.0.zip")
        if img_root is None or gt_root is None:
            raise _missing(manual, "UAV-benchmark-M.zip / UAV-benchmark-MOTD_v1.0.zip")
        gt = _find(gt_root, lambda p: any(n.endswith("_gt_whole.txt") for n in os.listdir(p)))
        images = _find(img_root, lambda p: any(os.path.isfile(os.path.join(p, d, "img000001.jpg"))
                                               for d in os.listdir(p)))
        if gt is None or images is None:
            raise _missing(manual, "GT/*_gt_whole.txt or <seq>/img000001.jpg inside the archives")
        attr_root = _open(dl_manager, manual, "M_attr.zip")
        if attr_root is None:
            return {"all": read_uavdt(gt, images)}
        out = {}
        for split in ("train", "test"):
            d = _find(attr_root, lambda p, s=split: os.path.basename(p) == s)
            if d:
                seqs = sorted({m.group(0) for n in os.listdir(d) if (m := re.match(r"M\d{4}", n))})
                out[split] = read_uavdt(gt, images, sequences=seqs)
        return out


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    width: int = 640
    height: int = 480
    difficulty: str = "medium"
    num_train: int = 2000
    num_validation: int = 200
    seed: int = 0


class Dipr1SyntheticCrowds(_RecordBuilder):
    """Procedural crowded scenes with exact GT (dipr1_jax.data.synthetic)."""

    name = "dipr1_synthetic_crowds"
    BUILDER_CONFIGS = [SyntheticConfig(name=d, difficulty=d) for d in ("easy", "medium", "hard")]

    def _split_records(self, dl_manager):
        c = self.builder_config
        scene = SceneConfig(width=c.width, height=c.height, difficulty=c.difficulty)
        # Validation uses another seed, so the splits never share a scene.
        return {"train": SyntheticCrowds(c.num_train, scene, seed=c.seed),
                "validation": SyntheticCrowds(c.num_validation, scene, seed=c.seed + 1_000_003)}

    def _generate_examples(self, records):
        for i in range(len(records)):
            rec = records[i]
            yield rec.image_id, record_to_example(rec)


BUILDERS = {b.name: b for b in (Dipr1Crowdhuman, Dipr1Citypersons, Dipr1Widerped, Dipr1Uavdt,
                                Dipr1SyntheticCrowds)}


def prepare(name: str, data_dir: str, manual_dir: str | None = None, config=None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Builds ``name`` (array_record) into ``data_dir``; never tries a download."""
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](data_dir=data_dir, config=config, file_format="array_record",
                             **builder_kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
    return builder
