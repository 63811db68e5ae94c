"""Play a rosbag2 recording into the ROS graph, for machines without ``ros2 bag``.

``pose-estimator play BAG [--rate R] [--loop]`` (or ``python -m
pose_estimator.ros.player BAG ...``) does what ``ros2 bag play`` does for the
pose estimator's recordings: it reads the recording with ``rosbags`` (MCAP or
SQLite3) and publishes every message's *serialized bytes* unchanged (rclpy
``Publisher.publish(bytes)``, no deserialization) at its recorded time offset
scaled by ``1 / rate``. Topics that were offered transient-local in the
recording, and ``/tf_static`` and ``/robot_description`` in any case, are
published transient-local so late subscribers still receive them. With
``--loop`` the recording starts over when it ends; header stamps are
replayed as recorded, so they jump backwards at each loop -- exactly what a
node must handle.

BAG may be a rosbag2 folder (with ``metadata.yaml``) or a generated sequence
folder that holds one in ``bag/``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["BagPlayer", "PlayStats", "add_play_arguments", "cli_play", "resolve_bag", "main",
           "ALWAYS_LATCHED"]

#: Topics published transient-local even when the recording does not say so.
ALWAYS_LATCHED = ("/tf_static", "/robot_description")


def resolve_bag(path: str | Path) -> Path:
    """The rosbag2 folder for ``path`` (a bag folder, or a sequence folder containing ``bag/``)."""
    p = Path(path).expanduser()
    if (p / "metadata.yaml").is_file():
        return p
    if (p / "bag" / "metadata.yaml").is_file():
        return p / "bag"
    if p.is_file() and p.suffix in (".mcap", ".db3") and (p.parent / "metadata.yaml").is_file():
        return p.parent
    raise FileNotFoundError(f"no rosbag2 recording at {p} (expected a folder with metadata.yaml, or a "
                            "sequence folder with bag/metadata.yaml)")


def _message_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rclpy message class (ImportError/AttributeError when missing)."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


@dataclass
class PlayStats:
    messages: int = 0
    loops: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    skipped_topics: dict[str, str] = field(default_factory=dict)  # topic -> why
    duration_s: float = 0.0


class BagPlayer:
    """Publishes a recording's serialized messages with their recorded timing (see the module docstring).

    Args:
        node: an rclpy node to create the publishers on.
        bag: recording folder (see :func:`resolve_bag`).
        rate: playback speed factor (2.0 = twice as fast).
        loop: start over at the end.
        topics: play only these topics (default all); ``exclude``: never these.
        clock: also publish ``/clock`` (rosgraph_msgs/Clock) with the recorded time.
        on_publish: called as ``on_publish(topic, log_time_ns, wall_monotonic)`` after each publish.
        remap: ``{recorded_topic: published_topic}``.
    """

    def __init__(self, node, bag: str | Path, rate: float = 1.0, loop: bool = False,
                 topics: Sequence[str] | None = None, exclude: Sequence[str] = (), clock: bool = False,
                 on_publish: Callable[[str, int, float], None] | None = None, remap: dict[str, str] | None = None):
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.node = node
        self.path = resolve_bag(bag)
        self.rate = float(rate)
        self.loop = loop
        self.on_publish = on_publish
        self.remap = dict(remap or {})
        self.stats = PlayStats()
        self._stop = threading.Event()
        from rosbags.rosbag2 import Reader

        from .qos import latched_qos, output_qos

        self._Reader = Reader
        self.publishers: dict[str, object] = {}
        self.latched: set[str] = set()
        with Reader(self.path) as reader:
            self.start_ns, self.end_ns = reader.start_time, reader.end_time
            self.message_count = reader.message_count
            for conn in reader.connections:
                topic = conn.topic
                if (topics and topic not in topics) or topic in exclude or topic in self.publishers:
                    continue
                try:
                    cls = _message_class(conn.msgtype)
                except (ImportError, AttributeError, ValueError) as e:
                    self.stats.skipped_topics[topic] = f"message type {conn.msgtype} not importable ({e})"
                    continue
                latched = topic in ALWAYS_LATCHED or _offered_transient_local(conn)
                qos = latched_qos() if latched else output_qos(depth=10)
                if latched:
                    self.latched.add(topic)
                self.publishers[topic] = node.create_publisher(cls, self.remap.get(topic, topic), qos)
        self._clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock

            self._Clock = Clock
            self._clock_pub = node.create_publisher(Clock, "/clock", output_qos(depth=10))

    def stop(self) -> None:
        """Ask :meth:`play` to return (thread-safe)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait_for_subscribers(self, topics: Sequence[str], timeout: float = 10.0) -> list[str]:
        """Wait (polling the graph, with a deadline) until each topic has a subscriber; returns those that have none."""
        deadline = time.monotonic() + timeout
        missing = list(topics)
        while True:
            missing = [t for t in topics if t in self.publishers and
                       self.publishers[t].get_subscription_count() == 0]
            missing += [t for t in topics if t not in self.publishers]
            if not missing or time.monotonic() >= deadline or self._stop.is_set():
                return missing
            self._stop.wait(0.01)

    def play(self, max_loops: int | None = None, duration_s: float | None = None) -> PlayStats:
        """Publish until the end (or ``max_loops`` loops, ``duration_s`` seconds, or :meth:`stop`)."""
        t_start = time.monotonic()
        end = None if duration_s is None else t_start + duration_s
        while not self._stop.is_set():
            self._play_once(end)
            self.stats.loops += 1
            if not self.loop or (max_loops is not None and self.stats.loops >= max_loops):
                break
            if end is not None and time.monotonic() >= end:
                break
        self.stats.duration_s = time.monotonic() - t_start
        return self.stats

    def _play_once(self, end: float | None) -> None:
        with self._Reader(self.path) as reader:
            conns = [c for c in reader.connections if c.topic in self.publishers]
            t0_wall = time.monotonic()
            t0_bag = None
            last_clock = None
            for conn, stamp_ns, raw in reader.messages(connections=conns):
                if t0_bag is None:
                    t0_bag = stamp_ns
                target = t0_wall + (stamp_ns - t0_bag) * 1e-9 / self.rate
                while True:
                    now = time.monotonic()
                    if self._stop.is_set() or (end is not None and now >= end) or not self.node.context.ok():
                        return
                    if now >= target:
                        break
                    self._stop.wait(min(target - now, 0.05))
                if self._clock_pub is not None and (last_clock is None or stamp_ns - last_clock >= 10_000_000):
                    c = self._Clock()
                    c.clock.sec, c.clock.nanosec = divmod(int(stamp_ns), 1_000_000_000)
                    self._clock_pub.publish(c)
                    last_clock = stamp_ns
                self.publishers[conn.topic].publish(bytes(raw))
                self.stats.messages += 1
                self.stats.per_topic[conn.topic] = self.stats.per_topic.get(conn.topic, 0) + 1
                if self.on_publish is not None:
                    self.on_publish(conn.topic, int(stamp_ns), time.monotonic())


def _offered_transient_local(conn) -> bool:
    """Whether the recording says the topic was offered transient-local (rosbags' parsed QoS, or its YAML)."""
    ext = getattr(conn, "ext", None)
    profiles = getattr(ext, "offered_qos_profiles", None)
    if profiles is None:
        return False
    if isinstance(profiles, str):  # older rosbags: the raw YAML
        return "durability: 1" in profiles or "transient_local" in profiles.lower()
    for q in profiles:
        d = getattr(q, "durability", None)
        if getattr(d, "name", "") == "TRANSIENT_LOCAL":
            return True
    return False


# ---------------------------------------------------------------------- command line
def add_play_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``pose-estimator play`` (also used by ``python -m pose_estimator.ros.player``)."""
    parser.add_argument("bag", help="rosbag2 folder (metadata.yaml + .mcap/.db3), or a generated sequence "
                                    "folder containing bag/")
    parser.add_argument("--rate", "-r", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", "-l", action="store_true", help="start over at the end")
    parser.add_argument("--topics", nargs="+", default=None, metavar="TOPIC", help="play only these topics")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="TOPIC", help="do not play these topics")
    parser.add_argument("--clock", action="store_true", help="publish /clock with the recorded time "
                                                             "(for use_sim_time nodes)")
    parser.add_argument("--wait-for", nargs="+", default=[], metavar="TOPIC",
                        help="wait until these topics have a subscriber before starting")
    parser.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for --wait-for")
    parser.add_argument("--loops", type=int, default=None, help="with --loop: stop after this many loops")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO", help="publish topic FROM as TO")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    return parser


def cli_play(args: argparse.Namespace) -> int:
    """Run ``play`` with parsed ``args``; returns the exit code (0 done or interrupted, 1 bad recording, 2 usage)."""
    import rclpy

    remap = {}
    for r in args.remap:
        if ":=" not in r:
            print(f"play: --remap expects FROM:=TO, got '{r}'", file=sys.stderr)
            return 2
        a, b = r.split(":=", 1)
        remap[a] = b
    try:
        bag = resolve_bag(args.bag)
    except FileNotFoundError as e:
        print(f"play: {e}", file=sys.stderr)
        return 1
    own_context = not rclpy.ok()
    if own_context:
        try:  # Ctrl-C / SIGINT as a plain KeyboardInterrupt, so playback ends cleanly
            from rclpy.signals import SignalHandlerOptions

            rclpy.init(args=None, signal_handler_options=SignalHandlerOptions.NO)
        except (ImportError, TypeError):
            rclpy.init(args=None)
    node = rclpy.create_node("pose_estimator_player")
    code = 0
    try:
        try:
            player = BagPlayer(node, bag, rate=args.rate, loop=args.loop, topics=args.topics, exclude=args.exclude,
                               clock=args.clock, remap=remap)
        except Exception as e:  # noqa: BLE001 - rosbags raises several kinds for a broken recording
            print(f"play: cannot read {bag}: {e}", file=sys.stderr)
            return 1
        for topic, why in player.stats.skipped_topics.items():
            print(f"play: skipping {topic}: {why}", file=sys.stderr)
        if args.wait_for:
            missing = player.wait_for_subscribers(args.wait_for, args.wait_timeout)
            if missing:
                print(f"play: no subscriber on {missing} after {args.wait_timeout} s; playing anyway",
                      file=sys.stderr)
        if not args.quiet:
            span = (player.end_ns - player.start_ns) * 1e-9
            print(f"play: {bag} ({player.message_count} messages, {span:.1f} s, {len(player.publishers)} topics) "
                  f"at rate {args.rate}{' looping' if args.loop else ''}", file=sys.stderr)
        try:
            stats = player.play(max_loops=args.loops, duration_s=args.duration)
        except KeyboardInterrupt:  # like `ros2 bag play`: stopping playback is a normal end
            player.stop()
            if not args.quiet:
                print(f"play: stopped after {player.stats.messages} messages", file=sys.stderr)
            return 0
        if not args.quiet:
            print(f"play: published {stats.messages} messages in {stats.duration_s:.1f} s "
                  f"({stats.loops} loop(s))", file=sys.stderr)
    finally:
        node.destroy_node()
        if own_context and rclpy.ok():
            rclpy.try_shutdown()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pose_estimator.ros.player",
                                     description="Play a rosbag2 recording (like `ros2 bag play`).")
    add_play_arguments(parser)
    return cli_play(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
