"""grain pipeline: batch layout and frames, bucketing, 2-process sharding, exact resume."""

import numpy as np
import pytest

from dipr1_jax.data import Record, RecordList
from dipr1_jax.data import pipeline as pl
from dipr1_jax.data.preprocess import boxes_to_original_batch
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds
from dipr1_jax.tokenizer import load_tokenizer

MAXPX = 28 * 28 * 16


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _records(n, h=60, w=100):
    return RecordList(
        Record(image_id=f"im{i}", width=w, height=h, image=_image(h, w, i),
               boxes=np.asarray([[10, 6, 50, 30]] * (i % 3) + [[0, 0, 4, 4]], np.float32),
               labels=["person"] * (i % 3 + 1), ignore=[False] * (i % 3) + [True])
        for i in range(n))


def _cfg(**kw):
    base = dict(batch_size=2, max_pixels=MAXPX, shard_index=0, shard_count=1, num_epochs=1)
    base.update(kw)
    return pl.PipelineConfig(**base)


def test_batch_layout_and_model_frame():
    import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as hf
    from PIL import Image

    tok = load_tokenizer()
    recs = RecordList([
        Record(image_id="a", width=100, height=60, image=_image(60, 100, 1),
               boxes=[[10, 6, 50, 30], [0, 0, 20, 20], [90, 50, 120, 70], [200, 0, 210, 10]],
               labels=["person", "mask", "person", "person"], ignore=[False, True, False, False]),
        Record(image_id="b", width=30, height=90, image=_image(90, 30, 2),
               boxes=np.zeros((0, 4)), labels=[], ignore=[]),
    ])
    cfg = _cfg(shuffle=False, batch_size=3)
    b = next(iter(pl.make_dataset(recs, cfg, tok)))
    # Image a: 60x100 rounds to 56x112 (6272 px, inside [3136, 12544]); grid 4x8, 8 tokens.
    # Image b: 90x30 rounds to 84x28 (2352 < 3136 px): upscaled by sqrt(3136/2700) -> 112x56.
    np.testing.assert_array_equal(b["image_grid_thw"], [[1, 4, 8], [1, 8, 4], [0, 0, 0]])
    np.testing.assert_array_equal(b["resized_size"], [[56, 112], [112, 56], [0, 0]])
    np.testing.assert_array_equal(b["orig_size"], [[60, 100], [90, 30], [0, 0]])
    np.testing.assert_allclose(b["scale"][:2], [[1.12, 56 / 60], [56 / 30, 112 / 90]], rtol=1e-6)
    assert list(b["valid"]) == [True, True, False] and list(b["image_id"]) == ["a", "b", ""]
    # GT in the resized frame: x * 1.12, y * 56/60; the box crossing the border is clipped
    # to 112x56, the one wholly outside is counted, the mask is an ignore region.
    np.testing.assert_allclose(b["gt_boxes"][0, :2], [[11.2, 5.6, 56, 28], [100.8, 50 * 56 / 60, 112, 56]],
                               rtol=1e-5)
    assert list(b["gt_mask"][0, :3]) == [True, True, False] and not b["gt_mask"][1:].any()
    np.testing.assert_allclose(b["ignore_boxes"][0, 0], [0, 0, 22.4, 20 * 56 / 60], rtol=1e-5)
    assert b["ignore_mask"].sum() == 1 and list(b["num_gt"]) == [2, 0, 0]
    assert list(b["num_clipped_away"]) == [1, 0, 0]
    back = boxes_to_original_batch(b["gt_boxes"], b["scale"])
    np.testing.assert_allclose(back[0, 0], [10, 6, 50, 30], rtol=1e-5)
    # pixel_values: both images' patches (as transformers makes them), in batch order, then zeros.
    proc = hf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=MAXPX)
    ref = proc(images=[Image.fromarray(recs[0].image), Image.fromarray(recs[1].image)],
               return_tensors="np")["pixel_values"]
    assert b["pixel_values"].shape[0] >= 64 and b["pixel_values"].shape[1] == 1176
    np.testing.assert_allclose(b["pixel_values"][:64], ref, atol=1e-5)
    assert not b["pixel_values"][64:].any()
    # Prompts: left padded; 8 image tokens for both images; the decoded text is the chat.
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        ids = b["input_ids"][i]
        assert (ids[:-n] == tok.pad_token_id).all() and (b["attention_mask"][i, :-n] == 0).all()
        assert int((ids == tok.image_token_id).sum()) == 8
        text = tok.decode(ids[-n:])
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        assert "<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>Locate every person" in text
    assert b["input_ids"].dtype == np.int32 and b["gt_boxes"].dtype == np.float32


def test_bucket_values():
    assert pl.bucket(3, ()) == 16 and pl.bucket(16, ()) == 16
    assert pl.bucket(17, ()) == 20 and pl.bucket(33, ()) == 40 and pl.bucket(1222, ()) == 1280
    assert pl.bucket(5, (8, 16)) == 8 and pl.bucket(9, (8, 16)) == 16
    assert pl.bucket(5, (8, 16), largest=True) == 16
    with pytest.raises(ValueError, match=r"GT boxes: 17 exceeds the largest bucket 16 \(images \['x'\]\)"):
        pl.bucket(17, (8, 16), "GT boxes", ids=["x"])


def test_shapes_come_from_a_small_fixed_set():
    src = SyntheticCrowds(12, SceneConfig(width=96, height=64, difficulty="hard"), seed=3)
    cfg = _cfg(batch_size=2, seq_buckets=(256, 512), patch_buckets=(64, 128), box_buckets=(64, 256),
               pad_to_largest=True)
    shapes = {tuple((k, v.shape) for k, v in sorted(b.items())) for b in pl.make_dataset(src, cfg)}
    assert len(shapes) == 1
    shape = dict(next(iter(shapes)))
    assert shape["input_ids"] == (2, 512) and shape["pixel_values"] == (128, 1176)
    assert shape["gt_boxes"] == (2, 256, 4)


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_get_disjoint_complete_shards(shuffle):
    recs = _records(7)
    seen = []
    for index in range(2):
        cfg = _cfg(shuffle=shuffle, shard_index=index, shard_count=2, seed=11)
        ids = [i for b in pl.make_dataset(recs, cfg) for i, v in zip(b["image_id"], b["valid"]) if v]
        assert len(ids) == len(set(ids)) == (4 if index == 0 else 3)
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"im{i}" for i in range(7)}


def test_process_shards_slice_the_single_process_global_batches():
    """Batch k of a 1-process run with batch size 4 is process 0's batch k followed by
    process 1's (batch size 2 each): the global batches do not depend on the count."""
    recs = _records(9)
    one = [list(b["image_id"][b["valid"]]) for b in
           pl.make_dataset(recs, _cfg(batch_size=4, shard_index=0, shard_count=1, seed=3))]
    two = [[list(b["image_id"][b["valid"]]) for b in
            pl.make_dataset(recs, _cfg(batch_size=2, shard_index=i, shard_count=2, seed=3))]
           for i in range(2)]
    two[1] += [[]] * (len(two[0]) - len(two[1]))  # the last global batch is short
    assert len(one) == len(two[0]) == 3
    assert [a + b for a, b in zip(*two)] == one


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(workers):
    recs = _records(5)
    # Endless epochs, reshuffled each epoch; 7 batches of 2 cross two epoch boundaries.
    cfg = _cfg(num_epochs=None, worker_count=workers, seed=5)
    full = _take(iter(pl.make_dataset(recs, cfg)), 7)
    it = iter(pl.make_dataset(recs, cfg))
    head = _take(it, 3)
    saved = pl.state_to_json(it.get_state())
    del it
    resumed = iter(pl.make_dataset(recs, cfg))
    resumed.set_state(pl.state_from_json(saved))
    _assert_same(head + _take(resumed, 4), full)
    ids = [i for b in full for i in b["image_id"]]
    # Every epoch is a permutation of the 5 records, and the two epochs differ.
    assert sorted(ids[:5]) == sorted(ids[5:10]) == [f"im{i}" for i in range(5)]
    assert ids[:5] != ids[5:10]


def test_mixed_tasks_and_counting_prompt():
    tok = load_tokenizer()
    cfg = _cfg(task="mixed", counting_fraction=0.5, shuffle=False, batch_size=8)
    b = next(iter(pl.make_dataset(_records(8), cfg, tok)))
    assert set(b["task"].tolist()) == {0, 1}
    again = next(iter(pl.make_dataset(_records(8), cfg, tok)))
    np.testing.assert_array_equal(b["task"], again["task"])
    for i in range(8):
        text = tok.decode(b["input_ids"][i][b["attention_mask"][i] == 1])
        assert ("How many people" in text) == (b["task"][i] == 1)
        assert ("Locate every person" in text) == (b["task"][i] == 0)


def test_bad_records_and_configs():
    bad = RecordList([Record(image_id="zz", width=10, height=10, image=_image(10, 10, 0),
                             boxes=[[5, 5, 5, 8]], labels=["person"], ignore=[False])])
    with pytest.raises(Exception, match="record 'zz'.*degenerate"):
        next(iter(pl.make_dataset(bad, _cfg())))
    wrong = RecordList([Record(image_id="sz", width=12, height=10, image=_image(10, 11, 0),
                               boxes=[[1, 1, 5, 8]], labels=["person"], ignore=[False])])
    with pytest.raises(Exception, match="record 'sz'.*11x10 but the annotation says 12x10"):
        next(iter(pl.make_dataset(wrong, _cfg())))
    with pytest.raises(ValueError, match="PipelineConfig.batch_size"):
        pl.PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="pad_to_largest"):
        pl.PipelineConfig(pad_to_largest=True)
    with pytest.raises(ValueError, match="shard_index"):
        pl.PipelineConfig(shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="box_buckets"):
        pl.PipelineConfig(box_buckets=(64, 16))
