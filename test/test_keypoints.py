"""Heat-map transformation, preprocessing affine and HeatmapNet: analytic answers."""

import numpy as np
import pytest
import torch

from pose_estimator.keypoints import (gaussian_fit2d, gaussian_targets, heatmap_to_input_affine,
                                      keypoints_to_image, soft_argmax2d)
from pose_estimator.network import HeatmapNet, HeatmapNetConfig
from pose_estimator.preprocess import Preprocessor, compose_affine, full_frame_roi, invert_affine


def gaussian_logits(mean, cov, shape):
    """log of an (unnormalised) Gaussian on a pixel grid: (B, K, H, W) from (B, K, 2), (B, K, 2, 2)."""
    H, W = shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    g = torch.stack([xs, ys], -1)  # (H, W, 2)
    d = g[None, None] - mean[:, :, None, None, :]
    P = torch.linalg.inv(cov)[:, :, None, None]
    return -0.5 * (d[..., None, :] @ P @ d[..., :, None])[..., 0, 0]


def test_soft_argmax_recovers_gaussian_mean_and_covariance():
    mean = torch.tensor([[[20.3, 30.7], [40.0, 12.5]]], dtype=torch.float64)
    cov = torch.tensor([[[[4.0, 1.0], [1.0, 3.0]], [[2.0, -0.5], [-0.5, 6.0]]]], dtype=torch.float64)
    logits = gaussian_logits(mean, cov, (64, 64))
    m, c = soft_argmax2d(logits, min_variance=0.0)
    assert torch.allclose(m, mean, atol=1e-6)
    # A sampled Gaussian's variance is the continuous one plus nothing (Euler–Maclaurin): tight.
    assert torch.allclose(c, cov, atol=1e-4)
    _, c2 = soft_argmax2d(logits)  # the default adds the 1-pixel quantisation variance
    assert torch.allclose(c2 - c, torch.eye(2, dtype=torch.float64) / 12, atol=1e-12)


def test_soft_argmax_in_float32_agrees_with_float64():
    # the network runs in float32: broad maps and sharp peaks away from the centre keep their moments
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 14, 128, 128, generator=gen) * 3
    x[:, :, 100:104, 10:14] += 20
    m64, c64 = soft_argmax2d(x.double())
    m32, c32 = soft_argmax2d(x)
    assert m32.dtype == c32.dtype == torch.float32
    assert (m32.double() - m64).abs().max() < 5e-4  # heat-map px
    # the moments about the map's centre cancel in float32 for a peak near its border: within 3 % of the
    # smaller variance (the peaks here, 55 px from the centre, have variances of ~0.3-1.5 px²)
    rel = (c32.double() - c64).abs() / c64.diagonal(dim1=-2, dim2=-1).amin(-1)[..., None, None]
    assert rel.max() < 0.03


def test_soft_argmax_temperature_and_spike():
    logits = torch.full((1, 1, 9, 9), -1e4, dtype=torch.float64)
    logits[0, 0, 3, 7] = 0.0
    m, c = soft_argmax2d(logits)
    assert torch.allclose(m, torch.tensor([[[7.0, 3.0]]], dtype=torch.float64))
    assert torch.allclose(c, torch.eye(2, dtype=torch.float64) / 12)
    g = gaussian_logits(torch.tensor([[[10.0, 10.0]]], dtype=torch.float64),
                        torch.eye(2, dtype=torch.float64)[None, None], (21, 21))
    _, c_hot = soft_argmax2d(g, temperature=2.0, min_variance=0)
    assert torch.allclose(c_hot, 2.0 * torch.eye(2, dtype=torch.float64), atol=1e-3)
    # the peak it can hand back is the same softmax's largest value
    m2, c2, peak = soft_argmax2d(g, temperature=2.0, min_variance=0, return_peak=True)
    assert torch.equal(m2, soft_argmax2d(g, temperature=2.0, min_variance=0)[0]) and torch.equal(c2, c_hot)
    assert torch.allclose(peak, torch.softmax(g.flatten(2) / 2.0, -1).max(-1).values)


def test_gaussian_fit_peak_outside_the_map():
    mean = torch.tensor([[[-6.0, 10.0], [20.0, 40.0], [12.0, 12.0]]], dtype=torch.float64)
    cov = torch.tensor([[[[16.0, 2.0], [2.0, 9.0]], [[25.0, 0.0], [0.0, 25.0]], [[3.0, 0.0], [0.0, 5.0]]]],
                       dtype=torch.float64)
    logits = gaussian_logits(mean, cov, (32, 32))
    m, c, ok = gaussian_fit2d(logits)
    assert ok.all()
    assert torch.allclose(m, mean, atol=1e-4)
    assert torch.allclose(c, cov, atol=1e-3)
    # the soft-argmax of a truncated Gaussian is pulled inside the map
    m_sa, _ = soft_argmax2d(logits)
    assert (m_sa[0, 0, 0] > 0) and (m_sa[0, 1, 1] < 32)


def test_gaussian_fit_flags_maps_without_a_peak():
    flat = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    bowl = ((xs - 8) ** 2 + (ys - 8) ** 2).double()[None, None] * 0.05  # a minimum, not a peak
    _, c, ok = gaussian_fit2d(torch.cat([flat, bowl], 1))
    assert not ok.any()
    assert (c.diagonal(dim1=-2, dim2=-1) >= 1e5).all()


@pytest.mark.parametrize("fn", ["softargmax", "gaussian_fit"])
def test_transformations_are_differentiable(fn):
    torch.manual_seed(0)
    logits = (torch.randn(1, 2, 6, 7, dtype=torch.float64) * 0.3
              + gaussian_logits(torch.tensor([[[3.0, 2.5], [2.0, 4.0]]], dtype=torch.float64),
                                torch.tensor([[[[2.0, 0.3], [0.3, 1.5]], [[1.0, 0.0], [0.0, 2.0]]]],
                                             dtype=torch.float64), (6, 7))).requires_grad_()

    def f(x):
        if fn == "softargmax":
            m, c = soft_argmax2d(x, temperature=0.7)
        else:
            m, c, _ = gaussian_fit2d(x)
        return m, c

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-5)


def test_heatmap_affine_and_keypoints_to_image():
    A_hm = heatmap_to_input_affine(2)
    assert np.allclose(A_hm @ [0, 0, 1], [0.5, 0.5])  # heat-map px 0 covers input px 0 and 1
    A = compose_affine(np.array([[3.0, 0, 10], [0, 3.0, 20]]), A_hm)
    mean = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    cov = torch.eye(2, dtype=torch.float64)[None, None]
    uv, c = keypoints_to_image(mean, cov, torch.as_tensor(A))
    assert torch.allclose(uv, torch.tensor([[[3 * 2.5 + 10, 3 * 4.5 + 20]]], dtype=torch.float64))
    assert torch.allclose(c, 36 * torch.eye(2, dtype=torch.float64))
    assert np.allclose(compose_affine(A, invert_affine(A)), np.eye(3)[:2])


@pytest.mark.parametrize("roi", [None, (100.0, 50.0, 356.0, 306.0), (-40.0, -40.0, 60.0, 60.0)])
def test_preprocess_affine_maps_input_pixels_to_image_pixels(roi):
    """A bright dot in the image lands, through the crop and back through the affine, where it was."""
    img = np.zeros((480, 640, 3), np.uint8)
    pts = {"a": (230.0, 170.0), "b": (20.0, 10.0)}
    import cv2

    for x, y in pts.values():
        cv2.circle(img, (int(x * 16), int(y * 16)), 6 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    pre = Preprocessor((128, 128))
    x, A = pre(img, roi)
    assert x.shape == (3, 128, 128)
    lum = torch.as_tensor(x.numpy().mean(0), dtype=torch.float64)
    x0, y0, x1, y1 = roi or full_frame_roi(640, 480)
    for px, py in pts.values():
        if not (x0 + 8 < px < x1 - 8 and y0 + 8 < py < y1 - 8):
            continue
        # centroid of the dot in input px, mapped back
        inv = invert_affine(A)
        cx, cy = inv @ [px, py, 1]
        ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
        win = ((xs - cx) ** 2 + (ys - cy) ** 2 < 12**2).double()
        w = (lum - lum.min()) * win
        c = torch.stack([(w * xs).sum(), (w * ys).sum()]) / w.sum()
        back = A @ [float(c[0]), float(c[1]), 1]
        assert np.allclose(back, [px, py], atol=0.35 * max(A[0, 0], 1)), (back, (px, py))


def test_preprocess_accepts_mono_and_rejects_bad_roi():
    pre = Preprocessor((64, 64))
    x, _ = pre(np.zeros((10, 20), np.uint8))
    assert x.shape == (3, 64, 64)
    with pytest.raises(ValueError):
        pre(np.zeros((10, 20, 3), np.uint8), (5, 5, 5, 9))
    with pytest.raises(ValueError):
        pre(np.zeros((10, 20, 2), np.uint8))


def test_heatmap_net_shapes_and_config():
    net = HeatmapNet(HeatmapNetConfig(num_keypoints=5, input_size=(64, 96), base_width=4, depth=2))
    y = net(torch.zeros(2, 3, 64, 96))
    assert y.shape == (2, 5, 32, 48)
    assert net.config.heatmap_size == (32, 48)
    with pytest.raises(ValueError):
        HeatmapNetConfig(input_size=(100, 100), depth=3)


def test_heatmap_net_learns_a_dot():
    """A few steps of cross-entropy against a target distribution move the soft-argmax onto the dot."""
    torch.manual_seed(0)
    cfg = HeatmapNetConfig(num_keypoints=1, input_size=(32, 32), base_width=8, depth=2)
    net = HeatmapNet(cfg)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n=16):
        pos = torch.randint(4, 28, (n, 2), generator=gen).double()
        x = torch.full((n, 3, 32, 32), -1.0)
        for i, (px, py) in enumerate(pos.long()):
            x[i, :, py - 1:py + 2, px - 1:px + 2] = 1.0
        hm = (pos - 0.5) / 2  # input px -> heat-map px (stride 2)
        return x, hm[:, None]

    def err():
        x, hm = batch(64)
        with torch.no_grad():
            m, _ = soft_argmax2d(net.eval()(x).double())
        net.train()
        return (m - hm).norm(dim=-1).median().item()

    before = err()
    for _ in range(150):
        x, hm = batch()
        logits = net(x)
        target = gaussian_targets(hm.float(), cfg.heatmap_size, sigma=1.0)
        loss = -(target * torch.log_softmax(logits.flatten(2), -1).view_as(logits)).sum((-1, -2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = err()
    assert after < 1.5 and after < before / 3, (before, after)


def test_prior_maps_mark_the_kinematic_keypoints():
    from pose_estimator.keypoints import prior_maps

    m = prior_maps(np.array([[10.0, 20.0], [np.nan, np.nan], [40.6, 3.2]]), (32, 48), sigma=2.0)
    assert m.shape == (3, 32, 48) and m.dtype == torch.float32
    assert m[0, 20, 10] == pytest.approx(1.0) and m[0].argmax() == 20 * 48 + 10
    assert m[1].abs().sum() == 0  # unknown: empty
    assert m[2].argmax() == 3 * 48 + 41
    with pytest.raises(ValueError, match="prior_channels"):
        HeatmapNetConfig(num_keypoints=5, prior_channels=3)
    net = HeatmapNet(HeatmapNetConfig(num_keypoints=5, input_size=(32, 32), base_width=4, depth=2, prior_channels=5))
    assert net(torch.zeros(2, 8, 32, 32)).shape == (2, 5, 16, 16)
