r"""Conditioning inputs of the conditioned generator (soft vectors, one-hot vectors, hot matrices).

A conditioned generator ``G(z, c)`` learns one image distribution per class of a frozen
classifier. The class is given to it in one of these forms (Suhail, Sethi et al., "Network
Inversion of Convolutional Neural Nets", arXiv 2407.18002):

- **soft vector** ``c = softmax(r)`` with ``r ~ N(0, I_K)``; its label is ``argmax c``, so
  the generator never sees a clean label;
- **one-hot vector** ``c = e_k`` (used for counterfeits and training-like reconstruction);
- **hot matrix** ``M_k``: a ``K x K`` binary matrix whose row ``k`` and column ``k`` are 1,
  concatenated as an extra channel to a ``K x K`` feature map inside the generator;
- **vector-matrix**: a soft vector together with the hot matrix of its label (the main
  method of the paper).
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_ext._utils.seeding import as_generator
from captum_ext._utils.validation import check_float_dtype, is_integer, torch_device

__all__ = ["hot_matrices", "one_hot_vectors", "soft_vectors", "vector_matrix"]


def _check_num_classes(num_classes) -> int:
    if not is_integer(num_classes) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
    return int(num_classes)  # numpy integers (np.int64) as a Python int


def _check_labels(labels, num_classes: int, device=None) -> Tensor:
    if not isinstance(labels, Tensor):
        if isinstance(labels, int | list | tuple) and not isinstance(labels, bool):
            labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        else:
            raise TypeError(
                f"`labels` must be a 1-d tensor (or list) of class indices, got "
                f"{type(labels).__name__}."
            )
    if labels.dim() == 0:
        labels = labels.reshape(1)
    if labels.dim() != 1:
        raise ValueError(f"`labels` must be 1-d, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must hold integer class indices, got dtype {labels.dtype}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"`labels` must lie in 0..{num_classes - 1}, got values in "
            f"{int(labels.min())}..{int(labels.max())}."
        )
    return labels.long()


def _check_n(n) -> int:
    if not is_integer(n) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}.")
    return int(n)


def soft_vectors(
    n: int,
    num_classes: int,
    *,
    labels: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Random soft conditioning vectors ``c = softmax(r)``, ``r ~ N(0, I_K)``.

    The label of a soft vector is ``argmax c``. When ``labels`` are given, the largest
    entry of each ``r`` is swapped with entry ``labels[i]``, so that ``argmax c_i ==
    labels[i]``; the result is distributed as ``softmax(r)`` conditioned on its argmax
    (the argmax of ``K`` independent normals is uniform over the classes, so drawing
    uniform labels first and then swapping gives exactly the unconditional distribution).

    Args:
        n (int): Number of vectors (ignored when ``labels`` are given: one per label).
        num_classes (int): ``K >= 2``.
        labels (Tensor, optional): ``N`` int class indices in ``0..K-1``. Default: None
        generator (torch.Generator or int, optional): Source of the normal draws, for
            reproducibility; on ``device``. Default: None (torch's global generator)
        device (torch.device or str, optional): Default: the device of ``labels``, or CPU.
        dtype (torch.dtype, optional): Floating dtype. Default: ``torch.float32``

    Returns:
        Tensor: ``N x K``, positive rows summing to 1.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import soft_vectors
        >>> c = soft_vectors(4, 10, generator=torch.Generator().manual_seed(0))
        >>> c.shape, bool(torch.allclose(c.sum(1), torch.ones(4)))
        (torch.Size([4, 10]), True)
    """
    generator = as_generator(generator)
    num_classes = _check_num_classes(num_classes)
    dtype = check_float_dtype(dtype)
    if device is not None:
        device = torch_device(device)
    if labels is not None:
        labels = _check_labels(labels, num_classes, device)
        n = labels.shape[0]
        device = labels.device if device is None else device
    n = _check_n(n)
    r = torch.randn(n, num_classes, generator=generator, device=device, dtype=dtype)
    if labels is not None:
        labels = labels.to(r.device)
        rows = torch.arange(n, device=r.device)
        top = r.argmax(dim=1)
        top_values = r[rows, top].clone()
        r[rows, top] = r[rows, labels]
        r[rows, labels] = top_values
    return torch.softmax(r, dim=1)


def one_hot_vectors(
    labels: Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    r"""One-hot conditioning vectors ``c_i = e_{labels[i]}``.

    Args:
        labels (Tensor): ``N`` int class indices in ``0..K-1``.
        num_classes (int): ``K >= 2``.
        dtype (torch.dtype, optional): Default: ``torch.float32``

    Returns:
        Tensor: ``N x K`` on the device of ``labels``.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import one_hot_vectors
        >>> one_hot_vectors(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    num_classes = _check_num_classes(num_classes)
    dtype = check_float_dtype(dtype)
    labels = _check_labels(labels, num_classes)
    return torch.nn.functional.one_hot(labels, num_classes).to(dtype)


def _class_profiles(labels: Tensor, num_classes: int, size: int, dtype: torch.dtype) -> Tensor:
    """``A e_k`` per label: the one-hot vector ``e_k`` area-resized from ``K`` to ``size``."""
    hot = torch.nn.functional.one_hot(labels, num_classes).to(dtype)  # N x K
    if size == num_classes:
        return hot
    # area resizing is adaptive average pooling: each output cell averages its input bin
    return torch.nn.functional.adaptive_avg_pool1d(hot[:, None, :], size)[:, 0, :]


def hot_matrices(
    labels: Tensor,
    num_classes: int,
    *,
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
) -> Tensor:
    r"""Hot matrices: ``M_k[i, j] = 1`` if ``i == k`` or ``j == k``, else 0.

    Row ``k`` and column ``k`` of a ``K x K`` zero matrix are set to 1 (``2K - 1`` ones).
    The generator concatenates it as an extra channel to a ``K x K`` feature map (for many
    classes, to a smaller working map: ``size``).

    With ``size = S != K`` the matrix is returned area-resized to ``S x S`` (what
    ``F.interpolate(M, (S, S), mode="area")`` gives) without ever building the ``K x K``
    matrix: ``M_k = e_k 1^T + 1 e_k^T - e_k e_k^T`` and area resizing is the separable
    linear map ``M -> A M A^T`` whose rows of ``A`` (``S x K``) sum to 1, so

    .. code-block:: text

        resize(M_k) = a 1^T + 1 a^T - a a^T,   a = A e_k  (e_k area-resized to S)

    Memory is ``O(N (K + S^2))`` instead of ``O(N K^2)`` (``K = 1000`` and a batch of 64 is
    256 MB as ``K x K`` matrices in float32, 1 MB at ``S = 64``).

    Args:
        labels (Tensor): ``N`` int class indices in ``0..K-1``.
        num_classes (int): ``K >= 2``.
        dtype (torch.dtype, optional): Default: ``torch.float32``
        size (int, optional): side ``S`` of the returned matrices. Default: None (``K``)

    Returns:
        Tensor: ``N x 1 x S x S`` on the device of ``labels``.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import hot_matrices
        >>> hot_matrices(torch.tensor([1]), 3)[0, 0]
        tensor([[0., 1., 0.],
                [1., 1., 1.],
                [0., 1., 0.]])
        >>> hot_matrices(torch.tensor([999]), 1000, size=64).shape
        torch.Size([1, 1, 64, 64])
    """
    num_classes = _check_num_classes(num_classes)
    labels = _check_labels(labels, num_classes)
    if size is None:
        size = num_classes
    if not is_integer(size) or size < 1:
        raise ValueError(f"`size` must be a positive int, got {size!r}.")
    size = int(size)
    dtype = check_float_dtype(dtype)
    a = _class_profiles(labels, num_classes, size, dtype)  # N x S
    if size == num_classes:  # binary: the exact construction
        rows = a[:, :, None].expand(-1, -1, size)
        cols = a[:, None, :].expand(-1, size, -1)
        return torch.maximum(rows, cols).unsqueeze(1)
    return (a[:, :, None] + a[:, None, :] - a[:, :, None] * a[:, None, :]).unsqueeze(1)


def vector_matrix(
    n: int,
    num_classes: int,
    *,
    labels: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Vector-matrix conditioning: soft vectors and the hot matrices of their labels.

    ``c = softmax(r)``, ``r ~ N(0, I_K)``, label ``k = argmax c`` and ``M_k`` as in
    :func:`hot_matrices` (see :func:`soft_vectors` for how ``labels`` are honoured).

    Args:
        n (int): Number of examples (ignored when ``labels`` are given).
        num_classes (int): ``K >= 2``.
        labels (Tensor, optional): ``N`` class indices to condition on. Default: None
        generator (torch.Generator or int, optional): Source of randomness. Default: None
        device (torch.device or str, optional): Default: labels' device, or CPU.
        dtype (torch.dtype, optional): Default: ``torch.float32``

    Returns:
        tuple[Tensor, Tensor, Tensor]:
        - **vectors** (*Tensor*): ``N x K`` soft vectors.
        - **matrices** (*Tensor*): ``N x 1 x K x K`` hot matrices.
        - **labels** (*Tensor*): ``N`` int64 labels, ``argmax`` of the vectors.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import vector_matrix
        >>> c, m, y = vector_matrix(8, 10, generator=torch.Generator().manual_seed(0))
        >>> c.shape, m.shape, bool((c.argmax(1) == y).all())
        (torch.Size([8, 10]), torch.Size([8, 1, 10, 10]), True)
    """
    generator = as_generator(generator)
    vectors = soft_vectors(
        n, num_classes, labels=labels, generator=generator, device=device, dtype=dtype
    )
    chosen = vectors.argmax(dim=1)
    return vectors, hot_matrices(chosen, num_classes, dtype=dtype), chosen
