"""grain input pipeline: records -> Qwen-VL model batches with ground truth in the model frame.

    ds = make_dataset(records, PipelineConfig(batch_size=8, worker_count=4), tokenizer)
    it = iter(ds)
    batch = next(it)
    state = it.get_state()          # JSON-serialisable; it.set_state(state) resumes exactly

``records`` is any random-access source (``len`` and ``[i]``) of
:class:`~dipr1_jax.data.records.Record` or TFDS example dicts: a reader's
``RecordList``, :class:`~dipr1_jax.data.synthetic.SyntheticCrowds`, or
``tfds.data_source(...)`` of the builders in :mod:`dipr1_jax.data.tfds_builders`.

Order of operations: shuffle with ``seed`` (reshuffled each epoch), repeat
``num_epochs`` (None: forever), decode + preprocess + tokenise each example (in
``worker_count`` processes when > 0), pad a batch of ``batch_size`` (per process)
to bucketed shapes, and with ``shard_count`` > 1 keep every ``shard_count``-th batch
from ``shard_index``: process p gets the p-th slice of each global batch of
``shard_count * batch_size`` examples, so the processes' shards are disjoint and
the global batches are those of one process reading them all. Every process of
a multi-host job must use the same config. Shapes may differ between processes
(each pads its own rows); ``multihost.to_global`` agrees them when it builds the
global arrays (or set ``pad_to_largest=True`` with explicit buckets).

Batch layout (a dict of numpy arrays; B = batch_size, always full: a short last
batch is padded with rows whose ``valid`` is False):

==================  ==========================  ===============================================
key                 shape, dtype                meaning
==================  ==========================  ===============================================
input_ids           [B, T] int32                prompt ids, LEFT-padded with pad_token_id; the
                                                image appears as image_grid_thw.prod()/4
                                                consecutive image_token_id
attention_mask      [B, T] int32                1 on prompt tokens, 0 on left padding
pixel_values        [P, 1176] float32           patches of all images, concatenated in batch
                                                order; rows >= sum(prod(image_grid_thw)) are zero
                                                padding (P is a bucket)
image_grid_thw      [B, 3] int32                (1, grid_h, grid_w); (0, 0, 0) for padding rows
gt_boxes            [B, K, 4] float32           non-ignore GT, x1y1x2y2 in the RESIZED model
                                                frame, clipped to the image
gt_mask             [B, K] bool                 valid entries of gt_boxes
ignore_boxes        [B, Ki, 4] float32          ignore regions, same frame
ignore_mask         [B, Ki] bool                valid entries of ignore_boxes
num_gt              [B] int32                   gt_mask.sum(-1) (the count target)
scale               [B, 2] float32              (sx, sy) = resized / original (w, h); original
                                                box = model box / (sx, sy, sx, sy)
orig_size           [B, 2] int32                original (height, width)
resized_size        [B, 2] int32                model input (height, width)
task                [B] int32                   0 detection, 1 counting (prompts.TASK_IDS)
valid               [B] bool                    False for batch padding rows
num_clipped_away    [B] int32                   GT boxes that lay wholly outside the image
image_id            [B] str                     record ids ('' for padding rows)
==================  ==========================  ===============================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Any, Literal, Sequence

import numpy as np

from dipr1_jax.config import ConfigError, _Validated
from dipr1_jax.data import preprocess as pp
from dipr1_jax.data import prompts
from dipr1_jax.data.records import DataFormatError, as_record, decode_image


@dataclasses.dataclass(frozen=True)
class PipelineConfig(_Validated):
    """Input pipeline settings (per process)."""

    batch_size: int = 2
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = False
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    task: Literal["detection", "counting", "mixed"] = "detection"
    counting_fraction: float = 0.5
    category: str = "person"
    prompt_style: Literal["full", "short"] = "full"
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    seq_buckets: tuple[int, ...] = ()
    patch_buckets: tuple[int, ...] = ()
    box_buckets: tuple[int, ...] = (16, 64, 256, 1024)
    pad_to_largest: bool = False
    clip_boxes: bool = True
    shard_index: int | None = None
    shard_count: int | None = None

    def validate(self) -> None:
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.num_epochs is None or (isinstance(self.num_epochs, int)
                                                  and self.num_epochs >= 1),
                      "num_epochs", "must be None (forever) or >= 1")
        self._require(self.worker_count >= 0, "worker_count", "must be >= 0")
        self._require(self.worker_buffer_size >= 1, "worker_buffer_size", "must be >= 1")
        self._require(self.read_threads >= 1, "read_threads", "must be >= 1")
        self._require(0.0 <= self.counting_fraction <= 1.0, "counting_fraction", "must be in [0, 1]")
        self._require(0 < self.min_pixels <= self.max_pixels, "min_pixels", "need 0 < min <= max_pixels")
        for name in ("seq_buckets", "patch_buckets", "box_buckets"):
            b = getattr(self, name)
            self._require(all(v > 0 for v in b) and list(b) == sorted(set(b)), name,
                          "must be strictly increasing positive ints")
        self._require(len(self.box_buckets) > 0, "box_buckets", "must not be empty")
        if self.pad_to_largest:
            self._require(bool(self.seq_buckets) and bool(self.patch_buckets), "pad_to_largest",
                          "needs explicit seq_buckets and patch_buckets")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ConfigError("PipelineConfig.shard_index/shard_count: set both or neither")
        if self.shard_count is not None:
            self._require(self.shard_count >= 1 and 0 <= self.shard_index < self.shard_count,
                          "shard_index", f"must be in [0, shard_count={self.shard_count})")

    @property
    def vision(self) -> pp.VisionSpec:
        return pp.VisionSpec(min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def bucket(n: int, buckets: Sequence[int], what: str = "size", largest: bool = False,
           ids: Sequence[str] = ()) -> int:
    """Smallest bucket >= n (the largest one if ``largest``). With no buckets, rounds n up
    on a quarter-octave grid (16, 20, 24, 28, 32, 40, 48, ...: at most 25% padding and
    four shapes per doubling)."""
    if buckets:
        if n > buckets[-1]:
            raise ValueError(f"{what}: {n} exceeds the largest bucket {buckets[-1]} "
                             f"(images {list(ids)[:8]}); add a larger bucket")
        return buckets[-1] if largest else next(b for b in buckets if b >= n)
    if n <= 16:
        return 16
    step = 2 ** (int(math.floor(math.log2(n))) - 2)
    return int(-(-n // step) * step)


def _task_of(image_id: str, cfg: PipelineConfig) -> str:
    if cfg.task != "mixed":
        return cfg.task
    u = zlib.crc32(f"{cfg.seed}:{image_id}".encode()) / 2 ** 32
    return "counting" if u < cfg.counting_fraction else "detection"


class ExampleBuilder:
    """One record -> one unpadded example (runs in grain workers; picklable)."""

    def __init__(self, tokenizer, cfg: PipelineConfig):
        self.tokenizer, self.cfg, self.spec = tokenizer, cfg, cfg.vision

    def __call__(self, item: Any) -> dict:
        rec = as_record(item)
        image = decode_image(rec)
        out = pp.preprocess_image(image, self.spec)
        oh, ow = rec.height, rec.width
        rh, rw = (int(v) for v in out["resized_size"])
        boxes = pp.boxes_to_model_frame(rec.boxes, (oh, ow), (rh, rw))
        bad = ~np.isfinite(rec.boxes).all(1) | (rec.boxes[:, 2] <= rec.boxes[:, 0]) | (
            rec.boxes[:, 3] <= rec.boxes[:, 1])
        if bad.any():
            raise DataFormatError(f"record {rec.image_id!r} ({rec.where}): box "
                                  f"{rec.boxes[bad][0].tolist()} is degenerate or non-finite")
        keep = np.ones(len(boxes), bool)
        if self.cfg.clip_boxes:
            boxes, keep = pp.clip_boxes(boxes, rh, rw)
        task = _task_of(rec.image_id, self.cfg)
        n_tok = pp.num_image_tokens(out["image_grid_thw"], self.spec)
        return {
            "input_ids": prompts.encode_prompt(self.tokenizer, n_tok, task, self.cfg.category,
                                               self.cfg.prompt_style),
            "pixel_values": out["pixel_values"],
            "image_grid_thw": out["image_grid_thw"],
            "gt_boxes": boxes[keep & ~rec.ignore],
            "ignore_boxes": boxes[keep & rec.ignore],
            "num_clipped_away": np.int32((~keep & ~rec.ignore).sum()),
            "scale": pp.box_scale((oh, ow), (rh, rw)),
            "orig_size": np.asarray([oh, ow], np.int32),
            "resized_size": out["resized_size"],
            "task": np.int32(prompts.TASK_IDS[task]),
            "image_id": rec.image_id,
        }


class Collate:
    """A list of examples -> one padded batch of bucketed shapes (see module docstring)."""

    def __init__(self, cfg: PipelineConfig, pad_token_id: int, patch_dim: int):
        self.cfg, self.pad_token_id, self.patch_dim = cfg, pad_token_id, patch_dim

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        cfg, b = self.cfg, self.cfg.batch_size
        ids = [e["image_id"] for e in examples]
        big = cfg.pad_to_largest
        t = bucket(max(len(e["input_ids"]) for e in examples), cfg.seq_buckets, "sequence length",
                   big, ids)
        p = bucket(sum(len(e["pixel_values"]) for e in examples), cfg.patch_buckets,
                   "patches per batch", big, ids)
        k = bucket(max(len(e["gt_boxes"]) for e in examples), cfg.box_buckets, "GT boxes", big, ids)
        ki = bucket(max(len(e["ignore_boxes"]) for e in examples), cfg.box_buckets,
                    "ignore boxes", big, ids)
        out = {
            "input_ids": np.full((b, t), self.pad_token_id, np.int32),
            "attention_mask": np.zeros((b, t), np.int32),
            "pixel_values": np.zeros((p, self.patch_dim), np.float32),
            "image_grid_thw": np.zeros((b, 3), np.int32),
            "gt_boxes": np.zeros((b, k, 4), np.float32),
            "gt_mask": np.zeros((b, k), bool),
            "ignore_boxes": np.zeros((b, ki, 4), np.float32),
            "ignore_mask": np.zeros((b, ki), bool),
            "num_gt": np.zeros((b,), np.int32),
            "scale": np.ones((b, 2), np.float32),
            "orig_size": np.zeros((b, 2), np.int32),
            "resized_size": np.zeros((b, 2), np.int32),
            "task": np.zeros((b,), np.int32),
            "valid": np.zeros((b,), bool),
            "num_clipped_away": np.zeros((b,), np.int32),
            "image_id": np.full((b,), "", dtype=object),
        }
        row = 0
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            out["input_ids"][i, t - n:] = e["input_ids"]
            out["attention_mask"][i, t - n:] = 1
            m = len(e["pixel_values"])
            out["pixel_values"][row:row + m] = e["pixel_values"]
            row += m
            g, ig = len(e["gt_boxes"]), len(e["ignore_boxes"])
            out["gt_boxes"][i, :g] = e["gt_boxes"]
            out["gt_mask"][i, :g] = True
            out["ignore_boxes"][i, :ig] = e["ignore_boxes"]
            out["ignore_mask"][i, :ig] = True
            out["num_gt"][i] = g
            out["valid"][i] = True
            for key in ("image_grid_thw", "scale", "orig_size", "resized_size", "task",
                        "num_clipped_away", "image_id"):
                out[key][i] = e[key]
        out["image_id"] = out["image_id"].astype(np.str_)
        return out


def _ensure_absl_flags() -> None:
    """grain's worker processes read absl flags; mark them parsed when no main did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def process_shard(cfg: PipelineConfig) -> tuple[int, int]:
    """(shard_index, shard_count): from the config, else this JAX process's."""
    if cfg.shard_count is not None:
        return cfg.shard_index, cfg.shard_count
    import jax  # only when the config leaves sharding to the JAX runtime

    return jax.process_index(), jax.process_count()


def make_dataset(source, cfg: PipelineConfig = PipelineConfig(), tokenizer=None):
    """The grain ``IterDataset`` of padded batches for this process (see module doc)."""
    import grain

    if tokenizer is None:
        from dipr1_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(None)
    if len(source) == 0:
        raise ValueError("make_dataset: the source is empty")
    index, count = process_shard(cfg)
    if count > 1 and len(source) < count:
        raise ValueError(f"make_dataset: {len(source)} records cannot be split over {count} "
                         "processes")
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(ExampleBuilder(tokenizer, cfg))
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder,
                  batch_fn=Collate(cfg, tokenizer.pad_token_id, cfg.vision.patch_dim))
    if count > 1:
        # Process p takes the p-th slice of every global batch: the global batches (one
        # shuffled stream, count * batch_size examples each) do not depend on the count.
        ds = ds[index::count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=2 * cfg.read_threads))
    if cfg.worker_count > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return it


def state_to_json(state: dict) -> str:
    return json.dumps(state, sort_keys=True)


def state_from_json(text: str) -> dict:
    return json.loads(text)
