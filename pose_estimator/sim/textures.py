"""Procedural textures for backgrounds and distractor objects.

Cheap to make (a few ms at 320x256) and varied enough that a network cannot
learn the background: low-frequency colour noise, checkerboards, stripes,
gradients and blobs, each with random colours and a little pixel noise.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["KINDS", "procedural_texture"]

KINDS = ("noise", "checker", "stripes", "gradient", "blobs")


def _colors(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.uniform(0, 255, size=(k, 3))


def procedural_texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 (height, width, 3) texture of ``kind`` (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown texture kind '{kind}' (known: {KINDS})")
    h, w = height, width
    if kind == "noise":
        cells = int(rng.integers(2, 12))
        small = rng.uniform(0, 255, size=(cells, max(2, cells * w // max(h, 1)), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind in ("checker", "stripes"):
        period = rng.uniform(8, max(9, min(h, w) / 2))
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        if kind == "checker":
            b = (-xx * np.sin(angle) + yy * np.cos(angle)) / period
            sel = (np.floor(a) + np.floor(b)) % 2
        else:
            sel = np.floor(a) % 2
        c = _colors(rng, 2).astype(np.float32)
        img = c[0] * (1 - sel[..., None]) + c[1] * sel[..., None]
    elif kind == "gradient":
        c = _colors(rng, 2).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        img = c[0] * (1 - t[..., None]) + c[1] * t[..., None]
    else:  # blobs
        img = np.empty((h, w, 3), np.float32)
        img[:] = _colors(rng, 1)[0]
        for _ in range(int(rng.integers(5, 25))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(3, max(4, w // 4))), int(rng.integers(3, max(4, h // 4))))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                        tuple(float(v) for v in _colors(rng, 1)[0]), -1)
    img = img + rng.normal(0, rng.uniform(0, 12), size=(1, 1, 1)).astype(np.float32) \
        * rng.standard_normal((h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
