"""Image to network input: crop a region, resize, normalise — and remember the affine.

The same :class:`Preprocessor` runs in training and at run time, so the
network always sees the arm at the scale it learned. Every call returns the
2x3 affine that maps network-input pixels back to image pixels; with
:func:`pose_estimator.keypoints.heatmap_to_input_affine` it carries a
keypoint found in a heat map back to the camera image, covariance included.

Pixel convention everywhere: (x, y) = (column, row), the centre of pixel
(0, 0) at (0, 0).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

__all__ = ["Preprocessor", "compose_affine", "invert_affine", "full_frame_roi", "roi_affine", "to_rgb"]

#: per-channel normalisation of RGB in [0, 1]
MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32)


def compose_affine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 affine ``a ∘ b`` (apply b first)."""
    A = np.vstack([np.asarray(a, dtype=np.float64), [0.0, 0.0, 1.0]])
    B = np.vstack([np.asarray(b, dtype=np.float64), [0.0, 0.0, 1.0]])
    return (A @ B)[:2]


def invert_affine(a: np.ndarray) -> np.ndarray:
    A = np.vstack([np.asarray(a, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(A)[:2]


def full_frame_roi(width: int, height: int, aspect: float = 1.0) -> tuple[float, float, float, float]:
    """The smallest box of the given aspect (w/h) holding the whole image, centred (padded)."""
    w, h = float(width), float(height)
    if w / h > aspect:
        h = w / aspect
    else:
        w = h * aspect
    cx, cy = (width - 1) / 2 + 0.5, (height - 1) / 2 + 0.5
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def roi_affine(roi: Sequence[float], input_size: tuple[int, int]) -> np.ndarray:
    """Affine input px -> image px for a box (x0, y0, x1, y1) given in pixel-edge coordinates.

    The box's left edge is x0 (so the whole image is (0, 0, W, H)); input pixel
    j spans [x0 + j·sx, x0 + (j+1)·sx) and its centre maps to x0 + (j + ½)·sx − ½.
    """
    x0, y0, x1, y1 = (float(v) for v in roi)
    h, w = input_size
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    return np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) mono or (H, W, 1|3|4) -> (H, W, 3) uint8 RGB (an alpha channel is dropped)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {image.shape}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {image.dtype}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


class Preprocessor:
    """Crop ``roi`` out of an RGB image, resize it to ``input_size`` (h, w), normalise.

    Downscaling by more than 2x first halves the image with ``cv2.pyrDown``
    (a Gaussian pyramid) so the crop is not aliased; the returned affine
    accounts for it exactly. Regions beyond the image are filled with black.
    """

    def __init__(self, input_size: tuple[int, int] = (128, 128)):
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def crop(self, image: np.ndarray, roi: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (uint8 RGB crop (h, w, 3), affine 2x3 input px -> image px)."""
        image = to_rgb(image)
        H, W = image.shape[:2]
        h, w = self.input_size
        if roi is None:
            roi = full_frame_roi(W, H, w / h)
        x0, y0, x1, y1 = (float(v) for v in roi)
        if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
            raise ValueError(f"invalid region of interest {roi}")
        A = roi_affine(roi, self.input_size)
        src, level = image, 0
        while min(A[0, 0], A[1, 1]) / (2**level) > 2.0 and min(src.shape[:2]) >= 8:
            src = cv2.pyrDown(src)
            level += 1
        # pyrDown: pixel i of the smaller image is centred on pixel 2i of the larger.
        A_src = A / (2**level)
        M = invert_affine(A_src)  # input px <- src px ... warpAffine wants dst <- src
        crop = cv2.warpAffine(src, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(0, 0, 0))
        return crop, A

    def normalize(self, crop: np.ndarray) -> torch.Tensor:
        """uint8 (h, w, 3) RGB -> float32 tensor (3, h, w)."""
        x = (crop.astype(np.float32) / 255.0 - MEAN) / STD
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __call__(self, image: np.ndarray, roi: Sequence[float] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """-> (tensor (3, h, w), affine 2x3 mapping network-input px to image px)."""
        crop, A = self.crop(image, roi)
        return self.normalize(crop), A
