"""report: JSON round trip, Markdown numbers equal to the JSON, example images."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from dipr1_jax import metrics as M
from dipr1_jax import report as R
from dipr1_jax import viz
from test_metrics import random_image, to_eval


def _models():
    rng = np.random.default_rng(4)
    scored = [to_eval(random_image(rng, i, True)) for i in range(8)]
    unscored = [to_eval(random_image(rng, i, False)) for i in range(8)]
    return {"base": unscored, "dip-r1 | step 2000": scored}


def _tables(md):
    """Markdown tables as lists of rows of cells (plain parser, independent of the writer)."""
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _check_table(table, rows, metrics, digits):
    header, sep, *body = table
    assert header == ["model"] + list(metrics)
    assert sep == ["---"] + ["---:"] * len(metrics)
    assert [r[0].replace("\\|", "|") for r in body] == list(rows)
    for cells, (name, row) in zip(body, rows.items()):
        assert len(cells) == 1 + len(metrics)
        for cell, k in zip(cells[1:], metrics):
            v = row[k]
            if v is None:
                assert cell == "n/a"
            elif isinstance(v, int):
                assert int(cell) == v
            elif digits is None:
                assert float(cell) == v  # exact
            else:
                assert abs(float(cell) - v) <= 0.5 * 10**-digits + 1e-15, (name, k, cell, v)


@pytest.mark.parametrize("digits", [4, None])
def test_report_json_round_trips_and_markdown_equals_json(tmp_path, digits):
    results = R.evaluate_models(_models())
    assert results["base"]["ap_50"] is None and isinstance(results["dip-r1 | step 2000"]["ap_50"], float)
    ex_img = np.full((60, 80, 3), 40, np.uint8)
    paths = R.write_report(
        tmp_path,
        results,
        title="Crowd eval",
        baseline="base",
        digits=digits,
        examples=[
            R.ReportExample("img 1", ex_img, gt_boxes=[[5, 5, 30, 50]], pred_boxes=[[40, 5, 70, 40]], model="base"),
            R.ReportExample("img 1", ex_img, gt_boxes=[[5, 5, 30, 50]], look_boxes=[[2, 2, 35, 55]], model="base"),
        ],
    )
    rep = R.read_report(tmp_path)
    # JSON round trip: what was evaluated is what is read back, bit for bit
    assert rep["models"] == ["base", "dip-r1 | step 2000"]
    assert rep["metrics"] == [k for k in M.SUMMARY_KEYS]
    for name, row in results.items():
        assert rep["results"][name] == row
    with open(paths["json"]) as f:
        assert json.load(f) == rep
    again = tmp_path / "again"
    R.write_report(again, rep["results"], title=rep["title"], baseline="base", digits=digits)
    rep2 = R.read_report(again / "report.json")
    assert {k: v for k, v in rep2.items() if k != "examples"} == {k: v for k, v in rep.items() if k != "examples"}
    # differences are model minus baseline, None where either is missing
    diff = rep["differences"]["dip-r1 | step 2000"]
    for k in rep["metrics"]:
        a, b = results["dip-r1 | step 2000"][k], results["base"][k]
        assert diff[k] == (None if a is None or b is None else a - b)
    # Markdown: the same numbers
    with open(paths["markdown"]) as f:
        md = f.read()
    assert md.startswith("# Crowd eval\n")
    tables = _tables(md)
    assert len(tables) == 2
    _check_table(tables[0], rep["results"], rep["metrics"], digits)
    _check_table(tables[1], rep["differences"], rep["metrics"], digits)
    # examples: two distinct PNGs with the boxes drawn, linked from the Markdown
    assert len(paths["images"]) == 2 and len(set(paths["images"])) == 2
    for entry, path in zip(rep["examples"], paths["images"]):
        assert f"]({entry['png']})" in md
        assert os.path.samefile(os.path.join(tmp_path, entry["png"]), path)
    with Image.open(paths["images"][0]) as im:
        assert im.convert("RGB").getpixel((5, 20)) == viz.COLORS["gt"]
        assert im.convert("RGB").getpixel((69, 20)) == viz.COLORS["pred"]
    with Image.open(paths["images"][1]) as im:
        assert im.convert("RGB").getpixel((2, 20)) == viz.COLORS["look"]


def test_values_are_cleaned_and_bad_values_rejected(tmp_path):
    rep = R.build_report({"a": {"x": np.float32(0.25), "y": float("nan"), "z": np.int64(3)}}, metrics=["x", "y", "z"])
    assert rep["results"]["a"] == {"x": 0.25, "y": None, "z": 3}
    assert type(rep["results"]["a"]["z"]) is int
    with pytest.raises(ValueError, match="model 'a', metric 'x'"):
        R.build_report({"a": {"x": "high"}}, metrics=["x"])
    with pytest.raises(ValueError, match="baseline 'b' is not one of the models"):
        R.build_report({"a": {"x": 1.0}}, baseline="b")
    with pytest.raises(ValueError, match=r"columns \['x'\] are not metrics of any model"):
        R.build_report({"a": {"w": 1.0}}, metrics=["x"])
    # columns select what the Markdown shows; the JSON keeps every metric (missing ones null)
    rep = R.build_report({"a": {"w": 1.0, "v": 2.0}, "b": {"v": 3.0}}, metrics=["v"])
    assert rep["columns"] == ["v"] and rep["results"]["b"] == {"w": None, "v": 3.0}
    assert _tables(R.render_markdown(rep)) == [[["model", "v"], ["---", "---:"], ["a", "2.0000"], ["b", "3.0000"]]]
    (tmp_path / "report.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="unsupported report format"):
        R.read_report(tmp_path)
    assert R.format_value(None) == "n/a" and R.format_value(7) == "7" and R.format_value(0.123456) == "0.1235"
    assert math.isclose(float(R.format_value(1 / 3, None)), 1 / 3, rel_tol=0)
