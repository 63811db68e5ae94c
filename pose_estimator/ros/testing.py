"""Helpers shared by the ROS tests and the benchmark: recordings, a model file, an in-process ROS graph.

* :func:`make_recording` -- a small generated Panda recording (rosbag2), made
  once per folder (generation is resumable and deterministic).
* :func:`make_model` -- an untrained model file for plumbing tests (the
  solver then refuses, or publishes a prior-sized covariance: a test of
  "no confident wrong pose").
* :class:`RosGraph` -- an rclpy context of its own with an executor spinning
  in a thread, and :func:`wait_for` (conditions with deadlines, never sleeps).

Every process that uses these must run with loopback-only discovery and its
own ``ROS_DOMAIN_ID`` (test/conftest.py sets both).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["make_recording", "make_model", "RosGraph", "wait_for", "Collector"]


def make_recording(root: str | Path, frames: int = 20, width: int = 320, height: int = 256, seed: int = 3,
                   fps: float = 30.0) -> Path:
    """One generated sequence with a bag; returns the sequence folder (``.../seq_00000``, bag in ``bag/``)."""
    from ..sim import GeneratorConfig, generate_dataset

    root = Path(root) / f"rec_{width}x{height}_{frames}f_{fps:g}fps_s{seed}"
    if not (root / "COMPLETE").is_file():
        cfg = GeneratorConfig(sequences=1, frames_per_sequence=frames, width=width, height=height, bag=True,
                              seed=seed, fps=fps)
        generate_dataset(cfg, root, workers=1, progress=False)
    return root / "seq_00000"


def make_model(path: str | Path, robot: str = "panda", seed: int = 0, extra: dict | None = None,
               **net_kwargs) -> Path:
    """An untrained model file for ``robot`` (deterministic weights); ``extra``: its metadata's ``extra``
    (e.g. ``{"refine_margin": 0.8}``, a model trained for the end effector's close crop)."""
    import torch

    from ..model_io import save_model
    from ..network import HeatmapNet, HeatmapNetConfig
    from ..robot import RobotDefinition

    path = Path(path)
    if path.is_file():
        return path
    d = RobotDefinition.from_yaml(robot)
    torch.manual_seed(seed)
    net = HeatmapNet(HeatmapNetConfig(num_keypoints=d.num_keypoints, **net_kwargs))
    return save_model(path, net, robot=robot, keypoint_names=d.keypoint_names, extra=extra)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, period: float = 0.01) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(period)


class Collector:
    """A subscription callback that keeps every message (thread-safe list)."""

    def __init__(self):
        self.messages: list = []
        self._lock = threading.Lock()

    def __call__(self, msg) -> None:
        with self._lock:
            self.messages.append(msg)

    def __len__(self) -> int:
        with self._lock:
            return len(self.messages)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.messages)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()


class RosGraph:
    """An rclpy context with a multi-threaded executor spinning in a background thread.

    Use as a context manager; nodes made with :meth:`node` (or added with
    :meth:`add`) are spun and destroyed with it.
    """

    def __init__(self, threads: int = 2):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor

        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self.nodes: list = []
        self._thread = threading.Thread(target=self._spin, name="ros_graph_spin", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, RuntimeError):
            pass

    def node(self, name: str, **kwargs):
        import rclpy

        return self.add(rclpy.create_node(name, context=self.context, **kwargs))

    def add(self, node):
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def remove(self, node) -> None:
        self.executor.remove_node(node)
        if node in self.nodes:
            self.nodes.remove(node)
        node.destroy_node()

    def close(self) -> None:
        for n in list(self.nodes):
            try:
                self.remove(n)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self.executor.shutdown(timeout_sec=5.0)
        self.context.try_shutdown()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> "RosGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
