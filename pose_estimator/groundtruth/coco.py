"""Human keypoint labels in COCO keypoint JSON (what CVAT, Label Studio, makesense.ai... export).

A COCO keypoint file has ``images`` (``id``, ``file_name``, ``width``,
``height``), ``annotations`` (``image_id``, ``category_id``, ``keypoints``
as a flat ``[x1, y1, v1, x2, y2, v2, ...]``, ``num_keypoints``) and
``categories`` (``id``, ``name``, ``keypoints``: the names, ``skeleton``).
``v`` is 0 (not labelled; x = y = 0), 1 (labelled, not visible) or 2
(labelled and visible).

Pixel convention: COCO tools put the image's top-left *corner* at (0, 0), so
the centre of pixel (0, 0) is (0.5, 0.5); this package puts the centre of
pixel (0, 0) at (0, 0) (OpenCV). :func:`load_coco_keypoints` subtracts
``pixel_offset`` (default 0.5) and :func:`write_coco_keypoints` adds it back.

Keypoint names are mapped onto the robot's: a category keypoint whose name is
a robot keypoint name maps to it; ``keypoint_map`` (``{coco_name: robot_name}``)
renames the others; names that map to nothing are ignored (and reported by
:func:`coco_unmapped_names`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["load_coco_keypoints", "write_coco_keypoints", "coco_unmapped_names", "parse_keypoint_map"]


def parse_keypoint_map(text: str | None) -> dict[str, str]:
    """``"a=b,c=d"`` -> ``{"a": "b", "c": "d"}``."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"keypoint map entry '{part}' is not COCO_NAME=ROBOT_NAME")
        a, b = part.split("=", 1)
        out[a.strip()] = b.strip()
    return out


def _read(path_or_data) -> dict:
    if isinstance(path_or_data, dict):
        return path_or_data
    p = Path(path_or_data)
    if not p.is_file():
        raise FileNotFoundError(f"COCO file not found: {p}")
    data = json.loads(p.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data or not isinstance(data[key], list):
            raise ValueError(f"{p}: not a COCO keypoint file (no '{key}' list)")
    return data


def coco_unmapped_names(coco, robot_keypoints: list[str], keypoint_map: dict[str, str] | None = None) -> list[str]:
    """Category keypoint names that map to no robot keypoint."""
    data = _read(coco)
    keypoint_map = keypoint_map or {}
    out = []
    for cat in data["categories"]:
        for name in cat.get("keypoints", []):
            if keypoint_map.get(name, name) not in robot_keypoints and name not in out:
                out.append(name)
    return out


def load_coco_keypoints(coco, robot_keypoints: list[str], keypoint_map: dict[str, str] | None = None,
                        pixel_offset: float = 0.5) -> dict[str, dict]:
    """Read COCO keypoint annotations and map them onto the robot's keypoint order.

    Returns ``{file_name: label}`` where ``label`` is a JSON-able dict
    ``{"names": robot_keypoints, "uv": [[u, v] | None, ...], "visible": [bool | None, ...],
    "labelled": [bool, ...], "source": "coco", "annotation_id": ...}`` with ``uv`` in this package's pixel
    convention. ``visible`` is True for v=2, False for v=1 and None when not labelled. Several annotations
    of one image (e.g. one per arm) keep the first; the others are ignored.
    """
    data = _read(coco)
    keypoint_map = keypoint_map or {}
    index = {n: i for i, n in enumerate(robot_keypoints)}
    cats = {}
    for cat in data["categories"]:
        names = list(cat.get("keypoints", []))
        cats[cat["id"]] = [index.get(keypoint_map.get(n, n)) for n in names]
    images = {img["id"]: img for img in data["images"]}
    K = len(robot_keypoints)
    out: dict[str, dict] = {}
    for ann in data["annotations"]:
        img = images.get(ann.get("image_id"))
        targets = cats.get(ann.get("category_id"))
        if img is None or targets is None or "keypoints" not in ann:
            continue
        name = img["file_name"]
        if name in out:
            continue
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        if len(kp) != len(targets):
            raise ValueError(f"annotation {ann.get('id')}: {len(kp)} keypoints, category has {len(targets)}")
        uv: list = [None] * K
        vis: list = [None] * K
        labelled = [False] * K
        for (x, y, v), j in zip(kp, targets):
            if j is None or v <= 0:
                continue
            uv[j] = [float(x - pixel_offset), float(y - pixel_offset)]
            vis[j] = bool(v >= 2)
            labelled[j] = True
        out[name] = {"names": list(robot_keypoints), "uv": uv, "visible": vis, "labelled": labelled,
                     "source": "coco", "annotation_id": ann.get("id")}
    return out


def write_coco_keypoints(path: str | os.PathLike, images: list[dict], keypoint_names: list[str],
                         category: str = "robot", pixel_offset: float = 0.5, skeleton: list | None = None) -> Path:
    """Write a COCO keypoint file.

    ``images``: one dict per image with ``file_name``, ``width``, ``height``, ``uv`` (K, 2) in this
    package's pixel convention (NaN or None = not labelled) and optional ``visible`` (K,) bool.
    """
    path = Path(path)
    out_images, anns = [], []
    for i, im in enumerate(images):
        out_images.append({"id": i + 1, "file_name": im["file_name"], "width": int(im["width"]),
                           "height": int(im["height"])})
        flat, n = [], 0
        vis = im.get("visible")
        for k in range(len(keypoint_names)):
            p = im["uv"][k]
            if p is None or not np.all(np.isfinite(np.asarray(p, dtype=np.float64))):
                flat += [0.0, 0.0, 0]
                continue
            v = 2 if vis is None or bool(vis[k]) else 1
            flat += [float(p[0]) + pixel_offset, float(p[1]) + pixel_offset, v]
            n += 1
        xs = [flat[3 * k] for k in range(len(keypoint_names)) if flat[3 * k + 2] > 0]
        ys = [flat[3 * k + 1] for k in range(len(keypoint_names)) if flat[3 * k + 2] > 0]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] if xs else [0, 0, 0, 0]
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "keypoints": flat, "num_keypoints": n,
                     "bbox": bbox, "area": float(bbox[2] * bbox[3]), "iscrowd": 0})
    data = {"images": out_images, "annotations": anns,
            "categories": [{"id": 1, "name": category, "supercategory": category,
                            "keypoints": list(keypoint_names), "skeleton": skeleton or []}]}
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path
