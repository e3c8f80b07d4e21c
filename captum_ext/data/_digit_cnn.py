"""Architecture of the bundled digit classifier.

Private; load the trained model with :func:`captum_ext.bundled.load_bundled_model`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BUNDLED_CAM_LAYER", "DigitCNN", "NORMALIZE_MEAN", "NORMALIZE_STD"]

#: Mean and standard deviation used to normalise pixels after scaling them to [0, 1]:
#: ``x = (pixel / 255 - NORMALIZE_MEAN) / NORMALIZE_STD``.
NORMALIZE_MEAN = 0.1307
NORMALIZE_STD = 0.3081

#: Dotted name (as in ``model.named_modules()``) of the last convolutional block's ReLU.
#: Its output is the ``N x 64 x 7 x 7`` feature map used for class activation maps.
BUNDLED_CAM_LAYER = "features.7"


class DigitCNN(nn.Module):
    r"""Tiny convolutional classifier for 28 x 28 grey-scale digits.

    Layout (``N x 1 x 28 x 28`` in, ``N x 10`` logits out)::

        features.0  Conv2d(1, 16, 3, padding=1)    -> N x 16 x 28 x 28
        features.1  ReLU
        features.2  MaxPool2d(2)                   -> N x 16 x 14 x 14
        features.3  Conv2d(16, 32, 3, padding=1)   -> N x 32 x 14 x 14
        features.4  ReLU
        features.5  MaxPool2d(2)                   -> N x 32 x 7 x 7
        features.6  Conv2d(32, 64, 3, padding=1)   -> N x 64 x 7 x 7
        features.7  ReLU                           (the CAM layer, ``BUNDLED_CAM_LAYER``)
        pool        AdaptiveAvgPool2d(1)           -> N x 64 x 1 x 1
        flatten     Flatten                        -> N x 64
        dropout     Dropout(0.2)
        classifier  Linear(64, 10)                 -> N x 10

    All ReLUs are out-of-place so that hooks and gradient-based attributions see
    unmodified activations. Because the head is global average pooling followed by a
    single linear layer, CAM on ``features.7`` is exact: the logit of class c equals
    ``mean_{i,j} sum_k w_{c,k} A_k[i, j] + b_c``.

    Inputs must be normalised as ``x = (pixel / 255 - 0.1307) / 0.3081``
    (see :func:`captum_ext.data.normalize_digits`).

    Args:
        num_classes (int, optional): Number of output logits. Default: 10
        dropout (float, optional): Dropout probability before the classifier. Default: 0.2
    """

    #: ``(C, H, W)`` of the inputs; read by methods that need the input shape (e.g.
    #: :class:`~captum_ext.inversion.NetworkInversion`) when none is given.
    input_shape: tuple[int, int, int] = (1, 28, 28)

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = self.flatten(x)
        x = self.dropout(x)
        return self.classifier(x)
