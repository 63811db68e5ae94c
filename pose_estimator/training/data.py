"""Training samples: a kinematics-guided crop of a dataset frame, its targets, and augmentation.

The crop is chosen exactly as the estimator chooses it at run time
(:func:`pose_estimator.estimator.kinematic_roi` around the keypoints that the
*measured* joints project to), then jittered in scale and position, and now
and then replaced by the whole frame (the estimator's first frame, before it
knows where the camera is). The same :class:`~pose_estimator.preprocess.Preprocessor`
produces the network input, so training and run time agree to the pixel.

A network with kinematic-prior inputs also gets one Gaussian map per keypoint
where the measured joints project it (empty for whole frames: at run time the
estimator has no prior before it knows where the camera is).

Targets per keypoint come from one of two sources:

``truth``
    the dataset's keypoint projections (a simulator knows them);
``labels``
    the self-made labels of :mod:`pose_estimator.groundtruth` (fiducial or
    interpolated end-effector poses with covariances): the rigid (hand)
    keypoints are projected from the labelled pose; the weight of each sample
    is the inverse of the label's position variance relative to a reference,
    so uncertain labels count less. Frames without a label are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..estimator import kinematic_roi, refine_roi
from ..keypoints import heatmap_to_input_affine, prior_maps
from ..preprocess import Preprocessor, compose_affine, full_frame_roi
from ..robot import RobotModel
from ..sim.dataset import SyntheticDataset, pose7_to_matrix

__all__ = ["AugmentConfig", "TrainingData", "Sample", "collate", "sample_pairs", "jitter_roi", "truth_weights",
           "heatmap_targets"]


@dataclass
class AugmentConfig:
    """Augmentation and crop jitter (all probabilities per sample)."""

    roi_margin: float = 0.25
    roi_scale_log_std: float = 0.15  # log-normal jitter of the crop size
    roi_shift: float = 0.08  # uniform shift, fraction of the crop size
    full_frame_prob: float = 0.1
    color_prob: float = 0.8
    blur_prob: float = 0.15
    noise_prob: float = 0.3
    occlusion_prob: float = 0.25
    flip_channels_prob: float = 0.1  # BGR/RGB confusion in the wild
    prior_shift_std: float = 1.0  # kinematic-prior maps: normal shift of all of them, input px (extrinsic error)
    prior_drop_prob: float = 0.1  # kinematic-prior maps: left empty (a frame without a camera seed)
    #: share of samples cropped around the end effector instead of the whole arm (the estimator's
    #: refinement crop: :func:`~pose_estimator.estimator.refine_roi`); 0: whole-arm crops only
    refine_prob: float = 0.0
    #: margin of that crop around the end effector's rigid keypoints, as a fraction of their box
    refine_margin: float = 0.5


@dataclass
class Sample:
    image: torch.Tensor  # (3 [+ K prior maps], h, w) normalised
    affine: np.ndarray  # (2, 3) heat-map px -> image px
    kp_hm: np.ndarray  # (K, 2) targets in heat-map px (NaN: none)
    kp_img: np.ndarray  # (K, 2) targets in image px (NaN: none)
    kp_weight: np.ndarray  # (K,)
    K: np.ndarray
    dist: np.ndarray
    size: tuple[int, int]  # (w, h)
    joints: np.ndarray  # measured
    ee_pose: np.ndarray  # (4, 4) target T_camera_ee
    ee_in_camera_kin: np.ndarray  # (4, 4) kinematic T_camera_ee (measured joints, true camera)
    camera_from_base: np.ndarray  # (4, 4) the extrinsic (seed of the articulated solver)
    pose_weight: float
    seq: int
    frame: int


def collate(samples: list[Sample]) -> dict:
    f = lambda name, dt=torch.float64: torch.as_tensor(np.stack([getattr(s, name) for s in samples]), dtype=dt)
    return {
        "image": torch.stack([s.image for s in samples]),
        "affine": f("affine"), "kp_hm": f("kp_hm"), "kp_img": f("kp_img"), "kp_weight": f("kp_weight"),
        "K": f("K"), "dist": f("dist"), "joints": f("joints"), "ee_pose": f("ee_pose"),
        "ee_kin": f("ee_in_camera_kin"), "camera_from_base": f("camera_from_base"), "pose_weight": torch.tensor([s.pose_weight for s in samples],
                                                                      dtype=torch.float64),
        "size": [s.size for s in samples], "seq": [s.seq for s in samples], "frame": [s.frame for s in samples],
    }


def kinematic_uv(frame, P_base: np.ndarray) -> np.ndarray:
    """Keypoints (base frame, (K, 3)) projected into a dataset frame with its extrinsic; NaN behind the camera."""
    T_cb = frame.T_camera_base
    Pc = P_base @ T_cb[:3, :3].T + T_cb[:3, 3]
    uv = cv2.projectPoints(P_base, cv2.Rodrigues(T_cb[:3, :3])[0], T_cb[:3, 3], frame.K, frame.dist)[0][:, 0]
    uv[Pc[:, 2] < 0.05] = np.nan
    return uv


def jitter_roi(roi, scale: float, shift: tuple[float, float]) -> tuple[float, float, float, float]:
    """The box ``roi`` (x0, y0, x1, y1) moved by ``shift`` (fractions of its size) and scaled about its centre."""
    x0, y0, x1, y1 = roi
    bw, bh = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2 + shift[0] * bw, (y0 + y1) / 2 + shift[1] * bh
    bw, bh = bw * scale, bh * scale
    return (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)


def truth_weights(kp_img: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Weights of the simulator's keypoint targets: 1 seen, 0.5 occluded (it is still where it is), 0 none."""
    weight = np.where(visible, 1.0, 0.5)
    weight[~np.isfinite(kp_img).all(-1)] = 0.0
    return weight


def heatmap_targets(kp_img: np.ndarray, weight: np.ndarray, A: np.ndarray,
                    heatmap_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (..., K, 2) image px -> heat-map px through ``A`` (..., 2, 3: heat-map px -> image px),
    and the weights with those outside the heat map (h, w) set to zero."""
    kp_hm = np.einsum("...kj,...ij->...ki", kp_img - A[..., None, :, 2], np.linalg.inv(A[..., :2]))
    hh, hw = heatmap_size
    inside = (kp_hm[..., 0] > -0.5) & (kp_hm[..., 0] < hw - 0.5) & (kp_hm[..., 1] > -0.5) & (kp_hm[..., 1] < hh - 0.5)
    return kp_hm, np.where(inside, weight, 0.0)


def sample_pairs(by_seq: dict, rng: np.random.Generator, n_pairs: int, max_gap: int = 8) -> list[int]:
    """``n_pairs`` pairs of sample indices (consecutive entries), each two frames of one sequence
    (``by_seq``: sequence -> its sample indices in frame order), a sequence drawn uniformly."""
    out: list[int] = []
    keys = list(by_seq)
    for _ in range(n_pairs):
        members = by_seq[keys[int(rng.integers(len(keys)))]]
        a = int(rng.integers(len(members)))
        step = int(rng.integers(1, max_gap + 1)) * (1 if rng.random() < 0.5 else -1)
        b = a + step if 0 <= a + step < len(members) else a - step  # never the same frame twice
        b = int(np.clip(b, 0, len(members) - 1))
        out += [members[a], members[b]]
    return out


def _augment(crop: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    img = crop.astype(np.float32)
    if rng.random() < cfg.color_prob:
        gain = rng.uniform(0.6, 1.4) * rng.uniform(0.85, 1.15, size=3)
        bias = rng.uniform(-30, 30) + rng.uniform(-10, 10, size=3)
        grey = img.mean(2, keepdims=True)
        sat = rng.uniform(0.6, 1.3)
        img = grey + sat * (img - grey)
        img = img * gain + bias
    if rng.random() < cfg.blur_prob:
        k = int(rng.choice([3, 5]))
        img = cv2.GaussianBlur(img, (k, k), 0)
    if rng.random() < cfg.occlusion_prob:
        h, w = img.shape[:2]
        ow, oh = int(rng.uniform(0.1, 0.35) * w), int(rng.uniform(0.1, 0.35) * h)
        x0, y0 = int(rng.integers(0, w - ow)), int(rng.integers(0, h - oh))
        img[y0:y0 + oh, x0:x0 + ow] = rng.uniform(0, 255, size=3)
    if rng.random() < cfg.noise_prob:
        img = img + rng.normal(0, rng.uniform(2, 10), size=img.shape).astype(np.float32)
    if rng.random() < cfg.flip_channels_prob:
        img = img[:, :, ::-1]
    return np.clip(img, 0, 255).astype(np.uint8)


class TrainingData:
    """Index and sampler over one or more generated datasets."""

    def __init__(self, roots: list[str | Path], robot: RobotModel, input_size: tuple[int, int], stride: int,
                 labels: str = "truth", augment: AugmentConfig | None = None, prior_sigma: float = 0.0):
        if labels not in ("truth", "labels"):
            raise ValueError(f"labels must be 'truth' or 'labels', got {labels!r}")
        #: > 0: whole-arm inputs carry the kinematic prior, one map per keypoint of this width (input px)
        self.prior_sigma = prior_sigma
        self.datasets = [SyntheticDataset(r) for r in roots]
        self.robot = robot
        self.labels = labels
        self.aug = augment or AugmentConfig()
        self.pre = Preprocessor(input_size)
        self.input_size = input_size
        self.A_hm = heatmap_to_input_affine(stride)
        self.stride = stride
        for ds in self.datasets:
            if ds.keypoint_names != robot.keypoint_names:
                raise ValueError(f"dataset {ds.root} has keypoints {ds.keypoint_names}, robot has "
                                 f"{robot.keypoint_names}")
        self.rigid = robot.definition.rigid_indices()
        # (dataset, sequence, frame, label or None)
        self.index: list[tuple[int, int, int, dict | None]] = []
        self.sequences: list[tuple[int, int]] = []
        for d, ds in enumerate(self.datasets):
            for s, seq in enumerate(ds.sequences()):
                lab = self._read_labels(seq.path) if labels == "labels" else None
                self.sequences.append((d, s))
                for i in range(len(seq)):
                    if lab is not None and (i >= len(lab) or lab[i] is None):
                        continue
                    self.index.append((d, s, i, None if lab is None else lab[i]))
        if not self.index:
            raise ValueError(f"no usable frames in {roots} (labels={labels})")
        self._seq_number = {key: n for n, key in enumerate(self.sequences)}
        self._by_seq: dict[tuple[int, int], list[int]] = {}
        for j, (d, s, _, _) in enumerate(self.index):
            self._by_seq.setdefault((d, s), []).append(j)

    @staticmethod
    def _read_labels(seq_path: Path) -> list[dict | None]:
        p = Path(seq_path) / "labels.jsonl"
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run `pose-estimator label` on the dataset first")
        out: list[dict | None] = []
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            ok = r.get("source") in ("fiducial", "interpolated") and r.get("ee_pose_camera") is not None
            out.append(r if ok else None)
        return out

    def __len__(self) -> int:
        return len(self.index)

    def sample_pairs(self, rng: np.random.Generator, n_pairs: int, max_gap: int = 8) -> list[int]:
        """Indices of ``n_pairs`` pairs (consecutive entries), each two frames of one sequence."""
        return sample_pairs(self._by_seq, rng, n_pairs, max_gap)

    def _arm_crop(self, f, P_base: np.ndarray, rng: np.random.Generator, augment: bool):
        """One crop around the arm -> (input (3 [+ K], h, w), heat-map px -> image px affine (2, 3))."""
        W, H = f.width, f.height
        h, w = self.input_size
        aspect = w / h
        roi = None
        uv_kin = kinematic_uv(f, P_base)
        if augment and self.aug.refine_prob > 0 and rng.random() < self.aug.refine_prob:
            roi = refine_roi(uv_kin, self.rigid, W, H, self.aug.refine_margin, aspect)
        if roi is None and not (augment and rng.random() < self.aug.full_frame_prob):
            roi = kinematic_roi(uv_kin, W, H, self.aug.roi_margin, aspect)
        with_prior = roi is not None  # the estimator knows where the arm is only with a camera seed
        if roi is None:
            roi = full_frame_roi(W, H, aspect)
        elif augment:
            sc = float(np.exp(rng.normal(0, self.aug.roi_scale_log_std)))
            shift = self.aug.roi_shift
            roi = jitter_roi(roi, sc, (rng.uniform(-1, 1) * shift, rng.uniform(-1, 1) * shift))
        crop, A_in = self.pre.crop(f.image, roi)
        if augment:
            crop = _augment(crop, rng, self.aug)
        x = self.pre.normalize(crop)
        if self.prior_sigma > 0:
            uv_in = np.full((self.robot.num_keypoints, 2), np.nan)
            if with_prior and not (augment and rng.random() < self.aug.prior_drop_prob):
                uv_in = (uv_kin - A_in[:, 2]) @ np.linalg.inv(A_in[:, :2]).T
                if augment:
                    uv_in = uv_in + rng.normal(0, self.aug.prior_shift_std, 2)
            x = torch.cat([x, prior_maps(uv_in, self.input_size, self.prior_sigma)])
        A = compose_affine(A_in, self.A_hm)  # heat-map px -> image px
        return x, A

    def load(self, j: int, rng: np.random.Generator, augment: bool = True) -> Sample:
        d, s, i, lab = self.index[j]
        seq = self.datasets[d].sequences()[s]
        f = seq.frame(i)
        T_cb = f.T_camera_base
        q = f.joints_measured
        qt = torch.as_tensor(q)[None]
        P_base = self.robot.keypoints_3d(qt)[0].numpy()
        T_be = self.robot.ee_pose(qt)[0].numpy()
        ee_kin = T_cb @ T_be
        W, H = f.width, f.height
        h, w = self.input_size
        x, A = self._arm_crop(f, P_base, rng, augment)

        if lab is None:
            kp_img = f.keypoints_2d.copy()
            weight = truth_weights(kp_img, f.keypoints_visible)
            ee_target = f.ee_pose_camera
            pose_weight = 1.0
        else:
            ee_target = pose7_to_matrix(lab["ee_pose_camera"])
            P_ee = self.robot.keypoints_in_ee(qt, self.rigid)[0].numpy()
            Pc = P_ee @ ee_target[:3, :3].T + ee_target[:3, 3]
            uv = cv2.projectPoints(Pc, np.zeros(3), np.zeros(3), f.K, f.dist)[0][:, 0]
            kp_img = np.full((self.robot.num_keypoints, 2), np.nan)
            kp_img[self.rigid] = uv
            weight = np.zeros(self.robot.num_keypoints)
            weight[self.rigid] = 1.0
            cov = np.asarray(lab.get("ee_covariance", np.eye(6) * 1e-6), dtype=np.float64).reshape(6, 6)
            sigma_mm = float(np.sqrt(np.trace(cov[:3, :3]) / 3)) * 1e3
            pose_weight = float(1.0 / (1.0 + (sigma_mm / 2.0) ** 2))
            weight *= pose_weight
        kp_hm, weight = heatmap_targets(kp_img, weight, A, (h // self.stride, w // self.stride))
        return Sample(image=x, affine=A, kp_hm=kp_hm, kp_img=kp_img, kp_weight=weight, K=f.K, dist=f.dist,
                      size=(W, H), joints=q, ee_pose=ee_target, ee_in_camera_kin=ee_kin,
                      camera_from_base=T_cb if lab is None else ee_target @ np.linalg.inv(T_be), pose_weight=pose_weight,
                      seq=self._seq_number[(d, s)], frame=i)
