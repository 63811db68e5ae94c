"""A robot as data: a URDF plus a keypoint definition (YAML).

:class:`RobotDefinition` reads the keypoint YAML (see ``resource/robots/``);
:class:`RobotModel` adds batched, differentiable forward kinematics and the
Jacobians the pose solver needs (FIG. 3, "joint-state kinematics seed").
Forward kinematics comes from pytorch-kinematics; the point Jacobians are the
geometric ones, written out here because the solver differentiates through
them.

Nothing about a particular arm is in this module: a new arm is a URDF and a
YAML file.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml

__all__ = [
    "KeypointSpec",
    "RobotDefinition",
    "RobotModel",
    "resolve_resource",
    "resource_dir",
    "WORLD",
]

#: The link name that marks a keypoint fixed in the environment (base frame).
WORLD = "world"

SUPPORTED_FORMAT_VERSIONS = (1,)


def resource_dir() -> Path:
    """The package's ``resource/`` folder: beside a source checkout or in the ament share."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "resource"]
    try:  # installed by colcon: <prefix>/share/pose_estimator/resource
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("pose_estimator")) / "resource")
    except Exception:  # noqa: BLE001 - ament index is optional (pip installs have none)
        pass
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"cannot find the pose_estimator resource folder; looked in {candidates}")


def resolve_resource(ref: str, relative_to: Path | None = None) -> Path:
    """Resolve a resource reference to a path.

    Accepts ``pybullet_data://sub/path``, ``package://pkg/sub/path`` (ament
    index), ``resource://sub/path`` (this package's resource folder), an
    absolute path, or a path relative to ``relative_to``.
    """
    if ref.startswith("pybullet_data://"):
        sub = ref[len("pybullet_data://"):]
        # Where pybullet is not installed (a training machine whose Python it has no wheel for), a copy of
        # the files needed (the URDF; meshes only for rendering) may be named by this variable.
        if os.environ.get("POSE_ESTIMATOR_PYBULLET_DATA"):
            return Path(os.environ["POSE_ESTIMATOR_PYBULLET_DATA"]) / sub
        try:
            import pybullet_data
        except ImportError as e:
            raise FileNotFoundError(f"{ref}: pybullet is not installed; install it, or set "
                                    "POSE_ESTIMATOR_PYBULLET_DATA to a folder holding a copy of its files") from e
        return Path(pybullet_data.getDataPath()) / sub
    if ref.startswith("resource://"):
        return resource_dir() / ref[len("resource://"):]
    if ref.startswith("package://"):
        pkg, _, sub = ref[len("package://"):].partition("/")
        if pkg == "pose_estimator":
            return resource_dir().parent / sub
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(pkg)) / sub
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute() and relative_to is not None:
        p = relative_to / p
    return p


@dataclass(frozen=True)
class KeypointSpec:
    """One feature point: fixed on ``link`` at ``offset`` (m, in the link frame)."""

    name: str
    link: str
    offset: tuple[float, float, float]


@dataclass(frozen=True)
class RobotDefinition:
    """The keypoint YAML, parsed and validated (no kinematics)."""

    name: str
    urdf: str  # reference as written in the YAML
    base_link: str
    end_effector: str
    keypoints: tuple[KeypointSpec, ...]
    rigid_keypoints: tuple[str, ...]
    source: Path | None = None

    @property
    def keypoint_names(self) -> list[str]:
        return [k.name for k in self.keypoints]

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)

    def urdf_path(self) -> Path:
        """The URDF file this definition names, resolved."""
        return resolve_resource(self.urdf, self.source.parent if self.source else None)

    def rigid_indices(self) -> list[int]:
        names = self.keypoint_names
        return [names.index(n) for n in self.rigid_keypoints]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RobotDefinition":
        """Load ``path``; a bare name (``panda``) means ``resource/robots/<name>.yaml``."""
        p = Path(path)
        if not p.suffix and not p.exists():
            p = resource_dir() / "robots" / f"{path}.yaml"
        if not p.is_file():
            raise FileNotFoundError(f"robot definition not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {e}") from e
        return cls.from_dict(data, source=p.resolve())

    @classmethod
    def from_dict(cls, data: dict, source: Path | None = None) -> "RobotDefinition":
        where = str(source) if source else "robot definition"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping at the top level")
        version = data.get("format_version", 1)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(f"{where}: format_version {version} is not supported "
                             f"(supported: {SUPPORTED_FORMAT_VERSIONS})")
        for key in ("name", "urdf", "base_link", "end_effector", "keypoints"):
            if key not in data:
                raise ValueError(f"{where}: missing required field '{key}'")
        kps = []
        seen = set()
        for i, k in enumerate(data["keypoints"]):
            try:
                name, link = str(k["name"]), str(k["link"])
                offset = tuple(float(v) for v in k.get("offset", (0.0, 0.0, 0.0)))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: keypoint #{i} is malformed ({e}); "
                                 "expected {name, link, offset: [x, y, z]}") from e
            if len(offset) != 3 or not all(math.isfinite(v) for v in offset):
                raise ValueError(f"{where}: keypoint '{name}' offset must be 3 finite numbers")
            if name in seen:
                raise ValueError(f"{where}: duplicate keypoint name '{name}'")
            seen.add(name)
            kps.append(KeypointSpec(name, link, offset))  # type: ignore[arg-type]
        if not kps:
            raise ValueError(f"{where}: no keypoints defined")
        rigid = tuple(str(n) for n in data.get("rigid_keypoints", ()))
        unknown = [n for n in rigid if n not in seen]
        if unknown:
            raise ValueError(f"{where}: rigid_keypoints not among keypoints: {unknown}")
        return cls(
            name=str(data["name"]),
            urdf=str(data["urdf"]),
            base_link=str(data["base_link"]),
            end_effector=str(data["end_effector"]),
            keypoints=tuple(kps),
            rigid_keypoints=rigid,
            source=source,
        )


class RobotModel:
    """Batched differentiable kinematics for the keypoints of one robot.

    Joint vectors ``q`` are ``(B, n)`` in the order of :attr:`joint_names`
    (the movable joints of the URDF, as pytorch-kinematics orders them).
    All poses are in the ``base_link`` frame, SI units.
    """

    def __init__(self, definition: RobotDefinition, urdf_xml: str | None = None,
                 dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        import pytorch_kinematics as pk

        self.definition = definition
        if urdf_xml is None:
            path = definition.urdf_path()
            if not path.is_file():
                raise FileNotFoundError(f"URDF not found: {path} (from '{definition.urdf}')")
            urdf_xml = path.read_text()
        self.urdf_xml = urdf_xml
        try:
            # The URDF parser writes a line to stderr for every tag it does not
            # model (<material> in <collision>, <contact>): harmless, and noise.
            with contextlib.redirect_stderr(io.StringIO()):
                chain = pk.build_chain_from_urdf(urdf_xml.encode() if isinstance(urdf_xml, str) else urdf_xml)
        except Exception as e:  # noqa: BLE001 - the parser raises many kinds
            raise ValueError(f"cannot parse URDF for robot '{definition.name}': {e}") from e
        self.chain = chain.to(dtype=dtype, device=device)
        self.dtype, self.device = dtype, torch.device(device)
        frames = self.chain.frame_to_idx
        for link in {k.link for k in definition.keypoints} | {definition.base_link, definition.end_effector}:
            if link != WORLD and link not in frames:
                raise ValueError(f"link '{link}' named in the keypoint definition is not in the URDF "
                                 f"(links: {sorted(frames)})")
        self.joint_names: list[str] = list(self.chain.get_joint_parameter_names())
        self.n_joints = len(self.joint_names)
        low, high = self.chain.get_joint_limits()
        self.joint_lower = torch.tensor(low, dtype=dtype, device=device)
        self.joint_upper = torch.tensor(high, dtype=dtype, device=device)

        # Static tables: which frame each keypoint rides on, its offset, and
        # which joints move which frame (ancestor mask) for the Jacobians.
        self._kp_frame = torch.tensor(
            [frames[k.link] if k.link != WORLD else frames[definition.base_link] for k in definition.keypoints],
            dtype=torch.long, device=device)
        self._kp_world = torch.tensor([k.link == WORLD for k in definition.keypoints], device=device)
        self._kp_offset = torch.tensor([k.offset for k in definition.keypoints], dtype=dtype, device=device)
        n_frames = len(frames)
        dof_frame = torch.zeros(self.n_joints, dtype=torch.long)
        joint_idx = self.chain.joint_indices
        for f in range(n_frames):
            j = int(joint_idx[f])
            if j >= 0:
                dof_frame[j] = f
        ancestor = torch.zeros(self.n_joints, n_frames, dtype=dtype)
        for f in range(n_frames):
            anc = {int(x) for x in self.chain.parents_indices[f]}
            for j in range(self.n_joints):
                ancestor[j, f] = float(int(dof_frame[j]) in anc)
        self._dof_frame = dof_frame.to(device)
        self._ancestor = ancestor.to(device)
        types = self.chain.joint_type_indices[dof_frame]
        self._dof_revolute = (types == 1).to(device)
        #: (n,) bool numpy: True for a revolute (or continuous) joint, False for a prismatic one
        self.joint_is_revolute = self._dof_revolute.cpu().numpy().copy()
        self._axes = self.chain.axes.to(dtype=dtype, device=device)
        self._base_idx = frames[definition.base_link]
        self._ee_idx = frames[definition.end_effector]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, robot_description: str | None = None,
                  **kwargs) -> "RobotModel":
        """Build from a keypoint YAML; ``robot_description`` (URDF XML) overrides its URDF file."""
        return cls(RobotDefinition.from_yaml(path), urdf_xml=robot_description, **kwargs)

    @property
    def keypoint_names(self) -> list[str]:
        return self.definition.keypoint_names

    @property
    def num_keypoints(self) -> int:
        return self.definition.num_keypoints

    def joint_vector(self, names: Sequence[str], positions: Sequence[float],
                     default: torch.Tensor | None = None) -> torch.Tensor:
        """Order ``positions`` given for ``names`` into this model's joint vector (n,).

        Names not in the URDF raise ``ValueError``; joints of the model missing
        from ``names`` take ``default`` (or raise when no default is given).
        """
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in names if n not in self.joint_names]
        if unknown and not any(n in index for n in self.joint_names):
            raise ValueError(f"joint names {unknown} are not in the URDF (expected {self.joint_names})")
        q = torch.empty(self.n_joints, dtype=self.dtype, device=self.device)
        for j, n in enumerate(self.joint_names):
            if n in index:
                q[j] = float(positions[index[n]])
            elif default is not None:
                q[j] = default[j]
            else:
                raise ValueError(f"joint '{n}' missing from joint state (got {list(names)})")
        return q

    # --------------------------------------------------------------- kinematics
    def _check_q(self, q: torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(q, dtype=self.dtype, device=self.device)
        if q.ndim == 1:
            q = q.unsqueeze(0)
        if q.ndim != 2 or q.shape[-1] != self.n_joints:
            raise ValueError(f"Invalid joint shape, we expect Bx{self.n_joints}. Got: {tuple(q.shape)}")
        return q

    def frame_poses(self, q: torch.Tensor) -> torch.Tensor:
        """All frames' poses in the base frame: q (B, n) -> (F, B, 4, 4)."""
        q = self._check_q(q)
        # analytical_grad=False keeps plain autograd ops, so the solver can
        # differentiate through Jacobians built from these poses.
        T = self.chain.forward_kinematics_tensor(q, analytical_grad=False)
        if self._base_idx != 0:
            T = torch.linalg.inv(T[self._base_idx]).unsqueeze(0) @ T
        return T

    def link_pose(self, q: torch.Tensor, link: str) -> torch.Tensor:
        """Pose of ``link`` in the base frame, (B, 4, 4)."""
        return self.frame_poses(q)[self.chain.frame_to_idx[link]]

    def ee_pose(self, q: torch.Tensor) -> torch.Tensor:
        """End-effector pose in the base frame, (B, 4, 4)."""
        return self.frame_poses(q)[self._ee_idx]

    def keypoints_3d(self, q: torch.Tensor) -> torch.Tensor:
        """Keypoints in the base frame: q (B, n) -> (B, K, 3) metres."""
        return self.keypoints_and_jacobian(q, jacobian=False)[0]

    def keypoints_and_jacobian(self, q: torch.Tensor, jacobian: bool = True):
        """Keypoints in the base frame and their Jacobian w.r.t. q.

        Returns ``(points (B, K, 3), J (B, K, 3, n) or None)``. For a revolute
        joint j with world axis z_j through o_j: dp/dq_j = z_j x (p - o_j);
        prismatic: dp/dq_j = z_j; zero unless joint j is an ancestor of the
        point's link.
        """
        T = self.frame_poses(q)  # (F, B, 4, 4)
        Tk = T[self._kp_frame]  # (K, B, 4, 4)
        p = (Tk[..., :3, :3] @ self._kp_offset[:, None, :, None]).squeeze(-1) + Tk[..., :3, 3]
        p = p.transpose(0, 1)  # (B, K, 3)
        if not jacobian:
            return p, None
        Td = T[self._dof_frame]  # (n, B, 4, 4)
        z = (Td[..., :3, :3] @ self._axes[:, None, :, None]).squeeze(-1).transpose(0, 1)  # (B, n, 3)
        o = Td[..., :3, 3].transpose(0, 1)  # (B, n, 3)
        lever = p[:, :, None, :] - o[:, None, :, :]  # (B, K, n, 3)
        zb = z[:, None].expand_as(lever)
        rev = torch.linalg.cross(zb, lever)
        col = torch.where(self._dof_revolute[None, None, :, None], rev, zb)
        mask = self._ancestor[:, self._kp_frame].T * (~self._kp_world)[:, None]  # (K, n)
        J = (col * mask[None, :, :, None]).permute(0, 1, 3, 2)  # (B, K, 3, n)
        return p, J

    def ee_jacobian(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """End-effector pose and geometric Jacobian in the base frame.

        Returns ``(T (B, 4, 4), J (B, 6, n))`` with rows (linear xyz, angular xyz).
        """
        T = self.frame_poses(q)
        Te = T[self._ee_idx]
        Td = T[self._dof_frame]
        z = (Td[..., :3, :3] @ self._axes[:, None, :, None]).squeeze(-1).transpose(0, 1)  # (B, n, 3)
        o = Td[..., :3, 3].transpose(0, 1)
        lever = Te[:, None, :3, 3] - o
        lin = torch.where(self._dof_revolute[None, :, None], torch.linalg.cross(z, lever), z)
        ang = torch.where(self._dof_revolute[None, :, None], z, torch.zeros_like(z))
        mask = self._ancestor[:, self._ee_idx][None, :, None]
        J = torch.cat([lin * mask, ang * mask], dim=-1).transpose(1, 2)  # (B, 6, n)
        return Te, J

    def keypoints_in_ee(self, q: torch.Tensor, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Keypoints expressed in the end-effector frame, (B, K', 3)."""
        p = self.keypoints_3d(q)
        if indices is not None:
            p = p[:, list(indices)]
        Te = self.ee_pose(q)
        R, t = Te[:, :3, :3], Te[:, :3, 3]
        return (p - t[:, None]) @ R

    def random_configuration(self, batch: int, generator: torch.Generator | None = None,
                             margin: float = 0.1) -> torch.Tensor:
        """Uniform joint configurations inside the limits (shrunk by ``margin`` of the range)."""
        lo, hi = self.joint_lower, self.joint_upper
        span = hi - lo
        u = torch.rand(batch, self.n_joints, generator=generator, dtype=self.dtype)
        return lo + span * (margin + (1 - 2 * margin) * u)
