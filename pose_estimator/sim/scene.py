"""The pybullet world: one arm (any URDF), the board on its hand, distractors, a camera.

One :class:`SimScene` owns one pybullet DIRECT client (so every worker process
has its own) and renders with the CPU tiny renderer in a single
``getCameraImage`` call per frame that returns colour, depth and segmentation
together. Nothing here knows which arm it is: links, joints and keypoints
come from the URDF and the keypoint YAML (:class:`~pose_estimator.robot.RobotDefinition`).

Link frames are URDF link frames: pybullet reports a link's centre of mass
first and its URDF frame in ``getLinkState(...)[4:6]``; the base reports its
inertial frame, which :meth:`SimScene.link_poses` undoes with the base's local
inertial pose.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pybullet as p

from .board import board_texture
from .camera import depth_from_buffer, gl_projection_matrix, gl_view_matrix
from .config import BoardSpec

__all__ = ["SimScene", "RobotSpec", "Lighting", "pose_to_matrix", "matrix_to_pose7",
           "LABEL_BACKGROUND", "LABEL_BOARD", "LABEL_OTHER"]

#: pose_estimator.robot.WORLD, repeated so that worker processes never import robot.py (and torch with it)
WORLD = "world"

#: values of the label mask: 0 background, 1 + (pybullet link index + 1) robot links, 254 board, 255 other objects
LABEL_BACKGROUND = 0
LABEL_BOARD = 254
LABEL_OTHER = 255


def pose_to_matrix(pos, quat_xyzw) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = np.asarray(p.getMatrixFromQuaternion(quat_xyzw)).reshape(3, 3)
    T[:3, 3] = pos
    return T


def _quat_from_matrix(R: np.ndarray) -> np.ndarray:
    """(3, 3) -> (x, y, z, w), w >= 0."""
    m = R
    t = np.trace(m)
    if t > 0:
        s = 2 * math.sqrt(1 + t)
        q = np.array([(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4])
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * math.sqrt(max(1e-300, 1 + m[i, i] - m[j, j] - m[k, k]))
        q = np.empty(4)
        q[i] = s / 4
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
        q[3] = (m[k, j] - m[j, k]) / s
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def matrix_to_pose7(T: np.ndarray) -> list[float]:
    """(4, 4) -> [x, y, z, qx, qy, qz, qw] (ROS order)."""
    return [float(v) for v in T[:3, 3]] + [float(v) for v in _quat_from_matrix(T[:3, :3])]


class KeypointDef(NamedTuple):
    name: str
    link: str
    offset: tuple[float, float, float]


@dataclass(frozen=True)
class RobotSpec:
    """What the renderer needs of a :class:`~pose_estimator.robot.RobotDefinition`, without torch.

    Sent to worker processes instead of the definition itself, whose module
    imports torch (1.5 s of start-up per worker for nothing).
    """

    name: str
    urdf: str
    urdf_file: str
    base_link: str
    end_effector: str
    keypoints: tuple[KeypointDef, ...]
    rigid_keypoints: tuple[str, ...]

    @classmethod
    def from_definition(cls, d) -> "RobotSpec":
        return cls(d.name, d.urdf, str(d.urdf_path()), d.base_link, d.end_effector,
                   tuple(KeypointDef(k.name, k.link, tuple(k.offset)) for k in d.keypoints), tuple(d.rigid_keypoints))

    def urdf_path(self) -> Path:
        return Path(self.urdf_file)

    @property
    def keypoint_names(self) -> list[str]:
        return [k.name for k in self.keypoints]


@dataclass
class Lighting:
    """Tiny-renderer light for one sequence."""

    direction: tuple[float, float, float]
    color: tuple[float, float, float]
    ambient: float
    diffuse: float
    specular: float
    shadow: bool

    def to_dict(self) -> dict:
        return {"direction": list(self.direction), "color": list(self.color), "ambient": self.ambient,
                "diffuse": self.diffuse, "specular": self.specular, "shadow": self.shadow}


class SimScene:
    """A pybullet DIRECT client holding the arm, its board and the sequence's distractors."""

    def __init__(self, definition, joint_names: list[str], board: BoardSpec | None,
                 texture_pool: list[np.ndarray] | None = None):
        """``definition``: a :class:`~pose_estimator.robot.RobotDefinition` or :class:`RobotSpec`."""
        if not isinstance(definition, RobotSpec):
            definition = RobotSpec.from_definition(definition)
        self.definition = definition
        self.cid = p.connect(p.DIRECT)
        self._tmp = tempfile.TemporaryDirectory(prefix="pose_estimator_sim_")
        urdf = definition.urdf_path()
        if not urdf.is_file():
            raise FileNotFoundError(f"URDF not found: {urdf} (from '{definition.urdf}')")
        self.robot = p.loadURDF(str(urdf), useFixedBase=True, flags=p.URDF_USE_INERTIA_FROM_FILE,
                                physicsClientId=self.cid)
        c = self.cid
        nj = p.getNumJoints(self.robot, physicsClientId=c)
        root = p.getBodyInfo(self.robot, physicsClientId=c)[0].decode()
        self.link_names: list[str] = [root]  # index 0 = root (pybullet link -1), then link i -> i + 1
        self._parent = [-2]  # pybullet parent link index of each entry's link (root has none)
        self._joint_fixed = [True]
        joint_index = {}
        self._joint_type = {}
        for j in range(nj):
            info = p.getJointInfo(self.robot, j, physicsClientId=c)
            self.link_names.append(info[12].decode())
            self._parent.append(info[16])
            self._joint_fixed.append(info[2] == p.JOINT_FIXED)
            joint_index[info[1].decode()] = j
            self._joint_type[info[1].decode()] = info[2]
        missing = [n for n in joint_names if n not in joint_index]
        if missing:
            raise ValueError(f"joints {missing} are not in the URDF loaded by pybullet ({sorted(joint_index)})")
        self.joint_names = list(joint_names)
        self._joint_idx = [joint_index[n] for n in joint_names]
        self.revolute = np.array([self._joint_type[n] == p.JOINT_REVOLUTE for n in joint_names])
        info = [p.getJointInfo(self.robot, j, physicsClientId=c) for j in self._joint_idx]
        self.joint_lower = np.array([i[8] for i in info], dtype=np.float64)
        self.joint_upper = np.array([i[9] for i in info], dtype=np.float64)
        bad = self.joint_upper <= self.joint_lower
        if bad.any():  # continuous joints: give them a full turn
            self.joint_lower[bad], self.joint_upper[bad] = -math.pi, math.pi
        inertial = p.getDynamicsInfo(self.robot, -1, physicsClientId=c)[3:5]
        self._T_inertial_root = np.linalg.inv(pose_to_matrix(*inertial))

        name_to_entry = {n: i for i, n in enumerate(self.link_names)}
        for link in {k.link for k in definition.keypoints} | {definition.base_link, definition.end_effector}:
            if link != WORLD and link not in name_to_entry:
                raise ValueError(f"link '{link}' of the keypoint definition is not in the URDF ({self.link_names})")
        self._entry = name_to_entry
        self.base_entry = name_to_entry[definition.base_link]
        self.ee_entry = name_to_entry[definition.end_effector]
        self.kp_entry = np.array([name_to_entry[k.link] if k.link != WORLD else -1 for k in definition.keypoints])
        self.kp_offset = np.array([k.offset for k in definition.keypoints], dtype=np.float64)
        self._rigid_groups()
        self.kp_labels = [self._allowed_labels(e) for e in self.kp_entry]

        self.board_spec = board
        self.board_bodies: list[int] = []
        self.T_link_board = np.eye(4)
        self.board_entry = -1
        if board is not None:
            self._make_board(board)
        self.texture_ids = []
        for i, tex in enumerate(texture_pool or []):
            path = os.path.join(self._tmp.name, f"texture_{i}.png")
            cv2.imwrite(path, cv2.cvtColor(tex, cv2.COLOR_RGB2BGR))
            self.texture_ids.append(p.loadTexture(path, physicsClientId=c))
        self.distractors: list[int] = []

    # ------------------------------------------------------------------ structure
    def _rigid_groups(self) -> None:
        """Links joined by fixed joints form one rigid group; a keypoint may be seen on its group or a neighbour."""
        n = len(self.link_names)
        group = list(range(n))

        def find(i):
            while group[i] != i:
                group[i] = group[group[i]]
                i = group[i]
            return i

        for e in range(1, n):
            if self._joint_fixed[e]:
                group[find(e)] = find(self._parent[e] + 1)
        self.group = [find(e) for e in range(n)]

    def _allowed_labels(self, entry: int) -> frozenset[int]:
        if entry < 0:  # fixed in the environment: any surface at the right depth
            return frozenset()
        g = self.group[entry]
        groups = {g}
        for e in range(1, len(self.link_names)):
            pg = self.group[self._parent[e] + 1]
            if self.group[e] == g:
                groups.add(pg)
            if pg == g:
                groups.add(self.group[e])
        return frozenset(e + 1 for e in range(len(self.link_names)) if self.group[e] in groups)

    def label_names(self) -> dict[int, str]:
        """The label mask's values and what they stand for."""
        names = {LABEL_BACKGROUND: "background", LABEL_BOARD: "board", LABEL_OTHER: "other"}
        names.update({e + 1: n for e, n in enumerate(self.link_names)})
        return names

    # ---------------------------------------------------------------------- board
    def _make_board(self, spec: BoardSpec) -> None:
        c = self.cid
        tex = board_texture(spec)
        path = os.path.join(self._tmp.name, "board.png")
        cv2.imwrite(path, tex)
        tex_id = p.loadTexture(path, physicsClientId=c)
        w, h = spec.width, spec.height
        # The printed face: one quad at z = 0 of the board frame. Texture v runs up the image
        # (OpenGL), board y runs down it: the board's top-left corner takes texture (0, 1).
        verts = [[0, 0, 0], [w, 0, 0], [w, h, 0], [0, h, 0]]
        uvs = [[0, 1], [1, 1], [1, 0], [0, 0]]
        # Two triangles wound so that the face looks along -z (towards the viewer).
        face = p.createVisualShape(p.GEOM_MESH, vertices=verts, indices=[0, 2, 1, 0, 3, 2], uvs=uvs,
                                   normals=[[0, 0, -1]] * 4, physicsClientId=c)
        face_body = p.createMultiBody(0, -1, face, physicsClientId=c)
        p.changeVisualShape(face_body, -1, textureUniqueId=tex_id, rgbaColor=[1, 1, 1, 1], physicsClientId=c)
        # The plate behind it, so the board has a back and edges.
        t = spec.thickness
        plate = p.createVisualShape(p.GEOM_BOX, halfExtents=[w / 2, h / 2, t / 2],
                                    visualFramePosition=[w / 2, h / 2, t / 2 + 5e-4],
                                    rgbaColor=[0.25, 0.25, 0.27, 1], physicsClientId=c)
        plate_body = p.createMultiBody(0, -1, plate, physicsClientId=c)
        self.board_bodies = [face_body, plate_body]
        self.board_standoff = 0.0
        link = spec.link or self.definition.end_effector
        if link not in self._entry:
            raise ValueError(f"board link '{link}' is not in the URDF ({self.link_names})")
        self.board_entry = self._entry[link]
        if spec.mount == "auto":
            self.T_link_board = self._auto_mount(spec)
        elif spec.mount == "explicit":
            if len(spec.T_link_board) != 16:
                raise ValueError("board.T_link_board must hold 16 numbers (row-major 4x4) when mount is 'explicit'")
            self.T_link_board = np.asarray(spec.T_link_board, dtype=np.float64).reshape(4, 4)
        else:
            raise ValueError(f"board.mount must be 'auto' or 'explicit', got '{spec.mount}'")
        reach = self.board_standoff - t - 5e-4
        if reach > 1e-3:  # a bracket from the link to the back of the plate
            s = min(0.02, w / 4, h / 4)
            bracket = p.createVisualShape(p.GEOM_BOX, halfExtents=[s, s, reach / 2 + 1e-3],
                                          visualFramePosition=[w / 2, h / 2, t + 5e-4 + reach / 2],
                                          rgbaColor=[0.35, 0.35, 0.38, 1], physicsClientId=c)
            self.board_bodies.append(p.createMultiBody(0, -1, bracket, physicsClientId=c))

    def _auto_mount(self, spec: BoardSpec) -> np.ndarray:
        """Board beside the +x face of its link (in the link frame), facing +x, on a short bracket.

        The board is centred on the link's own collision box (with links fixed
        below it, e.g. a grasp frame) in y and z, and stands 5 mm clear in x of
        everything rigidly attached to the link (which for a hand includes the
        flange it sits on). The boxes are measured by turning the whole arm so
        that the link's frame is aligned with the world axes, where pybullet's
        world AABB is the link-frame box.
        """
        c = self.cid
        self.set_joints(np.clip(np.zeros(len(self.joint_names)), self.joint_lower, self.joint_upper))
        T_w_link = self.link_poses_world()[self.board_entry]
        base_pos, base_orn = p.getBasePositionAndOrientation(self.robot, physicsClientId=c)
        # New base (inertial) pose such that the link frame sits at the origin with identity rotation.
        T_new = np.linalg.inv(T_w_link) @ pose_to_matrix(base_pos, base_orn)
        p.resetBasePositionAndOrientation(self.robot, T_new[:3, 3].tolist(), _quat_from_matrix(T_new[:3, :3]).tolist(),
                                          physicsClientId=c)
        p.performCollisionDetection(physicsClientId=c)  # refresh the collision objects' world transforms

        def box(entries):
            lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
            for e in entries:
                a, b = (np.array(v) for v in p.getAABB(self.robot, e - 1, physicsClientId=c))
                if np.all(b >= a) and np.all(np.abs(np.r_[a, b]) < 1e3):
                    lo, hi = np.minimum(lo, a), np.maximum(hi, b)
            return lo, hi

        def fixed_below(e):  # e or a link hanging from the board link by fixed joints only
            while e != self.board_entry:
                if e == 0 or not self._joint_fixed[e]:
                    return False
                e = self._parent[e] + 1
            return True

        own_lo, own_hi = box([e for e in range(len(self.link_names)) if fixed_below(e)])
        _, group_hi = box([e for e in range(len(self.link_names)) if self.group[e] == self.group[self.board_entry]])
        p.resetBasePositionAndOrientation(self.robot, base_pos, base_orn, physicsClientId=c)
        if not np.all(own_hi >= own_lo):  # no collision geometry: mount at the link origin
            own_lo, own_hi = np.zeros(3), np.zeros(3)
            group_hi = np.maximum(group_hi, 0.0) if np.all(np.isfinite(group_hi)) else np.zeros(3)
        face_x = max(own_hi[0], group_hi[0]) + 0.005 + spec.thickness + 5e-4
        centre = np.array([face_x, (own_lo[1] + own_hi[1]) / 2, (own_lo[2] + own_hi[2]) / 2])
        self.board_standoff = float(face_x - own_hi[0])
        # Face normal (-z_board) along +x_link; board x along link y, board y along -link z.
        R = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: board axes in the link
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = centre - R @ np.array([spec.width / 2, spec.height / 2, 0.0])
        return T

    # ---------------------------------------------------------------- kinematics
    def set_joints(self, q: np.ndarray) -> None:
        for j, v in zip(self._joint_idx, q):
            p.resetJointState(self.robot, j, float(v), physicsClientId=self.cid)

    def link_poses_world(self) -> np.ndarray:
        """URDF frames of every link in the world, (L, 4, 4), in :attr:`link_names` order."""
        c = self.cid
        out = np.empty((len(self.link_names), 4, 4))
        pos, orn = p.getBasePositionAndOrientation(self.robot, physicsClientId=c)
        out[0] = pose_to_matrix(pos, orn) @ self._T_inertial_root
        n = len(self.link_names) - 1
        if n:
            states = p.getLinkStates(self.robot, list(range(n)), computeForwardKinematics=True, physicsClientId=c)
            for i, s in enumerate(states):
                out[i + 1] = pose_to_matrix(s[4], s[5])
        return out

    def keypoints_world(self, T_links: np.ndarray) -> np.ndarray:
        """Keypoints (K, 3) in the world from link poses (L, 4, 4)."""
        T = T_links[np.where(self.kp_entry >= 0, self.kp_entry, self.base_entry)]
        return np.einsum("kij,kj->ki", T[:, :3, :3], self.kp_offset) + T[:, :3, 3]

    def place_board(self, T_links: np.ndarray) -> np.ndarray:
        """Move the board with its link; returns T_world_board."""
        T = T_links[self.board_entry] @ self.T_link_board
        if self.board_bodies:
            pos, orn = T[:3, 3].tolist(), _quat_from_matrix(T[:3, :3]).tolist()
            for b in self.board_bodies:
                p.resetBasePositionAndOrientation(b, pos, orn, physicsClientId=self.cid)
        return T

    # ---------------------------------------------------------------- distractors
    def clear_distractors(self) -> None:
        for b in self.distractors:
            p.removeBody(b, physicsClientId=self.cid)
        self.distractors = []

    def add_primitive(self, kind: str, size: np.ndarray, pos: np.ndarray, quat: np.ndarray,
                      rgba: list[float], texture: int | None = None) -> int:
        """Add a visual-only box/sphere/cylinder/capsule; ``size`` = half extents or (radius, length)."""
        c = self.cid
        if kind == "box":
            vs = p.createVisualShape(p.GEOM_BOX, halfExtents=size.tolist(), rgbaColor=rgba, physicsClientId=c)
        elif kind == "sphere":
            vs = p.createVisualShape(p.GEOM_SPHERE, radius=float(size[0]), rgbaColor=rgba, physicsClientId=c)
        elif kind == "cylinder":
            vs = p.createVisualShape(p.GEOM_CYLINDER, radius=float(size[0]), length=float(size[1]),
                                     rgbaColor=rgba, physicsClientId=c)
        elif kind == "capsule":
            vs = p.createVisualShape(p.GEOM_CAPSULE, radius=float(size[0]), length=float(size[1]),
                                     rgbaColor=rgba, physicsClientId=c)
        else:
            raise ValueError(f"unknown primitive '{kind}'")
        body = p.createMultiBody(0, -1, vs, basePosition=pos.tolist(), baseOrientation=quat.tolist(),
                                 physicsClientId=c)
        if texture is not None and texture < len(self.texture_ids):
            p.changeVisualShape(body, -1, textureUniqueId=self.texture_ids[texture], physicsClientId=c)
        self.distractors.append(body)
        return body

    # -------------------------------------------------------------------- render
    def render(self, T_world_camera: np.ndarray, K: np.ndarray, width: int, height: int, near: float, far: float,
               light: Lighting) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One tiny-renderer pass: ``(rgb (H, W, 3) uint8, depth (H, W) m, labels (H, W) uint8)``."""
        _, _, rgba, depth_buf, seg = p.getCameraImage(
            width, height, gl_view_matrix(T_world_camera), gl_projection_matrix(K, width, height, near, far),
            renderer=p.ER_TINY_RENDERER, flags=p.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX,
            shadow=int(light.shadow), lightDirection=list(light.direction), lightColor=list(light.color),
            lightDistance=10.0, lightAmbientCoeff=light.ambient, lightDiffuseCoeff=light.diffuse,
            lightSpecularCoeff=light.specular, physicsClientId=self.cid)
        rgba = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)
        depth = depth_from_buffer(np.asarray(depth_buf, dtype=np.float32).reshape(height, width), near, far)
        seg = np.asarray(seg, dtype=np.int64).reshape(height, width)
        return rgba[..., :3], depth, self.labels_from_segmentation(seg)

    def labels_from_segmentation(self, seg: np.ndarray) -> np.ndarray:
        """pybullet segmentation (objectUniqueId + (linkIndex + 1) << 24, -1 = none) -> label mask (uint8)."""
        obj = np.where(seg >= 0, seg & ((1 << 24) - 1), -1)
        link = np.where(seg >= 0, seg >> 24, 0)  # pybullet link index + 1; 0 = base
        labels = np.full(seg.shape, LABEL_OTHER, np.uint8)
        labels[seg < 0] = LABEL_BACKGROUND
        robot = obj == self.robot
        labels[robot] = (link[robot] + 1).astype(np.uint8)
        for b in self.board_bodies:
            labels[obj == b] = LABEL_BOARD
        return labels

    def close(self) -> None:
        try:
            p.disconnect(physicsClientId=self.cid)
        except p.error:  # already gone
            pass
        self._tmp.cleanup()
