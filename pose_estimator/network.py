"""HeatmapNet: a small U-Net from an RGB crop to K heat-map logits, one per feature point.

Layout (``stride`` 2, ``depth`` 3, ``base_width`` c):

    input 3×H×W ─ stem conv s2 ─► c×H/2 ─► down ─► 2c×H/4 ─► down ─► 4c×H/8 ─► down ─► 8c×H/16
                                    │               │                  │                 │
    logits K×H/2 ◄─ head ◄─ c ◄─ up+skip ◄─ 2c ◄─ up+skip ◄─ 4c ◄─ up+skip ◄──────────────┘

Convolutions are 3x3 with batch norm and ReLU; down-sampling is a strided
convolution, up-sampling bilinear. The output is raw logits: the spatial
softmax and the coordinate/covariance extraction live in
:mod:`pose_estimator.keypoints`. Everything is configuration; nothing knows
which robot it is looking at.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["HeatmapNetConfig", "HeatmapNet"]


@dataclass
class HeatmapNetConfig:
    num_keypoints: int = 14
    input_size: tuple[int, int] = (128, 128)  # (h, w)
    base_width: int = 16
    depth: int = 3
    stride: int = 2  # 1 or 2: heat-map resolution relative to the input
    #: extra input channels after RGB: the kinematic prior, one Gaussian map per keypoint at
    #: where the measured joints project it (0: the network sees RGB only)
    prior_channels: int = 0

    def __post_init__(self) -> None:
        self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        if self.num_keypoints < 1 or self.base_width < 1 or self.depth < 1:
            raise ValueError("num_keypoints, base_width and depth must be >= 1")
        if self.prior_channels not in (0, self.num_keypoints):
            raise ValueError(f"prior_channels must be 0 or num_keypoints ({self.num_keypoints}), "
                             f"got {self.prior_channels}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride}")
        f = self.stride * 2**self.depth
        if self.input_size[0] % f or self.input_size[1] % f:
            raise ValueError(f"input_size {self.input_size} must be divisible by stride*2**depth = {f}")

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return (self.input_size[0] // self.stride, self.input_size[1] // self.stride)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HeatmapNet(nn.Module):
    def __init__(self, config: HeatmapNetConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or HeatmapNetConfig(**kwargs)
        c, d = self.config.base_width, self.config.depth
        widths = [c * 2**i for i in range(d + 1)]
        self.stem = nn.Sequential(_conv(3 + self.config.prior_channels, c, stride=self.config.stride), _conv(c, c))
        self.down = nn.ModuleList(nn.Sequential(_conv(widths[i], widths[i + 1], stride=2),
                                                _conv(widths[i + 1], widths[i + 1])) for i in range(d))
        self.up = nn.ModuleList(nn.Sequential(_conv(widths[i + 1] + widths[i], widths[i]), _conv(widths[i], widths[i]))
                                for i in reversed(range(d)))
        self.head = nn.Conv2d(c, self.config.num_keypoints, 1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3 [+ K prior maps], H, W) normalised RGB -> (B, K, H/stride, W/stride) logits."""
        x = self.stem(x)
        skips = [x]
        for m in self.down:
            x = m(x)
            skips.append(x)
        skips.pop()
        for m in self.up:
            s = skips.pop()
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = m(torch.cat([x, s], 1))
        return self.head(x)

    def fused(self) -> "HeatmapNet":
        """A copy for inference with every batch norm folded into the convolution before it.

        Uses the running statistics (eval mode), so the outputs are the same up to float rounding,
        with one pass over each feature map fewer. On a 2-core CPU the gain is small, 0.98-1.09x
        across runs (``benchmarks/inference.py`` times both: ``fold_speedup``).
        The copy is for running, not training or saving (its layers differ from the model file's).
        """
        net = copy.deepcopy(self).eval()
        for m in net.modules():
            if (isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[0], nn.Conv2d)
                    and isinstance(m[1], nn.BatchNorm2d)):
                m[0], m[1] = fuse_conv_bn_eval(m[0], m[1]), nn.Identity()
        return net

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
