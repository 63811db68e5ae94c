"""Training: every loss decreases on a tiny model, gradients reach the network through the solver,
checkpoints resume exactly, the CLI writes a model the estimator loads, evaluation metrics."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pose_estimator.network import HeatmapNet, HeatmapNetConfig
from pose_estimator.robot import RobotModel
from pose_estimator.solver import SolverConfig
from pose_estimator.training import TrainConfig, TrainingData, load_checkpoint, train
from pose_estimator.training.data import AugmentConfig, collate, kinematic_uv
from pose_estimator.training.evaluate import add_auc
from pose_estimator.training.losses import heatmap_loss, keypoint_nll, pose_losses, soft_argmax_outputs

NET = dict(input_size=(64, 64), base_width=8, depth=2, stride=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pose_estimator.sim import GeneratorConfig, generate_dataset

    out = tmp_path_factory.mktemp("train_data") / "ds"
    cfg = GeneratorConfig(sequences=2, frames_per_sequence=6, seed=3, width=320, height=256)
    generate_dataset(cfg, out, workers=1, progress=False)
    return out


class WithPrior(torch.nn.Module):
    """The network plus fixed logits peaked near the targets: the solver sees keypoints a few px off,
    as from a half-trained network, so every loss (the solver's too) has somewhere to go."""

    def __init__(self, net, prior):
        super().__init__()
        self.net = net
        self.register_buffer("prior", prior)

    def forward(self, x):
        return self.net(x) + self.prior


def _losses(net, batch, panda, rigid):
    logits = net(batch["image"])
    mean, cov = soft_argmax_outputs(logits, 1.0)
    hm = heatmap_loss(logits, batch["kp_hm"].float(), batch["kp_weight"].float(), 1.5)
    nll = keypoint_nll(mean, cov, batch["kp_hm"], batch["kp_weight"])
    lp, ld, st = pose_losses(mean, cov, batch, panda, SolverConfig(max_iterations=15))
    return {"heatmap": hm, "keypoint_nll": nll, "pose": lp, "displacement": ld}, st


def test_every_loss_decreases_and_gradients_pass_the_solver(dataset, panda):
    from pose_estimator.keypoints import gaussian_targets

    torch.manual_seed(0)
    data = TrainingData([dataset], panda, NET["input_size"], NET["stride"])
    rng = np.random.default_rng(0)
    idx = data.sample_pairs(rng, 4, max_gap=2)
    batch = collate([data.load(j, rng, augment=False) for j in idx])
    hm_size = (NET["input_size"][0] // 2, NET["input_size"][1] // 2)
    off = torch.as_tensor(rng.normal(0, 1.5, batch["kp_hm"].shape))
    prior = torch.log(gaussian_targets(batch["kp_hm"] + off, hm_size, sigma=2.5, normalize=False) + 1e-3).float()
    net = WithPrior(HeatmapNet(HeatmapNetConfig(num_keypoints=panda.num_keypoints, **NET)), prior)
    rigid = panda.definition.rigid_indices()
    before, st = _losses(net, batch, panda, rigid)
    assert st["pose_ok"] > 0, st
    net.zero_grad()
    before["pose"].backward(retain_graph=True)
    g = net.net.stem[0][0].weight.grad  # the first layer, reached through solver and soft-argmax
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    net.zero_grad()
    before["displacement"].backward()
    assert net.net.stem[0][0].weight.grad.abs().sum() > 0
    before = {k: float(v.detach()) for k, v in before.items()}
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(30):
        terms, _ = _losses(net, batch, panda, rigid)
        loss = terms["heatmap"] + 0.05 * terms["keypoint_nll"] + 0.05 * terms["pose"] + 0.05 * terms["displacement"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = _losses(net, batch, panda, rigid)
    after = {k: float(v.detach()) for k, v in after.items()}
    for k in before:
        assert after[k] < before[k], (k, before[k], after[k])


def test_training_resumes_exactly(dataset, tmp_path):
    common = dict(data=[str(dataset)], batch_size=4, pose_start_step=4, checkpoint_every=3, log_every=1,
                  warmup_steps=2, seed=1, loader_threads=1, network=HeatmapNetConfig(**NET))
    full = TrainConfig(out=str(tmp_path / "full"), steps=6, **common)
    train(full, progress=False)
    part = TrainConfig(out=str(tmp_path / "part"), steps=3, **common)
    train(part, progress=False)
    # a new run started from the part-way checkpoint continues exactly too (ablations share a first phase)
    branch = TrainConfig(out=str(tmp_path / "branch"), steps=6, init_from=str(tmp_path / "part" / "checkpoint.pt"),
                         **common)
    train(branch, progress=False)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"] == 3
    resumed = TrainConfig(out=str(tmp_path / "part"), steps=6, **common)
    train(resumed, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    c = load_checkpoint(tmp_path / "branch" / "checkpoint.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
        assert torch.allclose(a[k].float(), c[k].float(), atol=1e-6), k
    rows = list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    # other settings on resume are refused
    with pytest.raises(ValueError, match="different settings"):
        train(TrainConfig(out=str(tmp_path / "part"), steps=6, **{**common, "seed": 2}), progress=False)
    # a checkpoint written before a setting existed resumes with the setting at its default
    ck = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    old = json.loads(ck["config"])
    del old["augment"]["refine_prob"], old["augment"]["refine_margin"]
    ck["config"] = json.dumps(old, sort_keys=True)
    torch.save(ck, tmp_path / "part" / "checkpoint.pt")
    train(TrainConfig(out=str(tmp_path / "part"), steps=7, **common), progress=False)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"] == 7
    # ... but not when the new setting is not at its default
    with pytest.raises(ValueError, match="different settings"):
        train(TrainConfig(out=str(tmp_path / "part"), steps=8,
                          **{**common, "augment": AugmentConfig(refine_prob=0.5)}), progress=False)


def test_cli_train_then_evaluate(dataset, tmp_path, capsys, monkeypatch):
    from pose_estimator.cli import main

    cfg = tmp_path / "t.yaml"
    cfg.write_text("network: {input_size: [64, 64], base_width: 8, depth: 2}\nbatch_size: 4\n"
                   "pose_start_step: 2\nloader_threads: 1\n")
    rc = main(["train", "--config", str(cfg), "--data", str(dataset), "--out", str(tmp_path / "run"),
               "--steps", "3", "--no-progress", "--install", str(tmp_path / "m.safetensors")])
    assert rc == 0
    rc = main(["evaluate", "--model", str(tmp_path / "m.safetensors"), "--data", str(dataset), "--max-frames", "4",
               "--json", "--no-progress", "--plots", str(tmp_path / "plots")])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("frames", "kp_err_px_median", "pck5", "ee_pos_err_mm_median", "ee_rot_err_deg_median",
              "kinematic_pos_err_mm_median", "add_auc_100mm", "coverage95", "ms_per_frame"):
        assert k in m
    assert m["frames"] == 4 and m["kinematic_pos_err_mm_median"] > 1.0
    by_kp = m["kp_err_px_median_by_keypoint"]  # where the keypoint error comes from, per keypoint
    assert list(by_kp) == RobotModel.from_yaml("panda").keypoint_names
    assert all(v is None or v >= 0 for v in by_kp.values()) and any(v is not None for v in by_kp.values())
    by_axis = m["ee_pos_err_mm_median_by_axis"]  # camera axes, z the line of sight
    assert sorted(by_axis) == ["x", "y", "z"]
    if m["published"] > 0:
        assert all(v >= 0 for v in by_axis.values())
        assert max(by_axis.values()) <= m["ee_pos_err_mm_p90"] + 1e-6
    assert (tmp_path / "plots" / "add_curve.png").is_file()
    # where the plots cannot go (a read-only install of the model, a file in the way), the figures still come
    (tmp_path / "in_the_way").write_text("")
    with pytest.warns(UserWarning, match="plots not written"):
        rc = main(["evaluate", "--model", str(tmp_path / "m.safetensors"), "--data", str(dataset), "--max-frames", "2",
                   "--json", "--no-progress", "--plots", str(tmp_path / "in_the_way")])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frames"] == 2
    # by default the plots go under the working directory, named after the model and the data, not beside the model
    monkeypatch.chdir(tmp_path / "run")
    rc = main(["evaluate", "--model", str(tmp_path / "m.safetensors"), "--data", str(dataset), "--max-frames", "1",
               "--json", "--no-progress"])
    out = tmp_path / "run" / "results" / "eval" / f"m-{Path(dataset).name}"
    assert rc == 0 and (out / "add_curve.png").is_file() and f"plots: {out.relative_to(tmp_path / 'run')}" in \
        capsys.readouterr().err
    assert not any(p.name.endswith(".eval") for p in tmp_path.iterdir())
    # calibrating the keypoint variance writes the factor into the model; the estimator applies it
    rc = main(["calibrate", "--model", str(tmp_path / "m.safetensors"), "--data", str(dataset), "--max-frames", "3",
               "--json"])
    assert rc == 0
    c = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert c["keypoint_variance_scale"] > 0 and c["keypoints"] > 0
    from pose_estimator.estimator import Estimator

    est = Estimator.from_files(tmp_path / "m.safetensors")
    assert est.model_variance_scale == pytest.approx(c["keypoint_variance_scale"])
    assert c["pose_covariance_scale"] > 0 and est.pose_covariance_scale == pytest.approx(c["pose_covariance_scale"])
    # without an extrinsic (PnP, then tracking) the published pose has a factor of its own
    x = c["pose_covariance_scale_no_extrinsic"]
    assert x > 0 and est.pose_covariance_scale_no_extrinsic == pytest.approx(x)
    from pose_estimator.training.evaluate import JOINT_PRIOR_SCALES

    assert c["joint_prior_scale"] in JOINT_PRIOR_SCALES and est.joint_prior_scale == c["joint_prior_scale"]
    tried = c["ee_pos_err_mm_median_by_joint_prior_scale"]
    assert len(tried) == len(JOINT_PRIOR_SCALES)
    finite = {float(k): v for k, v in tried.items() if math.isfinite(v)}
    assert c["joint_prior_scale"] == (min(finite, key=finite.get) if finite else 1.0)


def test_refinement_crops_look_closer_at_the_end_effector_and_the_model_says_so(dataset, panda, tmp_path):
    from pose_estimator.estimator import Estimator
    from pose_estimator.model_io import load_model

    rigid = panda.definition.rigid_indices()
    arm = TrainingData([dataset], panda, (64, 64), 2, augment=AugmentConfig(full_frame_prob=0.0))
    close = TrainingData([dataset], panda, (64, 64), 2, augment=AugmentConfig(full_frame_prob=0.0, refine_prob=1.0))
    rng = np.random.default_rng
    compared = 0
    for j in range(0, len(arm), 3):
        a, c = arm.load(j, rng(j)), close.load(j, rng(j))
        if not (a.kp_weight[rigid] > 0).all():
            continue  # the hand partly out of the image: nothing to compare
        # heat-map px -> image px: a closer crop has fewer image px per heat-map px
        assert np.abs(np.linalg.det(c.affine[:, :2])) < 0.5 * np.abs(np.linalg.det(a.affine[:, :2]))
        assert (c.kp_weight[rigid] > 0).all()  # the hand's keypoints are in it and taught
        assert c.kp_weight[panda.keypoint_names.index("base")] == 0  # the base is not, and is not taught
        assert np.allclose(a.kp_img, c.kp_img, equal_nan=True)  # the same targets, in image px
        compared += 1
    assert compared >= 2
    # without augmentation (validation) the crop is always the whole arm's
    assert np.allclose(close.load(0, rng(0), augment=False).affine, arm.load(0, rng(0), augment=False).affine)
    cfg = TrainConfig(data=[str(dataset)], out=str(tmp_path / "r"), steps=1, batch_size=2, loader_threads=1,
                      network=HeatmapNetConfig(**NET), augment=AugmentConfig(refine_prob=0.5, refine_margin=0.4))
    train(cfg, progress=False)
    _, info = load_model(tmp_path / "r" / "model.safetensors")
    assert info["extra"]["refine_margin"] == 0.4
    assert Estimator.from_files(tmp_path / "r" / "model.safetensors").refine_margin == 0.4


def test_prior_model_starts_from_the_rgb_model_and_sees_the_kinematic_prior(dataset, panda, tmp_path):
    """A network with kinematic-prior input channels seeded by an RGB-only one answers exactly as it
    did (the new inputs start at zero weight); its training inputs mark where kinematics puts each keypoint."""
    from pose_estimator.estimator import Estimator
    from pose_estimator.model_io import load_model, save_model

    torch.manual_seed(0)
    rgb = HeatmapNet(HeatmapNetConfig(num_keypoints=panda.num_keypoints, **NET))
    save_model(tmp_path / "rgb.safetensors", rgb, "panda", panda.keypoint_names)
    cfg = TrainConfig(data=[str(dataset)], out=str(tmp_path / "prior"), steps=0, batch_size=4, prior_sigma=2.0,
                      init_weights=str(tmp_path / "rgb.safetensors"), loader_threads=1, network=HeatmapNetConfig(**NET))
    train(cfg, progress=False)
    net, info = load_model(tmp_path / "prior" / "model.safetensors")
    assert net.config.prior_channels == panda.num_keypoints and info["extra"]["prior_sigma"] == 2.0
    w = net.stem[0][0].weight
    assert torch.equal(w[:, :3], rgb.stem[0][0].weight) and w[:, 3:].abs().sum() == 0
    f = TrainingData([dataset], panda, NET["input_size"], NET["stride"]).datasets[0].sequences()[0].frame(2)
    e_rgb = Estimator(panda, rgb).estimate(f.image, f.camera_model(), f.joints_measured,
                                           camera_from_base=f.T_camera_base)
    e_pri = Estimator(panda, net, model_info=info).estimate(f.image, f.camera_model(), f.joints_measured,
                                                            camera_from_base=f.T_camera_base)
    assert np.allclose(e_rgb.keypoints, e_pri.keypoints, atol=1e-4)
    # training inputs: RGB, then one map per keypoint peaking where kinematics puts it
    data = TrainingData([dataset], panda, NET["input_size"], NET["stride"], prior_sigma=2.0)
    s = data.load(2, np.random.default_rng(0), augment=False)
    assert s.image.shape == (3 + panda.num_keypoints, 64, 64)
    frame = data.datasets[0].sequences()[data.index[2][1]].frame(data.index[2][2])
    uv_kin = kinematic_uv(frame, panda.keypoints_3d(torch.as_tensor(frame.joints_measured)[None])[0].numpy())
    A_in = s.affine.copy()  # heat-map px -> image px; input px = stride * hm px + 0.5
    uv_in = ((uv_kin - A_in[:, 2]) @ np.linalg.inv(A_in[:, :2]).T) * 2 + 0.5
    for k in range(panda.num_keypoints):
        if 1 <= uv_in[k, 0] <= 62 and 1 <= uv_in[k, 1] <= 62:
            r, c = divmod(int(s.image[3 + k].argmax()), 64)
            assert abs(c - uv_in[k, 0]) <= 0.5 + 1e-6 and abs(r - uv_in[k, 1]) <= 0.5 + 1e-6, (k, (c, r), uv_in[k])


def test_add_auc():
    assert add_auc(np.zeros(10)) == pytest.approx(1.0, abs=1e-3)
    assert add_auc(np.full(10, np.nan)) == 0.0
    assert add_auc(np.full(4, 0.05)) == pytest.approx(0.5, abs=2e-3)


def test_shipped_training_configs_are_valid():
    """Every config/train_*.yaml the README names parses into a TrainConfig (no stale or misspelt keys)."""
    from pathlib import Path

    import yaml

    from pose_estimator.training.train import config_from_mapping

    files = sorted((Path(__file__).resolve().parents[1] / "config").glob("train_*.yaml"))
    assert len(files) >= 2
    for f in files:
        cfg = config_from_mapping({**yaml.safe_load(f.read_text()), "data": ["d"], "out": "o"})
        assert cfg.steps > 0 and cfg.network.input_size[0] % (cfg.network.stride * 2**cfg.network.depth) == 0, f
