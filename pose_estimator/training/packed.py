"""Packed training data: the arm regions of a dataset, small enough to travel, sampled and augmented on the GPU.

A generated dataset holds full 640x480 PNG frames (about 0.5 MB each), far
more than a training machine elsewhere may receive, and decoding, cropping
and augmenting them on a few CPU cores cannot feed a GPU. ``pose-estimator
pack`` keeps, for every frame, only what training looks at:

* ``arm``: a WebP (or JPEG) of the region around where the *measured* joints put the arm
  (the estimator's kinematic region of interest, enlarged by ``context`` so
  that the crop jitter of training stays inside it), at ``size`` px;
* ``full``: a WebP (or JPEG) of the whole frame at ``full_size`` px (the estimator's
  first frame, before it knows where the camera is);
* each one's affine (packed px -> image px), the keypoint targets, camera,
  measured joints, poses, and the kinematic keypoint projections.

Everything sits in one ``pack.npz`` (plain arrays, read with
``allow_pickle=False``) beside a ``pack.json`` that describes it.

:class:`PackedData` decodes a pack once onto the training device and draws
batches there: the crop of each sample (the same kinematic region as at run
time, jittered in scale and position as :class:`~pose_estimator.training.data.AugmentConfig`
says) is one bilinear resampling of the packed image, and colour, blur, noise,
occlusion and channel-order augmentation are tensor operations. Its batches
are the dicts of :func:`pose_estimator.training.data.collate`, so every loss
works on either source. Randomness comes from the numpy generator the
training loop hands it per step, so runs stay deterministic and resumable.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..estimator import kinematic_roi
from ..keypoints import gaussian_targets, heatmap_to_input_affine
from ..preprocess import MEAN, STD, Preprocessor, compose_affine, full_frame_roi, invert_affine, roi_affine
from ..robot import RobotModel
from ..sim.dataset import SyntheticDataset
from .data import AugmentConfig, heatmap_targets, jitter_roi, kinematic_uv, sample_pairs, truth_weights

__all__ = ["PACK_VERSION", "is_pack", "pack_datasets", "PackedData"]

PACK_VERSION = 1


def is_pack(root: str | os.PathLike) -> bool:
    return (Path(root) / "pack.json").is_file()


def _pad_dist(dist) -> np.ndarray:
    """Distortion coefficients zero-padded to 14 (OpenCV's longest model; zeros change nothing)."""
    d = np.asarray(dist, dtype=np.float64).ravel()
    if len(d) > 14:
        raise ValueError(f"{len(d)} distortion coefficients; OpenCV models have at most 14")
    return np.pad(d, (0, 14 - len(d)))


def pack_datasets(roots: list[str | os.PathLike], robot: RobotModel, out: str | os.PathLike, size: int = 192,
                  context: float = 1.5, full_size: int = 128, quality: int = 90, full_quality: int = 75,
                  image_format: str = "webp", roi_margin: float = 0.25, frame_step: int = 1, workers: int = 2,
                  progress: bool = True) -> dict:
    """Pack datasets into ``out`` (``pack.npz`` + ``pack.json``); returns the description.

    ``frame_step`` keeps every n-th frame of each sequence (consecutive frames of
    one scene add less than new scenes). Square regions: the network's input is square. Frames whose arm is not in
    view are packed with their whole frame only (``arm_ok`` false).
    """
    if size < 16 or full_size < 16 or context < 1.0 or not (1 <= quality <= 100 and 1 <= full_quality <= 100):
        raise ValueError("size and full_size must be >= 16, context >= 1, qualities in 1..100")
    if image_format not in ("webp", "jpg"):
        raise ValueError(f"image_format must be 'webp' or 'jpg', got {image_format!r}")
    out = Path(out)
    datasets = [SyntheticDataset(r) for r in roots]
    for ds in datasets:
        if ds.keypoint_names != robot.keypoint_names:
            raise ValueError(f"dataset {ds.root} has keypoints {ds.keypoint_names}, robot has {robot.keypoint_names}")
    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    jobs = [(d, s, i) for d, ds in enumerate(datasets) for s, seq in enumerate(ds.sequences())
            for i in range(0, len(seq), frame_step)]
    pre_arm, pre_full = Preprocessor((size, size)), Preprocessor((full_size, full_size))
    flag = cv2.IMWRITE_WEBP_QUALITY if image_format == "webp" else cv2.IMWRITE_JPEG_QUALITY

    def enc(im: np.ndarray, q: int) -> np.ndarray:
        ok, buf = cv2.imencode("." + image_format, np.ascontiguousarray(im[:, :, ::-1]), [flag, int(q)])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {image_format}")
        return np.frombuffer(buf.tobytes(), np.uint8)

    def one(job):
        d, s, i = job
        f = datasets[d].sequences()[s].frame(i)
        q = f.joints_measured
        qt = torch.as_tensor(q)[None]
        P_base = robot.keypoints_3d(qt)[0].numpy()
        T_be = robot.ee_pose(qt)[0].numpy()
        uv_kin = kinematic_uv(f, P_base)
        roi = kinematic_roi(uv_kin, f.width, f.height, roi_margin, 1.0)
        if roi is not None:
            x0, y0, x1, y1 = roi
            cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * context
            arm, A_arm = pre_arm.crop(f.image, (cx - half, cy - half, cx + half, cy + half))
        else:
            arm, A_arm = np.zeros((size, size, 3), np.uint8), np.zeros((2, 3))
        full, A_full = pre_full.crop(f.image, None)
        kp = f.keypoints_2d.copy()
        return {
            "arm": enc(arm, quality), "full": enc(full, full_quality), "A_arm": A_arm, "A_full": A_full,
            "arm_ok": roi is not None, "roi": np.asarray(roi if roi is not None else (np.nan,) * 4, float),
            "kp_img": kp, "kp_visible": f.keypoints_visible.astype(bool), "uv_kin": uv_kin,
            "K": f.K, "dist": _pad_dist(f.dist),
            "size": (f.width, f.height), "joints": q, "ee_pose": f.ee_pose_camera, "ee_kin": f.T_camera_base @ T_be,
            "camera_from_base": f.T_camera_base, "seq": s, "dataset": d, "frame": i,
        }

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="pack", dynamic_ncols=True)
    rows = []
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for r in ex.map(one, jobs):
            rows.append(r)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if not rows:
        raise ValueError(f"no frames in {roots}")
    seq_ids: dict[tuple[int, int], int] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in ("arm", "full"):
        blobs = [r[name] for r in rows]
        arrays[name] = np.concatenate(blobs)
        arrays[name + "_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    for name in ("A_arm", "A_full", "arm_ok", "roi", "kp_img", "kp_visible", "uv_kin", "K", "dist", "size", "joints",
                 "ee_pose", "ee_kin", "camera_from_base", "frame"):
        arrays[name] = np.stack([np.asarray(r[name]) for r in rows])
    arrays["seq"] = np.array([seq_ids.setdefault((r["dataset"], r["seq"]), len(seq_ids)) for r in rows], np.int64)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "pack.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out / "pack.npz")
    meta = {"format_version": PACK_VERSION, "keypoint_names": robot.keypoint_names, "size": size,
            "full_size": full_size, "context": context, "roi_margin": roi_margin, "image_format": image_format,
            "quality": quality, "full_quality": full_quality, "frame_step": frame_step,
            "frames": len(rows), "arm_frames": int(arrays["arm_ok"].sum()), "sequences": len(seq_ids),
            "sources": [str(Path(r)) for r in roots], "bytes": int((out / "pack.npz").stat().st_size)}
    tmp = out / "pack.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "pack.json")
    return meta


def _decode_all(blob: np.ndarray, offsets: np.ndarray, workers: int) -> np.ndarray:
    def dec(i):
        im = cv2.imdecode(blob[offsets[i]:offsets[i + 1]], cv2.IMREAD_COLOR)
        if im is None:
            raise ValueError(f"packed image {i} does not decode")
        return im[:, :, ::-1]

    with ThreadPoolExecutor(max(1, workers)) as ex:
        return np.stack(list(ex.map(dec, range(len(offsets) - 1))))


def _gaussian_kernel(sigma: float, k: int) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


class PackedData:
    """Packs on the training device, drawing augmented batches there (see the module docstring)."""

    def __init__(self, roots: list[str | os.PathLike], robot: RobotModel, input_size: tuple[int, int], stride: int,
                 augment: AugmentConfig | None = None, prior_sigma: float = 0.0, device: str | torch.device = "cpu",
                 workers: int = 4):
        self.robot = robot
        self.aug = augment or AugmentConfig()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.stride = stride
        self.prior_sigma = prior_sigma
        self.device = torch.device(device)
        self.A_hm = heatmap_to_input_affine(stride)
        if self.aug.refine_prob > 0:
            raise ValueError("packs hold the arm's region at the pack's resolution, too coarse for the "
                             "end-effector refinement crop (augment.refine_prob > 0): train on the generated "
                             "datasets instead")
        if self.input_size[0] != self.input_size[1]:
            raise ValueError(f"packed data holds square regions; input_size must be square, got {self.input_size}")
        parts: dict[str, list[np.ndarray]] = {}
        arm, full = [], []
        seq_base = 0
        self.context = math.inf
        for r in roots:
            meta = json.loads((Path(r) / "pack.json").read_text())
            if meta.get("format_version") != PACK_VERSION:
                raise ValueError(f"{r}: pack format {meta.get('format_version')}, this version reads {PACK_VERSION}")
            if meta["keypoint_names"] != robot.keypoint_names:
                raise ValueError(f"pack {r} has keypoints {meta['keypoint_names']}, robot has {robot.keypoint_names}")
            if abs(meta["roi_margin"] - self.aug.roi_margin) > 1e-9:
                raise ValueError(f"pack {r} was cut with roi_margin {meta['roi_margin']}, training uses "
                                 f"{self.aug.roi_margin}: re-pack or change augment.roi_margin")
            self.context = min(self.context, float(meta["context"]))
            with np.load(Path(r) / "pack.npz", allow_pickle=False) as z:
                arm.append(_decode_all(z["arm"], z["arm_offsets"], workers))
                full.append(_decode_all(z["full"], z["full_offsets"], workers))
                if arm[-1].shape[1:] != arm[0].shape[1:] or full[-1].shape[1:] != full[0].shape[1:]:
                    raise ValueError(f"pack {r}: image sizes differ from the first pack's; pack them alike")
                for k in z.files:
                    if k in ("arm", "full", "arm_offsets", "full_offsets"):
                        continue
                    v = z[k]
                    parts.setdefault(k, []).append(v + seq_base if k == "seq" else v)
                seq_base = int(parts["seq"][-1].max()) + 1
        if not arm:
            raise ValueError("no packs given")
        self.meta = {k: np.concatenate(v) for k, v in parts.items()}
        to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(np.concatenate(a).transpose(0, 3, 1, 2))).to(self.device)
        self.arm = to_dev(arm)  # (N, 3, S, S) uint8
        self.full = to_dev(full)
        self.n = self.arm.shape[0]
        self._by_seq: dict[int, list[int]] = {}
        for j, s in enumerate(self.meta["seq"]):
            self._by_seq.setdefault(int(s), []).append(j)

    def __len__(self) -> int:
        return self.n

    def sample_pairs(self, rng: np.random.Generator, n_pairs: int, max_gap: int = 8) -> list[int]:
        return sample_pairs(self._by_seq, rng, n_pairs, max_gap)

    def _resample(self, src: torch.Tensor, A_in_src: np.ndarray) -> torch.Tensor:
        """Bilinear crops: output px (j, i) of sample b is src px A_in_src[b] @ (j, i, 1); zeros outside."""
        h, w = self.input_size
        Ssz = src.shape[-1]
        M = torch.as_tensor(A_in_src, dtype=torch.float32, device=self.device)  # (B, 2, 3)
        ys, xs = torch.meshgrid(torch.arange(h, device=self.device, dtype=torch.float32),
                                torch.arange(w, device=self.device, dtype=torch.float32), indexing="ij")
        P = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # (h, w, 3)
        g = torch.einsum("hwk,bjk->bhwj", P, M)
        g = (g + 0.5) / Ssz * 2 - 1  # align_corners=False: -1 and 1 are the outer pixel edges
        return F.grid_sample(src.float(), g, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _augment(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Colour, blur, occlusion, noise, channel order: per sample, as in the CPU path."""
        a, dev = self.aug, self.device
        B, _, h, w = x.shape
        t = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float32), device=dev)
        col = rng.random(B) < a.color_prob
        gain = rng.uniform(0.6, 1.4, (B, 1)) * rng.uniform(0.85, 1.15, (B, 3))
        bias = rng.uniform(-30, 30, (B, 1)) + rng.uniform(-10, 10, (B, 3))
        sat = rng.uniform(0.6, 1.3, B)
        gain[~col], bias[~col], sat[~col] = 1.0, 0.0, 1.0
        grey = x.mean(1, keepdim=True)
        x = grey + t(sat)[:, None, None, None] * (x - grey)
        x = x * t(gain)[:, :, None, None] + t(bias)[:, :, None, None]
        blur = rng.random(B) < a.blur_prob
        ksize = rng.choice([3, 5], B)
        for k in (3, 5):
            sel = np.nonzero(blur & (ksize == k))[0]
            if len(sel):
                g = _gaussian_kernel(0.3 * ((k - 1) * 0.5 - 1) + 0.8, k).to(dev)  # OpenCV's sigma for this size
                y = x[sel].reshape(-1, 1, h, w)
                y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k))
                y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1))
                x[sel] = y.reshape(len(sel), 3, h, w)
        occ = rng.random(B) < a.occlusion_prob
        ow, oh = (rng.uniform(0.1, 0.35, B) * w).astype(int), (rng.uniform(0.1, 0.35, B) * h).astype(int)
        ox, oy = (rng.random(B) * (w - ow)).astype(int), (rng.random(B) * (h - oh)).astype(int)
        fill = rng.uniform(0, 255, (B, 3))
        for b in np.nonzero(occ)[0]:
            x[b, :, oy[b]:oy[b] + oh[b], ox[b]:ox[b] + ow[b]] = t(fill[b])[:, None, None]
        noisy = rng.random(B) < a.noise_prob
        if noisy.any():
            level = np.where(noisy, rng.uniform(2, 10, B), 0.0)
            gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2**62)))
            x = x + torch.randn(x.shape, generator=gen, device=dev) * t(level)[:, None, None, None]
        flip = np.nonzero(rng.random(B) < a.flip_channels_prob)[0]
        if len(flip):
            x[flip] = x[flip].flip(1)
        return x.clamp(0, 255).floor()  # the CPU path's uint8 conversion truncates

    def batch(self, idx: list[int], rng: np.random.Generator, augment: bool = True) -> dict:
        """The samples ``idx`` as a :func:`~pose_estimator.training.data.collate` batch (image on the device)."""
        a, m = self.aug, self.meta
        h, w = self.input_size
        idx = np.asarray(idx, dtype=np.int64)
        B = len(idx)
        A_in = np.zeros((B, 2, 3))
        A_src = np.zeros((B, 2, 3))
        use_full = ~m["arm_ok"][idx]
        if augment:
            use_full |= rng.random(B) < a.full_frame_prob
        scale = np.exp(rng.normal(0, a.roi_scale_log_std, B)) if augment else np.ones(B)
        shift = rng.uniform(-1, 1, (B, 2)) * a.roi_shift if augment else np.zeros((B, 2))
        # The jittered crop must stay inside the packed region (its size is `context` times the region).
        scale = np.clip(scale, 1 / self.context, self.context - 2 * a.roi_shift)
        for b, j in enumerate(idx):
            W, H = m["size"][j]
            if use_full[b]:
                A_in[b] = roi_affine(full_frame_roi(W, H, w / h), (h, w))
                A_src[b] = compose_affine(invert_affine(m["A_full"][j]), A_in[b])
            else:
                A_in[b] = roi_affine(jitter_roi(m["roi"][j], scale[b], shift[b]), (h, w))
                A_src[b] = compose_affine(invert_affine(m["A_arm"][j]), A_in[b])
        idx_t = torch.as_tensor(idx, device=self.device)
        x = torch.empty(B, 3, h, w, device=self.device)
        fb, ab = np.nonzero(use_full)[0], np.nonzero(~use_full)[0]
        if len(fb):
            x[torch.as_tensor(fb, device=self.device)] = self._resample(self.full[idx_t[fb]], A_src[fb])
        if len(ab):
            x[torch.as_tensor(ab, device=self.device)] = self._resample(self.arm[idx_t[ab]], A_src[ab])
        if augment:
            x = self._augment(x, rng)
        mean = torch.as_tensor(MEAN, device=self.device)[None, :, None, None]
        std = torch.as_tensor(STD, device=self.device)[None, :, None, None]
        x = (x / 255.0 - mean) / std
        if self.prior_sigma > 0:
            uv_in = np.full((B, self.robot.num_keypoints, 2), np.nan)
            keep = ~use_full
            if augment:
                keep &= rng.random(B) >= a.prior_drop_prob
            for b in np.nonzero(keep)[0]:
                uv_in[b] = (m["uv_kin"][idx[b]] - A_in[b][:, 2]) @ np.linalg.inv(A_in[b][:, :2]).T
                if augment:
                    uv_in[b] += rng.normal(0, a.prior_shift_std, 2)
            maps = gaussian_targets(torch.as_tensor(uv_in, device=self.device), (h, w), self.prior_sigma,
                                    normalize=False).float()
            x = torch.cat([x, maps], 1)
        A = np.stack([compose_affine(A_in[b], self.A_hm) for b in range(B)])  # heat-map px -> image px
        kp_img = m["kp_img"][idx]
        kp_hm, weight = heatmap_targets(kp_img, truth_weights(kp_img, m["kp_visible"][idx]), A,
                                        (h // self.stride, w // self.stride))
        d = lambda v: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float64)
        return {
            "image": x, "affine": d(A), "kp_hm": d(kp_hm), "kp_img": d(kp_img), "kp_weight": d(weight),
            "K": d(m["K"][idx]), "dist": d(m["dist"][idx]), "joints": d(m["joints"][idx]),
            "ee_pose": d(m["ee_pose"][idx]), "ee_kin": d(m["ee_kin"][idx]),
            "camera_from_base": d(m["camera_from_base"][idx]), "pose_weight": torch.ones(B, dtype=torch.float64),
            "size": [tuple(int(v) for v in m["size"][j]) for j in idx], "seq": [int(m["seq"][j]) for j in idx],
            "frame": [int(m["frame"][j]) for j in idx],
        }
