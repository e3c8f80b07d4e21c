r"""ROAD (Remove And Debias) and the completeness curve of the soundness/completeness pair.

Removing pixels and filling them with a constant leaks the shape of the removed region to the
model (Rong et al., ICML 2022). ROAD fills each removed pixel by **noisy linear imputation**:
the removed pixels :math:`U` take the values that make each of them the weighted mean of its
8 neighbours inside the image (direct neighbours weight 1/6, diagonal ones 1/12),

.. math::  \sum_{q \in \mathcal{N}(p)} w_{pq}\,(x_p - x_q) = 0 \quad \forall p \in U,

with the kept pixels fixed, then adds :math:`\mathcal{N}(0, \sigma^2)` noise (:math:`\sigma =
0.01`) to the imputed pixels. The system is the Dirichlet problem of a weighted graph
Laplacian: symmetric positive definite whenever every region of removed pixels touches a kept
one. :func:`~captum_ext.metrics.road_imputation` solves it for a whole batch (every image and
every channel at once): on the CPU by a batched nested-dissection Cholesky factorisation of the
system written on the whole pixel grid (images with large holes) or one sparse LU factorisation
of the block-diagonal system (scipy, images with small holes), on other devices by conjugate
gradients in float64 with the Laplacian applied as a 3 x 3 convolution, where no sparse matrix
is built (and the nested factorisation for any image they leave unconverged).

- :func:`~captum_ext.metrics.road`: the probability of the target after removing the most
  (``order="morf"``) or least (``"lerf"``) relevant fraction of pixels, for several fractions,
  with ROAD imputation.
- :func:`~captum_ext.metrics.completeness` (Li, Zhang, ..., Khakzar, TMLR 2024, MoRF
  *by value*): for threshold :math:`t`, remove the pixels with :math:`a(p) > (1 - t)\max a` and
  record the drop of the target's score, :math:`s(x) - s(\tilde x_t)`. Large early drops: the
  map's high values cover the evidence the model uses.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_ext._utils.batched_grad import run_forward
from captum_ext._utils.optional import import_optional
from captum_ext._utils.precision import has_float64, precise, precise_dtype
from captum_ext._utils.seeding import (
    as_generator,
    combined_keys,
    content_keys,
    example_normal,
    seed_from,
)
from captum_ext._utils.validation import (
    PerExampleLayout,
    check_int,
    check_number,
    check_several_classes,
    class_selection,
    format_additional_forward_args,
)
from captum_ext.metrics._multigrid import COARSEST_SIZE, multigrid_imputation
from captum_ext.metrics._perturbation import (
    DEFAULT_BLUR_KERNEL_SIZE,
    DEFAULT_BLUR_SIGMA,
    check_choice,
    evaluation,
    gaussian_blur,
    image_batch,
    maps_for,
)

__all__ = [
    "CompletenessCurves",
    "RoadCurves",
    "SoundnessCurves",
    "completeness",
    "road",
    "road_imputation",
    "soundness",
]

DEFAULT_ROAD_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_COMPLETENESS_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# soco's schedule: removed fraction from 0.98 down to 0.03 in steps of 0.01
DEFAULT_SOUNDNESS_RATIOS = tuple(round(0.98 - 0.01 * i, 2) for i in range(96))
_DIRECT, _DIAGONAL = 1.0 / 6.0, 1.0 / 12.0


class RoadCurves(NamedTuple):
    """What :func:`road` returns."""

    percentages: Tensor
    """``(P,)`` fraction of pixels removed at each point."""
    probability: Tensor
    """``(N, P)`` probability of the target after each removal."""
    correct: Tensor
    """``(N, P)`` 1 where the model still predicts the target (NaN where its logits are
    NaN)."""


class CompletenessCurves(NamedTuple):
    """What :func:`completeness` returns."""

    thresholds: Tensor
    """``(T,)`` the thresholds :math:`t`."""
    drop: Tensor
    """``(N, T)`` :math:`s(x) - s(\\tilde x_t)` with :math:`s` the target's probability (or
    its correctness, with ``score="accuracy"``)."""
    removed_fraction: Tensor
    """``(N, T)`` fraction of the pixels removed at each threshold."""


class SoundnessCurves(NamedTuple):
    """What :func:`soundness` returns."""

    removed_fractions: Tensor
    """``(R,)`` fraction of pixels removed at each step (decreasing)."""
    soundness: Tensor
    """``(N, R)`` (remaining mass - accumulated false mass) / remaining mass."""
    score: Tensor
    """``(N, R)`` the target's probability (or correctness) at each step."""
    false_mass: Tensor
    """``(N,)`` attribution mass counted as false by the end."""


def _neighbour_kernel(dtype: torch.dtype, device: torch.device) -> Tensor:
    kernel = torch.full((3, 3), _DIAGONAL, dtype=dtype, device=device)
    kernel[0, 1] = kernel[1, 0] = kernel[1, 2] = kernel[2, 1] = _DIRECT
    kernel[1, 1] = 0.0
    return kernel[None, None]


_DIRECT_UNKNOWNS = 20_000  # measured: smaller groups factorise faster (28 and 224 px)
_OFFSETS = [(dr, dq) for dr in (-1, 0, 1) for dq in (-1, 0, 1) if (dr, dq) != (0, 0)]


def _direct_solve(images: Tensor, removed: Tensor) -> Tensor:
    """All systems of the batch as one block-diagonal sparse matrix, factorised once by
    scipy's SuperLU (float64, on the CPU)."""
    import numpy as np

    sparse = import_optional("scipy.sparse", "road_imputation(solver='direct')")
    sparse_linalg = import_optional("scipy.sparse.linalg", "road_imputation(solver='direct')")

    n, c, h, w = images.shape
    pixels = h * w
    values_in = images.detach().to("cpu", torch.float64).numpy().reshape(n, c, pixels)
    unknown = np.flatnonzero(removed.detach().cpu().numpy().reshape(-1))
    if unknown.size == 0:
        return images.clone()
    index = -np.ones(n * pixels, dtype=np.int64)
    index[unknown] = np.arange(unknown.size)
    image_of, pixel = np.divmod(unknown, pixels)
    row, column = np.divmod(pixel, w)
    diagonal = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    rows, columns, entries = [], [], []
    for dr, dq in _OFFSETS:
        weight = _DIRECT if dr == 0 or dq == 0 else _DIAGONAL
        r, q = row + dr, column + dq
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        neighbour = np.where(inside, image_of * pixels + r * w + q, 0)
        diagonal += weight * inside
        is_unknown = inside & (index[neighbour] >= 0)
        rows.append(np.flatnonzero(is_unknown))
        columns.append(index[neighbour[is_unknown]])
        entries.append(np.full(rows[-1].size, -weight))
        known = np.flatnonzero(inside & ~is_unknown)
        rhs[known] += weight * values_in[image_of[known], :, neighbour[known] % pixels]
    rows.append(np.arange(unknown.size))
    columns.append(np.arange(unknown.size))
    entries.append(diagonal)
    matrix = sparse.csc_matrix(
        (np.concatenate(entries), (np.concatenate(rows), np.concatenate(columns))),
        shape=(unknown.size, unknown.size),
    )
    # symmetric positive definite: SuperLU's symmetric mode (diagonal pivots, no row
    # interchanges) with a minimum-degree ordering of A + A^T fills in about half as much as
    # the default COLAMD column ordering (measured, benchmarks/RESULTS.md)
    solution = sparse_linalg.splu(
        matrix,
        permc_spec="MMD_AT_PLUS_A",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": True},
    ).solve(rhs)
    out = torch.from_numpy(values_in.copy())  # (N, C, HW)
    out.permute(0, 2, 1)[torch.from_numpy(image_of), torch.from_numpy(pixel)] = torch.from_numpy(
        solution
    )
    return out.reshape(n, c, h, w).to(device=images.device, dtype=images.dtype)


_BLOCK_MAX_WIDTH = 40  # "auto": narrower images go to "block" rather than "nested" (measured)
_BLOCK_CHUNK_ELEMENTS = 16_000_000  # per chunk: about 2 x 128 MB of float64 factors


def _block_solve(images: Tensor, removed: Tensor) -> Tensor:
    r"""Every system of the batch at once by a block-tridiagonal Cholesky factorisation (float64).

    The system is written on the whole pixel grid: a removed pixel's row is the Laplacian row
    (kept neighbours moved to the right-hand side), a kept pixel's row is the identity. The
    matrix is symmetric positive definite and, with the pixels in row-major order,
    block-tridiagonal with ``H`` blocks of ``W x W``; one Cholesky sweep over the image rows
    factorises the systems of every image and mask of a chunk together (batched LAPACK calls,
    no per-image Python), ``O(H W^3)`` per system: fast for small images."""
    n, c, h, w = images.shape
    x = images.detach().to(torch.float64)
    u = removed.reshape(n, h, w).to(torch.float64)
    kernel = _neighbour_kernel(torch.float64, x.device)
    degree = F.conv2d(
        torch.ones(1, 1, h, w, dtype=torch.float64, device=x.device), kernel, padding=1
    )
    kept = (1.0 - u)[:, None]
    neighbours = F.conv2d((x * kept).reshape(n * c, 1, h, w), kernel, padding=1)
    rhs = u[:, None] * neighbours.reshape(n, c, h, w) + kept * x  # (N, C, H, W)
    rhs = rhs.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): block i is rhs[:, i]
    centre = u * degree[0, 0] + (1.0 - u)  # (N, H, W)
    across = -_DIRECT * u[..., 1:] * u[..., :-1]  # (N, H, W - 1)
    below, above = u[:, 1:], u[:, :-1]  # coupling of image row i + 1 (rows) with row i (columns)
    straight = -_DIRECT * below * above
    left = -_DIAGONAL * below[..., 1:] * above[..., :-1]
    right = -_DIAGONAL * below[..., :-1] * above[..., 1:]

    def tridiagonal(middle: Tensor, upper: Tensor, lower: Tensor) -> Tensor:  # (N, W, W)
        block = torch.zeros(n, w, w, dtype=torch.float64, device=x.device)
        block.diagonal(0, 1, 2).copy_(middle)
        block.diagonal(1, 1, 2).copy_(upper)
        block.diagonal(-1, 1, 2).copy_(lower)
        return block

    def diagonal_block(i: int) -> Tensor:
        return tridiagonal(centre[:, i], across[:, i], across[:, i])

    def coupling_block(i: int) -> Tensor:  # rows: image row i + 1, columns: row i
        return tridiagonal(straight[:, i], right[:, i], left[:, i])

    factors, lowers, forward = [], [], []
    factor = torch.linalg.cholesky(diagonal_block(0))
    factors.append(factor)
    forward.append(torch.linalg.solve_triangular(factor, rhs[:, 0], upper=False))
    for i in range(1, h):
        # coupling @ factor^-T, the block of the Cholesky factor below the previous one, as
        # (factor^-1 coupling^T)^T: torch's right-sided batched triangular solve
        # (left=False) is up to 1000x slower with more than one thread
        lower = torch.linalg.solve_triangular(factor, coupling_block(i - 1).mT, upper=False).mT
        factor = torch.linalg.cholesky(torch.baddbmm(diagonal_block(i), lower, lower.mT, alpha=-1))
        lowers.append(lower)
        factors.append(factor)
        forward.append(
            torch.linalg.solve_triangular(factor, rhs[:, i] - lower @ forward[-1], upper=False)
        )
    solution = [torch.linalg.solve_triangular(factors[-1].mT, forward[-1], upper=True)]
    for i in range(h - 2, -1, -1):
        solution.append(
            torch.linalg.solve_triangular(
                factors[i].mT, forward[i] - lowers[i].mT @ solution[-1], upper=True
            )
        )
    filled = torch.stack(solution[::-1], dim=1).permute(0, 3, 1, 2)  # (N, C, H, W)
    filled = torch.where(removed.reshape(n, 1, h, w), filled, x)
    return filled.to(images.dtype)


_NESTED_LEAF = 4  # boxes up to 4 x 4 pixels are eliminated whole
_NESTED_CHUNK_PIXELS = 200_000  # systems per chunk: this many pixels (about 3 images of 224 px)
_STENCIL = [(dr, dq) for dr in (-1, 0, 1) for dq in (-1, 0, 1)]  # index 4 is the pixel itself


class _FrontGroup(NamedTuple):
    """Fronts of one height of the dissection tree with the same shape, eliminated together.

    The matrix blocks (``"ee"``, ``"eu"``, ``"uu"``: eliminated / update rows and columns) and
    right-hand sides (``"e"``, ``"u"``) of the fronts are gathered from an arena per system
    that holds the stencil values (or right-hand side) followed by every group's Schur
    complement (or updated right-hand side) and a zero: ``(primary, extra_source,
    extra_target)`` gives each entry of the flattened block its first contribution (arena
    index) and the further contributions of the entries that have more than one."""

    eliminated: Tensor  # (fronts * ne,) pixels eliminated by the fronts
    update: Tensor  # (fronts * nu,) pixels of their update sets (the rings around their boxes)
    ne: int
    nu: int
    fronts: int
    blocks: dict
    rhs: dict
    offset: int  # where the group's Schur complements start in the matrix arena
    rhs_offset: int  # where its updated right-hand sides start in the right-hand side arena


def _index(parts: list) -> Tensor:
    import numpy as np

    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def _scatter(
    blocks: dict, shapes: dict, source: int, front: int, rows: Any, cols: Any, picked: Any
) -> None:
    """Record that entries ``picked`` of ``source`` land at (``rows``, ``cols``) of front
    ``front``, split over the blocks (eliminated/update rows and columns) they fall in."""
    for name, (row0, nrows, col0, ncols) in shapes.items():
        sel = (rows >= row0) & (rows < row0 + nrows) & (cols >= col0) & (cols < col0 + ncols)
        if sel.any():
            target = front * nrows * ncols + (rows[sel] - row0) * ncols + cols[sel] - col0
            entry = blocks[name].setdefault(source, ([], []))
            entry[0].append(picked[sel])
            entry[1].append(target)


def _on_device(group: _FrontGroup, device: torch.device) -> _FrontGroup:
    def moved(parts: dict) -> dict:
        return {name: tuple(t.to(device) for t in block) for name, block in parts.items()}

    return group._replace(
        eliminated=group.eliminated.to(device),
        update=group.update.to(device),
        blocks=moved(group.blocks),
        rhs=moved(group.rhs),
    )


def _gathers(parts: dict, bases: dict, size: int, zero: int) -> tuple[Tensor, Tensor, Tensor]:
    """(primary, extra_source, extra_target) of one block from its ``{source: (indices,
    targets)}`` contributions, with ``bases[source]`` the source's start in the arena."""
    import numpy as np

    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.full((size,), zero, dtype=torch.long), empty, empty
    source = np.concatenate([bases[k] + np.concatenate(a) for k, (a, _) in sorted(parts.items())])
    target = np.concatenate([np.concatenate(b) for _, (_, b) in sorted(parts.items())])
    order = np.argsort(target, kind="stable")
    source, target = source[order], target[order]
    first = np.ones(target.size, dtype=bool)
    first[1:] = target[1:] != target[:-1]
    primary = np.full(size, zero, dtype=np.int64)
    primary[target[first]] = source[first]
    return (
        torch.from_numpy(primary),
        torch.from_numpy(source[~first].astype(np.int64)),
        torch.from_numpy(target[~first].astype(np.int64)),
    )


_PLAN_LOCKS: dict[tuple[int, int, int], threading.Lock] = {}  # one per grid: others go on
_PLAN_LOCKS_GUARD = threading.Lock()


def _fresh_plan_locks() -> None:
    """New plan locks in a forked child (a DataLoader worker): a lock some other thread of the
    parent held at the fork would stay held there for good."""
    global _PLAN_LOCKS_GUARD
    _PLAN_LOCKS.clear()
    _PLAN_LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_fresh_plan_locks)


def _nested_plan(h: int, w: int, leaf: int) -> tuple[_FrontGroup, ...]:
    """:func:`_built_nested_plan`, built once however many threads ask for it at once (each
    thread built its own, about 90 MB and seconds at 224 x 224, before one was cached); a
    thread asking for another grid's plan does not wait for it."""
    with _PLAN_LOCKS_GUARD:
        lock = _PLAN_LOCKS.setdefault((h, w, leaf), threading.Lock())
    with lock:
        return _built_nested_plan(h, w, leaf)


@functools.lru_cache(maxsize=4)  # about 100 MB of indices for 224 x 224
def _built_nested_plan(h: int, w: int, leaf: int) -> tuple[_FrontGroup, ...]:
    r"""The symbolic nested-dissection factorisation of the ``h x w`` grid (shared by every
    system on that grid): boxes are split across their longer side by a one-pixel separator
    line (it disconnects the 9-point stencil) until they are at most ``leaf x leaf``. Each box
    is a front: its separator (or, for a leaf, all its pixels) is eliminated onto the ring of
    pixels around the box, which holds the pixels of coarser separators it touches."""
    import numpy as np

    n = h * w
    fronts: list[tuple[int, Any, Any, list[int]]] = []  # (height, eliminated, update, children)

    def ring(r0: int, r1: int, c0: int, c1: int) -> Any:
        rows = np.arange(max(r0 - 1, 0), min(r1 + 1, h))
        cols = np.arange(max(c0 - 1, 0), min(c1 + 1, w))
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        outside = (rr < r0) | (rr >= r1) | (cc < c0) | (cc >= c1)
        return (rr * w + cc)[outside]

    def build(r0: int, r1: int, c0: int, c1: int) -> int | None:
        if r1 <= r0 or c1 <= c0:
            return None
        if r1 - r0 <= leaf and c1 - c0 <= leaf:
            rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
            fronts.append((0, (rr * w + cc).ravel(), ring(r0, r1, c0, c1), []))
            return len(fronts) - 1
        if c1 - c0 >= r1 - r0:
            mid = c0 + (c1 - c0) // 2
            kids = [build(r0, r1, c0, mid), build(r0, r1, mid + 1, c1)]
            separator = np.arange(r0, r1) * w + mid
        else:
            mid = r0 + (r1 - r0) // 2
            kids = [build(r0, mid, c0, c1), build(mid + 1, r1, c0, c1)]
            separator = mid * w + np.arange(c0, c1)
        children = [k for k in kids if k is not None]
        height = 1 + max((fronts[k][0] for k in children), default=-1)
        fronts.append((height, separator, ring(r0, r1, c0, c1), children))
        return len(fronts) - 1

    build(0, h, 0, w)
    members_of: dict[tuple[int, int, int], list[int]] = {}
    for k, (height, eliminated, update, _) in enumerate(fronts):
        members_of.setdefault((height, eliminated.size, update.size), []).append(k)
    keys = sorted(members_of)  # by height: children before parents
    group_of, local_of = {}, {}
    for g, key in enumerate(keys):
        for i, k in enumerate(members_of[key]):
            group_of[k], local_of[k] = g, i
    rows_of, cols_of = np.divmod(np.arange(n), w)
    position = -np.ones(n, dtype=np.int64)
    groups: list[_FrontGroup] = []
    matrix_end, rhs_end = 9 * n, n
    for key in keys:
        _, ne, nu = key
        members = members_of[key]
        shapes = {"ee": (0, ne, 0, ne), "eu": (0, ne, ne, nu), "uu": (ne, nu, ne, nu)}
        blocks: dict[str, dict] = {name: {} for name in shapes}
        rhs: dict[str, dict] = {"e": {}, "u": {}}

        for i, k in enumerate(members):
            _, eliminated, update, children = fronts[k]
            index = np.concatenate([eliminated, update])
            position[index] = np.arange(ne + nu)
            own = position[eliminated]
            # the matrix entries of the eliminated pixels' rows not eliminated before
            for s, (dr, dq) in enumerate(_STENCIL):
                r, q = rows_of[eliminated] + dr, cols_of[eliminated] + dq
                inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
                other = np.where(inside, position[np.where(inside, r * w + q, 0)], -1)
                ok = other >= 0
                _scatter(blocks, shapes, -1, i, own[ok], other[ok], s * n + eliminated[ok])
            entry = rhs["e"].setdefault(-1, ([], []))
            entry[0].append(eliminated)
            entry[1].append(i * ne + own)
            for child in children:  # extend-add of the children's Schur complements
                source, local = group_of[child], local_of[child]
                where = position[fronts[child][2]]
                size = where.size
                rows, cols = np.repeat(where, size), np.tile(where, size)
                _scatter(
                    blocks,
                    shapes,
                    source,
                    i,
                    rows,
                    cols,
                    local * size * size + np.arange(size * size),
                )
                first = where < ne
                for name, sel, shift, width in (("e", first, 0, ne), ("u", ~first, ne, nu)):
                    entry = rhs[name].setdefault(source, ([], []))
                    entry[0].append(local * size + np.flatnonzero(sel))
                    entry[1].append(i * width + where[sel] - shift)
            position[index] = -1
        fronts_here = len(members)
        block_sizes = {"ee": ne * ne, "eu": ne * nu, "uu": nu * nu}
        groups.append(
            _FrontGroup(
                eliminated=_index([fronts[k][1] for k in members]),
                update=_index([fronts[k][2] for k in members]),
                ne=ne,
                nu=nu,
                fronts=fronts_here,
                blocks={
                    name: (parts, fronts_here * block_sizes[name]) for name, parts in blocks.items()
                },
                rhs={"e": (rhs["e"], fronts_here * ne), "u": (rhs["u"], fronts_here * nu)},
                offset=matrix_end,
                rhs_offset=rhs_end,
            )
        )
        matrix_end += fronts_here * nu * nu
        rhs_end += fronts_here * nu
    # the arenas: stencil values (9 per pixel) / right-hand side (one row per pixel), then the
    # groups' Schur complements / updated right-hand sides, then a zero
    matrix_bases = {-1: 0, **{k: g.offset for k, g in enumerate(groups)}}
    rhs_bases = {-1: 0, **{k: g.rhs_offset for k, g in enumerate(groups)}}
    groups = [
        g._replace(
            blocks={
                name: _gathers(parts, matrix_bases, size, matrix_end)
                for name, (parts, size) in g.blocks.items()
            },
            rhs={
                name: _gathers(parts, rhs_bases, size, rhs_end)
                for name, (parts, size) in g.rhs.items()
            },
        )
        for g in groups
    ]
    return tuple(groups)


def _nested_solve(images: Tensor, removed: Tensor, precision: str = "double") -> Tensor:
    r"""Every system of the batch by a batched nested-dissection Cholesky.

    As in :func:`_block_solve` the system lives on the whole pixel grid (identity rows for the
    kept pixels), so every system of every image has the same sparsity pattern and one
    symbolic factorisation (:func:`_nested_plan`, cached per image size) serves them all. The
    numeric factorisation is multifrontal: the fronts of one height of the dissection tree
    with the same shape are factorised for every system of a chunk at once (batched dense
    Cholesky, triangular solves and Schur-complement updates), then a bottom-up and a
    top-down sweep of triangular solves give the solution. Cost per system:
    :math:`O((HW)^{3/2})` flops, :math:`O(HW \log(HW))` memory.

    ``precision="double"`` (the default) factorises and solves in float64.
    ``precision="mixed"`` factorises in float32 and recovers float64 accuracy by iterative
    refinement: the residual :math:`r = b - A x` is computed in float64 with the stencil as a
    3 x 3 convolution, the correction :math:`A d = r` solved with the float32 factor, until
    the error left (the last correction, or its square over the one before) is below
    ``_REFINEMENT_TOLERANCE`` times the largest kept value; a system whose float32
    factorisation breaks down or that has not converged after ``_REFINEMENT_STEPS`` solves is
    solved again in float64. On the 2-core CPU of ``benchmarks/RESULTS.md`` the float32
    factorisation is about 1.5x faster but the two or three triangular sweeps of the
    refinement cost more than that saves, so "mixed" is not used by :func:`road_imputation`
    (``benchmarks/evaluation.py`` measures it beside "double").
    """
    n, c, h, w = images.shape
    device = images.device
    plan = _nested_plan(h, w, _NESTED_LEAF)
    if device.type != "cpu":
        plan = tuple(_on_device(group, device) for group in plan)
    per_chunk = min(n, max(1, _NESTED_CHUNK_PIXELS // (h * w)))
    workspaces = _NestedWorkspaces(plan, c, device)
    out = torch.empty(n, c, h, w, dtype=images.dtype, device=device)
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        x, u = images[start:stop].detach().to(torch.float64), removed[start:stop]
        if precision == "mixed":
            solved, failed = _nested_refined(x, u, plan, workspaces)
        else:
            solved, failed = None, torch.ones(stop - start, dtype=torch.bool, device=device)
        if bool(failed.any()):
            rows = failed.nonzero()[:, 0]
            exact = _nested_double(x[rows], u[rows], plan, workspaces)
            solved = exact if solved is None else solved.index_copy(0, rows, exact)
        out[start:stop] = solved.to(images.dtype)
    return out


_REFINEMENT_STEPS = 8  # float32 factor: at most this many solves before the float64 fallback
_REFINEMENT_TOLERANCE = 1e-12  # error left, relative to the largest kept value


class _NestedWorkspaces:
    """The arenas of :func:`_nested_factorise` / :func:`_nested_substitute` per (systems,
    dtype), reused by the chunks of one solve (refilled, not reallocated)."""

    def __init__(self, plan: tuple, channels: int, device: torch.device) -> None:
        last = plan[-1]
        self.matrix_size = last.offset + last.fronts * last.nu * last.nu + 1
        self.rhs_size = last.rhs_offset + last.fronts * last.nu + 1
        self.channels, self.device = channels, device
        self.cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def get(self, systems: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (systems, dtype)
        if key not in self.cache:
            # many systems: the matrix arena has them last (a gathered entry is one
            # contiguous row); a few: one row per system, gathered row by row (measured faster)
            shape = (self.matrix_size, systems) if systems > 8 else (systems, self.matrix_size)
            arena = torch.empty(shape, dtype=dtype, device=self.device)
            rhs_arena = torch.empty(
                systems, self.rhs_size, self.channels, dtype=dtype, device=self.device
            )
            arena[(-1, slice(None)) if systems > 8 else (slice(None), -1)] = 0.0  # the zero
            rhs_arena[:, -1] = 0.0
            self.cache[key] = (arena, rhs_arena)
        return self.cache[key]


def _nested_system(x: Tensor, removed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole-grid system of ``x`` ``(N, C, H, W)`` float64: stencil values ``(N, 9, H,
    W)`` (entry (p, p + offset s) at ``[:, s, p]``), right-hand side ``(N, C, H, W)``, the
    removed pixels as 0/1 ``(N, 1, H, W)`` and the degree ``(H, W)`` (summed neighbour
    weights)."""
    n, c, h, w = x.shape
    u = removed.reshape(n, h, w).to(torch.float64)
    padded_u = F.pad(u, (1, 1, 1, 1))
    padded_kept = F.pad(x * (1.0 - u)[:, None], (1, 1, 1, 1))
    inside = F.pad(torch.ones(h, w, dtype=torch.float64, device=x.device), (1, 1, 1, 1))
    degree = torch.zeros(h, w, dtype=torch.float64, device=x.device)
    neighbours = torch.zeros_like(x)
    values = x.new_empty(n, 9, h, w)
    for s, (dr, dq) in enumerate(_STENCIL):
        if (dr, dq) == (0, 0):
            continue
        weight = _DIRECT if dr == 0 or dq == 0 else _DIAGONAL
        rows, cols = slice(1 + dr, 1 + dr + h), slice(1 + dq, 1 + dq + w)
        degree += weight * inside[rows, cols]
        neighbours += weight * padded_kept[:, :, rows, cols]
        torch.mul(u * padded_u[:, rows, cols], -weight, out=values[:, s])
    values[:, 4] = u * degree + (1.0 - u)
    rhs = u[:, None] * neighbours + (1.0 - u)[:, None] * x
    return values, rhs, u[:, None], degree


def _nested_factorise(values: Tensor, plan: tuple, arena: Tensor) -> tuple[list, Tensor]:
    """Numeric factorisation of the systems with stencil ``values`` ``(N, 9, H, W)`` in the
    arena's dtype: per group of fronts (Cholesky factor of the eliminated block, its
    coupling :math:`L^{-1} A_{eu}` or None); and ``(N,)`` True where a system's factorisation
    broke down (not positive definite in that precision)."""
    n = values.shape[0]
    last = arena.shape[0] != n  # systems last
    stencil = values.reshape(n, -1).to(arena.dtype)
    if last:
        arena[: stencil.shape[1]] = stencil.t()
    else:
        arena[:, : stencil.shape[1]] = stencil

    def gather(block: tuple) -> Tensor:  # (N, block size) from the matrix arena
        primary, extra_source, extra_target = block
        if last:
            picked = arena.index_select(0, primary)
            if extra_source.numel():
                picked.index_add_(0, extra_target, arena.index_select(0, extra_source))
            return picked.t().contiguous()
        picked = arena.new_empty(n, primary.numel())
        for row in range(n):
            torch.index_select(arena[row], 0, primary, out=picked[row])
        if extra_source.numel():
            picked.index_add_(1, extra_target, arena.index_select(1, extra_source))
        return picked

    factors = []
    broken = torch.zeros(n, dtype=torch.bool, device=values.device)
    for group in plan:
        ne, nu, count = group.ne, group.nu, group.fronts
        factor, info = torch.linalg.cholesky_ex(gather(group.blocks["ee"]).view(n * count, ne, ne))
        broken |= (info != 0).view(n, count).any(dim=1)
        coupling = None
        if nu:
            block_eu = gather(group.blocks["eu"]).view(n * count, ne, nu)
            coupling = torch.linalg.solve_triangular(factor, block_eu, upper=False)
            del block_eu
            block_uu = gather(group.blocks["uu"]).view(n * count, nu, nu)
            size = count * nu * nu
            if last:
                block_uu.baddbmm_(coupling.mT, coupling, alpha=-1)
                arena[group.offset : group.offset + size] = block_uu.view(n, size).t()
            else:  # the Schur complements written straight into the arena, system by system
                target = arena[:, group.offset : group.offset + size]
                for row, (uu, cc) in enumerate(zip(block_uu.split(count), coupling.split(count))):
                    torch.baddbmm(uu, cc.mT, cc, alpha=-1, out=target[row].view(count, nu, nu))
            del block_uu
        factors.append((factor, coupling))
    return factors, broken


def _nested_substitute(factors: list, plan: tuple, rhs: Tensor, rhs_arena: Tensor) -> Tensor:
    """Solve the factorised systems for ``rhs`` ``(N, C, H, W)`` (cast to the factors'
    dtype): a bottom-up sweep of forward substitutions carrying the updated right-hand sides
    up the tree, then a top-down sweep of back substitutions. Returns ``(N, HW, C)``."""
    n, c, h, w = rhs.shape
    rhs_arena[:, : h * w] = rhs.reshape(n, c, h * w).transpose(1, 2)

    def gather_rhs(block: tuple) -> Tensor:
        primary, extra_source, extra_target = block
        picked = rhs_arena.index_select(1, primary)
        if extra_source.numel():
            picked.index_add_(1, extra_target, rhs_arena.index_select(1, extra_source))
        return picked

    forward = []
    for group, (factor, coupling) in zip(plan, factors):
        ne, nu, count = group.ne, group.nu, group.fronts
        y = gather_rhs(group.rhs["e"]).view(n * count, ne, c)
        y = torch.linalg.solve_triangular(factor, y, upper=False)
        if coupling is not None:
            rest = gather_rhs(group.rhs["u"]).view(n * count, nu, c)
            rest.baddbmm_(coupling.mT, y, alpha=-1)
            size = count * nu
            rhs_arena[:, group.rhs_offset : group.rhs_offset + size] = rest.view(n, size, c)
        forward.append(y)
    solution = rhs_arena.new_zeros(n, h * w, c)
    for group, (factor, coupling), y in zip(reversed(plan), reversed(factors), reversed(forward)):
        if coupling is not None:
            known = solution.index_select(1, group.update).view(-1, group.nu, c)
            y = torch.baddbmm(y, coupling, known, alpha=-1)
        solved = torch.linalg.solve_triangular(factor.mT, y, upper=True)
        solution.index_copy_(1, group.eliminated, solved.reshape(n, -1, c))
    return solution


def _nested_double(
    x: Tensor, removed: Tensor, plan: tuple, workspaces: _NestedWorkspaces
) -> Tensor:
    """The systems of ``x`` ``(N, C, H, W)`` float64 by one float64 factorisation and solve."""
    n, c, h, w = x.shape
    values, rhs, u, _ = _nested_system(x, removed)
    arena, rhs_arena = workspaces.get(n, torch.float64)
    factors, broken = _nested_factorise(values, plan, arena)
    if bool(broken.any()):
        raise RuntimeError("road_imputation: the imputation system is not positive definite.")
    solution = _nested_substitute(factors, plan, rhs, rhs_arena)
    filled = solution.transpose(1, 2).reshape(n, c, h, w)
    return torch.where(u.bool(), filled, x)


def _nested_refined(
    x: Tensor, removed: Tensor, plan: tuple, workspaces: _NestedWorkspaces
) -> tuple[Tensor, Tensor]:
    """The systems of ``x`` ``(N, C, H, W)`` float64 by a float32 factorisation and float64
    iterative refinement; returns the solutions and ``(N,)`` True for the systems that need
    the float64 fallback (broken factorisation or no convergence)."""
    n, c, h, w = x.shape
    values, _, u, degree = _nested_system(x, removed)
    arena, rhs_arena = workspaces.get(n, torch.float32)
    factors, failed = _nested_factorise(values, plan, arena)
    kernel = _neighbour_kernel(torch.float64, x.device)
    # the discrete maximum principle: the solution lies within the kept values
    scale = (x * (1.0 - u)).abs().flatten(1).amax(dim=1)
    filled = x * (1.0 - u)  # removed pixels start at 0; the kept ones are exact throughout
    active = ~failed
    previous = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    for _ in range(_REFINEMENT_STEPS):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        current = filled[rows]
        # r = b - A x on the removed pixels: the weighted neighbours minus degree * centre
        residual = F.conv2d(current.reshape(-1, 1, h, w), kernel, padding=1).view_as(current)
        residual = u[rows] * (residual - degree * current)
        size = residual.abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        step = residual / size.view(-1, 1, 1, 1)  # scaled into float32's range
        if rows.numel() < n:  # the converged systems' rows solve a zero right-hand side
            step = torch.zeros_like(x).index_copy(0, rows, step)
        correction = _nested_substitute(factors, plan, step.float(), rhs_arena)
        correction = correction.transpose(1, 2).reshape(n, c, h, w)[rows].double()
        correction = u[rows] * correction * size.view(-1, 1, 1, 1)
        filled.index_add_(0, rows, correction)
        change = correction.abs().flatten(1).amax(dim=1)
        # the error left after a correction is about ratio * change, with ratio the observed
        # contraction change / previous change (refinement converges linearly while the
        # float32 factor is accurate enough); NaN: not converged
        before = previous[rows]
        left = torch.where(before < float("inf"), change * change / before, float("inf"))
        limit = _REFINEMENT_TOLERANCE * scale[rows]
        active[rows] = ~((change <= limit) | ((change <= 0.5 * before) & (left <= limit)))
        previous[rows] = change
    return filled, failed | active


def _lacks_float64(device: torch.device) -> bool:
    """Whether ``device`` has no float64 (Apple's MPS)."""
    return not has_float64(device)


def _auto_factorises_on(device: torch.device) -> bool:
    """Whether "auto" factorises on ``device`` (the CPU) rather than iterating (CG)."""
    return device.type == "cpu"


def _scipy_available() -> bool:
    try:
        import scipy.sparse.linalg  # noqa: F401
    except ImportError:
        return False
    return True


# "auto" on the CPU: the sparse LU is faster than the whole-grid Cholesky (block / nested) for
# scattered masks below these removed shares, and for compact holes (most removed pixels have
# only removed neighbours) up to about this share of such pixels (measured, benchmarks/RESULTS.md)
_WHOLE_GRID_SHARE = {"block": 0.5, "nested": 0.6}
_WHOLE_GRID_INTERIOR = 0.15


def _whole_grid_is_faster(removed: Tensor, whole_grid: str) -> Tensor:
    """``(N,)`` True for the masks that ``whole_grid`` solves faster than the sparse LU: the
    LU's fill grows with the removed pixels that form one 2-D region (a percolating cluster
    or compact holes), the whole-grid factorisation costs the same for every mask."""
    mask = removed.reshape(removed.shape[0], 1, *removed.shape[-2:]).to(torch.float32)
    share = mask.flatten(1).mean(dim=1)
    interior = -F.max_pool2d(-mask, 3, stride=1, padding=1)  # every neighbour removed
    return (share >= _WHOLE_GRID_SHARE[whole_grid]) | (
        interior.flatten(1).mean(dim=1) >= _WHOLE_GRID_INTERIOR
    )


def _factorised(inputs: Tensor, removed: Tensor, solver: str) -> Tensor:
    """``inputs`` imputed (no noise) by one of the factorising solvers, in chunks."""
    n, _, h, w = inputs.shape
    if solver == "block":
        per_chunk = max(1, _BLOCK_CHUNK_ELEMENTS // (h * w * w))
        return torch.cat(
            [
                _block_solve(inputs[i : i + per_chunk], removed[i : i + per_chunk])
                for i in range(0, n, per_chunk)
            ]
        )
    if solver == "nested":
        return _nested_solve(inputs, removed)
    if solver == "nested_mixed":
        return _nested_solve(inputs, removed, "mixed")
    if solver == "multigrid":
        return _multigrid_or_nested(inputs, removed)
    # one factorisation per group of images with at most _DIRECT_UNKNOWNS removed pixels
    # (SuperLU's memory grows faster than the system)
    per_image = removed.flatten(1).sum(dim=1).tolist()
    parts, start, total = [], 0, 0
    for i, count in enumerate(per_image):
        if total and total + count > _DIRECT_UNKNOWNS:
            parts.append(_direct_solve(inputs[start:i], removed[start:i]))
            start, total = i, 0
        total += count
    parts.append(_direct_solve(inputs[start:], removed[start:]))
    return torch.cat(parts)


_MULTIGRID_TOLERANCE = 1e-6  # the last step, relative to the image's largest kept value
_MULTIGRID_MAX_ITERATIONS = 60  # measured: 6-13 at 28-224 px; the exact fallback beyond
# "auto" on the CPU: multigrid for images of at least this many pixels (measured crossover)
_MULTIGRID_MIN_PIXELS = 56 * 56


#: images keeping fewer pixels go to the exact solver: their systems are the worst
#: conditioned (one kept pixel: a near-singular coarse grid), and the multigrid stop rule,
#: met, left errors of 2e-6 to 5e-6 with 1 to 3 kept pixels (1e-7 to 8e-7 from 5 on)
_MULTIGRID_MIN_KEPT = 16


def _multigrid_or_nested(inputs: Tensor, removed: Tensor) -> Tensor:
    """``inputs`` imputed (no noise) by multigrid-preconditioned CG; the images it leaves
    unconverged, those keeping fewer than ``_MULTIGRID_MIN_KEPT`` pixels, and all images
    at most ``COARSEST_SIZE`` x ``COARSEST_SIZE`` pixels (no coarse grid) are solved
    exactly by the nested factorisation instead."""
    h, w = inputs.shape[-2:]
    if max(h, w) <= COARSEST_SIZE:
        return _nested_solve(inputs, removed)
    filled = torch.empty_like(inputs)
    exact = (~removed).flatten(1).sum(1) < _MULTIGRID_MIN_KEPT
    iterative = (~exact).nonzero()[:, 0]
    if iterative.numel():
        filled[iterative], converged = multigrid_imputation(
            inputs[iterative], removed[iterative], _MULTIGRID_TOLERANCE, _MULTIGRID_MAX_ITERATIONS
        )
        exact[iterative[~converged]] = True
    if bool(exact.any()):
        rows = exact.nonzero()[:, 0]
        filled[rows] = _nested_solve(inputs[rows], removed[rows])
    return filled


_DIRECT_PART_UNKNOWNS = 10_000  # on several threads: sparse-LU parts at least this large
# each thread of a whole-grid solver holds one chunk's factorisation (measured: 265 MB at
# 224 px): at most this many threads, whatever the machine's core count
_MAX_SOLVER_THREADS = 8


def _split_rows(rows: Tensor, removed: Tensor, method: str, workers: int) -> list[Tensor]:
    """``rows`` (systems for ``method``) in contiguous parts for ``workers`` threads: one part
    per thread for the whole-grid solvers (the same work per system); for the sparse LU up to
    four per thread, of about equal removed pixels and at least ``_DIRECT_PART_UNKNOWNS``
    each, so that threads that drew the cheap parts take the next ones (its work grows
    faster than the removed pixels where they form large holes)."""
    if rows.numel() == 0:
        return []
    if workers <= 1 or rows.numel() == 1:
        return [rows]
    parts = workers
    if method == "direct":
        weight = removed[rows].flatten(1).sum(dim=1).to(torch.float64).cpu()
        parts = min(4 * workers, max(1, int(weight.sum()) // _DIRECT_PART_UNKNOWNS))
    else:
        weight = torch.ones(rows.numel(), dtype=torch.float64)
    ends = weight.cumsum(0)
    cuts = torch.searchsorted(ends, ends[-1] * torch.arange(1, parts) / parts).tolist()
    bounds = sorted({0, *(min(cut + 1, rows.numel()) for cut in cuts), rows.numel()})
    return [rows[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _run_tasks(tasks: list[Callable[[], Tensor]], workers: int) -> list[Tensor]:
    """The results of ``tasks``, run by ``workers`` threads with one torch thread each.

    The factorising solvers are long chains of small batched LAPACK / BLAS calls and scipy's
    SuperLU (which releases the GIL): several torch threads inside each call mostly wait on one
    another, whole groups of systems on separate threads keep the cores busy (measured in
    ``benchmarks/RESULTS.md``). torch's thread count is per thread under OpenMP, so the
    caller's own setting is left as it was; but torch starts every new thread with the count
    set last anywhere in the process, so the caller's count is set again once the workers are
    done (threads the caller starts later would otherwise run on one core)."""
    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]

    def single_threaded(task: Callable[[], Tensor]) -> Tensor:
        torch.set_num_threads(1)
        return task()

    callers_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=min(workers, len(tasks)))
    try:
        futures = [pool.submit(single_threaded, task) for task in tasks]
        return [future.result() for future in futures]
    finally:  # on an error or Ctrl-C the parts not started are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(callers_threads)


def road_imputation(
    inputs: Tensor,
    removed: Tensor,
    *,
    noise: float = 0.01,
    generator: torch.Generator | int | None = None,
    solver: str = "auto",
    tolerance: float = 1e-7,
    max_iterations: int | None = None,
) -> Tensor:
    r"""Fill the ``removed`` pixels of ``inputs`` by ROAD's noisy linear imputation.

    Args:
        inputs (Tensor): ``(N, C, H, W)`` images.
        removed (Tensor): ``(N, 1, H, W)`` or ``(N, H, W)`` bool, True where a pixel is removed
            (all its channels).
        noise (float): standard deviation of the Gaussian noise added to the imputed pixels.
            Default: 0.01 (ROAD's). 0 for the plain linear imputation.
        generator (torch.Generator or int, optional): for the noise: one seed is drawn from it
            per call (from torch's global generator when None), and each image's noise
            comes from that seed, its pixels and its mask, so an image is imputed alike
            alone, anywhere in a batch and in any order. An int seeds that generator; it is
            not the noise's seed itself, which :func:`road`'s ``seed`` is: the noisy images
            of ``road(seed=s)`` are not those of ``road_imputation(generator=s)``.
        solver (str): ``"direct"`` (one sparse LU factorisation of the whole batch's
            block-diagonal system with scipy's SuperLU in symmetric mode, on the CPU),
            ``"block"`` (the system on the whole pixel grid, block-tridiagonal over image
            rows, factorised for every image of a chunk at once by batched dense Cholesky in
            torch, float64, any device;
            :math:`O(HW^3)` per image), ``"nested"`` (the same whole-grid system factorised
            by a batched nested-dissection (multifrontal) Cholesky in torch, float64, any
            device: :math:`O((HW)^{3/2})` per image), ``"nested_mixed"`` (the nested
            factorisation in float32, float64 accuracy recovered by iterative refinement, a
            float64 fallback per system that does not converge: equal to "nested" to about
            1e-12; for devices whose float64 is slow, e.g. consumer GPUs, and not chosen by
            "auto": on the CPU of ``benchmarks/RESULTS.md`` it measured no faster than
            "nested", on a GPU it is unmeasured), ``"multigrid"`` (conjugate gradients
            preconditioned by a geometric multigrid V-cycle, in float32 with float64
            residual replacement, every image of a chunk at once, on the inputs' device;
            see the module ``captum_ext.metrics._multigrid``: iterative, not exact: an image stops
            when, after its float64 residual replacement, its last CG step (max abs over
            channels and removed pixels) is below 1e-6 times its largest absolute kept
            value (each image is solved divided by that value, so the error scales with the
            pixels); max error about 1e-7 to 4e-7 against the exact solvers
            on pixel values in [0, 1] on the benchmark's masks (measured at 28 to 224 px),
            up to about 8e-7 on masks keeping 5 to 15 pixels. Any image that has not met
            that rule within 60 iterations, that keeps fewer than 16 pixels (whose systems
            are the worst conditioned: 2e-6 to 5e-6 with 1 to 3 kept pixels) or that is at
            most 8 x 8 pixels is solved exactly by "nested" instead, silently; ``tolerance`` and
            ``max_iterations`` do not apply to it), ``"cg"`` (conjugate gradients in float64
            with the Laplacian as a convolution, on the inputs' device; a RuntimeWarning
            names the images that miss ``tolerance`` within ``max_iterations``; on Apple's
            MPS, which has no float64, in float32 with a warning), or
            ``"auto"``: on the CPU multigrid for images of at least 56 x 56 = 3136 pixels
            (measured 1.06x to 2.3x less CPU time than the exact routes at 56 to 224 px,
            random and smooth maps, one thread; slower below 48 px), so that "auto"
            agrees with the exact solvers to
            about 1e-7 there rather than 1e-12; for smaller images
            direct for the masks with small or scattered holes (less than half of the pixels
            removed up to 40 pixels wide, 60% above, and under 15% of the pixels removed
            with all their neighbours; the sparse LU is cheap there), block (up to 40
            pixels wide) or nested (wider) for the others and for all when scipy is
            missing: the faster on a CPU in each case, see ``benchmarks/RESULTS.md``; CG on
            other devices, then the nested solver for any image CG leaves unconverged; on
            MPS (no float64) the CPU's choice, computed on the CPU. The other factorising
            solvers and multigrid also run on the CPU for MPS images. Default: ``"auto"``.
            On the CPU the factorising solvers and multigrid use ``torch.get_num_threads()``
            cores (at most 8; each holds one chunk's factorisation, about 265 MB at 224 px): the
            systems are split into that many groups, each solved on its own thread with one
            torch thread (they are chains of small batched LAPACK calls and SuperLU, which
            several torch threads inside one call slow down; measured in
            ``benchmarks/RESULTS.md``). ``torch.set_num_threads(1)`` keeps them on the
            calling thread.
        tolerance (float): ``"cg"`` (and "auto" off the CPU): conjugate gradients stop when
            the residual norm of every system is below ``tolerance`` times the norm of its
            right-hand side. Default: 1e-7. Not used by ``"multigrid"`` (fixed stop rule,
            above) nor by the factorising solvers.
        max_iterations (int, optional): ``"cg"`` only; default ``4 * (H + W) + 100``.

    Returns:
        Tensor: the imputed images, same shape and dtype as ``inputs``; kept pixels unchanged.

    Raises:
        ValueError: an image has every pixel removed (nothing to impute from).

    Example::

        >>> from captum_ext.metrics import road_imputation
        >>> removed = torch.zeros(4, 28, 28, dtype=torch.bool)
        >>> removed[:, 8:20, 8:20] = True  # a 12 x 12 hole in each digit
        >>> filled = road_imputation(x, removed, noise=0.0, solver="nested")
        >>> direct = road_imputation(x, removed, noise=0.0, solver="direct")
        >>> kept = ~removed[:, None]
        >>> bool((filled - direct).abs().max() < 1e-5), bool(torch.equal(filled[kept], x[kept]))
        (True, True)

    Reference: Y. Rong, T. Leemann, V. Borisov, G. Kasneci, E. Kasneci, "A consistent and
    efficient evaluation strategy for attribution methods", ICML 2022. The nested solver:
    A. George, "Nested dissection of a regular finite element mesh", SIAM J. Numer. Anal.
    10(2), 1973; I. S. Duff, J. K. Reid, "The multifrontal solution of indefinite sparse
    symmetric linear equations", ACM TOMS 9(3), 1983. The multigrid solver: W. L. Briggs,
    V. E. Henson, S. F. McCormick, "A Multigrid Tutorial", 2nd ed., SIAM 2000; U.
    Trottenberg, C. W. Oosterlee, A. Schüller, "Multigrid", Academic Press 2001.
    """
    generator = as_generator(generator)
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError("`inputs` must be an (N, C, H, W) tensor.")
    if not isinstance(removed, Tensor):
        raise TypeError(f"`removed` must be a bool tensor, got {type(removed).__name__}.")
    if removed.dtype != torch.bool and not bool(((removed == 0) | (removed == 1)).all()):
        raise ValueError(
            f"`removed` must be a bool mask (or hold only 0 and 1), got {removed.dtype} values in "
            f"[{float(removed.min()):g}, {float(removed.max()):g}]."
        )
    n, c, h, w = inputs.shape
    if tuple(removed.shape) not in ((n, 1, h, w), (n, h, w)):  # a transposed mask is refused
        raise ValueError(
            f"`removed` must have shape (N, 1, H, W) or (N, H, W) = ({n}, {h}, {w}), got "
            f"{tuple(removed.shape)}."
        )
    if not inputs.is_floating_point() or not bool(torch.isfinite(inputs).all()):
        raise ValueError("`inputs` must be floating point images without NaN or infinite values.")
    removed = removed.reshape(n, 1, h, w).to(device=inputs.device, dtype=torch.bool)
    if bool(removed.flatten(1).all(dim=1).any()):
        raise ValueError("`removed`: an image has every pixel removed; keep at least one.")
    noise = check_number(noise, "noise", allow_minimum=True)
    tolerance = check_number(tolerance, "tolerance")  # > 0: CG squares it
    iterations = max_iterations if max_iterations is not None else 4 * (h + w) + 100
    iterations = check_int(iterations, "max_iterations")
    if solver not in ("auto", "direct", "block", "nested", "nested_mixed", "multigrid", "cg"):
        raise ValueError(
            f"`solver`={solver!r}: expected 'auto', 'direct', 'block', 'nested', "
            "'nested_mixed', 'multigrid' or 'cg'."
        )
    if c == 0:  # images without channels: no value to impute, whatever the solver; the
        # noise's seed is drawn all the same, so the generator advances as with channels
        return _with_imputation_noise(inputs.clone(), inputs, removed, noise, generator)
    if _lacks_float64(inputs.device) and solver != "cg":
        # Apple's MPS has no float64: the factorisations run, exactly, on the CPU
        filled = road_imputation(
            inputs.cpu(),
            removed.cpu(),
            noise=noise,
            generator=generator,
            solver=solver,
            tolerance=tolerance,
            max_iterations=max_iterations,
        )
        return filled.to(inputs.device)
    if solver != "cg" and (solver != "auto" or _auto_factorises_on(inputs.device)):
        if solver == "auto" and h * w >= _MULTIGRID_MIN_PIXELS:
            routes = ((torch.ones(n, dtype=torch.bool, device=removed.device), "multigrid"),)
        elif solver == "auto":
            whole_grid = "block" if w <= _BLOCK_MAX_WIDTH else "nested"
            dense = _whole_grid_is_faster(removed, whole_grid)
            if not _scipy_available():
                dense[:] = True
            routes = ((dense, whole_grid), (~dense, "direct"))
        else:
            routes = ((torch.ones(n, dtype=torch.bool, device=removed.device), solver),)
        workers = 1
        if inputs.device.type == "cpu":
            workers = min(torch.get_num_threads(), _MAX_SOLVER_THREADS)
        parts = [
            (part, method)
            for picked, method in routes
            for part in _split_rows(picked.nonzero()[:, 0], removed, method, workers)
        ]
        if len(parts) > 1 and any(m in ("nested", "nested_mixed") for _, m in parts):
            _nested_plan(h, w, _NESTED_LEAF)  # built once here, not by every thread at once
        filled = torch.empty_like(inputs)
        solved = _run_tasks(
            [functools.partial(_factorised, inputs[r], removed[r], m) for r, m in parts], workers
        )
        for (rows, _), part in zip(parts, solved):
            filled[rows] = part
        return _with_imputation_noise(filled, inputs, removed, noise, generator)

    if _lacks_float64(inputs.device):
        warnings.warn(
            f"road_imputation(solver='cg') on {inputs.device.type}: no float64 there, so CG runs "
            "in float32, whose errors reach 1e-4 to 1e-2 on large holes; solver='auto' "
            "solves exactly on the CPU.",
            RuntimeWarning,
            stacklevel=2,
        )
    filled, converged = _conjugate_gradients(inputs, removed, tolerance, iterations)
    if not bool(converged.all()):
        stuck = (~converged).nonzero()[:, 0]
        if solver == "auto":  # exact instead: the nested factorisation runs on any device
            filled[stuck] = _factorised(inputs[stuck].to(torch.float64), removed[stuck], "nested")
        else:
            warnings.warn(
                f"road_imputation(solver='cg'): {stuck.numel()} of {n} images did not reach "
                f"`tolerance`={tolerance:g} within `max_iterations`={iterations}; their "
                "imputation is approximate. Raise `max_iterations` or use solver='nested'.",
                RuntimeWarning,
                stacklevel=2,
            )
    # drawn as on the CPU path: the same generator gives the same noise
    return _with_imputation_noise(filled, inputs, removed, noise, generator).to(inputs.dtype)


def _with_imputation_noise(
    filled: Tensor, inputs: Tensor, removed: Tensor, noise: float, generator: Any
) -> Tensor:
    """``filled + noise * removed * z``: one seed drawn from ``generator`` per call, each
    image's ``z`` from that seed, its pixels and its mask, so an image's imputation does not
    depend on the other images of the batch or their order."""
    if noise <= 0:
        return filled
    seed = seed_from(generator)
    keys = combined_keys(content_keys(inputs, seed), content_keys(removed, seed))
    # drawn in the inputs' dtype whatever the solver's, so every solver gets the same noise
    draw = example_normal(keys, 1, tuple(filled.shape[1:]), inputs.dtype)
    return filled + noise * removed.to(filled.dtype) * draw.to(filled)


def _conjugate_gradients(
    inputs: Tensor, removed: Tensor, tolerance: float, iterations: int
) -> tuple[Tensor, Tensor]:
    """``inputs`` imputed (no noise) by conjugate gradients on the inputs' device, with the
    Laplacian applied as a 3 x 3 convolution; and ``(N,)`` True where every channel reached
    ``tolerance``. In float64 wherever the device has it (not on MPS), whatever the images'
    dtype: the residual of these systems is a poor guide to the error (condition numbers
    grow with a hole's area), and float32 iterations left
    errors of 1e-4 to 1e-2 on float32 images with large holes (one kept pixel: 3e-4 at
    48 x 48, 1.5e-2 at 224 x 224)."""
    n, c, h, w = inputs.shape
    dtype = torch.float32 if _lacks_float64(inputs.device) else torch.float64
    x = inputs.to(dtype).reshape(n * c, 1, h, w)
    unknown = removed.repeat_interleave(c, dim=0).to(dtype)
    known = 1.0 - unknown
    kernel = _neighbour_kernel(dtype, inputs.device)
    # degree: the summed weight of the neighbours inside the image
    degree = F.conv2d(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), kernel, padding=1)

    def laplacian(v: Tensor) -> Tensor:  # v is zero on known pixels
        return unknown * (degree * v - F.conv2d(v, kernel, padding=1))

    rhs = unknown * F.conv2d(x * known, kernel, padding=1)
    solution = torch.zeros_like(x)
    residual = rhs.clone()
    direction = residual.clone()
    rs_old = (residual * residual).flatten(1).sum(1)
    stop = (tolerance * rhs.flatten(1).norm(dim=1)) ** 2
    for _ in range(iterations):
        active = rs_old > stop
        if not bool(active.any()):
            break
        product = laplacian(direction)
        curvature = (direction * product).flatten(1).sum(1)
        alpha = torch.where(active, rs_old / curvature.clamp_min(1e-300), 0.0)
        solution = solution + alpha.view(-1, 1, 1, 1) * direction
        residual = residual - alpha.view(-1, 1, 1, 1) * product
        rs_new = (residual * residual).flatten(1).sum(1)
        beta = torch.where(active, rs_new / rs_old.clamp_min(1e-300), 0.0)
        direction = residual + beta.view(-1, 1, 1, 1) * direction
        rs_old = rs_new
    converged = (rs_old <= stop).view(n, c).all(dim=1)
    filled = x * known + solution * unknown
    return filled.reshape(n, c, h, w), converged


#: how :func:`road`, :func:`completeness` and :func:`soundness` turn a map's channels into
#: one score per pixel (``channel_reduction``)
CHANNEL_REDUCTIONS = ("sum", "sum_abs")


def _check_channel_reduction(channel_reduction: Any) -> str:
    """``channel_reduction`` of road, completeness and soundness, checked by name."""
    if channel_reduction == "per_channel":
        raise ValueError(
            "`channel_reduction`='per_channel' is deletion's and insertion's only: ROAD's "
            "imputation removes whole pixels (all their channels at once), so the pixels "
            "need one score each; expected 'sum' or 'sum_abs'."
        )
    check_choice(channel_reduction, CHANNEL_REDUCTIONS, "channel_reduction")
    return channel_reduction


def _pixel_scores(attributions: Any, inputs: Tensor, channel_reduction: str = "sum") -> Tensor:
    """(N, H, W) float64 pixel scores: the maps' channels summed with their sign
    (``channel_reduction="sum"``) or, for maps of several channels, their absolute values
    summed (``"sum_abs"``, deletion's default: a one-channel map keeps its sign there too);
    maps smaller than the input (a CAM's (N, 1, h, w)) upsampled bilinearly as in
    deletion."""
    dtype = precise_dtype(inputs.device)  # float64 but on MPS
    maps = maps_for(attributions, inputs, "attributions", dtype=dtype)
    if channel_reduction == "sum_abs" and maps.shape[1] > 1:
        maps = maps.abs()
    return maps.sum(dim=1)


def _targets(forward_func: Callable, inputs: Tensor, target: Any, extra: tuple) -> Tensor:
    logits = run_forward(forward_func, (inputs,), extra, takes_output_transform=False)
    check_several_classes(
        logits,
        "road, completeness and soundness read the softmax probability of the target",
        takes_output_transform=False,
    )
    classes, multi = class_selection(target, logits, argument="target", default="predicted")
    if multi or classes.shape[1] != 1:
        raise ValueError("`target` must give one class per example (int, list or 1-D tensor).")
    return classes[:, 0]


def _example_keys(inputs: Tensor, seed: int) -> list[int]:
    """One key per example, from ``seed`` and the example's own pixels: the noise drawn with
    it does not depend on the rest of the batch or the example's place in it."""
    return content_keys(inputs, check_int(seed, "seed", minimum=0))


def _add_row_noise(
    imputed: Tensor, removed: Tensor, keys: Sequence[int], seed: int, noise: float
) -> Tensor:
    """``imputed + noise * removed * z`` with ``z`` standard normal, row ``k`` drawn from its
    own generator seeded by its example's key (``seed`` and the example's pixels) and the
    mask it imputes (``removed[k]`` with ``seed``). :func:`road_imputation` keys its noise
    the same way, but with a seed it first draws from its ``generator``
    (``seed_from(generator)``), never with the int it is given, so
    ``road_imputation(..., generator=seed)`` draws other noise than this. An
    example's imputations, and so its scores, are the same alone, anywhere in a batch,
    spread over accumulator updates, and whatever other fractions (or thresholds) are
    asked for with it or in which order (a key from the fraction's place in the list gave
    ``road(percentages=[0.5])`` other noise than the 0.5 of ``[0.2, 0.5, 0.8]``)."""
    if noise <= 0:
        return imputed
    row_keys = combined_keys(list(keys), content_keys(removed, seed))
    draws = example_normal(row_keys, 1, tuple(imputed.shape[1:]), imputed.dtype)
    mask = removed.reshape(removed.shape[0], 1, *imputed.shape[-2:]).to(imputed.dtype)
    return imputed + noise * mask * draws.to(imputed.device)


def _fractions(values: Any, argument: str, **bounds: Any) -> list[float]:
    """A non-empty sequence of numbers in the given bounds (:func:`check_number`'s)."""
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise TypeError(f"`{argument}` must be a sequence of numbers, got {type(values).__name__}.")
    if isinstance(values, Tensor):  # a 1-D tensor of fractions, as numpy arrays are taken
        if values.dim() != 1:
            raise ValueError(f"`{argument}` must be 1-D, got shape {tuple(values.shape)}.")
        values = values.tolist()
    checked = [check_number(value, argument, **bounds) for value in values]
    if not checked:
        raise ValueError(f"`{argument}` is empty; give at least one value.")
    return checked


#: the imputers of :func:`completeness` and :func:`soundness` (or a callable)
IMPUTERS = ("road", "mean", "blur")


def _check_imputer(imputer: Any) -> None:
    if not callable(imputer) and imputer not in IMPUTERS:
        raise ValueError(
            f"`imputer`={imputer!r}: expected 'road', 'mean', 'blur' or a callable "
            "imputer(images, removed) -> images."
        )


def _imputed(
    images: Tensor,
    removed: Tensor,
    imputer: Any,
    noise: float,
    keys: Sequence[int],
    seed: int,
) -> Tensor:
    """``images`` (R, C, H, W) with the ``removed`` (R, H, W) pixels filled by ``imputer``:
    ROAD's linear imputation plus each row's own noise (:func:`_add_row_noise`: from
    ``keys``, its example's, ``seed`` and its mask), each image's
    per-channel mean, its Gaussian blur (as deletion's ``baselines="blur"``), or
    ``imputer(images, removed[:, None])`` (cast to the images' dtype and device)."""
    if callable(imputer):
        filled = imputer(images, removed[:, None])
        if not isinstance(filled, Tensor) or filled.shape != images.shape:
            got = tuple(filled.shape) if isinstance(filled, Tensor) else type(filled).__name__
            raise ValueError(
                f"`imputer` must return images of shape {tuple(images.shape)}, got {got}."
            )
        if not filled.is_floating_point():
            raise ValueError(
                f"`imputer` must return floating-point images, got {filled.dtype} (the model "
                f"reads {images.dtype})."
            )
        # a numpy-based imputer returns float64 (or CPU tensors): the model reads the images'
        return filled.to(dtype=images.dtype, device=images.device)
    if imputer == "road":
        everything = removed.flatten(1).all(dim=1)
        safe = removed.clone()
        safe[everything] = False  # nothing to impute from: filled by the mean below
        filled = road_imputation(images, safe, noise=0.0)
        filled = _add_row_noise(filled, safe, keys, seed, noise)
        if bool(everything.any()):
            mean = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
            filled[everything] = mean[everything]
        return filled
    if imputer == "mean":
        fill = images.mean(dim=(2, 3), keepdim=True)
    else:
        fill = gaussian_blur(images, DEFAULT_BLUR_KERNEL_SIZE, DEFAULT_BLUR_SIGMA)
    return torch.where(removed[:, None], fill, images)


def _layout(extra: tuple | PerExampleLayout, n: int) -> PerExampleLayout:
    """``extra``'s :class:`PerExampleLayout` (itself where it is one already)."""
    return extra if isinstance(extra, PerExampleLayout) else PerExampleLayout(extra, n)


def _score_rows(
    forward_func: Callable,
    rows: Tensor,
    examples: Tensor,
    targets: Tensor,
    extra: tuple | PerExampleLayout,
    n: int,
) -> tuple[Tensor, Tensor]:
    """Target probability and 0/1 correctness of ``rows``; row ``k`` belongs to example
    ``examples[k]`` (of ``n``), whose target and per-example extra arguments it gets
    (``extra`` as a :class:`PerExampleLayout` made once per call, so that the arguments are
    walked once, not once per chunk)."""
    row_extra = _layout(extra, n).select(examples)  # also tensors nested in containers
    # (NaN logits are named once, on the clean batch: not again for every imputed chunk)
    logits = run_forward(
        forward_func, (rows,), row_extra, takes_output_transform=False, check_nan=False
    )
    if logits.dtype != torch.float64:  # half-precision logits scored in float32
        logits = logits.float()
    row_targets = targets.to(logits.device)[examples.to(logits.device)]
    probability = logits.softmax(dim=1).gather(1, row_targets[:, None])[:, 0]
    correct = (logits.argmax(dim=1) == row_targets).to(logits.dtype)
    # argmax of a NaN row is 0: without this, NaN logits were "correct" for class 0
    undefined = logits.isnan().any(dim=1)
    return probability, correct.masked_fill(undefined, float("nan"))


def _scores(
    forward_func: Callable,
    images: Tensor,
    targets: Tensor,
    extra: tuple,
    batch_size: int,
    repeats: int,
) -> tuple[Tensor, Tensor]:
    """Target probability and correctness of ``images`` (``repeats`` rows per example,
    example-major), ``batch_size`` rows per forward pass."""
    n = images.shape[0] // repeats
    extra = _layout(extra, n)  # walked once for every chunk
    probabilities, corrects = [], []
    for start in range(0, images.shape[0], batch_size):
        rows = images[start : start + batch_size]
        examples = torch.arange(start, start + rows.shape[0], device=rows.device) // repeats
        probability, correct = _score_rows(forward_func, rows, examples, targets, extra, n)
        probabilities.append(probability)
        corrects.append(correct)
    return torch.cat(probabilities), torch.cat(corrects)


def _imputed_scores(
    forward_func: Callable,
    inputs: Tensor,
    removed: Tensor,
    imputer: Any,
    noise: float,
    keys: Sequence[int],
    seed: int,
    targets: Tensor,
    extra: tuple,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Target probability and correctness of every example imputed under each of its masks:
    ``removed`` is (N * R, H, W), example-major (R masks per example). The rows are imputed
    and scored ``batch_size`` at a time, so memory follows ``batch_size`` whatever N and R
    (all N x R imputed images at once took about 34 MB per 224 px image at 9 fractions); a
    row's noise depends on its example and mask only, so the chunks do not change it."""
    n = inputs.shape[0]
    repeats = removed.shape[0] // max(n, 1)
    extra = _layout(extra, n)  # walked once for every chunk
    probabilities, corrects = [], []
    for start in range(0, removed.shape[0], batch_size):
        stop = min(start + batch_size, removed.shape[0])
        examples = torch.arange(start, stop, device=inputs.device) // repeats
        rows_keys = [keys[int(i)] for i in examples.tolist()]
        imputed = _imputed(inputs[examples], removed[start:stop], imputer, noise, rows_keys, seed)
        probability, correct = _score_rows(forward_func, imputed, examples, targets, extra, n)
        probabilities.append(probability)
        corrects.append(correct)
    if not probabilities:
        empty = torch.empty(0, dtype=torch.float64, device=inputs.device)
        return empty, empty
    return torch.cat(probabilities), torch.cat(corrects)


def road(
    forward_func: Callable,
    inputs: Tensor,
    attributions: Any,
    *,
    target: Any = None,
    additional_forward_args: Any = None,
    percentages: Sequence[float] = DEFAULT_ROAD_PERCENTAGES,
    order: str = "morf",
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 64,
    channel_reduction: str = "sum",
) -> RoadCurves:
    """Remove And Debias: the target's probability after removing a fraction of the pixels.

    For each fraction :math:`p` the :math:`p \\cdot HW` pixels with the highest
    (``order="morf"``, most relevant first) or lowest (``"lerf"``) attribution are removed
    (ties by index) and filled by :func:`road_imputation`. The (image, fraction) pairs are
    imputed and evaluated ``batch_size`` at a time (each chunk one batched solve and one
    forward pass), so memory follows ``batch_size``, not the number of images.

    Args:
        forward_func (Callable): the model, returning ``(N, classes)`` logits.
        inputs (Tensor): ``(N, C, H, W)``.
        attributions (Tensor): maps ``(N, C, H, W)`` (channels summed with their sign, or
            their absolute values: ``channel_reduction``) or ``(N, H, W)``; maps smaller
            than the input (a CAM's ``(N, 1, h, w)``) are upsampled bilinearly, as in
            :func:`~captum_ext.metrics.deletion`.
        target (int, list or Tensor, optional): the class followed; default the prediction.
        additional_forward_args (Any, optional): passed to the model after the images;
            tensors whose first dimension is N, also inside tuples, lists and dicts, follow
            the imputed rows' examples.
        percentages (sequence of float): fractions removed, each in (0, 1).
            Default: 0.1, ..., 0.9. A fraction that removes every pixel of a small image
            (0.99 of 5 x 5) leaves nothing to impute from: that image is filled with its
            per-channel mean, without noise.
        order (str): ``"morf"`` or ``"lerf"``. Default: ``"morf"``.
        noise (float): imputation noise. Default: 0.01.
        seed (int): seed of the noise. Each (example, fraction) image is
            ``road_imputation(image, removed, noise=0)`` plus ``noise * removed * z``, ``z``
            standard normal from a generator seeded by a key of ``seed``, the example's own
            pixels and the removed pixels' mask, so its scores are the same alone, anywhere
            in a batch, over an accumulator's updates, and whatever other ``percentages``
            are asked for with it or in which order. ``seed`` is that key's seed itself:
            :func:`road_imputation` with ``generator=seed`` first draws another seed from a
            generator seeded with it, so its noisy images (with ``noise > 0``) are not
            ROAD's and rebuilding ROAD's curves by hand with it differs by the noise; with
            ``noise=0`` the images are exactly ``road_imputation``'s. Default: 0.
        batch_size (int): (image, fraction) rows imputed and scored at a time: bounds the
            memory (a 224 px RGB row and its imputation take about 4 MB). Default: 64.
        channel_reduction (str): how the channels of a map with the input's C > 1
            channels give one score per pixel: ``"sum"`` (default) ranks pixels by the
            signed ``sum_c attr_c``, so channels of opposite sign cancel; ``"sum_abs"`` by
            ``sum_c |attr_c|``, the default of :func:`~captum_ext.metrics.deletion` and
            :func:`~captum_ext.metrics.insertion` (whose first pixels removed differ from
            ROAD's default ones on signed RGB maps such as integrated gradients'). A
            one-channel map is ranked by its signed values either way, as there.
            (Deletion's ``"per_channel"`` is refused: ROAD removes whole pixels.)

    Returns:
        RoadCurves: ``percentages``, ``probability`` and ``correct`` ``(N, P)``.
    """
    inputs = image_batch(inputs)
    if order not in ("morf", "lerf"):
        raise ValueError(f"`order`={order!r}: expected 'morf' or 'lerf'.")
    fractions = torch.tensor(
        _fractions(percentages, "percentages", maximum=1.0, allow_maximum=False),
        dtype=torch.float64,
    )
    batch_size = check_int(batch_size, "batch_size")
    channel_reduction = _check_channel_reduction(channel_reduction)
    extra = format_additional_forward_args(additional_forward_args)
    scores = _pixel_scores(attributions, inputs, channel_reduction)
    n, pixels = inputs.shape[0], inputs.shape[-2] * inputs.shape[-1]
    ranking = scores.flatten(1)
    ranking = -ranking if order == "morf" else ranking
    position = torch.empty_like(ranking, dtype=torch.long)
    position.scatter_(
        1,
        ranking.argsort(dim=1, stable=True),
        torch.arange(pixels, device=inputs.device).expand(n, pixels),
    )
    counts = (fractions * pixels).round().long().to(inputs.device)
    removed = position[:, None, :] < counts[None, :, None]  # (N, P, HW)
    repeats = len(fractions)
    noise = check_number(noise, "noise", allow_minimum=True)
    seed = check_int(seed, "seed", minimum=0)
    keys = _example_keys(inputs, seed)
    flat_removed = removed.reshape(n * repeats, *inputs.shape[-2:])
    with evaluation(forward_func):
        targets = _targets(forward_func, inputs, target, extra)
        probability, correct = _imputed_scores(
            forward_func, inputs, flat_removed, "road", noise, keys, seed, targets, extra,
            batch_size,
        )  # fmt: skip
    return RoadCurves(fractions, probability.view(n, repeats), correct.view(n, repeats))


def completeness(
    forward_func: Callable,
    inputs: Tensor,
    attributions: Any,
    *,
    target: Any = None,
    additional_forward_args: Any = None,
    thresholds: Sequence[float] = DEFAULT_COMPLETENESS_THRESHOLDS,
    imputer: str | Callable[[Tensor, Tensor], Tensor] = "road",
    score: str = "probability",
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 64,
    channel_reduction: str = "sum",
) -> CompletenessCurves:
    r"""Completeness (MoRF by value): the score lost when the high-valued pixels are removed.

    At threshold :math:`t` the pixels with :math:`a(p) > (1 - t)\max_p a(p)` are removed and
    filled by ``imputer``; the curve is :math:`s(x) - s(\tilde x_t)` with :math:`s` the
    target's probability, or its correctness (1 when the model predicts the target, else 0:
    the mean over a dataset is the paper's accuracy drop).

    Args:
        forward_func, inputs, attributions, target, additional_forward_args: as in
            :func:`road`.
        thresholds (sequence of float): values of :math:`t` in (0, 1]. Default: 0.1, ..., 0.9.
        imputer (str or Callable): ``"road"`` (noisy linear imputation), ``"mean"`` (each
            image's per-channel mean), ``"blur"`` (each image's Gaussian blur, kernel 11,
            sigma 5, as deletion's ``baselines="blur"``), or
            ``imputer(images, removed) -> images`` (``removed``: ``(R, 1, H, W)`` bool).
            Default: ``"road"``. Where every pixel is removed (``t = 1`` with a map above
            zero everywhere, such as ``|gradient|``), ``"road"`` has nothing to impute from
            and fills the image with its per-channel mean, without noise.
        score (str): ``"probability"`` or ``"accuracy"`` (per-example correctness).
            Default: ``"probability"``.
        noise, seed, batch_size: as in :func:`road` (``noise`` for the ROAD imputer; each
            threshold's noise from its mask, not its place in ``thresholds``).
        channel_reduction (str): ``"sum"`` (default, signed) or ``"sum_abs"`` (deletion's
            default), as in :func:`road`: the per-pixel map :math:`a` thresholded above.

    Returns:
        CompletenessCurves: ``thresholds``, ``drop`` and ``removed_fraction``, ``(N, T)``.

    Reference: X. Li, Y. Zhang, ..., A. Khakzar, "Sound and complete: a dual perspective on
    attribution evaluation" (TMLR 2024).
    """
    inputs = image_batch(inputs)
    _check_imputer(imputer)
    if score not in ("probability", "accuracy"):
        raise ValueError(f"`score`={score!r}: expected 'probability' or 'accuracy'.")
    values = torch.tensor(_fractions(thresholds, "thresholds", maximum=1.0), dtype=torch.float64)
    batch_size = check_int(batch_size, "batch_size")
    channel_reduction = _check_channel_reduction(channel_reduction)
    extra = format_additional_forward_args(additional_forward_args)
    scores = _pixel_scores(attributions, inputs, channel_reduction)
    n = inputs.shape[0]
    top = scores.flatten(1).max(dim=1).values.view(n, 1, 1, 1)
    levels = (1.0 - values.to(inputs.device)).view(1, -1, 1, 1)
    removed = scores[:, None] > levels * top  # (N, T, H, W)
    repeats = len(values)
    flat_removed = removed.reshape(n * repeats, *inputs.shape[-2:])
    noise = check_number(noise, "noise", allow_minimum=True)
    seed = check_int(seed, "seed", minimum=0)
    keys = _example_keys(inputs, seed)
    with evaluation(forward_func):
        targets = _targets(forward_func, inputs, target, extra)
        extra = PerExampleLayout(extra, inputs.shape[0])  # one walk for both passes
        original = _scores(forward_func, inputs, targets, extra, batch_size, 1)
        changed = _imputed_scores(
            forward_func, inputs, flat_removed, imputer, noise, keys, seed, targets, extra,
            batch_size,
        )  # fmt: skip
    which = 0 if score == "probability" else 1  # (probability, correct)
    drop = original[which][:, None] - changed[which].view(n, repeats)
    return CompletenessCurves(values, drop, precise(removed.flatten(2)).mean(dim=2))


def _lerf_positions(scores: Tensor, seed: int) -> Tensor:
    """Rank of each pixel in increasing attribution (least relevant first), ties broken by a
    random permutation drawn with ``seed``; ``(N, HW)`` long."""
    n, pixels = scores.shape
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(pixels, generator=generator).to(scores.device)
    order = permutation[scores[:, permutation].argsort(dim=1, stable=True)]
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(pixels, device=scores.device).expand(n, pixels))
    return positions


def soundness(
    forward_func: Callable,
    inputs: Tensor,
    attributions: Any,
    *,
    target: Any = None,
    additional_forward_args: Any = None,
    removed_fractions: Sequence[float] = DEFAULT_SOUNDNESS_RATIOS,
    imputer: str | Callable[[Tensor, Tensor], Tensor] = "road",
    score: str = "probability",
    threshold: float = 0.01,
    score_floor: float | None = 0.04,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 64,
    channel_reduction: str = "sum",
) -> SoundnessCurves:
    r"""Soundness (LeRF by area, accumulated): how much of a map's mass truly raises the score.

    Maps are min-max normalised to [0, 1] per example. Pixels are ranked by increasing value
    (ties by one random permutation drawn with ``seed``). At step :math:`i` the least relevant
    fraction :math:`r_i` of the pixels is removed (ROAD imputation by default), so pixels
    come back in decreasing order as :math:`r` falls. With :math:`s_i` the target's score after step
    :math:`i` (:math:`s_{-1} = 0`), the mass :math:`\Delta_i` of the pixels re-added at step
    :math:`i` is counted as *false* when :math:`s_i - s_{i-1} \le` ``threshold`` (and, if
    ``score_floor`` is set, :math:`s_i` is above it: the example's own probability, or the
    batch's accuracy with ``score="accuracy"``). Before that update,

    .. math::  \mathrm{soundness}_i = \frac{M_i - F_{i-1}}{M_i + 10^{-6}},

    with :math:`M_i` the mass of the pixels kept and :math:`F_{i-1}` the false mass so far.

    Args:
        forward_func, inputs, attributions, target, additional_forward_args: as in
            :func:`road`.
        removed_fractions (sequence of float): decreasing fractions in (0, 1); the step
            of fraction ``r`` removes ``int(H W r)`` pixels, truncated as soco does (so
            0.29 of 100 pixels is 28: ``100 * 0.29`` is 28.999999999999996 in floating
            point). Default: 0.98, 0.97, ..., 0.03 (96 steps).
        imputer (str or Callable): how removed pixels are filled, as in
            :func:`completeness`. Default: ``"road"``.
        score (str): ``"probability"`` (each example's own decision) or ``"accuracy"`` (one
            decision for the batch from its accuracy, as in the paper's default).
            Default: ``"probability"``.
        threshold (float): the largest score gain still counted as "no gain". Default: 0.01.
        score_floor (float or None): skip the update while the score is at or below this:
            each example's own probability (so one example's result does not depend on the
            rest of the batch), or the batch's accuracy with ``score="accuracy"`` (soco's
            rule). Default: 0.04.
        noise, seed, batch_size: as in :func:`road` (each step's noise from its mask, not
            its place in ``removed_fractions``); all steps are imputed and evaluated in
            batches of ``batch_size`` rows.
        channel_reduction (str): ``"sum"`` (default, signed) or ``"sum_abs"`` (deletion's
            default), as in :func:`road`: the per-pixel map normalised, ranked and weighed
            above.

    Returns:
        SoundnessCurves: ``removed_fractions``, ``soundness`` and ``score`` ``(N, R)``,
        ``false_mass`` ``(N,)``. An example whose model output is NaN at some step gets NaN
        soundness and false mass (its decisions are undefined); the accuracy of
        ``score="accuracy"`` leaves such examples out. For a dataset in batches,
        :class:`~captum_ext.metrics.Soundness` applies the rule to all of them at once.

    Reference: X. Li, Y. Zhang, ..., A. Khakzar, "Sound and complete: a dual perspective on
    attribution evaluation" (TMLR 2024); the reference implementation is ``soco``.
    """
    score, threshold, score_floor = _soundness_rule(score, threshold, score_floor)
    parts = _soundness_parts(
        forward_func,
        inputs,
        attributions,
        target=target,
        additional_forward_args=additional_forward_args,
        removed_fractions=removed_fractions,
        imputer=imputer,
        noise=noise,
        seed=seed,
        batch_size=batch_size,
        channel_reduction=channel_reduction,
    )
    measured = parts.probability if score == "probability" else parts.correct
    curves, false_mass = _accumulated_soundness(
        parts.remaining, parts.added, measured, score, threshold, score_floor
    )
    return SoundnessCurves(parts.removed_fractions, curves, measured, false_mass)


def _soundness_rule(score: Any, threshold: Any, score_floor: Any) -> tuple[str, float, Any]:
    """``score``, ``threshold`` and ``score_floor`` of :func:`soundness`, checked."""
    if score not in ("probability", "accuracy"):
        raise ValueError(f"`score`={score!r}: expected 'probability' or 'accuracy'.")
    threshold = check_number(threshold, "threshold", minimum=None)
    if score_floor is not None:
        score_floor = check_number(score_floor, "score_floor", minimum=None)
    return score, threshold, score_floor


class _SoundnessParts(NamedTuple):
    """What the soundness rule needs per example: the masses kept and re-added at each step,
    and the two scores measured there (all ``(N, R)`` float64 on the CPU)."""

    removed_fractions: Tensor
    remaining: Tensor
    added: Tensor
    probability: Tensor
    correct: Tensor


def _soundness_parts(
    forward_func: Callable,
    inputs: Tensor,
    attributions: Any,
    *,
    target: Any,
    additional_forward_args: Any,
    removed_fractions: Sequence[float],
    imputer: Any,
    noise: float,
    seed: int,
    batch_size: int,
    channel_reduction: str = "sum",
) -> _SoundnessParts:
    """Impute and score every (example, step) of :func:`soundness`; the masses per step."""
    inputs = image_batch(inputs)
    _check_imputer(imputer)
    ratios = _fractions(removed_fractions, "removed_fractions", maximum=1.0, allow_maximum=False)
    if any(b > a for a, b in zip(ratios, ratios[1:])) or not ratios:
        raise ValueError("`removed_fractions` must be a non-empty decreasing sequence.")
    batch_size = check_int(batch_size, "batch_size")
    seed = check_int(seed, "seed", minimum=0)
    channel_reduction = _check_channel_reduction(channel_reduction)
    extra = format_additional_forward_args(additional_forward_args)
    maps = _pixel_scores(attributions, inputs, channel_reduction).flatten(1)
    low = maps.min(dim=1, keepdim=True).values
    span = (maps.max(dim=1, keepdim=True).values - low).clamp_min(1e-30)
    maps = (maps - low) / span
    n, pixels = maps.shape
    positions = _lerf_positions(maps, seed)
    counts = [int(pixels * r) for r in ratios]
    steps = len(ratios)
    noise = check_number(noise, "noise", allow_minimum=True)
    keys = _example_keys(inputs, seed)
    with evaluation(forward_func):
        targets = _targets(forward_func, inputs, target, extra)
        probability = torch.empty(n, steps, dtype=torch.float64)
        correct = torch.empty(n, steps, dtype=torch.float64)
        # every (example, step) image, imputed and scored batch_size rows at a time
        rows = [(i, j) for i in range(n) for j in range(steps)]
        layout = PerExampleLayout(extra, n)  # walked once for every chunk
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            examples = torch.tensor([i for i, _ in chunk], device=inputs.device)
            limits = torch.tensor([counts[j] for _, j in chunk], device=inputs.device)
            removed = positions[examples] < limits[:, None]
            removed = removed.view(len(chunk), *inputs.shape[-2:])
            imputed = _imputed(
                inputs[examples],
                removed,
                imputer,
                noise,
                [keys[i] for i, _ in chunk],
                seed,
            )
            p, c = _score_rows(forward_func, imputed, examples, targets, layout, n)
            # rows are example-major: row i * steps + j is example i at step j
            probability.view(-1)[start : start + len(chunk)] = p.cpu().double()
            correct.view(-1)[start : start + len(chunk)] = c.cpu().double()
    maps = maps.cpu()
    sorted_maps = maps.gather(1, positions.cpu().argsort(dim=1))  # increasing, tie-broken
    suffix = sorted_maps.flip(1).cumsum(1).flip(1)  # suffix[k] = mass of positions >= k
    total = torch.cat([suffix, torch.zeros(n, 1, dtype=suffix.dtype)], dim=1)
    remaining = total[:, counts]
    before = total[:, [pixels, *counts[:-1]]]
    return _SoundnessParts(
        torch.tensor(ratios, dtype=torch.float64),
        remaining,
        remaining - before,
        probability,
        correct,
    )


def _accumulated_soundness(
    remaining: Tensor,
    added: Tensor,
    measured: Tensor,
    score: str,
    threshold: float,
    score_floor: float | None,
) -> tuple[Tensor, Tensor]:
    """Soundness curves ``(N, R)`` and false mass ``(N,)`` from the per-step masses and
    scores. With ``score="accuracy"`` one decision per step from the accuracy over all the
    examples given (those whose model output was NaN left out). An example whose score is
    NaN at any step gets NaN (its decisions are undefined)."""
    n, steps = measured.shape
    false_mass = torch.zeros(n, dtype=torch.float64)
    curves = torch.empty(n, steps, dtype=torch.float64)
    previous = torch.zeros(n, dtype=torch.float64)
    for j in range(steps):
        curves[:, j] = (remaining[:, j] - false_mass) / (remaining[:, j] + 1e-6)
        current = measured[:, j]
        if score == "accuracy":
            current = current.nanmean().expand(n)
        # the floor: each example's own probability, or the accuracy
        counted = (current - previous) <= threshold
        if score_floor is not None:
            counted &= current > score_floor
        false_mass = false_mass + torch.where(counted, added[:, j], 0.0)
        previous = current
    undefined = measured.isnan().any(dim=1)
    curves[undefined] = float("nan")
    return curves, false_mass.masked_fill(undefined, float("nan"))
