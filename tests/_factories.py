"""Model factories used through ``load_model("_factories:...")`` by test_loading and test_cli.

The tests put this folder on ``sys.path`` (``monkeypatch.syspath_prepend``, or ``PYTHONPATH``
for subprocesses), so the specs read ``_factories:small_cnn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NOT_CALLABLE = 3


class SmallCNN(nn.Module):
    """conv -> ReLU -> conv -> ReLU (``features.3``: N x 16 x H x W) -> pool -> linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BranchyCNN(nn.Module):
    """Control flow, free functions, keyword-only operator arguments and a list of blocks:
    what the TorchScript layer wrapper must evaluate on the way to ``blocks.1.conv``."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.ModuleList([_Block(6), _Block(6)])
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        features = [x]
        for block in self.blocks:
            x = block(x)
            features.append(x)
        if x.shape[0] > 0:
            x = torch.add(x, features[0], alpha=0.5)
        for i in range(2):
            x = x * (1.0 + 0.1 * i)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x))) + x


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def compiled_small_cnn() -> nn.Module:
    """A factory that compiles what it builds (the "aot_eager" backend: no C++ compiler)."""
    return torch.compile(small_cnn(), backend="aot_eager")


def one_logit_small_cnn() -> nn.Module:
    """A binary classifier with one logit per image (``BCEWithLogitsLoss`` style)."""
    torch.manual_seed(0)
    return SmallCNN(num_classes=1)


def softmax_small_cnn() -> nn.Module:
    """A classifier that ends in a softmax (returns probabilities)."""
    return nn.Sequential(small_cnn(), nn.Softmax(dim=1))


def double_precision_small_cnn() -> nn.Module:
    """A factory that returns its model in float64 (the images load as float32)."""
    return small_cnn().double()


def half_precision_small_cnn() -> nn.Module:
    """A factory that returns its model in bfloat16 (the images load as float32)."""
    return small_cnn().to(torch.bfloat16)


class _LogitsInAField(SmallCNN):
    """Returns ``{"logits": ...}``, as a Hugging Face model returns ``.logits``."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.classifier(torch.flatten(self.pool(self.features(x)), 1))  # scriptable
        return {"logits": logits, "hidden": x}


def logits_in_a_field() -> nn.Module:
    torch.manual_seed(0)
    return _LogitsInAField()


def grey_cnn() -> SmallCNN:
    """Single-channel input, 4 classes."""
    torch.manual_seed(0)
    return SmallCNN(in_channels=1)


def branchy_cnn() -> BranchyCNN:
    torch.manual_seed(0)
    model = BranchyCNN()
    for block in model.blocks:
        block.norm.running_mean.uniform_(-0.3, 0.3)
        block.norm.running_var.uniform_(0.5, 1.5)
    return model


def needs_argument(width: int) -> SmallCNN:
    return SmallCNN(num_classes=width)


def not_a_model() -> int:
    return 42
