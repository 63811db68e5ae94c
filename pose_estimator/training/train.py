"""End-to-end training of HeatmapNet (FIG. 4): resumable, deterministic, CPU or GPU, one or many processes.

Each step draws its batch and augmentation from ``numpy.random.default_rng((seed, step))``,
so a run resumed from a checkpoint continues exactly as if it had never
stopped, whatever the number of loader threads. A checkpoint (``RUN/checkpoint.pt``,
written atomically every ``checkpoint_every`` steps and at the end) holds the
network, optimiser and scheduler state as tensors and plain numbers, loaded
with ``torch.load(weights_only=True)``; the finished model is a safetensors file
(``RUN/model.safetensors``) that :func:`pose_estimator.model_io.load_model` reads.

Metrics go to ``RUN/metrics.csv`` and, when TensorBoard is installed, to
``RUN/tensorboard/``. Under ``torchrun`` each process trains on its slice of
every batch (DistributedDataParallel; NCCL on GPUs, Gloo on CPUs) and rank 0
writes. CUDA with mixed precision is used when a GPU is present.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import from_dict, to_dict
from ..model_io import save_model
from ..network import HeatmapNet, HeatmapNetConfig
from ..robot import RobotModel
from ..solver import SolverConfig
from .data import AugmentConfig, TrainingData, collate
from .losses import heatmap_loss, keypoint_nll, pose_losses, soft_argmax_outputs
from .packed import PackedData, is_pack

__all__ = ["LossWeights", "TrainConfig", "train", "load_checkpoint"]


@dataclass
class LossWeights:
    heatmap: float = 1.0
    keypoint_nll: float = 0.05
    pose: float = 0.05
    displacement: float = 0.02


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)
    out: str = "runs/panda"
    robot: str = "panda"
    labels: str = "truth"  # 'truth' (simulator keypoints) or 'labels' (pose-estimator label output)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    temperature: float = 1.0
    heatmap_sigma: float = 1.5  # heat-map px: the target Gaussian's width
    #: the solver-based losses start here (the keypoints must be roughly right first)
    pose_start_step: int = 500
    #: solver mode of the pose and displacement losses ('articulated' as the estimator runs, or 'rigid')
    pose_loss_mode: str = "articulated"
    checkpoint_every: int = 100
    #: > 0: stop after this many seconds of training (checkpoint and model written; re-running resumes),
    #: for a machine lent for a fixed time
    time_limit_s: float = 0.0
    #: also keep the checkpoint of these steps (RUN/checkpoint_step<N>.pt), e.g. where ablations branch off
    keep_checkpoints: list[int] = field(default_factory=list)
    log_every: int = 10
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    loader_threads: int = 2
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA
    #: start a new run from another run's checkpoint (weights, optimiser, step), e.g. for ablations
    #: that share a first phase; ignored when this run has a checkpoint of its own
    init_from: str = ""
    #: start a new run's network from a model file's weights (the same architecture, or an RGB-only one
    #: for a network with prior inputs); optimiser and step start afresh; ignored on resume
    init_weights: str = ""
    #: > 0 gives the network the kinematic prior as input, one Gaussian map per
    #: keypoint of this width (input px) where the measured joints project it; 0: RGB only
    prior_sigma: float = 0.0
    network: HeatmapNetConfig = field(default_factory=HeatmapNetConfig)
    losses: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError("batch_size must be even and >= 2 (frames come in pairs for the displacement loss)")


class _Done:
    """A finished future (a batch made in the training thread)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint without executing code (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, ws


def train(cfg: TrainConfig, progress: bool = True, log=print) -> dict:
    """Train (or resume) into ``cfg.out``; returns the final metrics row."""
    rank, world = _dist_info()
    if cfg.device == "auto":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        device = torch.device(cfg.device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    robot = RobotModel.from_yaml(cfg.robot)
    net_cfg = dataclasses.replace(cfg.network, num_keypoints=robot.num_keypoints,
                                  prior_channels=robot.num_keypoints if cfg.prior_sigma > 0 else 0)
    packs = [is_pack(r) for r in cfg.data]
    if any(packs) and not all(packs):
        raise ValueError("data: packs (`pose-estimator pack` output) and datasets cannot be mixed; pack them all")
    packed = bool(packs) and all(packs)
    if packed:
        if cfg.labels != "truth":
            raise ValueError("packed data holds the simulator's keypoints only: use labels 'truth'")
        data = PackedData(cfg.data, robot, net_cfg.input_size, net_cfg.stride, augment=cfg.augment,
                          prior_sigma=cfg.prior_sigma, device=device, workers=max(1, cfg.loader_threads))
    else:
        data = TrainingData(cfg.data, robot, net_cfg.input_size, net_cfg.stride, labels=cfg.labels,
                            augment=cfg.augment, prior_sigma=cfg.prior_sigma)
    net = HeatmapNet(net_cfg).to(device)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    ckpt_path = out / "checkpoint.pt"
    cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
    start = 0
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        # Read through today's TrainConfig: a field added since the checkpoint was written takes its
        # default, so an older run resumes as long as its settings mean the same.
        saved = json.loads(json.dumps(to_dict(config_from_mapping(json.loads(ck["config"]))), sort_keys=True))
        mine = json.loads(cfg_json)
        # Only the length of the run may change on resume.
        for k in ("steps", "init_from", "init_weights", "keep_checkpoints", "time_limit_s"):
            saved.pop(k, None)
            mine.pop(k, None)
        if saved != mine:
            raise ValueError(f"{ckpt_path} was written with different settings; use another --out or the "
                             "same settings (only --steps may change)")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if "scaler" in ck and use_amp:
            scaler.load_state_dict(ck["scaler"])
        start = int(ck["step"])
        if rank == 0:
            log(f"resuming {out} at step {start}/{cfg.steps}")
    elif cfg.init_weights:
        from ..model_io import load_model

        src, _ = load_model(cfg.init_weights)
        state = net.state_dict()
        for k, v in src.state_dict().items():
            # An RGB-only network's first layer seeds one with prior channels: the new inputs start at
            # zero weight, so training starts from exactly the source network's answers.
            if k in state and v.ndim == 4 and state[k].ndim == 4 and v.shape[1] < state[k].shape[1] \
                    and v.shape[0] == state[k].shape[0] and v.shape[2:] == state[k].shape[2:]:
                v = torch.cat([v, torch.zeros(v.shape[0], state[k].shape[1] - v.shape[1], *v.shape[2:])], 1)
            state[k] = v
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"init_weights {cfg.init_weights}: another architecture ({e})") from e
        if rank == 0:
            log(f"starting {out} from the weights of {cfg.init_weights}")
    elif cfg.init_from:
        ck = load_checkpoint(cfg.init_from)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        if rank == 0:
            log(f"starting {out} from {cfg.init_from} at step {start}")
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    writer = None
    csv_path = out / "metrics.csv"
    fields = ["step", "lr", "loss", "heatmap", "keypoint_nll", "pose", "displacement", "kp_err_px",
              "pose_err_mm", "pose_ok", "skipped_steps", "sec_per_step"]
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
        except ImportError:
            writer = None
        if start == 0 or not csv_path.is_file():
            with open(csv_path, "w", newline="") as fh:
                csv.writer(fh).writerow(fields)
        else:  # drop rows past the checkpoint (written after it, before a crash)
            rows = list(csv.reader(open(csv_path)))
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start]
            with open(csv_path, "w", newline="") as fh:
                csv.writer(fh).writerows(keep)

    solver_cfg = SolverConfig(max_iterations=15)
    # One thread prepares the next batch while this one trains; it fans the samples out to the loaders
    # (separate pools: a batch waiting on its own pool's threads would deadlock).
    loaders = ThreadPoolExecutor(max(1, cfg.loader_threads))
    pool = ThreadPoolExecutor(1)

    def make_batch(step: int):
        rng = np.random.default_rng((cfg.seed, step))
        idx = data.sample_pairs(rng, cfg.batch_size // 2)
        idx = idx[rank::world] if world > 1 else idx
        if packed:
            return data.batch(idx, rng)
        seeds = rng.integers(0, 2**63 - 1, size=len(idx))
        samples = list(loaders.map(lambda a: data.load(a[0], np.random.default_rng(a[1])), zip(idx, seeds)))
        return collate(samples)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    # Packed data is sampled on the training device, in this thread (the device queues the work).
    submit = (lambda st: _Done(make_batch(st))) if packed else (lambda st: pool.submit(make_batch, st))
    pending = submit(start) if start < cfg.steps else None
    row: dict = {}
    skipped = 0
    t_last = t_start = time.perf_counter()
    model.train()
    for step in range(start, cfg.steps):
        batch = pending.result()
        pending = submit(step + 1) if step + 1 < cfg.steps else None
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        x = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)
        logits = logits.float()
        # Heat-map losses where the network runs; the solver (float64, per-sample cameras) on the CPU.
        w = batch["kp_weight"]
        w_dev, kp_dev = w.to(device), batch["kp_hm"].to(device)
        lw = cfg.losses
        terms: dict[str, torch.Tensor] = {}
        if lw.heatmap > 0:
            terms["heatmap"] = heatmap_loss(logits, kp_dev.float(), w_dev.float(), cfg.heatmap_sigma)
        mean, cov = soft_argmax_outputs(logits, cfg.temperature)
        if lw.keypoint_nll > 0:
            terms["keypoint_nll"] = keypoint_nll(mean, cov, kp_dev, w_dev)
        stats: dict = {}
        if (lw.pose > 0 or lw.displacement > 0) and step >= cfg.pose_start_step:
            lp, ld, stats = pose_losses(mean.cpu(), cov.cpu(), batch, robot, solver_cfg, mode=cfg.pose_loss_mode,
                                        with_displacement=lw.displacement > 0)
            if lw.pose > 0:
                terms["pose"] = lp
            if lw.displacement > 0:
                terms["displacement"] = ld
        loss = sum(getattr(lw, k) * v.to(device, torch.float64) for k, v in terms.items())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        if torch.isfinite(loss) and torch.isfinite(gnorm):
            scaler.step(opt)
        else:  # a non-finite loss or gradient never reaches the weights
            skipped += 1
            opt.zero_grad(set_to_none=True)
            if use_amp:
                scaler.step(opt)  # lets the scaler lower its scale
        scaler.update()

        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            with torch.no_grad():
                valid = w > 0
                err = (torch.nan_to_num(mean.cpu() - batch["kp_hm"]).norm(dim=-1) * cfg.network.stride)[valid]
            now = time.perf_counter()
            row = {"step": done, "lr": opt.param_groups[0]["lr"], "loss": float(loss.detach()),
                   **{k: float(terms[k].detach()) if k in terms else float("nan")
                      for k in ("heatmap", "keypoint_nll", "pose", "displacement")},
                   "kp_err_px": float(err.median()) if err.numel() else float("nan"),
                   "pose_err_mm": stats.get("pose_err_mm", float("nan")),
                   "pose_ok": stats.get("pose_ok", float("nan")), "skipped_steps": skipped,
                   "sec_per_step": (now - t_last) / cfg.log_every}
            t_last = now
            with open(csv_path, "a", newline="") as fh:
                csv.writer(fh).writerow([row[k] for k in fields])
            if writer is not None:
                for k, v in row.items():
                    if k != "step" and v == v:
                        writer.add_scalar(k, v, done)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", kp_px=f"{row['kp_err_px']:.2f}")
        if bar is not None:
            bar.update(1)
        out_of_time = cfg.time_limit_s > 0 and time.perf_counter() - t_start > cfg.time_limit_s
        if world > 1 and cfg.time_limit_s > 0:  # every process stops at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time):
            ck = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": done, "config": cfg_json}
            if use_amp:
                ck["scaler"] = scaler.state_dict()
            _atomic_torch_save(ck, ckpt_path)
        if rank == 0 and done in cfg.keep_checkpoints:
            ck = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": done, "config": cfg_json}
            _atomic_torch_save(ck, out / f"checkpoint_step{done}.pt")
        if out_of_time:
            if rank == 0:
                log(f"time limit {cfg.time_limit_s:g} s reached at step {done}/{cfg.steps}; re-run to resume")
            break
    if bar is not None:
        bar.close()
    pool.shutdown(wait=False, cancel_futures=True)
    loaders.shutdown(wait=False, cancel_futures=True)
    if rank == 0:
        extra = {"train_config": json.loads(cfg_json), "steps": done if start < cfg.steps else cfg.steps}
        if cfg.prior_sigma > 0:
            extra["prior_sigma"] = cfg.prior_sigma
        if cfg.augment.refine_prob > 0:  # trained for the end-effector crop too: the estimator runs it
            extra["refine_margin"] = cfg.augment.refine_margin
        save_model(out / "model.safetensors", net.cpu(), robot=cfg.robot if "/" not in cfg.robot else "",
                   keypoint_names=robot.keypoint_names, extra=extra)
        if writer is not None:
            writer.close()
    if world > 1:
        torch.distributed.barrier()
    return row


def config_from_mapping(data: dict) -> TrainConfig:
    return from_dict(TrainConfig, data, "train config")
