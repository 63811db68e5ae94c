"""Generate a synthetic dataset: rendered sequences of a sloppy arm with exact ground truth.

:func:`generate_dataset` plans the dataset, writes ``meta.json``, renders the
missing sequences (in parallel: one pybullet DIRECT client per worker
process), and writes ``COMPLETE`` last. Each sequence is rendered into a
hidden temporary folder and renamed into place when finished, so a crash
never leaves a half-written sequence looking complete, and re-running the
same command resumes: finished sequences are skipped.

Sequence i draws all of its randomness from ``SeedSequence(seed, spawn_key=(i,))``,
so its content does not depend on the number of workers, on the order in
which sequences finish, or on resuming.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .. import __version__
from .bag import BagRecorder
from .board import board_corners_3d
from .camera import SimCamera, look_at_optical, project_points, sample_intrinsics
from .config import GeneratorConfig, config_to_dict
from .dataset import FORMAT_VERSION, SEQUENCE_PREFIX, TMP_PREFIX, write_json_atomic
from .joint_errors import apply_joint_errors, sample_joint_errors
from .scene import LABEL_BACKGROUND, LABEL_BOARD, LABEL_OTHER, Lighting, RobotSpec, SimScene, matrix_to_pose7
from .textures import KINDS, procedural_texture
from .trajectory import sample_trajectory

__all__ = ["generate_dataset", "generate_sequence", "build_meta", "sequence_name", "default_workers"]

NOISE_PAD = 32  # the per-sequence noise field is this much larger than the image; frames take shifted windows
_WORKER: dict = {}  # per-process cache: the scene (pybullet client) is built once per worker


def sequence_name(index: int) -> str:
    return f"{SEQUENCE_PREFIX}{index:05d}"


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _texture_pool(seed: int, n: int = 8, size: int = 128) -> list[np.ndarray]:
    # Same pool in every worker (seeded by the dataset seed only), so which worker renders a
    # sequence cannot change what it looks like.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2 ** 32 - 1,)))
    return [procedural_texture(KINDS[i % len(KINDS)], size, size, rng) for i in range(n)]


def _joint_names(definition) -> list[str]:
    """The movable joints in :class:`~pose_estimator.robot.RobotModel` order (the order the estimator uses)."""
    from ..robot import RobotModel

    return RobotModel(definition).joint_names


def _scene(cfg: GeneratorConfig, definition, joint_names: list[str]) -> SimScene:
    if not isinstance(definition, RobotSpec):
        definition = RobotSpec.from_definition(definition)
    key = (definition, tuple(joint_names), json.dumps(config_to_dict(cfg.board), sort_keys=True), cfg.seed)
    if _WORKER.get("key") != key:
        _close_scene()
        _WORKER["scene"] = SimScene(definition, joint_names, cfg.board, _texture_pool(cfg.seed))
        _WORKER["key"] = key
    return _WORKER["scene"]


def _close_scene() -> None:
    scene = _WORKER.pop("scene", None)
    _WORKER.pop("key", None)
    if scene is not None:
        scene.close()


# --------------------------------------------------------------------------- meta
def build_meta(cfg: GeneratorConfig, definition, scene: SimScene) -> dict:
    """The dataset-level description written to ``meta.json``."""
    board = None
    if scene.board_spec is not None:
        same_body = scene.group[scene.board_entry] == scene.group[scene.ee_entry]
        T_ee_board = None
        if same_body:
            scene.set_joints(np.clip(np.zeros(len(scene.joint_names)), scene.joint_lower, scene.joint_upper))
            TL = scene.link_poses_world()
            T_ee_board = (np.linalg.inv(TL[scene.ee_entry]) @ TL[scene.board_entry] @ scene.T_link_board).tolist()
        board = {
            "spec": config_to_dict(cfg.board),
            "link": scene.link_names[scene.board_entry],
            "T_link_board": scene.T_link_board.tolist(),
            "T_ee_board": T_ee_board,
            "corners_3d": board_corners_3d(cfg.board).tolist(),
            "frame": "OpenCV ChArUco board frame: origin at the top-left outer corner, x along the columns, "
                     "y along the rows, z into the board (the printed face looks along -z)",
        }
    settings = config_to_dict(cfg)
    settings.pop("sequences")  # may grow between runs: sequence i does not depend on the count
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"name": "pose_estimator.sim", "version": __version__},
        "seed": cfg.seed,
        "sequences": cfg.sequences,
        "frames_per_sequence": cfg.frames_per_sequence,
        "robot": {
            "name": definition.name,
            "definition": cfg.robot,
            "urdf": definition.urdf,
            "base_link": definition.base_link,
            "end_effector": definition.end_effector,
            "keypoints": [{"name": k.name, "link": k.link, "offset": list(k.offset)} for k in definition.keypoints],
            "rigid_keypoints": list(definition.rigid_keypoints),
        },
        "joint_names": list(scene.joint_names),
        "joint_types": ["revolute" if r else "prismatic" for r in scene.revolute],
        "joint_lower": scene.joint_lower.tolist(),
        "joint_upper": scene.joint_upper.tolist(),
        "link_names": list(scene.link_names),
        "keypoint_names": definition.keypoint_names,
        "mask_labels": {str(k): v for k, v in sorted(scene.label_names().items())},
        "board": board,
        "joint_error_model": config_to_dict(cfg.joint_errors),
        "frames": {"base": definition.base_link, "camera": cfg.camera_frame},
        "conventions": {
            "poses": "[x, y, z, qx, qy, qz, qw], metres; T_a_b maps points from frame b to frame a",
            "camera": "optical frame (REP-103): z forward, x right, y down; sequence.json stores T_base_camera",
            "pixels": "(u, v) = (column, row), centre of pixel (0, 0) at (0.0, 0.0), distorted image",
            "stamps": "stamp = seconds (float), stamp_ns = integer nanoseconds; bag header stamps = log times",
        },
        "settings": settings,
    }


# ----------------------------------------------------------------------- sampling
def _random_in_cone(axis: np.ndarray, cone: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector within ``cone`` rad of ``axis``, uniform over the cap's area."""
    axis = axis / np.linalg.norm(axis)
    perp = np.cross(axis, rng.standard_normal(3))
    perp /= np.linalg.norm(perp)
    theta = math.acos(1 - rng.random() * (1 - math.cos(cone)))
    return math.cos(theta) * axis + math.sin(theta) * perp


def _sample_camera(cfg: GeneratorConfig, kp_w: np.ndarray, board_w: np.ndarray | None, T_w_base: np.ndarray,
                   rng: np.random.Generator):
    """Camera pose (T_world_camera) and intrinsics looking at the arm.

    kp_w (F, K, 3) keypoints and board_w (F, 4, 4) board poses over the sequence, world frame.
    """
    c = cfg.camera
    pts = kp_w.reshape(-1, 3)
    centre = pts.mean(0)
    R = T_w_base[:3, :3]
    up = R[:, 2]
    facing = board_w is not None and rng.random() < c.board_facing_probability
    best = None
    for attempt in range(60):
        d = rng.uniform(*c.distance)
        board_centre = None
        if facing and attempt < 40:
            i = int(rng.integers(len(board_w)))
            normal = -board_w[i, :3, 2]  # the printed face looks along -z_board
            board_centre = board_w[i, :3, :3] @ np.array([cfg.board.width / 2, cfg.board.height / 2, 0]) \
                + board_w[i, :3, 3]
            direction = _random_in_cone(normal, math.radians(c.board_facing_cone_deg), rng)
            el = math.degrees(math.asin(float(np.clip(direction @ up, -1, 1))))
            if not c.board_facing_elevation_deg[0] <= el <= c.board_facing_elevation_deg[1]:
                continue
            target = centre + rng.uniform(0, 1) * (board_centre - centre) + rng.normal(0, c.target_jitter, 3)
        else:
            target = centre + rng.normal(0, c.target_jitter, 3)
            el, az = math.radians(rng.uniform(*c.elevation_deg)), math.radians(rng.uniform(*c.azimuth_deg))
            direction = R @ np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        eye = target + d * direction
        T_wc = look_at_optical(eye, target, up=up, roll=math.radians(rng.normal(0, c.roll_std_deg)))
        cam = sample_intrinsics(c, cfg.width, cfg.height, d, rng)
        clearance = float(np.linalg.norm(pts - eye, axis=-1).min())
        T_cw = np.linalg.inv(T_wc)
        check = pts if board_centre is None else np.r_[pts, board_centre[None]]
        p_cam = (T_cw[:3, :3] @ check.T).T + T_cw[:3, 3]
        uv = project_points(p_cam, cam)
        inside = np.isfinite(uv).all(-1) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) \
            & (uv[:, 1] < cam.height) & (p_cam[:, 2] > c.near)
        if board_centre is None:
            ok = clearance >= c.min_clearance and inside.mean() >= c.min_in_view
        else:  # looking at the board: it must be in view, the arm may be half out of it
            ok = clearance >= c.min_clearance and bool(inside[-1]) and inside[:-1].mean() >= c.min_in_view / 2
        score = (ok, clearance >= c.min_clearance, float(inside.mean()))
        if best is None or score > best[0]:
            best = (score, T_wc, cam)
        if ok:
            break
    return best[1], best[2]


def _sample_lighting(cfg: GeneratorConfig, rng: np.random.Generator) -> Lighting:
    s = cfg.scene
    el, az = math.radians(rng.uniform(*s.light_elevation_deg)), rng.uniform(0, 2 * math.pi)
    direction = (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))
    color = tuple(float(v) for v in 1.0 - rng.uniform(0, 0.25, 3))
    return Lighting(direction, color, float(rng.uniform(*s.light_ambient)), float(rng.uniform(*s.light_diffuse)),
                    float(rng.uniform(*s.light_specular)), bool(rng.random() < s.shadow_probability))


def _random_quat(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    return q / np.linalg.norm(q)


def _place_distractors(scene: SimScene, cfg: GeneratorConfig, T_wc: np.ndarray, cam: SimCamera,
                       kp_w: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Primitives behind the arm (clutter) and, sometimes, one between camera and arm (occluder)."""
    scene.clear_distractors()
    s = cfg.scene
    out = []
    Kinv = np.linalg.inv(cam.K)
    p_cam = (np.linalg.inv(T_wc) @ np.c_[kp_w.reshape(-1, 3), np.ones(kp_w[..., 0].size)].T).T[:, :3]
    arm_depth = float(np.median(p_cam[:, 2]))

    def world_at(u, v, depth):
        ray = Kinv @ np.array([u, v, 1.0])
        return (T_wc @ np.r_[ray * depth, 1.0])[:3]

    def add(pos, size_scale, role):
        kind = str(rng.choice(["box", "sphere", "cylinder", "capsule"]))
        size = rng.uniform(0.3, 1.0, 3) * size_scale
        rgba = [float(v) for v in rng.uniform(0, 1, 3)] + [1.0]
        tex = int(rng.integers(0, len(scene.texture_ids))) if kind == "box" and scene.texture_ids \
            and rng.random() < 0.5 else None
        quat = _random_quat(rng)
        scene.add_primitive(kind, size, pos, quat, rgba, tex)
        out.append({"role": role, "kind": kind, "size": size.tolist(), "position_world": pos.tolist(),
                    "orientation_world": quat.tolist(), "rgba": rgba, "texture": tex})

    for _ in range(int(rng.integers(s.distractors[0], s.distractors[1] + 1))):
        u, v = rng.uniform(0, cam.width), rng.uniform(0, cam.height)
        add(world_at(u, v, arm_depth + rng.uniform(0.3, 1.2)), rng.uniform(0.05, 0.2), "clutter")
    if rng.random() < s.occluder_probability:
        uv = project_points(p_cam, cam)
        ok = np.isfinite(uv).all(-1) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) \
            & (uv[:, 1] < cam.height) & (p_cam[:, 2] > 0.3)
        if ok.any():
            j = int(rng.choice(np.flatnonzero(ok)))
            depth = max(cfg.camera.near + 0.15, p_cam[j, 2] * rng.uniform(0.35, 0.7))
            add(world_at(uv[j, 0], uv[j, 1], depth), rng.uniform(0.03, 0.07), "occluder")
    return out


# ------------------------------------------------------------------- one frame
def _motion_blur(rgb: np.ndarray, labels: np.ndarray, background: np.ndarray, length: float,
                 angle: float) -> np.ndarray:
    """Smear the moving layer (robot and board) along ``angle`` over the static one.

    I = k * (F a) + B (1 - k * a): the exact image of a layer F with coverage a
    moving over a static background B during the exposure, for a linear kernel k.
    """
    n = int(math.ceil(length)) | 1
    kernel = np.zeros((n, n), np.float32)
    c = (n - 1) / 2
    for t in np.linspace(-length / 2, length / 2, max(2, 2 * n)):
        kernel[int(round(c + t * math.sin(angle))), int(round(c + t * math.cos(angle)))] += 1
    kernel /= kernel.sum()
    moving = ((labels != LABEL_BACKGROUND) & (labels != LABEL_OTHER)).astype(np.float32)
    fg = rgb.astype(np.float32) * moving[..., None]
    static = np.where(moving[..., None] > 0, background, rgb).astype(np.float32)
    a = cv2.filter2D(moving, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    out = cv2.filter2D(fg, -1, kernel, borderType=cv2.BORDER_REPLICATE) + static * (1 - a[..., None])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _pixel_index(uv: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels whose area contains uv (centre of pixel (0, 0) at (0, 0)): (inside mask, rows, cols)."""
    finite = np.isfinite(uv).all(-1)
    u = np.where(finite, uv[:, 0], -1.0)
    v = np.where(finite, uv[:, 1], -1.0)
    inside = finite & (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)
    cols = np.clip(np.floor(u + 0.5).astype(int), 0, width - 1)
    rows = np.clip(np.floor(v + 0.5).astype(int), 0, height - 1)
    return inside, rows, cols


def _board_visibility(T_cb: np.ndarray, cam: SimCamera, labels: np.ndarray, depth: np.ndarray,
                      corners_b: np.ndarray, spec, scfg) -> dict:
    """How much of the board's printed face the camera sees, and which ChArUco corners."""
    w, h = spec.width, spec.height
    centre = T_cb[:3, :3] @ np.array([w / 2, h / 2, 0.0]) + T_cb[:3, 3]
    normal = -T_cb[:3, 2]  # the face looks along -z_board
    to_cam = -centre / max(np.linalg.norm(centre), 1e-9)
    angle = math.degrees(math.acos(float(np.clip(normal @ to_cam, -1, 1))))
    pc = (T_cb[:3, :3] @ corners_b.T).T + T_cb[:3, 3]
    uv_c = project_points(pc, cam)
    inside, rows, cols = _pixel_index(uv_c, cam.width, cam.height)
    corner_vis = inside & (angle < 90) & (labels[rows, cols] == LABEL_BOARD) \
        & (np.abs(depth[rows, cols] - pc[:, 2]) < 0.01)
    fraction, area = 0.0, 0.0
    t = np.linspace(0, 1, 9)[:-1]
    edge = np.concatenate([np.c_[t * w, 0 * t], np.c_[w + 0 * t, t * h], np.c_[w - t * w, h + 0 * t],
                           np.c_[0 * t, h - t * h]])
    outline = (T_cb[:3, :3] @ np.c_[edge, np.zeros(len(edge))].T).T + T_cb[:3, 3]
    if angle < 90 and np.all(outline[:, 2] > 0.01):
        poly = project_points(outline, cam)
        area = 0.5 * abs(float(np.dot(poly[:, 0], np.roll(poly[:, 1], 1)) - np.dot(poly[:, 1], np.roll(poly[:, 0], 1))))
        if area > 0:
            canvas = np.zeros(labels.shape, np.uint8)
            cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], 1, shift=4)
            fraction = min(1.0, float(np.count_nonzero(canvas.astype(bool) & (labels == LABEL_BOARD))) / area)
    visible = angle <= scfg.board_max_angle_deg and fraction >= scfg.board_min_visible_fraction \
        and area >= scfg.board_min_area_px
    return {"uv": uv_c, "corner_vis": corner_vis, "angle": angle, "fraction": fraction, "visible": bool(visible)}


# ---------------------------------------------------------------- one sequence
def generate_sequence(cfg: GeneratorConfig, definition, joint_names: list[str], index: int,
                      root: str | os.PathLike, tick: Callable[[int], None] | None = None) -> Path:
    """Render sequence ``index`` into ``root/seq_XXXXX`` (atomically) and return its path.

    ``definition``: a :class:`~pose_estimator.robot.RobotDefinition` or :class:`~.scene.RobotSpec`;
    ``joint_names``: the joint order of the recorded joint vectors.
    """
    root = Path(root)
    final = root / sequence_name(index)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _render_sequence(cfg, definition, joint_names, index, tmp, tick)
        try:
            os.rename(tmp, final)
        except OSError:
            if final.is_dir():  # another run finished it first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _render_sequence(cfg: GeneratorConfig, definition, joint_names: list[str], index: int,
                     out: Path, tick: Callable[[int], None] | None) -> None:
    scene = _scene(cfg, definition, joint_names)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(index,)))
    sc, cc = cfg.scene, cfg.camera
    F, r = cfg.frames_per_sequence, cfg.joint_steps_per_frame
    N = (F - 1) * r + 1
    W, H = cfg.width, cfg.height

    # Trajectory, sampled at the joint rate; frame i is joint sample i * r.
    traj = sample_trajectory(scene.joint_lower, scene.joint_upper, (N - 1) / cfg.joint_rate + 1.5, cfg.trajectory,
                             rng, scene.revolute)
    t = rng.uniform(0, min(1.5, float(traj.times[1]))) + np.arange(N) / cfg.joint_rate
    q_true, v_true = traj(t)
    errors = sample_joint_errors(cfg.joint_errors, scene.revolute, rng)
    q_meas = apply_joint_errors(q_true, errors, rng)
    start_ns = int(round((cfg.start_time + index * cfg.sequence_spacing) * 1e9))
    stamps = start_ns + np.round(np.arange(N) * (1e9 / cfg.joint_rate)).astype(np.int64)
    frame_k = np.arange(F) * r

    links_w = np.empty((F, len(scene.link_names), 4, 4))
    for i, k in enumerate(frame_k):
        scene.set_joints(q_true[k])
        links_w[i] = scene.link_poses_world()
    kp_w = np.stack([scene.keypoints_world(L) for L in links_w])
    T_w_base = links_w[0, scene.base_entry]  # fixed base
    T_base_w = np.linalg.inv(T_w_base)

    board_w = links_w[:, scene.board_entry] @ scene.T_link_board if scene.board_spec is not None else None
    T_wc, cam = _sample_camera(cfg, kp_w, board_w, T_w_base, rng)
    T_cw = np.linalg.inv(T_wc)
    T_base_cam = T_base_w @ T_wc
    light = _sample_lighting(cfg, rng)
    bg_kind = str(rng.choice(list(sc.backgrounds)))
    background = procedural_texture(bg_kind, H, W, rng)
    distractors = _place_distractors(scene, cfg, T_wc, cam, kp_w, rng)
    brightness, gamma, noise_std = rng.uniform(*sc.brightness), rng.uniform(*sc.gamma), rng.uniform(*sc.noise_std)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma * brightness + 0.5, 0, 255).astype(np.uint8)
    noise_bank = None
    if noise_std > 0:
        noise_bank = np.round(rng.standard_normal((H + NOISE_PAD, W + NOISE_PAD, 3)) * noise_std).astype(np.int16)
    K_r, W_r, H_r, map_x, map_y = cam.render_setup()
    corners_b = board_corners_3d(cfg.board) if scene.board_spec is not None else np.zeros((0, 3))

    (out / "images").mkdir(parents=True)
    if cfg.masks:
        (out / "masks").mkdir()
    bag = BagRecorder(out / "bag", cfg.bag_storage) if cfg.bag else None
    base_frame = definition.base_link
    try:
        if bag is not None:
            bag.write_static(int(stamps[0]), base_frame, cfg.camera_frame, T_base_cam,
                             definition.urdf_path().read_text())
        next_joint = 0
        records = []
        # Sensor noise defeats LZ matching: Huffman-only is both faster and smaller than deflate here.
        png = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
        png_mask = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        for i, k in enumerate(frame_k):
            if bag is not None:
                for j in range(next_joint, k + 1):
                    bag.write_joint_state(int(stamps[j]), joint_names, q_meas[j])
                    bag.write_joint_state(int(stamps[j]), joint_names, q_true[j], v_true[j], ground_truth=True)
                next_joint = k + 1
            scene.set_joints(q_true[k])
            T_w_board = scene.place_board(links_w[i])
            rgb, depth, labels = scene.render(T_wc, K_r, W_r, H_r, cc.near, cc.far, light)
            if map_x is not None:
                rgb = cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                depth = cv2.remap(depth.astype(np.float32), map_x, map_y, cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=cc.far)
                labels = cv2.remap(labels, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=LABEL_BACKGROUND)
            rgb = np.where((labels == LABEL_BACKGROUND)[..., None], background, rgb)

            # Motion blur from the end effector's image speed over the exposure.
            blur_px = 0.0
            if rng.random() < sc.blur_probability and 0 < k < N - 1:
                scene.set_joints(q_true[k + 1])
                a = scene.link_poses_world()[scene.ee_entry][:3, 3]
                scene.set_joints(q_true[k - 1])
                b = scene.link_poses_world()[scene.ee_entry][:3, 3]
                uv_ab = project_points((T_cw[:3, :3] @ np.stack([a, b]).T).T + T_cw[:3, 3], cam)
                if np.isfinite(uv_ab).all():
                    vel = (uv_ab[0] - uv_ab[1]) * cfg.joint_rate / 2
                    blur_px = float(min(25.0, np.linalg.norm(vel) * rng.uniform(*sc.exposure)))
                    if blur_px >= 1.0:
                        rgb = _motion_blur(rgb, labels, background, blur_px, math.atan2(vel[1], vel[0]))
                    else:
                        blur_px = 0.0
            rgb = cv2.LUT(rgb, lut)
            if noise_bank is not None:
                # A fresh window of the sequence's noise field each frame: white noise, at a fraction of
                # the cost of drawing H*W*3 normals per frame.
                dy, dx = int(rng.integers(0, NOISE_PAD + 1)), int(rng.integers(0, NOISE_PAD + 1))
                rgb = np.clip(rgb.astype(np.int16) + noise_bank[dy:dy + H, dx:dx + W], 0, 255).astype(np.uint8)

            # Ground truth for this frame.
            TL_b = T_base_w @ links_w[i]
            kp_b = (T_base_w[:3, :3] @ kp_w[i].T).T + T_base_w[:3, 3]
            p_cam = (T_cw[:3, :3] @ kp_w[i].T).T + T_cw[:3, 3]
            uv = project_points(p_cam, cam)
            inside, rows, cols = _pixel_index(uv, W, H)
            inside &= p_cam[:, 2] > cc.near
            lab_at, depth_at = labels[rows, cols], depth[rows, cols]
            on_link = np.array([not allowed or int(lab) in allowed for lab, allowed in zip(lab_at, scene.kp_labels)])
            visible = inside & on_link & (p_cam[:, 2] - depth_at < sc.visibility_depth_tolerance)
            T_c_ee = T_cw @ links_w[i][scene.ee_entry]
            T_c_board = T_cw @ T_w_board
            bv = _board_visibility(T_c_board, cam, labels, depth, corners_b, cfg.board, sc) \
                if scene.board_spec is not None else None

            name = f"{i:06d}.png"
            cv2.imwrite(str(out / "images" / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), png)
            if cfg.masks:
                cv2.imwrite(str(out / "masks" / name), labels, png_mask)
            records.append({
                "index": i,
                "stamp": stamps[k] / 1e9,
                "stamp_ns": int(stamps[k]),
                "joint_sample": int(k),
                "image": f"images/{name}",
                "mask": f"masks/{name}" if cfg.masks else None,
                "joints_true": q_true[k].tolist(),
                "joints_measured": q_meas[k].tolist(),
                "joint_velocity": v_true[k].tolist(),
                "link_poses": [matrix_to_pose7(T) for T in TL_b],
                "keypoints_3d": kp_b.tolist(),
                "keypoints_2d": [None if not np.isfinite(x).all() else x.tolist() for x in uv],
                "keypoints_depth": p_cam[:, 2].tolist(),
                "keypoints_in_image": inside.tolist(),
                "keypoints_visible": visible.tolist(),
                "ee_pose": matrix_to_pose7(TL_b[scene.ee_entry]),
                "ee_pose_camera": matrix_to_pose7(T_c_ee),
                "board_pose_camera": matrix_to_pose7(T_c_board),
                "board_visible": bool(bv["visible"]) if bv else False,
                "board_visible_fraction": bv["fraction"] if bv else 0.0,
                "board_angle_deg": bv["angle"] if bv else 180.0,
                "board_corners_2d": [None if not np.isfinite(x).all() else x.tolist() for x in bv["uv"]] if bv else [],
                "board_corners_visible": bv["corner_vis"].tolist() if bv else [],
                "blur_px": blur_px,
            })
            if bag is not None:
                bag.write_image(int(stamps[k]), cfg.camera_frame, rgb, cam.K, cam.dist)
                bag.write_pose("gt_ee_pose", int(stamps[k]), cfg.camera_frame, T_c_ee)
                bag.write_pose("gt_board_pose", int(stamps[k]), cfg.camera_frame, T_c_board)
            if tick is not None:
                tick(1)
    finally:
        if bag is not None:
            bag.close()

    with open(out / "frames.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    with open(out / "joints.jsonl", "w") as f:
        for j in range(N):
            f.write(json.dumps({"stamp_ns": int(stamps[j]), "position": q_true[j].tolist(),
                                "velocity": v_true[j].tolist(), "measured": q_meas[j].tolist()}) + "\n")
    info = {
        "name": sequence_name(index),
        "index": index,
        "num_frames": F,
        "num_joint_samples": N,
        "fps": cfg.fps,
        "joint_rate": cfg.joint_rate,
        "start_stamp_ns": int(stamps[0]),
        "camera": {**cam.to_dict(), "T_base_camera": T_base_cam.tolist(), "frame_id": cfg.camera_frame,
                   "parent_frame_id": base_frame},
        "joint_errors": errors.to_dict(),
        "lighting": light.to_dict(),
        "background": bg_kind,
        "photometric": {"brightness": brightness, "gamma": gamma, "noise_std": noise_std},
        "distractors": distractors,
        "trajectory": {"knot_times": traj.times.tolist(), "knots": traj.knots.tolist(), "time_offset": float(t[0])},
        "board_visible_frames": int(sum(rec["board_visible"] for rec in records)),
        "bag": "bag" if bag is not None else None,
    }
    write_json_atomic(out / "sequence.json", info)


# ------------------------------------------------------------------ the dataset
def _pool_init(queue) -> None:
    _WORKER["queue"] = queue
    cv2.setNumThreads(1)  # one process per core already


def _pool_run(job) -> str:
    cfg, definition, joint_names, index, root = job
    q = _WORKER.get("queue")
    return str(generate_sequence(cfg, definition, joint_names, index, root, (lambda n: q.put(n)) if q else None))


def _compare_meta(old: dict, new: dict, root: Path) -> None:
    a = {k: v for k, v in old.items() if k != "sequences"}
    b = {k: v for k, v in new.items() if k != "sequences"}
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if "settings" in diff:
            sa, sb = a.get("settings", {}), b.get("settings", {})
            diff += [f"settings.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
        raise ValueError(f"{root} holds a dataset generated with different settings (differs in {diff}); "
                         "use another --out, or --overwrite to replace it")


def generate_dataset(cfg: GeneratorConfig, out: str | os.PathLike, workers: int | None = None,
                     progress: bool = True, overwrite: bool = False) -> Path:
    """Generate (or finish) the dataset ``cfg`` describes in ``out``; returns ``out``.

    ``workers`` processes render sequences in parallel (default: every core
    this process may use). ``meta.json`` is written first, each sequence
    appears atomically, ``COMPLETE`` is written last; re-running resumes.
    """
    root = Path(out)
    if overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if workers is None else max(1, int(workers))
    from ..robot import RobotDefinition

    full_definition = RobotDefinition.from_yaml(cfg.robot)
    joint_names = _joint_names(full_definition)
    definition = RobotSpec.from_definition(full_definition)
    scene = _scene(cfg, definition, joint_names)
    meta = build_meta(cfg, definition, scene)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        _compare_meta(json.loads(meta_path.read_text()), meta, root)
    complete = root / "COMPLETE"
    if complete.exists():
        complete.unlink()  # about to change the dataset: it is not complete until this run ends
    write_json_atomic(meta_path, meta)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    todo = [i for i in range(cfg.sequences) if not (root / sequence_name(i) / "sequence.json").is_file()]
    total = len(todo) * cfg.frames_per_sequence
    bar = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc=f"generate {root.name}", smoothing=0.1)
    tick = bar.update if bar is not None else None
    try:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                generate_sequence(cfg, definition, joint_names, i, root, tick)
        else:
            _close_scene()  # workers build their own pybullet clients
            # Not plain fork: OpenCV's thread pool (used by this process already) deadlocks in a
            # forked child. A fork server forks from a clean process that imported this module once.
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload([__name__])
            else:
                ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            jobs = [(cfg, definition, joint_names, i, root) for i in todo]
            # ProcessPoolExecutor, not Pool: a worker that dies (e.g. killed for memory) fails the
            # run with BrokenProcessPool instead of leaving it waiting forever for a lost task.
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_pool_init,
                                     initargs=(queue,)) as pool:
                futures = [pool.submit(_pool_run, job) for job in jobs]
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                    while not queue.empty():
                        n = queue.get()
                        if tick is not None:
                            tick(n)
                    for f in done:
                        if f.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise f.exception()
                time.sleep(0.05)  # let the last ticks arrive
                while not queue.empty():
                    n = queue.get()
                    if tick is not None:
                        tick(n)
    finally:
        if bar is not None:
            bar.close()
    missing = [i for i in range(cfg.sequences) if not (root / sequence_name(i) / "sequence.json").is_file()]
    if missing:
        raise RuntimeError(f"sequences {missing[:5]}... were not written")
    write_json_atomic(complete, {"format_version": FORMAT_VERSION, "sequences": cfg.sequences,
                                 "frames": cfg.sequences * cfg.frames_per_sequence})
    return root
