"""Command-line hooks: ``label`` and ``plot-labels``.

The main CLI (:mod:`pose_estimator.cli`) owns the parser; it calls
``add_label_arguments(subparser)`` / ``add_plot_arguments(subparser)`` and
dispatches to ``cli_label(args)`` / ``cli_plot(args)``, which return a process
exit code. ``python -m pose_estimator.groundtruth`` runs them stand-alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_label_arguments", "cli_label", "add_plot_arguments", "cli_plot", "label_config_from_args",
           "add_cli_commands", "main"]

#: keys of the summary printed as the JSON line (the file labels.json has everything)
_JSON_KEYS = ("frames", "fiducial", "interpolated", "unlabelled", "keypoint_labels", "fiducial_pos_err_mm_median",
              "fiducial_raw_pos_err_mm_median", "interpolated_pos_err_mm_median", "interpolated_pos_err_mm_p90",
              "interpolated_rot_err_deg_median", "kinematic_pos_err_mm_median", "improvement_over_kinematics",
              "coverage95", "coverage95_fiducial", "coverage95_interpolated", "sequences_labelled",
              "sequences_without_fiducial", "longest_board_gap_s")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``label``."""
    parser.add_argument("dataset", help="dataset folder (written by generate)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    parser.add_argument("--config", default=None,
                        help="YAML with LabelConfig fields (gate: {...}, interpolation: {...}, joint_noise, "
                             "joint_smoothing_half_window)")
    parser.add_argument("--max-gap", type=float, default=None,
                        help="leave frames further than this many seconds from a good fiducial frame unlabelled "
                             "(default 2.0)")
    parser.add_argument("--max-position-sigma-mm", type=float, default=None,
                        help="gate: largest predicted 1-sigma position uncertainty of a fiducial frame (default 8)")
    parser.add_argument("--joint-model", choices=("none", "offset", "backlash"), default=None,
                        help="joint-space terms of the discrepancy state (default backlash)")
    parser.add_argument("--coco", default=None, help="COCO keypoint JSON with human labels to merge in")
    parser.add_argument("--keypoint-map", default=None,
                        help="COCO keypoint name -> robot keypoint name, 'a=b,c=d' (names that match need none)")
    parser.add_argument("--hide-board", type=float, default=None, metavar="SECONDS",
                        help="evaluation: ignore the board in stretches of SECONDS, separated by --show-board "
                             "seconds where it is used (stress-tests the interpolation across known gaps)")
    parser.add_argument("--show-board", type=float, default=None, metavar="SECONDS",
                        help="evaluation: length of the stretches between hidden ones (default 0.5)")
    parser.add_argument("--no-write", action="store_true", help="score only; write no label files")


def label_config_from_args(args: argparse.Namespace):
    import yaml

    from ..sim.config import config_from_dict
    from .labels import LabelConfig

    data: dict = {}
    if getattr(args, "config", None):
        p = Path(args.config)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of LabelConfig fields")
    cfg = config_from_dict(LabelConfig, data, getattr(args, "config", None) or "label")
    if getattr(args, "max_gap", None) is not None:
        cfg.interpolation.max_gap_s = float(args.max_gap)
    if getattr(args, "max_position_sigma_mm", None) is not None:
        cfg.gate.max_position_sigma_mm = float(args.max_position_sigma_mm)
    if getattr(args, "joint_model", None) is not None:
        cfg.interpolation.joint_model = args.joint_model
    if getattr(args, "hide_board", None) is not None:
        cfg.hide_board_s = float(args.hide_board)
    if getattr(args, "show_board", None) is not None:
        cfg.show_board_s = float(args.show_board)
    return cfg


def cli_label(args: argparse.Namespace) -> int:
    """Run ``label``; returns the exit code."""
    from .coco import parse_keypoint_map
    from .labels import label_dataset

    try:
        cfg = label_config_from_args(args)
        kmap = parse_keypoint_map(getattr(args, "keypoint_map", None))
    except (ValueError, FileNotFoundError) as e:
        print(f"pose-estimator label: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def progress(i, n, name, counts):
        print(f"[{i}/{n}] {name}: {counts['fiducial']} fiducial, {counts['interpolated']} interpolated, "
              f"{counts['unlabelled']} unlabelled", file=sys.stderr, flush=True)

    try:
        summary = label_dataset(args.dataset, cfg, coco=args.coco, keypoint_map=kmap, write=not args.no_write,
                                progress=progress)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"pose-estimator label: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    out = {k: summary[k] for k in _JSON_KEYS if k in summary}
    out["seconds"] = round(dt, 1)
    out["labels"] = None if args.no_write else str(Path(args.dataset) / "labels.json")
    print(f"{args.dataset}: {out['frames']} frames: {out['fiducial']} fiducial, {out['interpolated']} interpolated, "
          f"{out['unlabelled']} unlabelled ({dt:.1f} s)")
    if out.get("kinematic_pos_err_mm_median") is not None:
        print(f"  position error (median): fiducial labels {out.get('fiducial_pos_err_mm_median')} mm, "
              f"interpolated {out.get('interpolated_pos_err_mm_median')} mm, "
              f"kinematics alone {out.get('kinematic_pos_err_mm_median')} mm; coverage95 {out.get('coverage95')}")
    if args.json:
        print(json.dumps(out))
    return 0


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``plot-labels``."""
    parser.add_argument("dataset", help="dataset folder (labelled with 'label', or labelled on the fly)")
    parser.add_argument("--sequence", type=int, default=0, help="sequence index (default 0)")
    parser.add_argument("--out", default="labels.png", help="output PNG (default labels.png)")
    parser.add_argument("--config", default=None, help="LabelConfig YAML, used when labelling on the fly")


def cli_plot(args: argparse.Namespace) -> int:
    from .plot import plot_sequence_labels

    try:
        out = plot_sequence_labels(args.dataset, args.sequence, args.out, cfg=label_config_from_args(args))
    except (ValueError, FileNotFoundError, OSError, IndexError) as e:
        print(f"pose-estimator plot-labels: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def add_cli_commands(sub) -> None:
    """Register ``label`` and ``plot-labels`` on an ``add_subparsers()`` object (each sets ``func``)."""
    p = sub.add_parser("label", help="self-label a dataset: fiducial, interpolated and unlabelled frames",
                       description="Label every frame with the end-effector pose and covariance from the "
                                   "fiducial board and the measured joints; write labels.jsonl per sequence.")
    add_label_arguments(p)
    p.set_defaults(func=cli_label)
    p = sub.add_parser("plot-labels", help="plot one sequence's labels against truth and kinematics (PNG)")
    add_plot_arguments(p)
    p.set_defaults(func=cli_plot)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pose_estimator.groundtruth``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="python -m pose_estimator.groundtruth")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))
