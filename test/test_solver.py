"""PoseSolver: recovery, weighting, seeding, gradients, honesty and degenerate input."""

import math

import cv2
import numpy as np
import pytest
import torch

from pose_estimator.geometry import (CameraModel, make_pose, project, quaternion_from_matrix, rotation_angle, so3_exp,
                                     so3_log, transform_points)
from pose_estimator.solver import SolverConfig, solve
from pose_estimator.synthetic import add_keypoint_noise, look_at, perturb_pose, random_rigid_problem

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def trans_err(a, b):
    return (a[:, :3, 3] - b[:, :3, 3]).norm(dim=-1)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-7, 1e-4, 0.3, 2.0, 3.1, 3.13, math.pi])
def test_so3_log_inverts_so3_exp_at_every_angle(angle):
    g = gen(3)
    axis = torch.nn.functional.normalize(torch.randn(200, 3, dtype=D, generator=g), dim=-1)
    R = so3_exp(axis * angle)
    w = so3_log(R)
    assert float((so3_exp(w) - R).abs().max()) < 1e-12
    assert float((w.norm(dim=-1) - angle).abs().max()) < 1e-9
    if angle < 3.0:  # below a half turn the vector itself is unique
        assert float((w - axis * angle).abs().max()) < 1e-12
    # the rotation vector agrees with the quaternion's half angle
    q = quaternion_from_matrix(R)
    assert torch.allclose(2 * torch.atan2(q[:, :3].norm(dim=-1), q[:, 3]), w.norm(dim=-1), atol=1e-9)


def test_so3_log_gradient_is_the_identity_at_the_identity():
    w = torch.zeros(4, 3, dtype=D, requires_grad=True)
    J = torch.autograd.functional.jacobian(lambda x: so3_log(so3_exp(x)).sum(0), w)
    assert torch.isfinite(J).all()
    assert torch.allclose(J.permute(1, 0, 2), torch.eye(3, dtype=D).expand(4, 3, 3))
    x = torch.full((2, 3), 0.4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: so3_log(so3_exp(v)), (x,))


def test_rigid_recovers_known_poses_from_noisy_projections():
    g = gen(1)
    prob = random_rigid_problem(64, 12, generator=g)
    uv, cov, _ = add_keypoint_noise(prob.uv_true, torch.full((64, 12), 0.5, dtype=D), generator=g)
    seed = perturb_pose(prob.pose, 0.05, math.radians(5), generator=g)
    sol = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=seed)
    assert bool(sol.converged.all()), set(sol.message)
    assert float(trans_err(sol.pose, prob.pose).median()) < 0.006  # 6 mm at 0.8-2.5 m, 0.5 px noise
    assert float(rotation_angle(sol.pose[:, :3, :3], prob.pose[:, :3, :3]).median()) < math.radians(0.6)
    # Residual is ~1 (in sigmas) when the covariances are right.
    assert 0.6 < float(sol.residual.median()) < 1.4


def test_noise_free_rigid_solution_is_exact():
    prob = random_rigid_problem(8, 6, generator=gen(2))
    cov = torch.eye(2, dtype=D).expand(8, 6, 2, 2)
    seed = perturb_pose(prob.pose, 0.05, 0.1, generator=gen(3))
    sol = solve("rigid", prob.uv_true, cov, prob.K, points=prob.points, initial_pose=seed)
    assert bool(sol.converged.all())
    assert float(trans_err(sol.pose, prob.pose).max()) < 1e-7


def test_weighting_beats_unweighted_on_heteroscedastic_noise():
    g = gen(4)
    B, N = 200, 16
    prob = random_rigid_problem(B, N, generator=g)
    sigma = torch.full((B, N), 0.5, dtype=D)
    sigma[:, : N // 3] = 5.0  # a third of the points ten times noisier
    uv, cov, _ = add_keypoint_noise(prob.uv_true, sigma, generator=g)
    seed = perturb_pose(prob.pose, 0.03, 0.05, generator=g)
    cfg = SolverConfig(robust_loss="none", max_residual=1e9)
    weighted = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=seed, config=cfg)
    flat = solve("rigid", uv, torch.eye(2, dtype=D).expand(B, N, 2, 2), prob.K, points=prob.points,
                 initial_pose=seed, config=cfg)
    ew = float(trans_err(weighted.pose, prob.pose).median())
    eu = float(trans_err(flat.pose, prob.pose).median())
    assert ew < 0.6 * eu, (ew, eu)


def test_one_gross_outlier_cannot_drag_the_pose():
    g = gen(5)
    prob = random_rigid_problem(32, 10, generator=g)
    uv, cov, _ = add_keypoint_noise(prob.uv_true, torch.full((32, 10), 0.5, dtype=D), generator=g)
    uv_bad = uv.clone()
    uv_bad[:, 0] += 80.0
    seed = perturb_pose(prob.pose, 0.03, 0.05, generator=g)
    clean = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=seed)
    robust = solve("rigid", uv_bad, cov, prob.K, points=prob.points, initial_pose=seed)
    plain = solve("rigid", uv_bad, cov, prob.K, points=prob.points, initial_pose=seed,
                  config=SolverConfig(robust_loss="none", max_residual=1e9, min_inlier_fraction=0))
    e_clean = float(trans_err(clean.pose, prob.pose).median())
    e_robust = float(trans_err(robust.pose, prob.pose).median())
    e_plain = float(trans_err(plain.pose, prob.pose).median())
    assert e_robust < 1.5 * e_clean + 1e-4, (e_robust, e_clean)
    assert e_plain > 3 * e_robust, (e_plain, e_robust)
    assert not bool(robust.inliers[:, 0].any())  # the outlier is flagged


def test_kinematic_seed_converges_where_identity_seed_fails():
    g = gen(6)
    prob = random_rigid_problem(64, 10, generator=g)
    uv, cov, _ = add_keypoint_noise(prob.uv_true, torch.full((64, 10), 0.5, dtype=D), generator=g)
    kin_seed = perturb_pose(prob.pose, 0.02, math.radians(2), generator=g)
    ident = make_pose(torch.eye(3, dtype=D).expand(64, 3, 3), torch.tensor([0.0, 0.0, 1.5], dtype=D).expand(64, 3))
    seeded = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=kin_seed)
    blind = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=ident)
    # 5 cm: the noise-limited depth error of 10 points at 2.5 m is ~1-2 cm (1 sigma).
    ok_seeded = seeded.converged & (trans_err(seeded.pose, prob.pose) < 0.05)
    ok_blind = blind.converged & (trans_err(blind.pose, prob.pose) < 0.05)
    assert float(ok_seeded.float().mean()) == 1.0
    # From identity, a good share fail (wrong basin, or flagged) and the rest take longer.
    assert float(ok_blind.float().mean()) < 0.8
    both = ok_seeded & ok_blind
    assert float(seeded.iterations[both].float().mean()) < float(blind.iterations[both].float().mean())
    # A wrong basin is never reported as a confident pose.
    wrong = blind.converged & (trans_err(blind.pose, prob.pose) > 0.10)
    assert int(wrong.sum()) == 0


def test_covariance_is_honest_on_rigid_problems():
    """Squared Mahalanobis pose errors average ~6 (chi-square, 6 dof) when keypoint covariances are right."""
    g = gen(7)
    B, N = 400, 12
    prob = random_rigid_problem(B, N, generator=g)
    sigma = 0.3 + 2.0 * torch.rand(B, N, generator=g, dtype=D)
    uv, cov, _ = add_keypoint_noise(prob.uv_true, sigma, generator=g)
    seed = perturb_pose(prob.pose, 0.02, 0.03, generator=g)
    sol = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=seed,
                config=SolverConfig(robust_loss="none", inflate_covariance=False))
    dt = sol.pose[:, :3, 3] - prob.pose[:, :3, 3]
    dw = torch.stack([torch.as_tensor(cv2.Rodrigues((sol.pose[b, :3, :3] @ prob.pose[b, :3, :3].T).numpy())[0][:, 0])
                      for b in range(B)])
    e = torch.cat([dt, dw], -1)[..., None]
    m2 = (e.transpose(-1, -2) @ torch.linalg.inv(sol.covariance) @ e)[:, 0, 0]
    assert 5.0 < float(m2.mean()) < 7.2, float(m2.mean())
    # 95 % ellipsoid coverage near 0.95 (chi2_6 0.95 quantile = 12.59)
    cover = float((m2 < 12.59).float().mean())
    assert 0.91 < cover < 0.98, cover


def test_solver_undistorts_keypoints_with_the_camera_model():
    g = gen(8)
    prob = random_rigid_problem(16, 12, generator=g, width=640, height=480)
    dist = np.array([-0.25, 0.08, 0.001, -0.0005, 0.0])
    cam = CameraModel(prob.K.numpy(), 640, 480, dist)
    uv = []
    for b in range(16):
        rvec = cv2.Rodrigues(prob.pose[b, :3, :3].numpy())[0]
        img, _ = cv2.projectPoints(prob.points[b].numpy(), rvec, prob.pose[b, :3, 3].numpy(), prob.K.numpy(), dist)
        uv.append(torch.as_tensor(img[:, 0]))
    uv = torch.stack(uv)
    cov = torch.eye(2, dtype=D).expand(16, 12, 2, 2) * 0.25
    seed = perturb_pose(prob.pose, 0.03, 0.05, generator=g)
    with_model = solve("rigid", uv, cov, cam, points=prob.points, initial_pose=seed)
    assert bool(with_model.converged.all())
    assert float(trans_err(with_model.pose, prob.pose).max()) < 1e-5
    ignoring = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=seed,
                     config=SolverConfig(max_residual=1e9, min_inlier_fraction=0))
    assert float(trans_err(ignoring.pose, prob.pose).median()) > 1e-3


def test_undistortion_is_exact_or_unknown_where_the_lens_model_folds_over():
    """Far outside the image a polynomial lens model turns back: there is no inverse (a singular Jacobian
    there crashed a training run). Every point comes back either distorting to itself again or NaN (with a
    NaN covariance), never an exception, never a wrong place; the solver leaves NaN keypoints out."""
    from pose_estimator.geometry import distort_normalized, undistort_points

    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    dist = np.array([-0.45, 0.0, 0.0, 0.0, 0.0])  # strong barrel
    cam = CameraModel(K, 640, 480, dist)
    # radially r -> r - 0.45 r^3: it peaks at r = 1/sqrt(1.35) (0.574 there, 287 px from the centre),
    # so points farther out have no preimage, and the map folds over past the peak
    f, c0, d = torch.tensor([500.0, 500.0], dtype=D), torch.tensor([320.0, 240.0], dtype=D), torch.as_tensor(dist)
    r_peak = 1 / math.sqrt(1.35)
    peak = distort_normalized(torch.tensor([[r_peak, 0.0], [0.0, -r_peak]], dtype=D), d) * f + c0
    xs = np.linspace(-3000, 3000, 121)
    grid = torch.as_tensor(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2) + [320, 240], dtype=D)
    uv = torch.cat([grid, peak])[None]
    cov = torch.eye(2, dtype=D).expand(1, uv.shape[1], 2, 2) * 4.0
    u, c = undistort_points(uv, cov, cam)  # the peak: a singular Jacobian, no exception
    ok = torch.isfinite(u).all(-1)[0]
    assert bool(ok.any()) and not bool(ok.all())
    assert bool(torch.isfinite(c[0, ok]).all()) and not bool(torch.isfinite(c[0, ~ok]).any())
    back = distort_normalized((u[0, ok] - c0) / f, d) * f + c0
    assert float((back - uv[0, ok]).norm(dim=-1).max()) < 0.01
    assert bool(ok[(uv[0] - c0).norm(dim=-1) < 250].all())  # well inside the fold, always invertible
    assert not bool(ok[(uv[0] - c0).norm(dim=-1) > 300].any())  # beyond the peak: nothing maps there
    # the solver leaves the unknown keypoints out and solves from the others
    g = gen(9)
    prob = random_rigid_problem(1, 12, generator=g, width=640, height=480)
    cam2 = CameraModel(prob.K.numpy(), 640, 480, dist)
    rvec = cv2.Rodrigues(prob.pose[0, :3, :3].numpy())[0]
    img = cv2.projectPoints(prob.points[0].numpy(), rvec, prob.pose[0, :3, 3].numpy(), prob.K.numpy(), dist)[0]
    kp = torch.as_tensor(img[:, 0])[None].clone()
    kp[0, :2] = torch.tensor([[5000.0, 4000.0], [-4000.0, 240.0]], dtype=D)  # no preimage
    sol = solve("rigid", kp, torch.eye(2, dtype=D).expand(1, 12, 2, 2) * 0.25, cam2, points=prob.points,
                initial_pose=perturb_pose(prob.pose, 0.02, 0.03, generator=g))
    assert bool(sol.converged[0]) and not bool(sol.inliers[0, :2].any())
    assert float(trans_err(sol.pose, prob.pose)[0]) < 1e-5


def _panda_scene(panda, B, g, joint_offset_deg=1.0):
    q_true = panda.random_configuration(B, generator=g, margin=0.2)
    q_true[:, 7:] = 0.02
    offsets = torch.randn(B, panda.n_joints, generator=g, dtype=D) * math.radians(joint_offset_deg)
    offsets[:, 7:] = 0.0
    q_meas = q_true + offsets
    target = torch.tensor([0.0, 0.0, 0.5], dtype=D).expand(B, 3)
    az = torch.rand(B, generator=g, dtype=D) * 2 * math.pi
    r = 1.4 + 0.6 * torch.rand(B, generator=g, dtype=D)
    eye = torch.stack([r * torch.cos(az), r * torch.sin(az), 0.6 + 0.6 * torch.rand(B, generator=g, dtype=D)], -1)
    T_cb = look_at(eye, target)
    K = torch.tensor([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]], dtype=D)
    uv_true = project(K.expand(B, 3, 3), transform_points(T_cb, panda.keypoints_3d(q_true)))
    return q_true, q_meas, T_cb, K, uv_true


def test_articulated_mode_corrects_sloppy_joints(panda):
    g = gen(9)
    B = 16
    q_true, q_meas, T_cb, K, uv_true = _panda_scene(panda, B, g)
    N = panda.num_keypoints
    uv, cov, _ = add_keypoint_noise(uv_true, torch.full((B, N), 0.5, dtype=D), generator=g)
    sol = solve("articulated", uv, cov, K, robot=panda, joints=q_meas, initial_camera_from_base=T_cb,
                joint_sigma=math.radians(2.0), camera_prior_sigma=(0.01, 0.01))
    assert bool(sol.converged.all()), set(sol.message)
    T_ce_true = T_cb @ panda.ee_pose(q_true)
    T_ce_kin = T_cb @ panda.ee_pose(q_meas)
    e_sol = trans_err(sol.pose, T_ce_true)
    e_kin = trans_err(T_ce_kin, T_ce_true)
    assert float(e_sol.median()) < 0.4 * float(e_kin.median()), (float(e_sol.median()), float(e_kin.median()))
    assert sol.joints.shape == (B, panda.n_joints)
    evals = torch.linalg.eigvalsh(sol.covariance)
    assert bool((evals > 0).all())


def test_articulated_recovers_camera_and_joints_noise_free(panda):
    g = gen(10)
    q_true, q_meas, T_cb, K, uv_true = _panda_scene(panda, 4, g, joint_offset_deg=0.5)
    cov = torch.eye(2, dtype=D).expand(4, panda.num_keypoints, 2, 2) * 0.01
    seed = perturb_pose(T_cb, 0.02, 0.02, generator=g)
    sol = solve("articulated", uv_true, cov, K, robot=panda, joints=q_meas, initial_camera_from_base=seed,
                joint_sigma=math.radians(3.0))
    T_ce_true = T_cb @ panda.ee_pose(q_true)
    assert float(trans_err(sol.pose, T_ce_true).max()) < 0.004


def _rigid_small(seed=11, B=1, N=5):
    prob = random_rigid_problem(B, N, generator=gen(seed))
    return prob, perturb_pose(prob.pose, 0.02, 0.03, generator=gen(seed + 1))


@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_gradcheck_through_rigid_solver(mode):
    prob, seed = _rigid_small()
    uv = (prob.uv_true + 0.3 * torch.randn(prob.uv_true.shape, generator=gen(3), dtype=D)).requires_grad_(True)
    cov = torch.eye(2, dtype=D).expand(1, 5, 2, 2).clone().requires_grad_(True)
    cfg = SolverConfig(gradient=mode, robust_loss="none", tolerance=0.0, max_iterations=30, inflate_covariance=False)

    def f(u, c):
        sol = solve("rigid", u, c, prob.K, points=prob.points, initial_pose=seed, config=cfg)
        return sol.pose[:, :3, :].flatten()

    if mode == "unroll":
        assert torch.autograd.gradcheck(f, (uv, cov), eps=1e-6, atol=1e-5)
    else:
        # The implicit gradient is the Gauss-Newton derivative: exact for the
        # keypoints when the fit is exact, so check it on noise-free data.
        u0 = prob.uv_true.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda u: f(u, cov.detach()), (u0,), eps=1e-6, atol=1e-5)


def test_gradients_reach_keypoints_through_articulated_solver(panda):
    g = gen(12)
    q_true, q_meas, T_cb, K, uv_true = _panda_scene(panda, 2, g)
    uv = uv_true.clone().requires_grad_(True)
    cov = (torch.eye(2, dtype=D) * 0.5).expand(2, panda.num_keypoints, 2, 2).clone().requires_grad_(True)
    sol = solve("articulated", uv, cov, K, robot=panda, joints=q_meas, initial_camera_from_base=T_cb)
    sol.pose[:, :3, 3].sum().backward()
    assert uv.grad is not None and float(uv.grad.abs().sum()) > 0
    assert torch.isfinite(uv.grad).all()

    # only the joints asking for a gradient: it reaches them too
    q = q_meas.clone().requires_grad_(True)
    sol_q = solve("articulated", uv_true, cov.detach(), K, robot=panda, joints=q, initial_camera_from_base=T_cb)
    sol_q.pose[:, :3, 3].sum().backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0
    # nothing asking for one: no graph (and no extra Gauss-Newton step for it), the same pose
    plain = solve("articulated", uv_true, cov.detach(), K, robot=panda, joints=q_meas, initial_camera_from_base=T_cb)
    assert not plain.pose.requires_grad
    assert torch.allclose(plain.pose, sol_q.pose.detach(), atol=1e-8)
    assert torch.allclose(plain.covariance, sol_q.covariance.detach(), rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------- degenerate input
def test_too_few_points_is_not_converged_with_a_message():
    prob, seed = _rigid_small(N=3)
    sol = solve("rigid", prob.uv_true, torch.eye(2, dtype=D).expand(1, 3, 2, 2), prob.K,
                points=prob.points, initial_pose=seed)
    assert not bool(sol.converged[0])
    assert "too few valid keypoints" in sol.message[0]
    assert float(sol.covariance[0].diagonal().min()) >= 1e6  # never a confident pose


def test_collinear_points_are_flagged_degenerate():
    B, N = 1, 8
    s = torch.linspace(-0.15, 0.15, N, dtype=D)
    P = torch.stack([s, 0.5 * s, torch.zeros_like(s)], -1)[None]
    T = make_pose(so3_exp(torch.tensor([[0.3, -0.2, 0.1]], dtype=D)), torch.tensor([[0.05, 0.0, 1.2]], dtype=D))
    K = torch.tensor([[600.0, 0, 320], [0, 600, 240], [0, 0, 1]], dtype=D)
    uv = project(K[None], transform_points(T, P))
    seed = perturb_pose(T, 0.01, 0.02, generator=gen(13))
    sol = solve("rigid", uv, torch.eye(2, dtype=D).expand(B, N, 2, 2), K, points=P, initial_pose=seed)
    assert not bool(sol.converged[0])
    assert "degenerate" in sol.message[0]


def test_nan_keypoints_are_ignored_and_all_nan_is_not_converged():
    prob, seed = _rigid_small(N=8)
    cov = torch.eye(2, dtype=D).expand(1, 8, 2, 2)
    uv = prob.uv_true.clone()
    uv[0, 2] = float("nan")
    sol = solve("rigid", uv, cov, prob.K, points=prob.points, initial_pose=seed)
    assert bool(sol.converged[0])
    assert torch.isfinite(sol.pose).all()
    assert float(trans_err(sol.pose, prob.pose)[0]) < 1e-6
    all_nan = torch.full_like(uv, float("nan"))
    sol = solve("rigid", all_nan, cov, prob.K, points=prob.points, initial_pose=seed)
    assert not bool(sol.converged[0]) and "too few valid keypoints" in sol.message[0]
    assert torch.isfinite(sol.pose).all()


def test_zero_variance_keypoints_are_rejected_not_trusted_infinitely():
    prob, seed = _rigid_small(N=8)
    cov = torch.eye(2, dtype=D).expand(1, 8, 2, 2).clone()
    cov[0, :2] = 0.0
    sol = solve("rigid", prob.uv_true, cov, prob.K, points=prob.points, initial_pose=seed)
    assert "not positive definite" in sol.message[0]
    assert bool(sol.converged[0])  # six good points remain
    cov[0] = 0.0
    sol = solve("rigid", prob.uv_true, cov, prob.K, points=prob.points, initial_pose=seed)
    assert not bool(sol.converged[0])


def test_bad_arguments_raise_clear_errors():
    prob, seed = _rigid_small(N=5)
    cov = torch.eye(2, dtype=D).expand(1, 5, 2, 2)
    with pytest.raises(ValueError, match="BxKx2"):
        solve("rigid", prob.uv_true[0], cov, prob.K, points=prob.points, initial_pose=seed)
    with pytest.raises(ValueError, match="focal"):
        solve("rigid", prob.uv_true, cov, torch.zeros(3, 3, dtype=D), points=prob.points, initial_pose=seed)
    with pytest.raises(ValueError, match="mode"):
        solve("nope", prob.uv_true, cov, prob.K)
    with pytest.raises(ValueError, match="covariance"):
        solve("rigid", prob.uv_true, cov[..., :1], prob.K, points=prob.points, initial_pose=seed)
    with pytest.raises(ValueError):
        CameraModel(np.zeros((3, 3)), 640, 480)


def test_nan_joints_give_non_converged_articulated_result(panda):
    g = gen(14)
    q_true, q_meas, T_cb, K, uv_true = _panda_scene(panda, 2, g)
    q_meas = q_meas.clone()
    q_meas[1, 3] = float("nan")
    cov = torch.eye(2, dtype=D).expand(2, panda.num_keypoints, 2, 2)
    sol = solve("articulated", uv_true, cov, K, robot=panda, joints=q_meas, initial_camera_from_base=T_cb)
    assert bool(sol.converged[0]) and not bool(sol.converged[1])
    assert "joint state is not finite" in sol.message[1]
