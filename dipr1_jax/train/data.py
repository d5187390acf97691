"""Train and held-out data for the loops: ``--config.data.*`` -> record sources -> grain batches.

``source(cfg.data, split, seed)`` returns a random-access source of records:
``synthetic`` scenes (train and held-out splits are disjoint: different
seeds), one of the dataset readers (``READERS``: official layouts under
``data.root``, listed above ``READERS``),
or a TFDS builder (``tfds:<name>``, read with ``tfds.data_source`` from
``data.root``). ``pipeline_config`` maps the data section onto the grain
pipeline's config; ``eval_batches`` materialises one pass over the held-out
split (kept in memory and reused by every evaluation of a run).
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from dipr1_jax.config import DataSection
from dipr1_jax.data.pipeline import PipelineConfig, make_dataset
from dipr1_jax.data.records import find_dir

# Seed offsets of the synthetic splits (the held-out scenes never appear in training).
_SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def synthetic_source(cfg: DataSection, split: str, seed: int):
    from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds

    people = (1, cfg.synthetic_max_people) if cfg.synthetic_max_people else None
    scene = SceneConfig(width=cfg.synthetic_width, height=cfg.synthetic_height,
                        difficulty=cfg.synthetic_difficulty, num_people=people,
                        min_person_height=cfg.synthetic_min_person_height,
                        coord_tint=cfg.synthetic_coord_tint, clutter=cfg.synthetic_clutter,
                        silhouettes=cfg.synthetic_silhouettes)
    n = cfg.synthetic_train_size if split == cfg.train_split else cfg.synthetic_eval_size
    offset = _SPLIT_SEEDS.get(split, 3_000_017 + sum(map(ord, split)))
    return SyntheticCrowds(n, scene, seed=seed + offset)


def reader_source(cfg: DataSection, split: str):
    """Records of ``split`` read by ``READERS[cfg.name]`` from ``cfg.root`` (official layout)."""
    if cfg.name not in READERS:
        raise ValueError(f"data.name={cfg.name}: no reader (readers: {', '.join(sorted(READERS))})")
    if not os.path.isdir(cfg.root):
        raise FileNotFoundError(f"data.root={cfg.root!r} is not a directory "
                                f"(data.name={cfg.name}){_remote_hint(cfg.root)}")
    # COCO files hold many categories: the task's category (the one the prompts name) is read.
    kw = {"category": cfg.category} if cfg.name == "coco" else {}
    records = READERS[cfg.name](cfg.root, split, **kw)
    logging.info("data: %s %s: %s", cfg.name, split,
                 records.summary() if hasattr(records, "summary") else len(records))
    if len(records) == 0:
        raise ValueError(f"data.name={cfg.name} split {split!r} under {cfg.root}: no records")
    return records


def tfds_source(cfg: DataSection, split: str):
    """``tfds.data_source`` of a prepared builder in ``data.root`` (never downloads or builds)."""
    import tensorflow_datasets as tfds

    name = cfg.name.split(":", 1)[1]
    where = f"data.root={cfg.root}" if cfg.root else "the default TFDS data_dir"
    if cfg.root and not os.path.isdir(cfg.root):
        raise FileNotFoundError(f"data.root={cfg.root!r} is not a directory (data.name={cfg.name})")
    if name.startswith("dipr1_"):
        from dipr1_jax.data import tfds_builders  # noqa: F401  (registers the project's builders)
    try:
        builder = tfds.builder(name, data_dir=cfg.root or None)
    except Exception as e:  # DatasetNotFoundError, bad config name, ...
        raise FileNotFoundError(f"{where}: no TFDS dataset {name!r} ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0]})") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{where}: TFDS dataset {name!r} is not prepared under {builder.data_dir} (build it "
            "first, e.g. dipr1_jax.data.tfds_builders.prepare(name, data_dir, manual_dir))")
    splits = sorted(builder.info.splits.keys())
    wanted = [part.split("[")[0].strip() for part in split.split("+")]  # "train[:10%]+validation"
    if not all(w in splits for w in wanted):
        raise FileNotFoundError(f"{where}: TFDS dataset {name!r} has no split {split!r} "
                                f"(found splits: {', '.join(splits) or 'none'})")
    return tfds.data_source(name, split=split, data_dir=cfg.root or None, download=False)


def source(cfg: DataSection, split: str, seed: int = 0):
    if cfg.name == "synthetic":
        return synthetic_source(cfg, split, seed)
    if cfg.name.startswith("tfds:"):
        return tfds_source(cfg, split)
    return reader_source(cfg, split)


# ----------------------------------------------------------------------------- dataset readers
# name -> fn(root, split) -> RecordList, ``root`` holding the dataset in its OFFICIAL on-disk
# layout (the official archives extracted into one folder). These are the layouts that
# dipr1_jax/data/tfds_builders.py documents for its manual dir (module docstring and each
# builder's ``_split_records``) and the readers' docstrings (dipr1_jax/data/*.py) describe:
#
#   crowdhuman   annotation_<split>.odgt + Images/<ID>.jpg (CrowdHuman_train0{1,2,3}.zip and
#                CrowdHuman_val.zip each hold Images/; extracted into root, or each into its
#                own folder: root/<archive>/Images)                      splits: train, val
#   citypersons  gtBboxCityPersons/<split>/<city>/*_gtBboxCityPersons.json
#                + leftImg8bit/<split>/<city>/*_leftImg8bit.png          splits: train, val
#   widerped     <split>_bbx_gt.txt [+ <split>_bbx_ignore.txt]; the images in <split>/ or
#                else the first folder under root (sorted walk) holding the first listed image
#                                                                        splits: train, val
#   uavdt        UAV-benchmark-M/<seq>/img<frame:06d>.jpg
#                + UAV-benchmark-MOTD_v1.0/GT/<seq>_gt_whole.txt [+ <seq>_gt_ignore.txt];
#                M_attr/<split>/<seq>_attr.txt lists the official sequence split
#                                                    splits: train, test (M_attr), all
#   coco         annotations/instances_<split>2017.json + <split>2017/  splits: train, val
#                (or any annotations/instances_<name>.json + <name>/: split <name>)
#
# A missing file fails naming the path and the splits that do exist.


def _no_split(root: str, what: str, split: str, found) -> FileNotFoundError:
    return FileNotFoundError(f"data.root={root}: no {what} for split {split!r} "
                             f"(found splits: {', '.join(found) or 'none'})")


def _require_dir(root: str, path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.root={root}: {what} not found: {path}")
    return path


def _file_splits(folder: str, prefix: str, suffix: str) -> list[str]:
    """Split names of the files ``<folder>/<prefix><split><suffix>``."""
    if not os.path.isdir(folder):
        return []
    return sorted(n[len(prefix):-len(suffix)] for n in os.listdir(folder)
                  if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix + suffix))


def _subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if os.path.isdir(os.path.join(folder, n))) if os.path.isdir(folder) else []


def crowdhuman_split(root: str, split: str, box: str = "full"):
    from dipr1_jax.data.crowdhuman import read_crowdhuman

    odgt = os.path.join(root, f"annotation_{split}.odgt")
    if not os.path.isfile(odgt):
        raise _no_split(root, f"annotation_{split}.odgt", split,
                        _file_splits(root, "annotation_", ".odgt"))
    image_dirs = [d for d in [os.path.join(root, "Images")]
                  + [os.path.join(root, n, "Images") for n in _subdirs(root)] if os.path.isdir(d)]
    if not image_dirs:
        raise FileNotFoundError(f"data.root={root}: no Images/ folder (CrowdHuman images: "
                                f"{os.path.join(root, 'Images')} or <root>/<archive>/Images)")
    return read_crowdhuman(odgt, image_dirs, box=box)


def citypersons_split(root: str, split: str):
    from dipr1_jax.data.citypersons import read_citypersons

    ann_root = os.path.join(root, "gtBboxCityPersons")
    ann = os.path.join(ann_root, split)
    if not os.path.isdir(ann):
        raise _no_split(root, f"gtBboxCityPersons/{split}/", split, _subdirs(ann_root))
    images = _require_dir(root, os.path.join(root, "leftImg8bit", split),
                          f"the images of split {split!r} (leftImg8bit/{split}/)")
    return read_citypersons(ann, images)


def widerped_split(root: str, split: str):
    from dipr1_jax.data.widerped import read_widerped

    ann = os.path.join(root, f"{split}_bbx_gt.txt")
    if not os.path.isfile(ann):
        raise _no_split(root, f"{split}_bbx_gt.txt", split, _file_splits(root, "", "_bbx_gt.txt"))
    with open(ann, encoding="utf-8") as f:
        first = next((line.split()[0] for line in f if line.strip()), None)
    if first is None:
        raise ValueError(f"data.root={root}: {ann} lists no images")
    image_dir = os.path.join(root, split)  # e.g. train.zip holds train/<name>.jpg
    if not os.path.isfile(os.path.join(image_dir, first)):
        image_dir = find_dir(root, lambda p: os.path.isfile(os.path.join(p, first)))
    if image_dir is None:
        raise FileNotFoundError(f"data.root={root}: no folder under it holds {first} "
                                f"(the first image listed in {ann})")
    ign = os.path.join(root, f"{split}_bbx_ignore.txt")
    return read_widerped(ann, image_dir, ign if os.path.isfile(ign) else None)


UAVDT_IMAGES = "UAV-benchmark-M"
UAVDT_GT = os.path.join("UAV-benchmark-MOTD_v1.0", "GT")
UAVDT_ATTR = "M_attr"


def uavdt_split(root: str, split: str):
    from dipr1_jax.data.uavdt import read_uavdt

    attr = os.path.join(root, UAVDT_ATTR)
    if split == "all":
        sequences = None
    elif os.path.isdir(os.path.join(attr, split)):
        suffix = "_attr.txt"
        sequences = sorted(n[:-len(suffix)] for n in os.listdir(os.path.join(attr, split))
                           if n.endswith(suffix))
        if not sequences:
            raise FileNotFoundError(f"data.root={root}: no <seq>{suffix} in "
                                    f"{os.path.join(attr, split)} (the sequences of {split!r})")
    else:
        raise _no_split(root, f"{UAVDT_ATTR}/{split}/ sequence list", split,
                        ["all"] + _subdirs(attr))
    gt = _require_dir(root, os.path.join(root, UAVDT_GT), "the UAVDT ground truth folder")
    images = _require_dir(root, os.path.join(root, UAVDT_IMAGES), "the UAVDT image folder")
    return read_uavdt(gt, images, sequences=sequences)


def coco_split(root: str, split: str, category: str | None = None):
    from dipr1_jax.data.coco import read_coco

    ann_dir = os.path.join(root, "annotations")
    for name in (f"{split}2017", split):
        js = os.path.join(ann_dir, f"instances_{name}.json")
        if os.path.isfile(js):
            break
    else:
        found = [s[:-4] if s.endswith("2017") else s
                 for s in _file_splits(ann_dir, "instances_", ".json")]
        raise _no_split(root, f"annotations/instances_{split}2017.json", split, found)
    images = _require_dir(root, os.path.join(root, name), f"the images of split {split!r}")
    return read_coco(js, images, categories=[category] if category else None)


READERS: dict = {
    "crowdhuman": crowdhuman_split,
    "citypersons": citypersons_split,
    "widerped": widerped_split,
    "uavdt": uavdt_split,
    "coco": coco_split,
}


def pipeline_config(cfg: DataSection, batch_size: int, seed: int, *, shuffle: bool = True,
                    num_epochs: int | None = None) -> PipelineConfig:
    return PipelineConfig(batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                          worker_count=cfg.worker_count, task=cfg.task,
                          counting_fraction=cfg.counting_fraction, category=cfg.category,
                          prompt_style="full" if cfg.prompt_style == "auto" else cfg.prompt_style,
                          min_pixels=cfg.min_pixels,
                          max_pixels=cfg.max_pixels)


def local_batch_size(batch_size: int, what: str) -> int:
    """This process's share of a global batch (``what`` names the flag in errors)."""
    import jax

    n = jax.process_count()
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} does not split over {n} processes "
                         f"(use a multiple of {n})")
    return batch_size // n


def train_iterator(cfg: DataSection, tokenizer, batch_size: int, seed: int,
                   what: str = "batch_size"):
    """An endless iterator of shuffled training batches (reshuffled each epoch) of
    ``batch_size`` prompts in all: on several processes, each reads its own slice of
    every global batch (``make_dataset``)."""
    src = source(cfg, cfg.train_split, seed)
    local = local_batch_size(batch_size, what)
    return iter(make_dataset(src, pipeline_config(cfg, local, seed), tokenizer))


def eval_batches(cfg: DataSection, tokenizer, batch_size: int, num_images: int = 0,
                 seed: int = 0) -> list[dict]:
    """One ordered pass over the held-out split (the first ``num_images``; 0: all)."""
    src = source(cfg, cfg.eval_split, seed)
    if num_images and num_images < len(src):
        import grain
        src = grain.MapDataset.source(src)[:num_images]
    # Every process reads the whole held-out split (small) and evaluates the same global
    # batches; the devices of all processes share the work.
    pc = dataclasses.replace(pipeline_config(cfg, batch_size, seed, shuffle=False, num_epochs=1),
                             shard_index=0, shard_count=1)
    return list(make_dataset(src, pc, tokenizer))


# ----------------------------------------------------------------------------- out of domain

def ood_section(cfg: DataSection, ood) -> DataSection:
    """The data section of an ``eval.ood`` entry (``config.OODSet``): its reader, root and
    split as the held-out split, every other setting (pixels, prompt style, task) the
    run's, the category the entry names (default ``data.category``)."""
    import dataclasses as dc
    return dc.replace(cfg, name=ood.name, root=ood.root, eval_split=ood.split,
                      category=ood.category or cfg.category)


def check_data(cfg) -> None:
    """The in-domain dataset's name and root, checked at start-up (before the model loads,
    which takes minutes at 7B): a reader that does not exist or a ``data.root`` that is not
    a directory fails here with the message the first read would give."""
    from dipr1_jax.config import ConfigError
    d = cfg.data
    if d.name == "synthetic":
        return
    if d.name.startswith("tfds:"):
        if d.root and not os.path.isdir(d.root):
            raise FileNotFoundError(f"data.root={d.root!r} is not a directory "
                                    f"(data.name={d.name})")
        return
    if d.name not in READERS:
        raise ConfigError(f"data.name={d.name}: no reader (readers: "
                          f"{', '.join(sorted(READERS))}, synthetic, tfds:<builder>)")
    if not os.path.isdir(d.root):
        raise FileNotFoundError(f"data.root={d.root!r} is not a directory "
                                f"(data.name={d.name}){_remote_hint(d.root)}")


def _remote_hint(root: str) -> str:
    from dipr1_jax import fsio
    if not fsio.is_remote(root):
        return ""
    return ("; datasets are read from local disk: copy it there first (on a TPU slice: "
            "launch/run.sh --pull SRC=DIR, see launch/README.md)")


def check_ood(cfg) -> None:
    """Reads the annotations of every ``eval.ood`` set of the config (``Config``) once, so
    that a missing root, split or file fails at start-up, before any compute, with the
    reader's message (naming the path) prefixed by the entry."""
    from dipr1_jax.config import ConfigError, parse_ood
    for ood in parse_ood(cfg.eval.ood):
        where = f"eval.ood entry {ood.name}:{ood.root}:{ood.split}"
        try:
            reader_source(ood_section(cfg.data, ood), ood.split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e}") from None
        except ValueError as e:  # malformed annotations, no records (ConfigError: exit 2)
            raise ConfigError(f"{where}: {e}") from None
