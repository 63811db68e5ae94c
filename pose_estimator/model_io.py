"""Saving and loading trained models: safetensors only, so loading never runs code.

A model file is a ``.safetensors`` file whose tensors are the HeatmapNet
state dict and whose string metadata carries ``format`` (``pose_estimator.model``),
``format_version``, the network config, the robot name and the keypoint
names, all JSON. Anything else is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelFormatError", "save_model", "load_model", "update_model_extra", "MODEL_FORMAT",
           "MODEL_FORMAT_VERSION"]

MODEL_FORMAT = "pose_estimator.model"
MODEL_FORMAT_VERSION = 1


class ModelFormatError(ValueError):
    """The file exists but is not a usable pose_estimator model."""


def save_model(path: str | os.PathLike, net, robot: str, keypoint_names: list[str],
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``net`` atomically (temp file + rename) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": MODEL_FORMAT,
        "format_version": str(MODEL_FORMAT_VERSION),
        "network": json.dumps(asdict(net.config)),
        "robot": robot,
        "keypoint_names": json.dumps(list(keypoint_names)),
        "extra": json.dumps(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a model file; returns ``(HeatmapNet in eval mode, metadata dict)``.

    The metadata dict has ``robot``, ``keypoint_names``, ``extra`` (training
    record, calibration factors, kinematic-prior width) and ``network``.

    Raises ``FileNotFoundError`` when missing and :class:`ModelFormatError`
    when truncated, corrupt or not a pose_estimator model.
    """
    from safetensors import SafetensorError, safe_open

    from .network import HeatmapNet, HeatmapNetConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{path}: not a readable safetensors model file ({e})") from e
    if meta.get("format") != MODEL_FORMAT:
        raise ModelFormatError(f"{path}: not a pose_estimator model (format={meta.get('format')!r})")
    if int(meta.get("format_version", -1)) > MODEL_FORMAT_VERSION:
        raise ModelFormatError(f"{path}: model format_version {meta.get('format_version')} is newer than "
                               f"this pose_estimator supports ({MODEL_FORMAT_VERSION})")
    try:
        net_cfg = HeatmapNetConfig(**json.loads(meta["network"]))
        info = {
            "robot": meta.get("robot", ""),
            "keypoint_names": json.loads(meta.get("keypoint_names", "[]")),
            "extra": json.loads(meta.get("extra", "{}")),
            "network": net_cfg,
        }
        net = HeatmapNet(net_cfg)
        net.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{path}: model metadata or weights do not match the network ({e})") from e
    return net.to(device).eval(), info


def update_model_extra(path: str | os.PathLike, **extra: Any) -> Path:
    """Rewrite a model file (atomically) with ``extra`` merged into its metadata."""
    net, info = load_model(path)
    merged = {**info["extra"], **extra}
    return save_model(path, net, robot=info["robot"], keypoint_names=info["keypoint_names"], extra=merged)
