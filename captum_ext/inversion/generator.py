r"""The conditioned generator of network inversion, for any number of classes and image size."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ext.inversion.conditioning import (
    _check_labels,
    _check_num_classes,
    hot_matrices,
    one_hot_vectors,
    soft_vectors,
)

__all__ = ["CONDITIONINGS", "ConditionedGenerator"]

#: Conditioning modes: which vector the generator receives (``"soft"``, ``"one_hot"`` or
#: none) and whether it receives the hot matrix.
CONDITIONINGS: dict[str, tuple[str | None, bool]] = {
    "vector": ("soft", False),
    "one_hot": ("one_hot", False),
    "matrix": (None, True),
    "vector_matrix": ("soft", True),
    "one_hot_matrix": ("one_hot", True),
}


class _AffineNormalize(nn.Module):
    """``(x - mean) / std`` per channel (a tuple ``(mean, std)`` given as ``normalize``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        for name, value in (("mean", mean_t), ("std", std_t)):
            if value.numel() not in (1, channels):
                raise ValueError(
                    f"`normalize` {name} must have 1 or {channels} values, got {value.numel()}."
                )
        if bool((std_t <= 0).any()):
            raise ValueError("`normalize` std must be positive.")
        self.register_buffer("mean", mean_t.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _pixels_255(normalize: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def wrapped(x: Tensor) -> Tensor:
        return normalize(x * 255.0)

    return wrapped


def _make_normalize(normalize, channels: int):
    if normalize is None:
        return None
    from captum_ext.data import normalize_digits

    if normalize is normalize_digits:  # takes 0..255 pixels, the generator makes [0, 1]
        return _pixels_255(normalize)
    if isinstance(normalize, tuple | list) and len(normalize) == 2:
        return _AffineNormalize(normalize[0], normalize[1], channels)
    if callable(normalize):
        return normalize
    raise TypeError(
        "`normalize` must be None, a callable taking images in [0, 1], or a (mean, std) pair, "
        f"got {type(normalize).__name__}."
    )


def _block(cin: int, cout: int, kernel: int, stride: int, padding: int, dropout: float):
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConditionedGenerator(nn.Module):
    r"""Conditional generator ``G(z, c)`` for all ``K`` classes of a frozen classifier.

    The reference architecture of Suhail, Sethi et al. ("Network Inversion of Convolutional
    Neural Nets", arXiv 2407.18002), generalised to any ``K`` and output size:

    - ``z ~ N(0, I)`` (``latent_dim``); the conditioning vector ``c`` (soft or one-hot, when
      the mode has one) goes through ``Linear(K -> latent_dim)`` and is concatenated with
      ``z`` into a ``2 latent_dim x 1 x 1`` map (``latent_dim x 1 x 1`` without vector);
    - stage A: transposed convolutions with BatchNorm + ReLU, ``1 -> 4 -> 7 -> 10``, then a
      resize to ``K x K`` (bilinear; nothing to do for ``K = 10``);
    - the ``K x K`` hot matrix is concatenated as an extra channel (when the mode has it)
      and mixed by a 3 x 3 block;
    - stage B: resize to ``ceil(H / 2^u) x ceil(W / 2^u)`` and ``u`` transposed
      convolutions that double the size (``u = max(1, ceil(log2(max(H, W) / K)))``), each
      with BatchNorm, ``Dropout2d(dropout)`` and ReLU, a resize to exactly ``H x W`` when
      needed, a 3 x 3 convolution to ``C`` channels and Tanh;
    - the output ``t`` in ``[-1, 1]`` becomes pixels ``p = (t + 1) / 2`` in ``[0, 1]`` and
      the images ``x = normalize(p)`` in the classifier's input space.

    For ``K = 10`` and ``28 x 28`` the sizes are those of the paper's MNIST generator
    (``10 -> 7 -> 14 -> 28`` in stage B).

    Args:
        num_classes (int): ``K >= 2``, the classifier's number of outputs.
        out_shape (tuple[int, int, int], optional): ``(C, H, W)`` of the classifier's
            input. Default: ``(1, 28, 28)``
        latent_dim (int, optional): Size of ``z``. Default: 100
        conditioning (str, optional): ``"vector_matrix"`` (soft vector + hot matrix, the
            main method), ``"vector"`` (soft vector only), ``"one_hot"`` (one-hot vector
            only), ``"matrix"`` (hot matrix only) or ``"one_hot_matrix"`` (one-hot vector +
            hot matrix). The vector kind is only the default of :meth:`conditioning_for`;
            the network takes any ``N x K`` vector (the reconstruction preset feeds one-hot
            vectors to a ``"vector_matrix"`` generator in its second phase).
            Default: ``"vector_matrix"``
        dropout (float, optional): ``Dropout2d`` probability in every stage-B block
            ("heavy dropout" in the papers). Default: 0.1
        normalize (callable or tuple, optional): The classifier's normalisation, applied to
            pixels in ``[0, 1]``: a callable, or a ``(mean, std)`` pair (numbers or one per
            channel). :func:`captum_ext.data.normalize_digits` (which takes ``0..255``
            pixels) is recognised and fed ``255 p``. Default: None (images are the pixels)
        width (int, optional): Channels of the ``K x K`` map; stage A uses ``2 width``,
            stage B halves at each doubling (at least 16). Default: 64
        bounded (bool, optional): Tanh at the end (pixels always in ``[0, 1]``). With
            ``False`` the pixels are ``(t + 1) / 2`` of an unbounded ``t``, and the pixel
            range prior of the reconstruction preset keeps them in range. Default: True

    Examples::

        >>> import torch
        >>> from captum_ext.data import normalize_digits
        >>> from captum_ext.inversion import ConditionedGenerator
        >>> gen = ConditionedGenerator(10, (1, 28, 28), normalize=normalize_digits).eval()
        >>> images = gen.generate(torch.arange(10), generator=torch.Generator().manual_seed(0))
        >>> images.shape
        torch.Size([10, 1, 28, 28])
    """

    def __init__(
        self,
        num_classes: int,
        out_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 100,
        conditioning: str = "vector_matrix",
        dropout: float = 0.1,
        normalize: Callable[[Tensor], Tensor] | Sequence | None = None,
        *,
        width: int = 64,
        bounded: bool = True,
    ) -> None:
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        if (
            not isinstance(out_shape, Sequence)
            or len(out_shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in out_shape)
        ):
            raise ValueError(f"`out_shape` must be (C, H, W) of positive ints, got {out_shape!r}.")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"`latent_dim` must be a positive int, got {latent_dim!r}.")
        if conditioning not in CONDITIONINGS:
            raise ValueError(
                f"`conditioning` must be one of {sorted(CONDITIONINGS)}, got {conditioning!r}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise TypeError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"`width` must be a positive int, got {width!r}.")
        channels, height, wide = (int(s) for s in out_shape)
        self.num_classes = num_classes
        self.out_shape = (channels, height, wide)
        self.latent_dim = latent_dim
        self.conditioning = conditioning
        self.vector_kind, self.uses_matrix = CONDITIONINGS[conditioning]
        self.uses_vector = self.vector_kind is not None
        self.bounded = bool(bounded)
        self.normalize = _make_normalize(normalize, channels)

        self.embed = nn.Linear(num_classes, latent_dim) if self.uses_vector else None
        cin = latent_dim * (2 if self.uses_vector else 1)
        self.stage_a = nn.Sequential(
            _block(cin, 2 * width, 4, 1, 0, 0.0),  # 1 -> 4
            _block(2 * width, 2 * width, 4, 1, 0, 0.0),  # 4 -> 7
            _block(2 * width, width, 4, 1, 0, 0.0),  # 7 -> 10
        )
        self.mix = _block(width + (1 if self.uses_matrix else 0), width, 3, 1, 1, dropout)
        ups = max(1, math.ceil(math.log2(max(height, wide) / num_classes)))
        self._start = (math.ceil(height / 2**ups), math.ceil(wide / 2**ups))
        blocks, c = [], width
        for _ in range(ups):
            nxt = max(16, c // 2)
            blocks.append(_block(c, nxt, 4, 2, 1, dropout))
            c = nxt
        self.stage_b = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(c, channels, 3, padding=1)

    def conditioning_for(
        self,
        labels: Tensor,
        *,
        vector: str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        r"""The conditioning inputs for ``labels`` in this generator's mode.

        Args:
            labels (Tensor): ``N`` class indices.
            vector (str, optional): ``"soft"`` or ``"one_hot"`` to override the mode's
                vector kind (only for modes with a vector). Default: None
            generator (torch.Generator, optional): For the soft vectors. Default: None

        Returns:
            tuple: ``(vectors, matrices)``, ``N x K`` and ``N x 1 x K x K``, each None when
            the mode does not use it. Float32 on the device of ``labels``.
        """
        labels = _check_labels(labels, self.num_classes)
        kind = self.vector_kind if vector is None else vector
        if vector is not None and vector not in ("soft", "one_hot"):
            raise ValueError(f"`vector` must be 'soft' or 'one_hot', got {vector!r}.")
        vectors = None
        if self.uses_vector:
            if kind == "soft":
                vectors = soft_vectors(
                    0, self.num_classes, labels=labels, generator=generator, device=labels.device
                )
            else:
                vectors = one_hot_vectors(labels, self.num_classes)
        matrices = hot_matrices(labels, self.num_classes) if self.uses_matrix else None
        return vectors, matrices

    def forward(
        self,
        z: Tensor,
        vectors: Tensor | None = None,
        matrices: Tensor | None = None,
        *,
        return_pixels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Generate images.

        Args:
            z (Tensor): ``N x latent_dim`` noise.
            vectors (Tensor, optional): ``N x K`` conditioning vectors (required when the
                mode has a vector).
            matrices (Tensor, optional): ``N x 1 x K x K`` hot matrices (required when the
                mode has the matrix).
            return_pixels (bool, optional): Also return the pixels in ``[0, 1]``.

        Returns:
            Tensor or tuple[Tensor, Tensor]: images ``N x C x H x W`` in the classifier's
            input space (``normalize(pixels)``), and the pixels when ``return_pixels``.
        """
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"`z` must be a tensor of shape (N, {self.latent_dim}), got "
                f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}."
            )
        n, k = z.shape[0], self.num_classes
        parts = [z]
        if self.uses_vector:
            if vectors is None or tuple(vectors.shape) != (n, k):
                raise ValueError(
                    f"`vectors` must have shape ({n}, {k}) for conditioning "
                    f"{self.conditioning!r}, got "
                    f"{None if vectors is None else tuple(vectors.shape)}."
                )
            parts.append(self.embed(vectors.to(z.dtype)))
        h = self.stage_a(torch.cat(parts, dim=1)[:, :, None, None])
        if h.shape[-1] != k:
            h = F.interpolate(h, size=(k, k), mode="bilinear", align_corners=False)
        if self.uses_matrix:
            if matrices is None or tuple(matrices.shape) != (n, 1, k, k):
                raise ValueError(
                    f"`matrices` must have shape ({n}, 1, {k}, {k}) for conditioning "
                    f"{self.conditioning!r}, got "
                    f"{None if matrices is None else tuple(matrices.shape)}."
                )
            h = torch.cat([h, matrices.to(h.dtype)], dim=1)
        h = self.mix(h)
        if tuple(h.shape[-2:]) != self._start:
            h = F.interpolate(h, size=self._start, mode="bilinear", align_corners=False)
        h = self.stage_b(h)
        if tuple(h.shape[-2:]) != self.out_shape[1:]:
            h = F.interpolate(h, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        t = self.to_image(h)
        if self.bounded:
            t = torch.tanh(t)
        pixels = (t + 1) / 2
        images = pixels if self.normalize is None else self.normalize(pixels)
        return (images, pixels) if return_pixels else images

    def normalize_pixels(self, pixels: Tensor) -> Tensor:
        """Map pixels in ``[0, 1]`` to the classifier's input space (``normalize``)."""
        return pixels if self.normalize is None else self.normalize(pixels)

    def generate(
        self,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        vector: str | None = None,
        return_pixels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""One image per label: draws ``z`` and the conditioning, then calls ``forward``.

        Runs in the current train/eval mode and grad mode (use ``.eval()`` and
        ``torch.no_grad()`` for sampling; :meth:`NetworkInversion.sample` does both).

        Args:
            labels (Tensor): ``N`` class indices (on the generator's device).
            generator (torch.Generator, optional): Source of ``z`` and the soft vectors.
            vector (str, optional): ``"soft"`` / ``"one_hot"`` override. Default: None
            return_pixels (bool, optional): Also return the pixels in ``[0, 1]``.
        """
        param = next(self.parameters())
        labels = _check_labels(labels, self.num_classes, param.device).to(param.device)
        z = torch.randn(
            labels.shape[0], self.latent_dim, generator=generator, device=param.device
        ).to(param.dtype)
        vectors, matrices = self.conditioning_for(labels, vector=vector, generator=generator)
        if vectors is not None:
            vectors = vectors.to(param.dtype)
        if matrices is not None:
            matrices = matrices.to(param.dtype)
        return self(z, vectors, matrices, return_pixels=return_pixels)
