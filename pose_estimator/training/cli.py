"""``pose-estimator train`` and ``pose-estimator evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_train_arguments", "cli_train", "add_pack_arguments", "cli_pack", "add_evaluate_arguments", "cli_evaluate",
           "add_calibrate_arguments", "cli_calibrate"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True,
                   help="dataset folder(s) written by `pose-estimator generate`, or packs (`pose-estimator pack`)")
    p.add_argument("--out", required=True, help="run folder: checkpoint, metrics, model (re-running resumes)")
    p.add_argument("--config", help="YAML with TrainConfig fields (network, losses, augment, ...)")
    p.add_argument("--robot", help="robot definition name or keypoint YAML (default panda)")
    p.add_argument("--labels", choices=["truth", "labels"],
                   help="keypoint targets: the simulator's ('truth') or `pose-estimator label` output ('labels')")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--time-limit", type=float, dest="time_limit_s", metavar="SECONDS",
                   help="stop after this long (checkpoint and model written; re-running resumes)")
    p.add_argument("--no-pose-loss", action="store_true", help="switch off the loss through the solver")
    p.add_argument("--no-displacement-loss", action="store_true", help="switch off the displacement loss")
    p.add_argument("--init-from", help="start from another run's checkpoint.pt (weights, optimiser, step)")
    p.add_argument("--init-weights", help="start from a model file's weights (same architecture)")
    p.add_argument("--install", metavar="PATH", help="copy the finished model here (e.g. resource/models/panda.safetensors)")
    p.add_argument("--no-progress", action="store_true")


def _train_config(args: argparse.Namespace):
    import yaml

    from .train import config_from_mapping

    data: dict = {}
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text()) or {}
    data["data"] = list(args.data)
    data["out"] = args.out
    for flag in ("robot", "labels", "steps", "batch_size", "lr", "seed", "device", "threads", "init_from",
                 "init_weights", "time_limit_s"):
        v = getattr(args, flag)
        if v is not None:
            data[flag] = v
    if args.no_pose_loss:
        data.setdefault("losses", {})["pose"] = 0.0
    if args.no_displacement_loss:
        data.setdefault("losses", {})["displacement"] = 0.0
    return config_from_mapping(data)


def cli_train(args: argparse.Namespace) -> int:
    import shutil

    from .train import train

    cfg = _train_config(args)
    row = train(cfg, progress=not args.no_progress)
    model = Path(cfg.out) / "model.safetensors"
    if args.install:
        Path(args.install).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, args.install)
        print(f"installed {model} -> {args.install}")
    print(json.dumps({"model": str(model), **{k: v for k, v in row.items()}}))
    return 0


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="dataset folder(s) written by `pose-estimator generate`")
    p.add_argument("--out", required=True, help="pack folder (pack.npz, pack.json); rewritten")
    p.add_argument("--robot", default="panda", help="robot definition name or keypoint YAML (default panda)")
    p.add_argument("--size", type=int, default=192, help="arm region size, px (default 192)")
    p.add_argument("--context", type=float, default=1.5,
                   help="arm region: the estimator's region of interest times this, room for crop jitter (default 1.5)")
    p.add_argument("--full-size", type=int, default=128, help="whole-frame image size, px (default 128)")
    p.add_argument("--format", choices=["webp", "jpg"], default="webp", help="image format (default webp)")
    p.add_argument("--quality", type=int, default=90, help="arm regions' image quality (default 90)")
    p.add_argument("--full-quality", type=int, default=75, help="whole frames' image quality (default 75)")
    p.add_argument("--roi-margin", type=float, default=0.25, help="the region's margin (augment.roi_margin, default 0.25)")
    p.add_argument("--frame-step", type=int, default=1, help="keep every n-th frame of each sequence (default 1)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the pack's description as one JSON object")
    p.add_argument("--no-progress", action="store_true")


def cli_pack(args: argparse.Namespace) -> int:
    from ..robot import RobotModel
    from .packed import pack_datasets

    meta = pack_datasets(args.data, RobotModel.from_yaml(args.robot), args.out, size=args.size, context=args.context,
                         full_size=args.full_size, quality=args.quality, full_quality=args.full_quality,
                         image_format=args.format, roi_margin=args.roi_margin, frame_step=args.frame_step,
                         workers=args.workers, progress=not args.no_progress)
    print(json.dumps(meta) if args.json else
          f"packed {meta['frames']} frames ({meta['sequences']} sequences) into {args.out}: "
          f"{meta['bytes'] / 2**20:.1f} MiB")
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model file (default: the shipped resource/models/<robot>.safetensors)")
    p.add_argument("--data", required=True, help="held-out dataset folder")
    p.add_argument("--config", help="estimator YAML (config/estimator.yaml layout)")
    p.add_argument("--mode", choices=["articulated", "rigid"])
    p.add_argument("--keypoint-method", choices=["softargmax", "gaussian_fit"])
    p.add_argument("--unweighted", action="store_true", help="ablation: ignore the keypoint covariances in the solver")
    p.add_argument("--extrinsic", choices=["given", "none"], default="given",
                   help="seed camera-from-base with the recording's extrinsic, or find it (PnP, then tracking)")
    p.add_argument("--max-frames", type=int)
    p.add_argument("--plots", help="folder for the PNG plots (default: results/eval/<model>-<data>/ in the working "
                                   "directory, never beside the model: an installed model's folder is not ours to write)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.add_argument("--no-progress", action="store_true")


def default_model(robot: str = "panda") -> Path:
    from ..robot import resource_dir

    return resource_dir() / "models" / f"{robot}.safetensors"


def cli_evaluate(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .evaluate import dumps, evaluate

    overrides: dict = {}
    if args.mode:
        overrides["mode"] = args.mode
    if args.keypoint_method:
        overrides["keypoint_method"] = args.keypoint_method
    if args.unweighted:
        overrides.setdefault("solver", {})["unweighted"] = True
    cfg = load_config(args.config, overrides)
    model = Path(args.model) if args.model else default_model(Path(cfg.robot).stem)
    plots = Path(args.plots) if args.plots else Path("results", "eval", f"{model.stem}-{Path(args.data).resolve().name}")
    m = evaluate(model, args.data, cfg, extrinsic=args.extrinsic, max_frames=args.max_frames, plots_dir=plots,
                 progress=not args.no_progress)
    if args.json:
        print(dumps(m))
    else:
        w = max(len(k) for k in m)
        for k, v in m.items():
            print(f"{k:<{w}}  {v:.4g}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    print(f"plots: {plots}", file=sys.stderr)
    return 0


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model file to calibrate (rewritten in place unless --dry-run)")
    p.add_argument("--data", required=True, help="held-out dataset (not the training data, not the test data)")
    p.add_argument("--config", help="estimator YAML the model will run with (the pose factor depends on its priors)")
    p.add_argument("--max-frames", type=int)
    p.add_argument("--no-joint-prior-fit", action="store_true",
                   help="leave the joint prior at the config's joint_sigma (else the factor on it with the lowest "
                        "end-effector error on DATA is stored in the model)")
    p.add_argument("--dry-run", action="store_true", help="print the factors, leave the model alone")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


def cli_calibrate(args: argparse.Namespace) -> int:
    from ..model_io import update_model_extra
    from .evaluate import JOINT_PRIOR_SCALES, calibrate_variance

    from ..config import load_config

    m = calibrate_variance(args.model, args.data, max_frames=args.max_frames, config=load_config(args.config),
                           joint_prior_scales=None if args.no_joint_prior_fit else JOINT_PRIOR_SCALES)
    if not args.dry_run:
        update_model_extra(args.model, keypoint_variance_scale=m["keypoint_variance_scale"],
                           pose_covariance_scale=m["pose_covariance_scale"], joint_prior_scale=m["joint_prior_scale"],
                           pose_covariance_scale_no_extrinsic=m["pose_covariance_scale_no_extrinsic"],
                           calibration={k: v for k, v in m.items() if not k.endswith(("_scale", "_no_extrinsic"))}
                           | {"data": str(args.data)})
    if args.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:<26} {v:.4g}" if isinstance(v, float) else f"{k:<26} {v}")
    return 0
