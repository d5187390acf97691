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
from dipr1_jax.data.pipeline import PipelineConfig, make_dataset
from dipr1_jax.data.records import DataFormatError, Record, RecordList, as_record, decode_image
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds, render_scene
from dipr1_jax.data.uavdt import read_uavdt
from dipr1_jax.data.widerped import read_widerped

# TFDS builders live in dipr1_jax.data.tfds_builders (imported on demand: it needs tfds).
__all__ = [
    "DataFormatError", "PipelineConfig", "Record", "RecordList", "SceneConfig", "SyntheticCrowds",
    "as_record", "decode_image", "make_dataset", "read_citypersons", "read_coco", "read_crowdhuman",
    "read_uavdt", "read_widerped", "render_scene",
]
