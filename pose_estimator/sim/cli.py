"""Command-line hooks: ``pose-estimator generate`` and ``pose-estimator contact-sheet``.

The main CLI (:mod:`pose_estimator.cli`) owns the parser; it calls
``add_*_arguments(subparser)`` and dispatches to ``cli_*(args)``, which
return a process exit code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["add_generate_arguments", "cli_generate", "add_contact_sheet_arguments", "cli_contact_sheet"]


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``generate`` (flags given override the --config file, which overrides the defaults)."""
    parser.add_argument("--robot", default=None, help="robot definition: a name under resource/robots/ or a "
                        "keypoint YAML path (default: panda)")
    parser.add_argument("--out", required=True, help="dataset folder (created; re-running resumes)")
    parser.add_argument("--sequences", type=int, default=None, help="number of sequences (default 4)")
    parser.add_argument("--frames-per-sequence", type=int, default=None, help="frames per sequence (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--width", type=int, default=None, help="image width in px (default 640)")
    parser.add_argument("--height", type=int, default=None, help="image height in px (default 480)")
    parser.add_argument("--fps", type=float, default=None, help="camera rate in Hz (default 30)")
    parser.add_argument("--joint-rate", type=float, default=None,
                        help="joint-state rate in Hz, a multiple of --fps (default 120)")
    parser.add_argument("--bag", action="store_true", default=None, help="also write a rosbag2 recording per sequence")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: every core this process may use)")
    parser.add_argument("--config", default=None,
                        help="YAML with GeneratorConfig fields (camera, scene, board, joint_errors, trajectory, ...)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing dataset at --out first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _generator_config(args: argparse.Namespace):
    import yaml

    from .config import GeneratorConfig, config_from_dict

    data: dict = {}
    if args.config:
        p = Path(args.config)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of GeneratorConfig fields")
    for flag, key in [("robot", "robot"), ("sequences", "sequences"), ("frames_per_sequence", "frames_per_sequence"),
                      ("seed", "seed"), ("width", "width"), ("height", "height"), ("fps", "fps"),
                      ("joint_rate", "joint_rate"), ("bag", "bag")]:
        v = getattr(args, flag, None)
        if v is not None:
            data[key] = v
    return config_from_dict(GeneratorConfig, data, args.config or "generate")


def cli_generate(args: argparse.Namespace) -> int:
    """Run ``generate``; returns the exit code."""
    from .generate import default_workers, generate_dataset

    try:
        cfg = _generator_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pose-estimator generate: {e}", file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else default_workers()
    t0 = time.perf_counter()
    try:
        root = generate_dataset(cfg, args.out, workers=workers, progress=not args.no_progress,
                                overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"pose-estimator generate: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    n = cfg.sequences * cfg.frames_per_sequence
    print(f"{root}: {cfg.sequences} sequences x {cfg.frames_per_sequence} frames ({n} frames) "
          f"at {cfg.width}x{cfg.height}, {workers} worker(s), {dt:.1f} s")
    return 0


def add_contact_sheet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder written by generate")
    parser.add_argument("--out", default="sheet.png", help="output PNG (default sheet.png)")
    parser.add_argument("--frames", type=int, default=12, help="number of frames (default 12)")
    parser.add_argument("--columns", type=int, default=4, help="grid columns (default 4)")
    parser.add_argument("--scale", type=int, default=2, help="upscaling of each frame (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="which frames to pick (default 0)")


def cli_contact_sheet(args: argparse.Namespace) -> int:
    from .contact_sheet import make_contact_sheet

    try:
        out = make_contact_sheet(args.dataset, args.out, frames=args.frames, columns=args.columns, seed=args.seed,
                                 scale=args.scale)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"pose-estimator contact-sheet: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pose_estimator.sim``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="python -m pose_estimator.sim")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(sub.add_parser("generate", help="render a synthetic dataset"))
    add_contact_sheet_arguments(sub.add_parser("contact-sheet", help="draw a grid of annotated frames"))
    args = parser.parse_args(argv)
    return cli_generate(args) if args.command == "generate" else cli_contact_sheet(args)
