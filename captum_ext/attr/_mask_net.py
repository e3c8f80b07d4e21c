"""The U-Net that maps an image to mask logits, and the straight-through binary mask (private).

Architecture (Suhail, Anand & Sethi, "Activation Matching for Explanation Generation",
arXiv 2509.23051): ``depth`` encoder levels of two 3x3 conv + ReLU with channels
``width * 2**level`` and 2x2 max-pooling between levels, a bottleneck of two 3x3 conv + ReLU
with ``width * 2**depth`` channels, a mirrored decoder (2x2 transposed-conv upsampling,
concatenation with the encoder's skip, two 3x3 conv + ReLU) and a 1x1 head to one logit
channel. The paper's net is ``depth=4, width=32`` (32-64-128-256, bottleneck 512).

Depth and width scale with the input (:func:`default_unet_config`): 224 x 224 gets the full
net, 28 x 28 a two-level net of width 16. Inputs of any size work: they are padded
(replicate) to a multiple of ``2**depth`` and the logits are cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MaskUNet",
    "default_unet_config",
    "init_mask_net",
    "straight_through_mask",
    "unet_config_from_state_dict",
]

#: Initial bias of the head: 0, so a fresh net starts near p = 0.5 (a mask that the first
#: steps shape from both sides). A large positive bias (start from the full image) makes the
#: area term switch almost every pixel off in the same few steps on MNIST.
HEAD_BIAS = 0.0
#: Scale of the head's Kaiming-uniform weights.
HEAD_WEIGHT_SCALE = 1.0


def default_unet_config(height: int, width: int) -> dict[str, int]:
    """Depth and base width for an ``height x width`` input.

    ``depth = clamp(floor(log2(min(H, W) / 4)), 1, 4)`` (the bottleneck keeps at least about
    4 x 4 pixels) and ``width = 32`` from 112 pixels on, 16 below (the papers' net for
    ImageNet sizes, a lighter one for digits).

    >>> from captum_ext.attr._mask_net import default_unet_config
    >>> default_unet_config(224, 224), default_unet_config(28, 28)
    ({'depth': 4, 'width': 32}, {'depth': 2, 'width': 16})
    """
    side = max(min(int(height), int(width)), 1)
    depth = int(math.floor(math.log2(max(side / 4, 1.0)))) if side >= 8 else 1
    depth = min(max(depth, 1), 4)
    return {"depth": depth, "width": 32 if side >= 112 else 16}


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(),
    )


class MaskUNet(nn.Module):
    """U-Net from (N, C, H, W) images to (N, 1, H, W) mask logits (see the module docstring)."""

    def __init__(self, in_channels: int, depth: int = 4, width: int = 32) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"MaskUNet needs in_channels, depth, width >= 1, got {in_channels}, {depth}, "
                f"{width}."
            )
        self.in_channels = in_channels
        self.depth = depth
        self.width = width
        channels = [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for level in range(depth):
            self.encoder.append(_double_conv(previous, channels[level]))
            previous = channels[level]
        self.bottleneck = _double_conv(previous, channels[depth])
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth)):
            self.upsample.append(
                nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
            )
            self.decoder.append(_double_conv(2 * channels[level], channels[level]))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h = (-height) % multiple
        pad_w = (-width) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for upsample, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)[..., :height, :width]


def init_mask_net(net: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """Re-initialise a :class:`MaskUNet` from ``generator`` only (the global RNG is untouched):
    Kaiming-uniform convolutions with zero biases, the head's bias ``HEAD_BIAS``."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
        head = getattr(net, "head", None)
        if isinstance(head, nn.Conv2d):
            head.weight.mul_(HEAD_WEIGHT_SCALE)
            if head.bias is not None:
                head.bias.fill_(HEAD_BIAS)
    return net


def build_mask_net(
    in_channels: int,
    height: int,
    width: int,
    *,
    config: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MaskUNet:
    """A freshly initialised :class:`MaskUNet` for the given input size, without touching
    the global random number generator."""
    config = dict(config or default_unet_config(height, width))
    with torch.random.fork_rng(devices=[]):  # nn.Conv2d's default init draws from it
        # float32 whatever torch's default dtype: the generator's draws differ by dtype,
        # and a seed must give the same net under set_default_dtype(torch.float64)
        net = MaskUNet(in_channels, **config).to(torch.float32)
    init_mask_net(net, generator)
    return net.to(device=device, dtype=dtype)


def unet_config_from_state_dict(state: Mapping[str, Tensor]) -> dict[str, int]:
    """``in_channels``, ``depth`` and ``width`` of the :class:`MaskUNet` that wrote ``state``."""
    try:
        first = state["encoder.0.0.weight"]
        levels = {key.split(".")[1] for key in state if key.startswith("encoder.")}
        return {
            "in_channels": int(first.shape[1]),
            "depth": len(levels),
            "width": int(first.shape[0]),
        }
    except (KeyError, IndexError, AttributeError) as error:
        raise ValueError(
            f"the file does not hold a MaskUNet state dict (missing {error}); load it into "
            "an ActivationMatchingMask built with the same `mask_net`."
        ) from None


class _StraightThrough(torch.autograd.Function):
    """Forward: 1[p > 0.5]; backward: the identity (the gradient of p)."""

    @staticmethod
    def forward(ctx, probabilities: Tensor) -> Tensor:
        return (probabilities > 0.5).to(probabilities.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def straight_through_mask(probabilities: Tensor) -> Tensor:
    """Hard mask ``1[p > 0.5]`` whose gradient with respect to ``p`` is the identity."""
    return _StraightThrough.apply(probabilities)
