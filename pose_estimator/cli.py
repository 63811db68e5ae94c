"""The ``pose-estimator`` command: one entry point, one subcommand per job.

Subcommands register themselves from the modules that implement them, so a
module that is missing (an optional dependency not installed) removes only
its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.solver_only:
        from .demo import run_solver_demo

        run_solver_demo(args.robot, frames=args.frames, seed=args.seed, as_json=args.json)
        return 0
    from .demo import run_node_demo

    return run_node_demo(robot=args.robot, model=args.model, out=args.out, frames=args.frames, seed=args.seed,
                         as_json=args.json)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: a simulated sloppy Panda played into the node, scored",
                       description="Generate (or reuse) a rosbag2 recording of the simulated Panda with sloppy "
                                   "joint sensors, play it into the pose_estimator node (real DDS on loopback) "
                                   "and print end-effector error (kinematics alone vs the node), rate and "
                                   "latency; writes a few debug frames as PNG.")
    p.add_argument("--robot", default="panda", help="robot definition name or keypoint YAML path")
    p.add_argument("--model", default=None, help="model file (default: resource/models/<robot>.safetensors)")
    p.add_argument("--out", default="out/demo", help="folder for the recording and the debug PNGs")
    p.add_argument("--frames", type=int, default=150, help="frames in the recording (30 Hz)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--solver-only", action="store_true",
                   help="skip rendering and the node: the solver alone on kinematics-seeded noisy keypoints")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.set_defaults(func=_cmd_demo)


# Subcommands implemented elsewhere: (name, module, add-arguments function, run function, help).
_EXTERNAL = [
    ("generate", "pose_estimator.sim.cli", "add_generate_arguments", "cli_generate",
     "render a synthetic dataset (and rosbag2 recordings) of a sloppy arm"),
    ("contact-sheet", "pose_estimator.sim.cli", "add_contact_sheet_arguments", "cli_contact_sheet",
     "draw a few dataset frames with keypoints and board into one PNG"),
    ("label", "pose_estimator.groundtruth.cli", "add_label_arguments", "cli_label",
     "label a dataset: fiducial poses where the board is seen, interpolation elsewhere"),
    ("plot-labels", "pose_estimator.groundtruth.cli", "add_plot_arguments", "cli_plot",
     "plot one sequence's true, kinematic and labelled end-effector position"),
    ("train", "pose_estimator.training.cli", "add_train_arguments", "cli_train",
     "train HeatmapNet end to end on a labelled dataset (resumable)"),
    ("pack", "pose_estimator.training.cli", "add_pack_arguments", "cli_pack",
     "pack datasets' arm regions into a small file for training elsewhere (a GPU machine)"),
    ("evaluate", "pose_estimator.training.cli", "add_evaluate_arguments", "cli_evaluate",
     "run the full estimator on a held-out dataset and report accuracy"),
    ("calibrate", "pose_estimator.training.cli", "add_calibrate_arguments", "cli_calibrate",
     "fit the factor that makes a model's keypoint covariances honest on held-out data"),
    ("play", "pose_estimator.ros.player", "add_play_arguments", "cli_play",
     "publish a rosbag2 recording with its recorded timing (like ros2 bag play)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pose-estimator",
                                     description="Camera-based end-effector pose estimation for robot arms.")
    parser.add_argument("--version", action="version", version=f"pose_estimator {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    for name, module, add, run, help_ in _EXTERNAL:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            # Only a missing optional dependency (e.g. rclpy for `play`) hides a subcommand.
            if e.name and module.startswith(e.name):
                continue
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e: _unavailable(args, e))
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        getattr(mod, add)(p)
        p.set_defaults(func=getattr(mod, run))
    return parser


def _unavailable(args: argparse.Namespace, error: ImportError) -> int:
    print(f"pose-estimator {args.command}: unavailable here: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"pose-estimator {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pose-estimator {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
