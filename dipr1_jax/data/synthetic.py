"""Procedural crowded scenes with exact ground truth (Pillow + numpy, no downloads).

``render_scene(index, seed, config)`` draws one street scene and returns a
:class:`~dipr1_jax.data.records.Record` holding the pixels. The same
``(seed, index, config)`` always gives the same image and boxes.

Scene: sky and ground split at a horizon, buildings with windows, trees,
poles, parked cars, benches and a noise texture as clutter. People are
articulated figures (head, torso or dress, two arms and two legs at random
swing angles, optional hat and bag) with random skin, shirt and trouser
colours. Their size follows a ground-plane perspective: feet near the horizon
give tiny distant figures, feet near the bottom large ones (which may be cut by
the image border). ``crowd_groups`` clusters people so they occlude one
another; figures are painted far to near.

Ground truth (all in original pixels, x1y1x2y2, pixel ``i`` spans ``[i, i+1)``):

- ``boxes``: the full (amodal) box of each figure, clipped to the image;
- ``visible_boxes`` / ``visibility``: the box and share of the figure's own
  pixels that remain visible after every nearer figure is painted (exact,
  from an instance-id raster); ``attrs["occlusion"] = 1 - visibility``;
- ``ignore``: distractors (posters showing a person, shop-window mannequins:
  person-shaped but not people) and figures with visibility below
  ``min_visibility`` (nothing left to find);
- ``labels``: ``person``, ``poster`` or ``mannequin``;
- ``attrs["num_outside"]``: figures placed wholly outside the frame (no box).

Visibility is measured over the figure's pixels inside the image.

``SyntheticCrowds`` exposes the generator as a random-access dataset (``len``
and ``[i]``, like the readers' record lists and ``grain`` data sources).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from dipr1_jax.data.records import Record

DIFFICULTIES = ("easy", "medium", "hard")
# difficulty -> (people range, crowd groups, group spread as share of width,
#                distractors range, noise amplitude, nearest person height / image height,
#                share of tiny distant people placed just below the horizon)
_PRESETS = {
    "easy": ((1, 8), (1, 3), 0.25, (0, 1), 4, 0.55, 0.0),
    "medium": ((8, 40), (2, 5), 0.12, (1, 3), 8, 0.45, 0.1),
    "hard": ((40, 160), (3, 8), 0.06, (2, 6), 14, 0.40, 0.25),
}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """How scenes look. ``num_people`` / ``num_distractors`` override the difficulty's ranges.

    Three switches make scenes a model trained from scratch in minutes can learn
    from (the default job; BUILD_NOTES "The default job"); at their defaults the
    scenes are exactly as without them:

    - ``coord_tint`` in [0, 1] blends the background (not the people) with a
      coordinate map (red = x, green = y, blue 128), so every patch shows where
      it is. Qwen2.5-VL carries position only through RoPE, which a small model
      does not learn to turn into absolute coordinates from a few thousand images.
    - ``clutter=False``: sky, ground and noise only (no buildings, trees, cars,
      road marks; hence no posters).
    - ``silhouettes``: people painted in one dark colour (mannequins keep theirs).
    """

    width: int = 640
    height: int = 480
    difficulty: str = "medium"
    num_people: tuple[int, int] | None = None
    num_distractors: tuple[int, int] | None = None
    min_visibility: float = 0.05
    min_person_height: int = 6
    coord_tint: float = 0.0
    clutter: bool = True
    silhouettes: bool = False

    def __post_init__(self):
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"SceneConfig.difficulty: one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.width < 32 or self.height < 32:
            raise ValueError(f"SceneConfig: image must be at least 32x32, got {self.width}x{self.height}")
        for name in ("num_people", "num_distractors"):
            rng = getattr(self, name)
            if rng is not None and not (len(rng) == 2 and 0 <= rng[0] <= rng[1]):
                raise ValueError(f"SceneConfig.{name}: need (lo, hi) with 0 <= lo <= hi, got {rng}")
        if not 0.0 <= self.coord_tint <= 1.0:
            raise ValueError(f"SceneConfig.coord_tint: in [0, 1], got {self.coord_tint}")
        if self.min_person_height < 1:
            raise ValueError(f"SceneConfig.min_person_height: >= 1, got {self.min_person_height}")
        if not 0.0 <= self.min_visibility < 1.0:
            raise ValueError(f"SceneConfig.min_visibility: in [0, 1), got {self.min_visibility}")

    @property
    def people_range(self) -> tuple[int, int]:
        return self.num_people if self.num_people is not None else _PRESETS[self.difficulty][0]


SKIN = [(255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (90, 56, 37), (241, 194, 125)]
SILHOUETTE = (16, 16, 16)
HAIR = [(20, 20, 20), (60, 40, 20), (120, 80, 40), (200, 170, 100), (150, 150, 150)]


def _rand_colour(rng, lo=20, hi=235):
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


@dataclasses.dataclass
class _Figure:
    kind: str          # person | mannequin
    cx: float          # centre x of the feet
    feet: float        # feet y
    h: float           # standing height in pixels
    params: dict


def _draw_figure(fig: _Figure, rng_colours: dict) -> tuple[Image.Image, int, int]:
    """Draws a figure into a local RGBA image; returns (image, x0, y0) of its top-left."""
    h = fig.h
    p = fig.params
    lw_w, lw_h = int(math.ceil(h * 0.9)) + 4, int(math.ceil(h * 1.02)) + 4
    img = Image.new("RGBA", (lw_w, lw_h), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx, top = lw_w / 2, 2.0
    c = rng_colours
    r = max(1.0, 0.065 * h)
    sh_y, hip_y = top + 0.16 * h, top + 0.52 * h
    sh_w, hip_w = 0.12 * h * p["build"], 0.09 * h * p["build"]
    limb = max(1, int(round(0.06 * h * p["build"])))
    arm = max(1, int(round(0.05 * h * p["build"])))

    def lw(v):
        return max(1, int(round(v)))

    # Legs (from the hips to the feet, swinging by stride angles).
    leg_len = (top + h) - hip_y
    for side, ang in ((-1, p["leg_a"]), (1, p["leg_b"])):
        hx = cx + side * hip_w * 0.5
        fx, fy = hx + math.sin(ang) * leg_len, hip_y + math.cos(ang) * leg_len
        d.line([(hx, hip_y), (fx, fy)], fill=c["trousers"], width=limb)
        d.ellipse([fx - limb * 0.8, fy - limb * 0.5, fx + limb * 0.8, fy + limb * 0.3], fill=c["shoes"])
    # Torso (or dress) as a polygon.
    if p["dress"]:
        body = [(cx - sh_w, sh_y), (cx + sh_w, sh_y), (cx + hip_w * 1.8, top + 0.72 * h),
                (cx - hip_w * 1.8, top + 0.72 * h)]
    else:
        body = [(cx - sh_w, sh_y), (cx + sh_w, sh_y), (cx + hip_w, hip_y + 0.04 * h),
                (cx - hip_w, hip_y + 0.04 * h)]
    if p["bag"]:
        bx = cx + p["facing"] * sh_w * 0.9
        d.rectangle([bx - 0.06 * h, sh_y + 0.05 * h, bx + 0.06 * h, sh_y + 0.25 * h], fill=c["bag"])
    d.polygon(body, fill=c["shirt"])
    # Arms from the shoulders.
    arm_len = 0.36 * h
    for side, ang in ((-1, p["arm_a"]), (1, p["arm_b"])):
        sx = cx + side * sh_w * 0.92
        ex, ey = sx + side * math.sin(ang) * arm_len, sh_y + math.cos(ang) * arm_len
        d.line([(sx, sh_y + arm * 0.5), (ex, ey)], fill=c["sleeve"], width=arm)
        d.ellipse([ex - arm * 0.6, ey - arm * 0.6, ex + arm * 0.6, ey + arm * 0.6], fill=c["skin"])
    # Neck and head.
    d.line([(cx, sh_y), (cx, top + 2 * r)], fill=c["skin"], width=lw(0.5 * r))
    d.ellipse([cx - r * 0.9, top, cx + r * 0.9, top + 2 * r], fill=c["skin"])
    if fig.kind == "person":
        d.chord([cx - r * 0.95, top - r * 0.05, cx + r * 0.95, top + 1.3 * r], 180, 360, fill=c["hair"])
        if p["hat"]:
            d.rectangle([cx - r * 1.1, top - 0.1 * r, cx + r * 1.1, top + 0.45 * r], fill=c["hat"])
    return img, int(round(fig.cx - cx)), int(round(fig.feet - h - top))


def _person_params(rng) -> dict:
    stride = rng.uniform(0.0, 0.35)
    return {
        "leg_a": -stride + rng.normal(0, 0.04), "leg_b": stride + rng.normal(0, 0.04),
        "arm_a": rng.uniform(0.05, 0.6) if rng.random() > 0.15 else rng.uniform(2.2, 2.9),
        "arm_b": rng.uniform(0.05, 0.6) if rng.random() > 0.15 else rng.uniform(2.2, 2.9),
        "build": rng.uniform(0.8, 1.25), "dress": rng.random() < 0.2, "hat": rng.random() < 0.25,
        "bag": rng.random() < 0.3, "facing": 1 if rng.random() < 0.5 else -1,
    }


def _person_colours(rng, kind: str) -> dict:
    if kind == "mannequin":
        tone = _rand_colour(rng, 170, 250) if rng.random() < 0.5 else (235, 235, 230)
        return {"skin": tone, "hair": tone, "hat": tone, "shirt": _rand_colour(rng), "sleeve": tone,
                "trousers": tone, "shoes": tone, "bag": tone}
    shirt = _rand_colour(rng)
    return {"skin": SKIN[rng.integers(len(SKIN))], "hair": HAIR[rng.integers(len(HAIR))],
            "hat": _rand_colour(rng), "shirt": shirt,
            "sleeve": shirt if rng.random() < 0.6 else SKIN[rng.integers(len(SKIN))],
            "trousers": _rand_colour(rng, 10, 160), "shoes": _rand_colour(rng, 0, 80),
            "bag": _rand_colour(rng)}


def _background(rng, w, h, horizon, noise_amp, clutter=True) -> tuple[Image.Image, list]:
    """Sky, ground, buildings (returns wall rectangles for posters), clutter.

    ``clutter=False``: sky, ground and noise only (no walls, so no posters)."""
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    sky_top, sky_bot = np.asarray(_rand_colour(rng, 120, 230)), np.asarray(_rand_colour(rng, 150, 250))
    t = np.linspace(0, 1, max(horizon, 1))[:, None]
    sky = (sky_top * (1 - t) + sky_bot * t).astype(np.uint8)
    ground = _rand_colour(rng, 60, 170)
    arr = np.empty((h, w, 3), np.uint8)
    arr[:horizon] = sky[:, None, :]
    arr[horizon:] = ground
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    walls = []
    if not clutter:
        return _noise(img, rng, w, h, noise_amp), walls
    x = -int(rng.integers(0, 40))
    while x < w:  # building row along the horizon
        bw, bh = int(rng.integers(w // 10, w // 4)), int(rng.integers(horizon // 3, horizon + h // 6))
        y0 = max(0, horizon - bh)
        colour = _rand_colour(rng, 60, 220)
        d.rectangle([x, y0, x + bw, horizon + h // 40], fill=colour)
        walls.append((max(x, 0), y0, min(x + bw, w), horizon))
        win = max(3, bw // 8)
        wc = _rand_colour(rng, 30, 120)
        for wy in range(y0 + win, horizon - win, 2 * win):
            for wx in range(x + win // 2, x + bw - win, 2 * win):
                d.rectangle([wx, wy, wx + win - 1, wy + win - 1], fill=wc)
        x += bw + int(rng.integers(0, w // 30 + 1))
    for _ in range(int(rng.integers(2, 6))):  # road markings / pavement stripes
        y = int(rng.integers(horizon + 2, h))
        d.line([(0, y), (w, y + int(rng.integers(-h // 10, h // 10 + 1)))], fill=_rand_colour(rng),
               width=max(1, h // 200))
    for _ in range(int(rng.integers(1, 5))):  # trees and poles
        x0 = int(rng.integers(0, w))
        yb = int(rng.integers(horizon, h))
        th = (yb - horizon) * rng.uniform(0.8, 2.0) + h * 0.05
        d.rectangle([x0, yb - th, x0 + max(2, th * 0.05), yb], fill=(90, 60, 30))
        if rng.random() < 0.6:
            rr = th * 0.3
            d.ellipse([x0 - rr, yb - th - rr, x0 + rr, yb - th + rr], fill=_rand_colour(rng, 20, 140))
    for _ in range(int(rng.integers(0, 4))):  # parked cars and benches
        x0 = int(rng.integers(0, w))
        yb = int(rng.integers(horizon + 2, h))
        s = (yb - horizon) / max(h - horizon, 1) * h * 0.25 + 4
        d.rounded_rectangle([x0, yb - s * 0.5, x0 + s * 1.6, yb], radius=max(1, s * 0.1),
                            fill=_rand_colour(rng))
    return _noise(img, rng, w, h, noise_amp), walls


def _noise(img, rng, w, h, noise_amp):
    if noise_amp:
        tile = rng.integers(-noise_amp, noise_amp + 1, (64, 64, 3), dtype=np.int16)
        reps = (-(-h // 64), -(-w // 64), 1)
        arr = np.asarray(img).astype(np.int16) + np.tile(tile, reps)[:h, :w]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def _tint(img: Image.Image, amount: float) -> Image.Image:
    """Blends ``img`` with a coordinate map: red grows with x, green with y, blue 128."""
    h, w = img.height, img.width
    coords = np.empty((h, w, 3), np.float32)
    coords[..., 0] = np.linspace(0, 255, w)[None, :]
    coords[..., 1] = np.linspace(0, 255, h)[:, None]
    coords[..., 2] = 128
    arr = (1 - amount) * np.asarray(img, np.float32) + amount * coords
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _tight_box(alpha: np.ndarray, x0: int, y0: int):
    ys, xs = np.nonzero(np.any(alpha, axis=1)), np.nonzero(np.any(alpha, axis=0))
    if ys[0].size == 0:
        return None
    return (x0 + xs[0][0], y0 + ys[0][0], x0 + xs[0][-1] + 1, y0 + ys[0][-1] + 1)


def render_scene(index: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> Record:
    """One deterministic scene (a function of ``seed``, ``index`` and ``config`` only)."""
    rng = np.random.default_rng([int(seed), int(index), 0x5CE4E])
    w, h = config.width, config.height
    _, groups, spread, distractors, noise, near_h, tiny = _PRESETS[config.difficulty]
    horizon = int(h * rng.uniform(0.28, 0.45))
    canvas, walls = _background(rng, w, h, horizon, noise, config.clutter)
    if config.coord_tint > 0:
        canvas = _tint(canvas, config.coord_tint)
    ids = Image.new("I", (w, h), 0)

    n_people = int(rng.integers(config.people_range[0], config.people_range[1] + 1))
    centres = [(rng.uniform(0.05, 0.95) * w, rng.uniform(0.1, 1.0))
               for _ in range(int(rng.integers(groups[0], groups[1] + 1)))]
    k_h = near_h * h / max(h - horizon, 1)  # height per pixel below the horizon
    figures = []
    for _ in range(n_people):
        gx, gdepth = centres[int(rng.integers(len(centres)))]
        depth = float(np.clip(gdepth + rng.normal(0, spread * 2), 0.0, 1.08))
        if rng.random() < tiny:
            depth = rng.uniform(0.005, 0.06)
        feet = horizon + max(depth, 0.004) * (h - horizon)
        ph = max(float(config.min_person_height), (feet - horizon) * k_h * rng.uniform(0.85, 1.15))
        cx = float(np.clip(gx + rng.normal(0, spread * w), -0.05 * w, 1.05 * w))
        figures.append(_Figure("person", cx, feet, ph, _person_params(rng)))
    if config.num_distractors is not None:
        distractors = config.num_distractors
    n_distract = int(rng.integers(distractors[0], distractors[1] + 1))
    ignore_rows = []
    for _ in range(n_distract):
        if rng.random() < 0.5 and walls:  # a poster on a wall, showing a person
            wx0, wy0, wx1, wy1 = walls[int(rng.integers(len(walls)))]
            ph = min(wy1 - wy0, wx1 - wx0) * rng.uniform(0.4, 0.9)
            if ph < 8:
                continue
            px0 = wx0 + rng.uniform(0, max(wx1 - wx0 - ph * 0.7, 0))
            py0 = wy0 + rng.uniform(0, max(wy1 - wy0 - ph, 0))
            box = (int(px0), int(py0), int(px0 + ph * 0.7) + 1, int(py0 + ph) + 1)
            ImageDraw.Draw(canvas).rectangle(box, fill=_rand_colour(rng, 150, 255),
                                             outline=(30, 30, 30))
            art = _Figure("person", (box[0] + box[2]) / 2, box[3] - ph * 0.05, ph * 0.85,
                          _person_params(rng))
            im, x0, y0 = _draw_figure(art, _person_colours(rng, "person"))
            canvas.paste(im, (x0, y0), im)
            ignore_rows.append(("poster", box))
        else:  # a mannequin standing among the people
            depth = rng.uniform(0.1, 0.9)
            feet = horizon + depth * (h - horizon)
            ph = max(float(config.min_person_height), (feet - horizon) * k_h)
            figures.append(_Figure("mannequin", rng.uniform(0.05, 0.95) * w, feet, ph,
                                   _person_params(rng)))

    figures.sort(key=lambda f: f.feet)  # far (small feet y) first
    drawn = []
    for k, fig in enumerate(figures, start=1):
        colours = _person_colours(rng, fig.kind)
        if config.silhouettes and fig.kind == "person":
            colours = dict.fromkeys(colours, SILHOUETTE)
        im, x0, y0 = _draw_figure(fig, colours)
        alpha = np.asarray(im.getchannel("A")) > 0
        canvas.paste(im, (x0, y0), im)
        ids.paste(k, (x0, y0, x0 + im.width, y0 + im.height), Image.fromarray(alpha.astype(np.uint8) * 255))
        own = _clip_count(alpha, x0, y0, w, h)
        drawn.append((fig, k, x0, y0, alpha, own))

    id_arr = np.asarray(ids)
    rows, outside = [], 0
    for fig, k, x0, y0, alpha, own in drawn:
        full = _tight_box(_clip_alpha(alpha, x0, y0, w, h), max(x0, 0), max(y0, 0))
        if full is None or own == 0:
            outside += 1  # drawn wholly outside the image: counted in attrs
            continue
        crop = id_arr[full[1]:full[3], full[0]:full[2]] == k
        vis_count = int(crop.sum())
        vis_box = _tight_box(crop, full[0], full[1]) if vis_count else (math.nan,) * 4
        visibility = vis_count / own
        if fig.kind == "mannequin":
            rows.append(("mannequin", full, True, vis_box, visibility))
        else:
            rows.append(("person", full, visibility < config.min_visibility, vis_box, visibility))
    for label, box in ignore_rows:
        rows.append((label, box, True, box, 1.0))
    vis = np.asarray([r[4] for r in rows], np.float32)
    return Record(
        image_id=f"synthetic/{config.difficulty}/{seed}/{index:08d}",
        width=w, height=h, image=np.asarray(canvas),
        boxes=np.asarray([r[1] for r in rows], np.float32).reshape(-1, 4),
        labels=np.asarray([r[0] for r in rows], np.str_),
        ignore=np.asarray([r[2] for r in rows], bool),
        category_ids=np.asarray([{"person": 1, "mannequin": 0, "poster": 0}[r[0]] for r in rows], np.int32),
        visible_boxes=np.asarray([r[3] for r in rows], np.float32).reshape(-1, 4),
        visibility=vis,
        source=f"synthetic(seed={seed})", line=0,
        attrs={"occlusion": (1.0 - vis).astype(np.float32), "difficulty": config.difficulty,
               "horizon": horizon, "num_outside": outside},
    )


def _clip_alpha(alpha, x0, y0, w, h):
    return alpha[max(0, -y0):max(0, h - y0), max(0, -x0):max(0, w - x0)]


def _clip_count(alpha, x0, y0, w, h) -> int:
    return int(_clip_alpha(alpha, x0, y0, w, h).sum())


class SyntheticCrowds:
    """Random-access dataset of synthetic scenes: ``len(ds)`` and ``ds[i] -> Record``."""

    def __init__(self, num_images: int, config: SceneConfig = SceneConfig(), seed: int = 0):
        if num_images <= 0:
            raise ValueError(f"SyntheticCrowds: num_images must be positive, got {num_images}")
        self.num_images, self.config, self.seed = int(num_images), config, int(seed)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Record:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"SyntheticCrowds: index {index} out of range [0, {self.num_images})")
        return render_scene(index % self.num_images, self.seed, self.config)

    def __repr__(self) -> str:
        return f"SyntheticCrowds({self.num_images}, {self.config}, seed={self.seed})"
