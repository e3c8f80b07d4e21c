r"""The conditioned generator of network inversion, for any number of classes and image size."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.hooks import call_hook, registered_hooks
from captum_ext._utils.model_state import gradients_on
from captum_ext._utils.seeding import as_generator, seeded_rng
from captum_ext._utils.summaries import format_seconds
from captum_ext._utils.validation import is_integer, is_real, torch_device
from captum_ext.inversion.conditioning import (
    _check_labels,
    _check_num_classes,
    hot_matrices,
    one_hot_vectors,
    soft_vectors,
)

__all__ = [
    "CONDITIONINGS",
    "ConditionedGenerator",
    "InversionCost",
    "available_memory_bytes",
    "estimate_inversion_cost",
]

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
    """``(x - mean) / std`` per channel (a tuple ``(mean, std)`` given as ``preprocess``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        for name, value in (("mean", mean_t), ("std", std_t)):
            if value.numel() not in (1, channels):
                raise ValueError(
                    f"`preprocess` {name} must have 1 or {channels} values, got {value.numel()}."
                )
        if bool((std_t <= 0).any()):
            raise ValueError("`preprocess` std must be positive.")
        self.register_buffer("mean", mean_t.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class _Rescaled:
    """``preprocess(low + (high - low) p)``: pixels in [0, 1] to the range ``preprocess`` takes."""

    def __init__(self, preprocess: Callable[[Tensor], Tensor], low: float, high: float) -> None:
        self.preprocess = preprocess
        self.low = low
        self.high = high

    def __call__(self, pixels: Tensor) -> Tensor:
        scaled = pixels * (self.high - self.low)
        if self.low:
            scaled = scaled + self.low
        return self.preprocess(scaled)


def check_value_range(value_range: Any) -> tuple[float, float]:
    """``(low, high)`` of finite numbers with ``low < high`` (the ``value_range`` argument)."""
    if (
        not isinstance(value_range, tuple | list)
        or len(value_range) != 2
        or not all(is_real(v) and math.isfinite(v) for v in value_range)
        or not value_range[0] < value_range[1]
    ):
        raise ValueError(
            f"`value_range` must be (low, high) with finite low < high, got {value_range!r}."
        )
    return float(value_range[0]), float(value_range[1])


def _make_preprocess(preprocess, channels: int, value_range: tuple[float, float]):
    if preprocess is None:
        if value_range != (0.0, 1.0):
            raise ValueError("`value_range` is only used with a `preprocess` callable.")
        return None
    if isinstance(preprocess, tuple | list) and len(preprocess) == 2:
        if value_range != (0.0, 1.0):
            raise ValueError(
                "`value_range` is only used with a `preprocess` callable; a (mean, std) pair "
                "applies to pixels in [0, 1]."
            )
        return _AffineNormalize(preprocess[0], preprocess[1], channels)
    if callable(preprocess):
        if value_range == (0.0, 1.0):
            return preprocess
        return _Rescaled(preprocess, *value_range)
    raise TypeError(
        "`preprocess` must be None, a callable taking pixels in `value_range`, or a "
        f"(mean, std) pair, got {type(preprocess).__name__}."
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
      resize to the working size ``S x S`` (bilinear; nothing to do for ``S = 10``), with
      ``S = K`` up to ``max_matrix_size`` classes and ``S = max_matrix_size`` beyond;
    - the ``K x K`` hot matrix, area-resized to ``S x S`` (built at that size directly,
      never as ``K x K``: :func:`~captum_ext.inversion.hot_matrices` with ``size``), is
      concatenated as an extra channel (when the mode has it) and mixed by a 3 x 3 block;
    - stage B: resize to ``ceil(H / 2^u) x ceil(W / 2^u)`` and ``u`` transposed
      convolutions that double the size (``u = max(1, ceil(log2(max(H, W) / K)))``), each
      with BatchNorm, ``Dropout2d(dropout)`` and ReLU, a resize to exactly ``H x W`` when
      needed, a 3 x 3 convolution to ``C`` channels and Tanh;
    - the output ``t`` in ``[-1, 1]`` becomes pixels ``p = (t + 1) / 2`` in ``[0, 1]`` and
      the images ``x = preprocess(lo + (hi - lo) p)`` in the model's input space, with
      ``(lo, hi) = value_range``.

    For ``K = 10`` and ``28 x 28`` the sizes are those of the paper's MNIST generator
    (``10 -> 7 -> 14 -> 28`` in stage B). The working size caps memory: the paper's
    ``K x K`` feature map costs ``N * width * K^2`` values (16.4 GB in float32 for
    ``K = 1000``, batch 64 and width 64); with ``S = min(K, max_matrix_size)`` memory grows
    with the batch, ``K`` and the output pixels, not with ``K^2``. Up to ``max_matrix_size``
    classes the network is exactly the paper's.

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
        preprocess (callable or tuple, optional): Maps the generated pixels to the model's
            input space (its normalisation): a callable taking pixels in ``value_range``,
            or a ``(mean, std)`` pair (numbers or one per channel) applied to pixels in
            ``[0, 1]``. Formerly ``normalize``. Default: None (images are the pixels)
        value_range (tuple[float, float], optional): The range of pixel values that
            ``preprocess`` takes, e.g. ``(0, 255)`` for a normalisation written for 8-bit
            pixels; the generator's pixels ``p`` in ``[0, 1]`` are scaled to it first.
            Default: ``(0, 1)``
        width (int, optional): Channels of the ``K x K`` map; stage A uses ``2 width``,
            stage B halves at each doubling (at least 16). Default: 64
        bounded (bool, optional): Tanh at the end (pixels always in ``[0, 1]``). With
            ``False`` the pixels are ``(t + 1) / 2`` of an unbounded ``t``, and the pixel
            range prior of the reconstruction preset keeps them in range. Default: True
        max_matrix_size (int, optional): the largest working size ``S`` of the hot matrix
            and the feature map it joins (see above); parameters do not depend on it.
            Default: 64

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import ConditionedGenerator
        >>> gen = ConditionedGenerator(10, (1, 28, 28), preprocess=((0.5,), (0.5,))).eval()
        >>> images = gen.generate(torch.arange(10), generator=torch.Generator().manual_seed(0))
        >>> images.shape
        torch.Size([10, 1, 28, 28])
    """

    @renamed_arguments(normalize="preprocess")
    def __init__(
        self,
        num_classes: int,
        out_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 100,
        conditioning: str = "vector_matrix",
        dropout: float = 0.1,
        preprocess: Callable[[Tensor], Tensor] | Sequence | None = None,
        *,
        value_range: tuple[float, float] = (0.0, 1.0),
        width: int = 64,
        bounded: bool = True,
        max_matrix_size: int = 64,
    ) -> None:
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        if (
            not isinstance(out_shape, Sequence)
            or len(out_shape) != 3
            or not all(is_integer(s) and s > 0 for s in out_shape)
        ):
            raise ValueError(f"`out_shape` must be (C, H, W) of positive ints, got {out_shape!r}.")
        if not is_integer(latent_dim) or latent_dim < 1:
            raise ValueError(f"`latent_dim` must be a positive int, got {latent_dim!r}.")
        latent_dim = int(latent_dim)
        if not isinstance(conditioning, str) or conditioning not in CONDITIONINGS:
            raise ValueError(
                f"`conditioning` must be one of {sorted(CONDITIONINGS)}, got {conditioning!r}."
            )
        if not is_real(dropout):
            raise TypeError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        dropout = float(dropout)
        if not is_integer(width) or width < 1:
            raise ValueError(f"`width` must be a positive int, got {width!r}.")
        width = int(width)
        if not is_integer(max_matrix_size) or max_matrix_size < 2:
            raise ValueError(f"`max_matrix_size` must be an int >= 2, got {max_matrix_size!r}.")
        max_matrix_size = int(max_matrix_size)
        channels, height, wide = (int(s) for s in out_shape)
        self.num_classes = num_classes
        #: side of the working feature map and of the hot matrices the network takes
        self.matrix_size = min(num_classes, max_matrix_size)
        self.out_shape = (channels, height, wide)
        self.latent_dim = latent_dim
        self.conditioning = conditioning
        self.vector_kind, self.uses_matrix = CONDITIONINGS[conditioning]
        self.uses_vector = self.vector_kind is not None
        self.bounded = bool(bounded)
        self.value_range = check_value_range(value_range)
        self.preprocess = _make_preprocess(preprocess, channels, self.value_range)

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
        generator: torch.Generator | int | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        r"""The conditioning inputs for ``labels`` in this generator's mode.

        Args:
            labels (Tensor): ``N`` class indices.
            vector (str, optional): ``"soft"`` or ``"one_hot"`` to override the mode's
                vector kind (only for modes with a vector). Default: None
            generator (torch.Generator or int, optional): For the soft vectors. Default: None

        Returns:
            tuple: ``(vectors, matrices)``, ``N x K`` and ``N x 1 x S x S`` (``S`` =
            ``matrix_size``, ``K`` up to ``max_matrix_size`` classes), each None when
            the mode does not use it. Float32 on the device of ``labels``.
        """
        generator = as_generator(generator)
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
        matrices = self.hot_matrices(labels) if self.uses_matrix else None
        return vectors, matrices

    def hot_matrices(self, labels: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
        r"""The hot matrices of ``labels`` at this generator's working size.

        :func:`~captum_ext.inversion.hot_matrices` with ``size=self.matrix_size``:
        ``N x 1 x S x S``, built in ``O(N (K + S^2))`` memory (never ``N x K x K``).

        Args:
            labels (Tensor): ``N`` class indices.
            dtype (torch.dtype, optional): Default: ``torch.float32``
        """
        return hot_matrices(labels, self.num_classes, dtype=dtype, size=self.matrix_size)

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
            matrices (Tensor, optional): ``N x 1 x S x S`` hot matrices (required when the
                mode has the matrix; :meth:`hot_matrices`). Full ``N x 1 x K x K`` matrices
                are accepted too and area-resized to ``S x S``.
            return_pixels (bool, optional): Also return the pixels in ``[0, 1]``.

        Returns:
            Tensor or tuple[Tensor, Tensor]: images ``N x C x H x W`` in the classifier's
            input space (``preprocess`` of the pixels), and the pixels when ``return_pixels``.
        """
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"`z` must be a tensor of shape (N, {self.latent_dim}), got "
                f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}."
            )
        n, k, s = z.shape[0], self.num_classes, self.matrix_size
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
        if h.shape[-1] != s:
            h = F.interpolate(h, size=(s, s), mode="bilinear", align_corners=False)
        if self.uses_matrix:
            shape = None if matrices is None else tuple(matrices.shape)
            if shape not in ((n, 1, s, s), (n, 1, k, k)):
                raise ValueError(
                    f"`matrices` must have shape ({n}, 1, {s}, {s}) for conditioning "
                    f"{self.conditioning!r} (the hot matrices at the working size, "
                    f"`ConditionedGenerator.hot_matrices`), got {shape}."
                )
            if shape[-1] != s:
                matrices = F.interpolate(matrices.to(h.dtype), size=(s, s), mode="area")
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
        images = self.preprocess_pixels(pixels)
        return (images, pixels) if return_pixels else images

    def preprocess_pixels(self, pixels: Tensor) -> Tensor:
        """Map pixels in ``[0, 1]`` to the model's input space (``preprocess``)."""
        return pixels if self.preprocess is None else self.preprocess(pixels)

    def normalize_pixels(self, pixels: Tensor) -> Tensor:
        """Deprecated alias of :meth:`preprocess_pixels`."""
        warnings.warn(
            "ConditionedGenerator.normalize_pixels is renamed preprocess_pixels; the old name "
            "will be removed in a future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.preprocess_pixels(pixels)

    @property
    def normalize(self):
        """Deprecated alias of the ``preprocess`` attribute."""
        warnings.warn(
            "ConditionedGenerator.normalize is renamed preprocess; the old name will be "
            "removed in a future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.preprocess

    def generate(
        self,
        labels: Tensor,
        *,
        generator: torch.Generator | int | None = None,
        vector: str | None = None,
        return_pixels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""One image per label: draws ``z`` and the conditioning, then calls ``forward``.

        Runs in the current train/eval mode and grad mode (use ``.eval()`` and
        ``torch.no_grad()`` for sampling; :meth:`NetworkInversion.sample` does both).

        Args:
            labels (Tensor): ``N`` class indices (on the generator's device).
            generator (torch.Generator or int, optional): Source of ``z`` and the soft vectors.
                In train mode the generator's dropout draws from torch's global generator
                (as every ``nn.Dropout`` does), so only ``.eval()`` samples are reproducible
                from ``generator`` alone.
            vector (str, optional): ``"soft"`` / ``"one_hot"`` override. Default: None
            return_pixels (bool, optional): Also return the pixels in ``[0, 1]``.
        """
        generator = as_generator(generator)
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


def _format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class InversionCost:
    r"""Estimated peak memory and time of training an inversion generator.

    Attributes:
        bytes (int): estimated peak memory of training, beyond what the process already uses:
            ``4 P_G + P_f + 2 B (a_G + a_f)`` with ``P`` the parameter and buffer bytes of
            the generator (weights, gradients and two Adam moments) and of the classifier,
            ``B`` the batch size and ``a`` the bytes of all module outputs per example
            (kept for the backward pass, and as many again for their gradients).
        seconds (float): estimated time of ``steps`` training steps: one timed step
            (forward and backward) at ``b`` examples scaled by ``steps * batch_size / b``.
        per_example_bytes (int): ``a_G + a_f``.
        parameter_bytes (int): ``4 P_G + P_f``.
        batch_size (int): the batch the estimate is for.
        steps (int): the steps the estimate is for.
        num_classes (int): ``K``.
        matrix_size (int): the generator's working size ``S = min(K, max_matrix_size)``.
    """

    bytes: int
    seconds: float
    per_example_bytes: int
    parameter_bytes: int
    batch_size: int
    steps: int
    num_classes: int
    matrix_size: int

    def fits(self, available: int | None = None, *, margin: float = 1.5) -> bool:
        """Whether ``margin * bytes`` fits in ``available`` bytes (default:
        :func:`available_memory_bytes` on CPU)."""
        if available is None:
            available = available_memory_bytes()
        return available is None or margin * self.bytes <= available

    def describe(self) -> str:
        """One line for a report: ``"about 1.2 GB and 3.4 min for 10 steps at batch 64"``."""
        return (
            f"about {_format_bytes(self.bytes)} of memory and {format_seconds(self.seconds)} "
            f"for {self.steps} steps at batch {self.batch_size} ({self.num_classes} classes)"
        )


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    r"""Memory a new computation can still allocate on ``device``, or None when unknown.

    CUDA: the free memory of the device (``torch.cuda.mem_get_info``). CPU: the smallest of
    the system's available memory (``MemAvailable`` in ``/proc/meminfo``) and what is left
    under the process's address-space limit (``RLIMIT_AS`` minus the current ``VmSize``).

    Args:
        device (torch.device or str, optional): Default: None (the CPU)
    """
    device = torch_device("cpu" if device is None else device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None  # no driver here: unknown, as documented
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":  # mps, meta, xla, ...: not the CPU's memory; unknown
        return None
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        return min(limits) if limits else None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _proc_status_kb("VmSize")
        limits.append(max(0, soft - (used or 0) * 1024))
    return min(limits) if limits else None


def _module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@renamed_arguments(classifier="model")
def estimate_inversion_cost(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    num_classes: int | None = None,
    batch_size: int = 64,
    steps: int = 1000,
    latent_dim: int = 100,
    width: int = 64,
    conditioning: str = "vector_matrix",
    max_matrix_size: int = 64,
    probe_batch: int = 2,
    probe_bytes: int = 2**28,
) -> InversionCost:
    r"""Estimate memory and time of training a :class:`ConditionedGenerator` for ``model``.

    Runs one training step at ``probe_batch`` examples (generator forward, model
    forward, backward to the generator's parameters only) that measures the bytes of every
    module output per example with forward hooks, then times one step at the largest batch
    (up to ``batch_size``) whose activations fit in ``probe_bytes``, and scales to
    ``batch_size`` and ``steps`` (formulas in :class:`InversionCost`). Call it before a heavy
    section and skip the section when ``not cost.fits()``. The probes themselves need
    ``probe_bytes`` of memory at most (beyond ``probe_batch`` examples). The model is
    left as it was (mode, flags, ``.grad``, buffers;
    ``preserved_state``).

    Args:
        model (nn.Module): the model to invert (``N x C x H x W -> N x K``).
        input_shape (Sequence[int]): ``(C, H, W)`` of its inputs.
        num_classes (int, optional): ``K``. Default: None (the model's output width)
        batch_size (int, optional): training batch. Default: 64
        steps (int, optional): training steps. Default: 1000
        latent_dim, width, conditioning, max_matrix_size: as in :class:`ConditionedGenerator`.
        probe_batch (int, optional): examples of the probe step that measures the
            activations (>= 2 for BatchNorm). Default: 2
        probe_bytes (int, optional): activation memory allowed to the timed step, whose
            batch is ``min(batch_size, probe_bytes / (2 a))`` (at least ``probe_batch``).
            Default: 256 MiB

    Returns:
        InversionCost: ``bytes``, ``seconds`` and their parts.

    Examples::

        >>> import torchvision
        >>> from captum_ext.inversion import estimate_inversion_cost
        >>> cost = estimate_inversion_cost(torchvision.models.resnet18(), (3, 224, 224),
        ...                                batch_size=64, steps=10)
        >>> if not cost.fits():
        ...     print("inversion skipped: it needs " + cost.describe())
    """
    from captum_ext._utils.model_state import preserved_state

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    for name, value, low in (("batch_size", batch_size, 1), ("steps", steps, 0)):
        if not is_integer(value) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    if not is_integer(probe_batch) or probe_batch < 2:
        raise ValueError(f"`probe_batch` must be an int >= 2, got {probe_batch!r}.")
    if not is_integer(probe_bytes) or probe_bytes < 1:
        raise ValueError(f"`probe_bytes` must be a positive int, got {probe_bytes!r}.")
    batch_size, steps = int(batch_size), int(steps)
    probe_batch, probe_bytes = int(probe_batch), int(probe_bytes)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    sizes: list[int] = []

    def record(module, inputs, output):
        for out in output if isinstance(output, tuple | list) else (output,):
            if isinstance(out, Tensor):
                sizes.append(out.numel() * out.element_size())

    with preserved_state([model]):
        model.eval()
        if num_classes is None:  # one probe: a bad input_shape is named, not torch's error
            from captum_ext.inversion._features import count_classes

            num_classes = count_classes(model, input_shape, device, dtype)
        with seeded_rng(0):
            gen = ConditionedGenerator(
                num_classes,
                tuple(input_shape),
                latent_dim=latent_dim,
                conditioning=conditioning,
                width=width,
                max_matrix_size=max_matrix_size,
            ).to(device=device, dtype=dtype)
            gen.train()
            gen_params = [p for p in gen.parameters()]

            def step(n: int) -> float:
                labels = torch.arange(n, device=device) % num_classes
                start = time.perf_counter()
                with gradients_on():
                    images = gen.generate(labels)
                    logits = model(images)
                    loss = F.cross_entropy(logits.float(), labels)
                    torch.autograd.grad(loss, gen_params, allow_unused=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - start

            leaves = [m for m in [*gen.modules(), *model.modules()] if not list(m.children())]
            with registered_hooks(*(call_hook(m, record) for m in leaves)):
                step(probe_batch)
            per_example = math.ceil(sum(sizes) / probe_batch)
            # time a batch as large as `probe_bytes` allows: small batches carry a fixed
            # cost per step that a linear extrapolation from 2 examples would multiply
            timed = min(batch_size, max(probe_batch, probe_bytes // max(1, 2 * per_example)))
            elapsed = step(timed)
    parameters = 4 * _module_bytes(gen) + _module_bytes(model)
    return InversionCost(
        bytes=int(parameters + 2 * batch_size * per_example),
        seconds=float(elapsed * batch_size / timed * steps),
        per_example_bytes=int(per_example),
        parameter_bytes=int(parameters),
        batch_size=batch_size,
        steps=steps,
        num_classes=num_classes,
        matrix_size=gen.matrix_size,
    )
