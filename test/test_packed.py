"""Packed training data: a pack gives the network the same crops and targets as the full dataset, draws
deterministic augmented batches, trains and resumes, and a run stops at its time limit with a model."""

import json

import cv2
import numpy as np
import pytest
import torch

from pose_estimator.network import HeatmapNetConfig
from pose_estimator.training import TrainConfig, TrainingData, load_checkpoint, train
from pose_estimator.training.packed import PackedData, is_pack, pack_datasets

NET = dict(input_size=(64, 64), base_width=8, depth=2, stride=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pose_estimator.sim import GeneratorConfig, generate_dataset

    out = tmp_path_factory.mktemp("pack_data") / "ds"
    generate_dataset(GeneratorConfig(sequences=2, frames_per_sequence=4, seed=5, width=320, height=256), out,
                     workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def pack(dataset, panda, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "p"
    # lossless-looking JPEG so that only the second resampling separates the two paths
    meta = pack_datasets([dataset], panda, out, size=96, context=1.5, full_size=64, quality=100, full_quality=100,
                         image_format="jpg", workers=1, progress=False)
    return out, meta


def test_pack_describes_itself_and_holds_plain_arrays(pack, panda):
    out, meta = pack
    assert is_pack(out)
    assert json.loads((out / "pack.json").read_text()) == meta
    assert meta["frames"] == 8 and meta["sequences"] == 2 and meta["keypoint_names"] == panda.keypoint_names
    with np.load(out / "pack.npz", allow_pickle=False) as z:  # no object arrays: loading runs no code
        assert z["kp_img"].shape == (8, panda.num_keypoints, 2)
        assert z["arm_offsets"][-1] == z["arm"].size


def test_packed_batch_matches_the_dataset_crop(dataset, pack, panda):
    td = TrainingData([dataset], panda, (64, 64), 2)
    pd = PackedData([pack[0]], panda, (64, 64), 2)
    rng = np.random.default_rng(0)
    for j in range(len(td)):
        s = td.load(j, rng, augment=False)
        b = pd.batch([j], rng, augment=False)
        np.testing.assert_allclose(b["affine"][0].numpy(), s.affine, atol=1e-9)
        np.testing.assert_allclose(b["kp_hm"][0].numpy(), s.kp_hm, atol=1e-9)
        np.testing.assert_array_equal(b["kp_weight"][0].numpy(), s.kp_weight)
        np.testing.assert_allclose(b["ee_pose"][0].numpy(), s.ee_pose)
        np.testing.assert_allclose(b["joints"][0].numpy(), s.joints)
        # one more bilinear resampling: a little blur, no shift
        a, c = (v.numpy().mean(0).astype(np.float64) for v in (s.image, b["image"][0]))
        (dx, dy), _ = cv2.phaseCorrelate(a, c, cv2.createHanningWindow(a.shape[::-1], cv2.CV_64F))
        assert abs(dx) < 0.2 and abs(dy) < 0.2, (j, dx, dy)
        assert np.abs(a - c).mean() * 0.25 * 255 < 10.0


def test_packed_batches_are_deterministic_and_augmented(pack, panda):
    pd = PackedData([pack[0]], panda, (64, 64), 2)
    draw = lambda seed: pd.batch(pd.sample_pairs(np.random.default_rng(seed), 8), np.random.default_rng(seed))
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["kp_hm"], b["kp_hm"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (16, 3, 64, 64) and a["kp_hm"].shape == (16, panda.num_keypoints, 2)
    # pairs: two frames of one sequence each
    assert all(a["seq"][2 * i] == a["seq"][2 * i + 1] for i in range(8))
    assert (a["kp_weight"] > 0).sum() > 16 * 4


def test_packs_and_datasets_do_not_mix(dataset, pack, tmp_path):
    cfg = TrainConfig(data=[str(dataset), str(pack[0])], out=str(tmp_path / "r"), steps=1, batch_size=2,
                      network=HeatmapNetConfig(**NET))
    with pytest.raises(ValueError, match="cannot be mixed"):
        train(cfg, progress=False)


def test_packs_refuse_the_refinement_crop(pack, panda):
    from pose_estimator.training.data import AugmentConfig

    with pytest.raises(ValueError, match="refinement crop"):
        PackedData([pack[0]], panda, (64, 64), 2, augment=AugmentConfig(refine_prob=0.5))


def test_training_from_a_pack_resumes_exactly_and_stops_at_its_time_limit(pack, tmp_path):
    common = dict(data=[str(pack[0])], batch_size=4, pose_start_step=2, checkpoint_every=2, log_every=1,
                  warmup_steps=2, seed=1, network=HeatmapNetConfig(**NET))
    train(TrainConfig(out=str(tmp_path / "full"), steps=4, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "part"), steps=2, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "part"), steps=4, **common), progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    # the solver losses ran from step 2 on packed batches
    import csv

    rows = list(csv.DictReader(open(tmp_path / "full" / "metrics.csv")))
    assert float(rows[-1]["pose_ok"]) >= 0
    # a time limit stops a long run early, with its checkpoint and a model; re-running resumes
    limited = TrainConfig(out=str(tmp_path / "lim"), steps=10_000, time_limit_s=1e-9, **common)
    train(limited, progress=False)
    step = load_checkpoint(tmp_path / "lim" / "checkpoint.pt")["step"]
    assert step == 1 and (tmp_path / "lim" / "model.safetensors").is_file()
    train(TrainConfig(out=str(tmp_path / "lim"), steps=10_000, time_limit_s=1e-9, **common), progress=False)
    assert load_checkpoint(tmp_path / "lim" / "checkpoint.pt")["step"] == 2


def test_a_keypoint_far_outside_a_distorted_image_leaves_the_gradient_finite(pack, panda):
    """The undistortion of a point far outside the image may not converge; its NaN must not reach the
    network through the solver loss (it did, in ~3 % of training steps)."""
    from pose_estimator.geometry import CameraModel, undistort_points
    from pose_estimator.solver import SolverConfig
    from pose_estimator.training.losses import pose_losses, soft_argmax_outputs

    pd = PackedData([pack[0]], panda, (64, 64), 2)
    b = pd.batch(pd.sample_pairs(np.random.default_rng(0), 2), np.random.default_rng(0), augment=False)
    b["dist"][:] = 0.0
    b["dist"][:, 0], b["dist"][:, 1] = -0.45, 0.25  # strong barrel distortion
    logits = torch.full((4, panda.num_keypoints, 32, 32), -20.0, dtype=torch.float64)
    hm = torch.nan_to_num(b["kp_hm"], nan=16.0).round().long().clamp(0, 31)
    for i in range(4):
        for k in range(panda.num_keypoints):
            logits[i, k, hm[i, k, 1], hm[i, k, 0]] = 0.0
    logits.requires_grad_(True)
    mean, cov = soft_argmax_outputs(logits, 1.0)
    far = mean.clone()
    far[0, 3] = torch.tensor([-400.0, -400.0], dtype=torch.float64)  # heat-map px: far beyond the image
    W, H = b["size"][0]
    from pose_estimator.keypoints import keypoints_to_image

    uv, c = keypoints_to_image(far[:1, 3:4].detach(), cov[:1, 3:4].detach(), b["affine"][:1])
    u, _ = undistort_points(uv, c, CameraModel(b["K"][0].numpy(), W, H, b["dist"][0].numpy()))
    assert not torch.isfinite(u).all()  # the case this test is about
    lp, ld, _ = pose_losses(far, cov, b, panda, SolverConfig(max_iterations=10))
    (lp + ld).backward()
    assert torch.isfinite(lp) and torch.isfinite(logits.grad).all()
