"""A deterministic pixel classifier for the tiny world: color, background, shape, style.

No learned weights on purpose: a benchmark that judges a trained model with another trained model measures two
things at once. These rules only need the facts of `shapes.py` (a fixed palette, one shape, a margin of
background at the border) and of `style_art.py` (a gold frame one latent cell wide, cream paper, ink
outlines), so the numbers stay comparable across runs and machines. Pixel constants are written for 64x64 and
scale with the image size.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

from sd_lora.training.shapes import PALETTE, parse_caption
from sd_lora.training.style_art import FRAME_GOLD, INK, PAPER, frame_width

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], np.float32)
OBJECT_DISTANCE = 45.0  # RGB distance from the background beyond which a pixel belongs to the object
# (fill of the bounding box, solidity = area / convex hull area), measured on rendered 64 px scenes.
SHAPE_PROTOTYPES = {
    "circle": (0.78, 0.96), "square": (1.0, 1.0), "triangle": (0.53, 0.92), "star": (0.37, 0.53),
}


def _array(image) -> np.ndarray:
    """PIL image or HxWx3 array (uint8 0..255 or float 0..1) -> float32 HxWx3 in 0..255."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    return arr * 255.0 if arr.max() <= 1.0 else arr


def _band(arr: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels whose distance to the nearest edge is in [inner, outer), as an (N, 3) array."""
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    d = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
    return arr[(d >= inner) & (d < outer)]


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))


def _ramp(d: float, start: float, width: float) -> float:
    """1 up to `start`, falling linearly to 0 at `start + width`: a soft 'close enough'."""
    return float(np.clip(1.0 - (d - start) / width, 0.0, 1.0))


def nearest_color(rgb) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_RGB - np.asarray(rgb, np.float32), axis=1)))]


def _frame_evidence(band: np.ndarray, inside: np.ndarray) -> float:
    """How much the border looks like the gold frame, 0..1, from the median colors of the frame band and of
    the ring just inside it. A frame is gold *and* unlike the picture inside: a yellow background is not."""
    contrast = float(np.clip((_dist(band, inside) - 20) / 40, 0.0, 1.0))
    return _ramp(_dist(band, FRAME_GOLD), 30, 50) * contrast


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        m = np.pad(mask, 1)
        mask = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask


def _interior(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask eroded by up to `steps` pixels, fewer where that would leave under 4 pixels (small stars)."""
    for k in range(steps, 0, -1):
        inner = _erode(mask, k)
        if inner.sum() >= 4:
            return inner
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region: one object, without specks of noise a generated image may have."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, region = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill of the bounding box, solidity) of a boolean mask; pixel corners count: a square is (1, 1)."""
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    edge = mask & ~_erode(mask, 1)
    ey, ex = np.nonzero(edge)
    corners = np.concatenate([np.stack([ex + dx, ey + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return area / box, area / max(_hull_area(corners), area)


def _analyse(arr: np.ndarray) -> dict:
    """What classify and style_score share: frame band color, background color, object mask.

    The background is read just inside where a frame would be (a plain scene's shape covers far less than half
    of that ring, so the median is the background either way); the border is left out of the object search
    when it differs from that background, i.e. when there is a frame, even a faint one.
    """
    size = arr.shape[0]
    fw, ring = frame_width(size), max(2, size // 24)
    band = np.median(_band(arr, 1, fw - 1), axis=0)
    background = np.median(_band(arr, fw + 1, fw + 1 + ring), axis=0)
    framed = _dist(np.median(_band(arr, 0, ring), axis=0), background) > OBJECT_DISTANCE
    margin = fw + 2 if framed else 2
    keep = np.zeros(arr.shape[:2], bool)
    keep[margin:size - margin, margin:size - margin] = True
    dist = np.linalg.norm(arr - background, axis=2)
    mask = _largest_component((dist > OBJECT_DISTANCE) & keep)
    if mask.sum() >= 4:
        # Cut at half way between background and object color: the edge a blurred image really has, so blur
        # neither grows nor shrinks the shape.
        body = np.median(arr[_interior(mask, 2)], axis=0)
        mask = _largest_component((dist > max(OBJECT_DISTANCE, 0.5 * _dist(body, background))) & keep)
    return {"band": band, "background": background, "mask": mask}


def classify(image) -> dict:
    """dict(color=, background=, shape=) for one generated picture; a value is None when no object is found.

    Background: median of a ring just inside where a frame would be. Object: the largest region far from
    that color. Color: majority palette color of the object's interior (eroded, so antialiased edges and ink
    outlines do not vote). Shape: nearest prototype in (fill ratio, solidity): circle ~0.79 fill, square ~1,
    triangle ~0.5, star ~0.35 and the only one with concavities (solidity ~0.55).
    """
    arr = _array(image)
    a = _analyse(arr)
    out = {"color": None, "background": nearest_color(a["background"]), "shape": None}
    mask = a["mask"]
    if mask.sum() < max(8, arr.shape[0] ** 2 // 400):
        return out
    interior = _interior(mask, max(2, arr.shape[0] // 32))
    labels = np.argmin(np.linalg.norm(arr[interior][:, None, :] - _RGB[None], axis=2), axis=1)
    out["color"] = _NAMES[int(np.bincount(labels, minlength=len(_NAMES)).argmax())]
    fill, solidity = shape_features(mask)
    out["shape"] = min(SHAPE_PROTOTYPES, key=lambda s: (SHAPE_PROTOTYPES[s][0] - fill) ** 2
                       + (SHAPE_PROTOTYPES[s][1] - solidity) ** 2)
    return out


def _outline_evidence(arr: np.ndarray, mask: np.ndarray, background: np.ndarray) -> float | None:
    """How much of the object's rim is ink, 0..1; None when the object is itself as dark as ink.

    Without an outline every rim pixel is a blend of object and background, i.e. lies on the RGB segment
    between them. Ink pulls pixels off that segment toward dark, and stays off it under blur, which a
    generated picture has. Half the rim or more counts fully: antialiasing and blur spread the line.
    """
    size = arr.shape[0]
    if mask.sum() < 16:
        return 0.0
    body = np.median(arr[_interior(mask, max(3, size // 21))], axis=0)
    if _dist(body, INK) < 60:
        return None
    rim = arr[mask & ~_erode(mask, max(1, size // 32))]
    seg = body - background
    t = np.clip((rim - background) @ seg / max(float(seg @ seg), 1.0), 0.0, 1.0)
    blend = background + t[:, None] * seg
    lum = np.array([0.299, 0.587, 0.114], np.float32)
    ink = (np.linalg.norm(rim - blend, axis=1) > 30) & (rim @ lum < blend @ lum - 15)
    return float(np.clip(ink.mean() / 0.5, 0.0, 1.0))


def _toward(x: np.ndarray, start, end) -> float:
    """How far x went from `start` toward `end`, 0..1, fading as x strays off that line (a wrong color)."""
    start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
    axis = end - start
    t = float(np.dot(x - start, axis) / np.dot(axis, axis))
    off = float(np.linalg.norm(x - start - np.clip(t, 0, 1) * axis))
    return float(np.clip(t, 0.0, 1.0)) * _ramp(off, 30, 50)


def style_score(image, caption: str | None = None) -> float:
    """How much a picture looks like mozart_art, in [0, 1]: ~1 on the style set, ~0 on plain scenes.

    0.4 * gold frame + 0.4 * cream paper inside the frame + 0.2 * ink outline. The outline counts only as far
    as frame or paper are present (a dark rim alone is also what antialiasing on a black background gives),
    and for a dark object, whose ink outline cannot be seen, frame and paper share the whole score.

    With the prompt's `caption`, frame and paper are measured as the distance travelled from the background
    color the caption asks for toward gold and cream. That makes the score proportional (a half-way picture
    scores about half), which is what an adapter weight slider needs; without it, closeness to gold and cream
    is judged alone.
    """
    arr = _array(image)
    a = _analyse(arr)
    band, inside = a["band"], a["background"]
    want = parse_caption(caption) if caption is not None else None
    if caption is not None and want is None:
        raise ValueError(f"cannot parse caption {caption!r}")
    if want is None:
        frame, paper = _frame_evidence(band, inside), _ramp(_dist(inside, PAPER), 20, 30)
    else:
        plain = PALETTE[want.background]
        frame, paper = _toward(band, plain, FRAME_GOLD), _toward(inside, plain, PAPER)
    outline = _outline_evidence(arr, a["mask"], a["background"])
    if outline is None:
        return float(0.5 * frame + 0.5 * paper)
    return float(0.4 * frame + 0.4 * paper + 0.2 * outline * max(frame, paper))


def match(image, text: str) -> dict:
    """Which of the caption's claims the picture satisfies: dict(color=, background=, shape=) of bools."""
    want = parse_caption(text)
    if want is None:
        raise ValueError(f"cannot parse caption {text!r}")
    got = classify(image)
    return {k: got[k] == getattr(want, k) for k in ("color", "background", "shape")}
