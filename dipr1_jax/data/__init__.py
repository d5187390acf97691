"""Data: dataset readers, synthetic crowded scenes, Qwen-VL preprocessing, grain pipeline.

Readers (numpy only, safe in grain worker processes) return a
:class:`~dipr1_jax.data.records.RecordList` of :class:`~dipr1_jax.data.records.Record`
with boxes x1y1x2y2 in ORIGINAL image pixels. The preprocessing
(:mod:`dipr1_jax.data.preprocess`) maps them into the resized model frame; the
pipeline (:mod:`dipr1_jax.data.pipeline`) batches them. See DESIGN.md section 2.
"""

from dipr1_jax.data.citypersons import read_citypersons
from dipr1_jax.data.coco import read_coco
from dipr1_jax.data.crowdhuman import read_crowdhuman
from dipr1_jax.data.records import DataFormatError, Record, RecordList, decode_image
from dipr1_jax.data.uavdt import read_uavdt
from dipr1_jax.data.widerped import read_widerped

__all__ = [
    "DataFormatError", "Record", "RecordList", "decode_image", "read_citypersons", "read_coco",
    "read_crowdhuman", "read_uavdt", "read_widerped",
]
