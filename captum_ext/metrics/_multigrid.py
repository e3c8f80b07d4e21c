r"""Batched multigrid-preconditioned conjugate gradients for ROAD's linear imputation.

For each mask the removed pixels :math:`U` solve (kept pixels fixed, every channel alike)

.. math::  A v = b, \qquad (A v)_p = u_p \big((d_p + \tfrac13) v_p - \tfrac1{12} (S v)_p\big),
   \qquad b_p = \tfrac1{12} u_p (S (x \odot (1 - u)))_p,

with :math:`u` the removed pixels as 0/1, :math:`S` the :math:`[1, 2, 1] \otimes [1, 2, 1]`
neighbourhood sum (zero outside the image; :math:`S/12 - 1/3` is the 8-neighbour weighting of
ROAD, 1/6 direct and 1/12 diagonal) and :math:`d_p` the summed neighbour weight inside the
image. :math:`A`, restricted to the removed pixels, is symmetric positive definite.

Algorithm (:func:`multigrid_imputation`):

* outer iteration: preconditioned conjugate gradients in float32 with one float64 *reliable
  update* per mask: once a mask's steps have shrunk ``_REPLACEMENT_DROP``-fold since its
  largest one, its float32 correction is added to a float64 solution and its residual is
  recomputed in float64 from the original system. Each image is solved divided by its largest
  absolute kept value (the system is linear; an image whose kept pixels are all 0 as it is),
  and the result multiplied back, so the stop rule is relative to that value at every scale of
  pixels: a mask stops when, after its float64 update, its last step (max abs over channels
  and pixels) is below ``tolerance``.
* preconditioner: one symmetric V-cycle (W. L. Briggs, V. E. Henson, S. F. McCormick, "A
  Multigrid Tutorial", 2nd ed., SIAM 2000, ch. 3-5) in float32 on grids halved (vertex
  centred: coarse :math:`J` sits on fine :math:`2J`) until at most ``COARSEST_SIZE`` pixels
  wide; bilinear prolongation :math:`P` (masked to the removed pixels on the finest level, the
  last fine row / column copying the last coarse one for even sizes, so constants are kept),
  full-weighting restriction :math:`R = P^T`, Galerkin coarse operators
  :math:`A_{l+1} = P^T A_l P` (U. Trottenberg, C. W. Oosterlee, A. Schüller, "Multigrid",
  Academic Press 2001, sec. 7.7; variable 9-point stencils, computed by applying :math:`A_l`
  to the prolongations of 9 coloured coarse probe vectors, then symmetrised), damped Jacobi
  smoothing (weight 1.0 on the finest level, 0.9 on the coarse ones; one sweep before and one
  after on the two finest levels, two from the third level on) and the coarsest level solved
  exactly (a dense Cholesky inverse per mask, float64).

Since the V-cycle is symmetric positive definite the PCG is a valid Krylov method (Briggs et
al., sec. 10). Stencils are applied as strided slices of zero-bordered buffers, which measured
3-60x faster than ``conv2d``, ``avg_pool2d`` or ``interpolate`` for these small kernels on a
CPU. Masks of a chunk are one batch (their channels share the mask's hierarchy); a converged
mask leaves the batch.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

DEFAULT_TOLERANCE = 1e-6
DEFAULT_MAX_ITERATIONS = 60  # measured: 6-13 iterations at 28-224 px, random and smooth maps
COARSEST_SIZE = 8  # grids at most this many pixels wide are solved exactly
_FINE_DAMPING = 1.0
_COARSE_DAMPING = 0.9
_TWO_SWEEPS_FROM_LEVEL = 2
_REPLACEMENT_DROP = 1e-3
_CHUNK_PIXELS = 4 * 224 * 224  # masks per batch: about 4 images of 224 x 224
_STENCIL = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # index 3 (dy+1) + (dx+1)
_CENTRE = 4


class _Workspace:
    """Work buffers reused across the operations and chunks of one solve (on ``device``),
    keyed by (name, shape, dtype): fresh allocations of megabytes on every stencil
    application measured slower (page faults)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[tuple, Tensor] = {}
        self.views: dict[tuple, list[Tensor]] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, zero: bool = False) -> Tensor:
        key = (name, tuple(shape), dtype)
        buffer = self.buffers.get(key)
        if buffer is None:
            make = torch.zeros if zero else torch.empty
            buffer = self.buffers[key] = make(tuple(shape), dtype=dtype, device=self.device)
        return buffer

    def bordered(self, name: str, shape: tuple, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A zero-bordered buffer ``(..., h + 2, w + 2)`` and its interior ``(..., h, w)``
        (only the interior is ever written, so the border stays zero)."""
        *lead, h, w = shape
        padded = self.get("bordered" + name, (*lead, h + 2, w + 2), dtype, zero=True)
        return padded, padded[..., 1:-1, 1:-1]

    def shifted(self, padded: Tensor) -> list[Tensor]:
        """The 9 shifted interior views of the workspace buffer ``padded``, in stencil order."""
        key = (padded.data_ptr(), tuple(padded.shape), tuple(padded.stride()))
        views = self.views.get(key)
        if views is None:
            h, w = padded.shape[-2] - 2, padded.shape[-1] - 2
            views = [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _STENCIL]
            self.views[key] = views
        return views


def _neighbourhood_sum(padded: Tensor, out: Tensor, ws: _Workspace, tag: str) -> Tensor:
    """``out`` = the [1 2 1] x [1 2 1] sum over the 3 x 3 neighbourhood of the interior of the
    zero-bordered ``padded``."""
    shape = (*padded.shape[:-1], padded.shape[-1] - 2)
    rows = ws.get("rows" + tag, shape, padded.dtype)
    torch.add(padded[..., :, :-2], padded[..., :, 2:], out=rows)
    rows.add_(padded[..., :, 1:-1], alpha=2.0)
    torch.add(rows[..., :-2, :], rows[..., 2:, :], out=out)
    return out.add_(rows[..., 1:-1, :], alpha=2.0)


def _neighbourhood_sum_of(values: Tensor, out: Tensor, ws: _Workspace, tag: str) -> Tensor:
    padded, interior = ws.bordered("sum" + tag, values.shape, values.dtype)
    interior.copy_(values)
    return _neighbourhood_sum(padded, out, ws, tag)


# ---- transfer operators: separable, vertex centred ------------------------------------------


def _along(dim: int, index: slice) -> tuple:
    return (Ellipsis, index) if dim == -1 else (Ellipsis, index, slice(None))


def _restrict_along(fine: Tensor, dim: int, out: Tensor) -> Tensor:
    """``out`` = :math:`P_1^T` ``fine`` along ``dim`` (1-D full weighting)."""
    even = fine[_along(dim, slice(0, None, 2))]
    odd = fine[_along(dim, slice(1, None, 2))]
    coarse, odds = even.shape[dim], odd.shape[dim]
    if odds == coarse:  # even size: the last odd point belongs wholly to the last coarse one
        torch.add(even, odd, alpha=0.5, out=out)
        out[_along(dim, slice(1, None))].add_(odd[_along(dim, slice(0, coarse - 1))], alpha=0.5)
        out[_along(dim, slice(coarse - 1, coarse))].add_(
            odd[_along(dim, slice(odds - 1, odds))], alpha=0.5
        )
    else:
        out.copy_(even)
        out[_along(dim, slice(0, odds))].add_(odd, alpha=0.5)
        out[_along(dim, slice(1, None))].add_(odd, alpha=0.5)
    return out


def restrict(fine: Tensor, ws: _Workspace, tag: str, out: Tensor | None = None) -> Tensor:
    """:math:`R = P^T`: ``(..., h, w)`` to ``(..., ceil(h / 2), ceil(w / 2))``."""
    *lead, h, w = fine.shape
    coarse_h, coarse_w = (h + 1) // 2, (w + 1) // 2
    half = ws.get("restrict" + tag, (*lead, coarse_h, w), fine.dtype)
    if out is None:
        out = torch.empty((*lead, coarse_h, coarse_w), dtype=fine.dtype, device=fine.device)
    _restrict_along(fine, -2, half)
    return _restrict_along(half, -1, out)


def _prolong_along(coarse: Tensor, dim: int, out: Tensor) -> Tensor:
    """``out`` = :math:`P_1` ``coarse`` along ``dim`` (1-D linear interpolation)."""
    size, coarse_size = out.shape[dim], coarse.shape[dim]
    out[_along(dim, slice(0, None, 2))] = coarse
    odd = out[_along(dim, slice(1, None, 2))]
    middle = odd[_along(dim, slice(0, coarse_size - 1))]
    torch.add(
        coarse[_along(dim, slice(0, coarse_size - 1))],
        coarse[_along(dim, slice(1, coarse_size))],
        out=middle,
    )
    middle.mul_(0.5)
    if size % 2 == 0:  # the last fine point copies the last coarse one
        odd[_along(dim, slice(coarse_size - 1, coarse_size))] = coarse[
            _along(dim, slice(coarse_size - 1, coarse_size))
        ]
    return out


def prolong(coarse: Tensor, h: int, w: int, ws: _Workspace, tag: str) -> Tensor:
    """:math:`P`: ``(..., ceil(h / 2), ceil(w / 2))`` to a new ``(..., h, w)``."""
    *lead, coarse_h, _ = coarse.shape
    half = ws.get("prolong" + tag, (*lead, coarse_h, w), coarse.dtype)
    _prolong_along(coarse, -1, half)
    out = torch.empty((*lead, h, w), dtype=coarse.dtype, device=coarse.device)
    return _prolong_along(half, -2, out)


def _add_prolonged(coarse: Tensor, mask: Tensor, fine: Tensor, ws: _Workspace, tag: str) -> None:
    """``fine += mask * P coarse`` (the pass along the rows fused with the masked add)."""
    *lead, coarse_h, _ = coarse.shape
    h, w = fine.shape[-2:]
    half = ws.get("prolong" + tag, (*lead, coarse_h, w), coarse.dtype)
    _prolong_along(coarse, -1, half)
    fine[..., 0::2, :].addcmul_(mask[..., 0::2, :], half)
    odd_fine, odd_mask = fine[..., 1::2, :], mask[..., 1::2, :]
    pair_sum = ws.get("pairs" + tag, (*lead, coarse_h - 1, w), coarse.dtype)
    torch.add(half[..., :-1, :], half[..., 1:, :], out=pair_sum)
    odd_fine[..., : coarse_h - 1, :].addcmul_(odd_mask[..., : coarse_h - 1, :], pair_sum, value=0.5)
    if h % 2 == 0:
        odd_fine[..., coarse_h - 1 :, :].addcmul_(
            odd_mask[..., coarse_h - 1 :, :], half[..., coarse_h - 1 :, :]
        )


# ---- variable 9-point stencils -----------------------------------------------------------------


def _stencil_apply(
    coefficients: list[Tensor], padded: Tensor, rhs: Tensor | None, out: Tensor, ws: _Workspace
) -> Tensor:
    """``out`` = ``rhs - A v`` (``A v`` when ``rhs`` is None) for the stencil ``A`` given as 9
    ``(B, 1, h, w)`` coefficient views and ``v`` the interior of the workspace buffer
    ``padded`` ``(B, C, h + 2, w + 2)``."""
    views = ws.shifted(padded)
    if rhs is None:
        torch.mul(coefficients[_CENTRE], views[_CENTRE], out=out)
        sign = 1.0
    else:
        torch.addcmul(rhs, coefficients[_CENTRE], views[_CENTRE], value=-1.0, out=out)
        sign = -1.0
    for k in range(9):
        if k != _CENTRE:
            out.addcmul_(coefficients[k], views[k], value=sign)
    return out


def _split_stencil(coefficients: Tensor) -> list[Tensor]:
    return [coefficients[:, k : k + 1] for k in range(9)]


@functools.lru_cache(maxsize=32)
def _degree(h: int, w: int, device: torch.device) -> Tensor:
    """``(1, 1, h, w)`` float64: the summed neighbour weights of each pixel inside the image."""
    ones = torch.ones(1, 1, h, w, dtype=torch.float64, device=device)
    total = _neighbourhood_sum_of(ones, torch.empty_like(ones), _Workspace(device), "")
    return (total - 4.0) / 12.0


@functools.lru_cache(maxsize=32)
def _prolonged_probes(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(1, 9, h, w)``: :math:`P` applied to the 9 coloured coarse probes (coarse pixel
    :math:`(I, J)` belongs to probe :math:`3 (I \\bmod 3) + (J \\bmod 3)`); the 9-point coarse
    stencils of neighbours never share a probe, so one product per probe gives them all."""
    coarse_h, coarse_w = (h + 1) // 2, (w + 1) // 2
    colour_rows = torch.arange(coarse_h, device=device) % 3
    colour_cols = torch.arange(coarse_w, device=device) % 3
    colour = colour_rows[:, None] * 3 + colour_cols[None, :]
    probes = (colour[None] == torch.arange(9, device=device)[:, None, None]).to(dtype)[None]
    return prolong(probes, h, w, _Workspace(device), "")


@functools.lru_cache(maxsize=32)
def _probe_gather(h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """For each coarse pixel and stencil offset: which probe's response holds that entry, and
    whether the neighbour lies inside the grid."""
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    index = torch.empty(9, h, w, dtype=torch.long, device=device)
    inside = torch.empty(9, h, w, dtype=dtype, device=device)
    for k, (dy, dx) in enumerate(_STENCIL):
        index[k] = ((rows + dy) % 3)[:, None] * 3 + ((cols + dx) % 3)[None, :]
        row_in = (rows + dy >= 0) & (rows + dy < h)
        col_in = (cols + dx >= 0) & (cols + dx < w)
        inside[k] = (row_in[:, None] & col_in[None, :]).to(dtype)
    return index[None], inside[None]


def _coarse_stencil(responses: Tensor) -> Tensor:
    """``(B, 9, h, w)`` restricted probe responses to the symmetrised coarse stencil."""
    b, _, h, w = responses.shape
    index, inside = _probe_gather(h, w, responses.dtype, responses.device)
    stencil = torch.gather(responses, 1, index.expand(b, 9, h, w)).mul_(inside)
    for k, (dy, dx) in enumerate(_STENCIL[:_CENTRE]):  # A(I, I + d) = A(I + d, I)
        source = stencil[:, k, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        mirror = stencil[:, 8 - k, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        source.add_(mirror).mul_(0.5)
        mirror.copy_(source)
    return stencil


@functools.lru_cache(maxsize=32)
def _dense_positions(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Where each stencil entry goes in the flattened dense ``(h w) x (h w)`` matrix."""
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    targets, sources = [], []
    for k, (dy, dx) in enumerate(_STENCIL):
        rows2, cols2 = rows + dy, cols + dx
        inside = (rows2 >= 0) & (rows2 < h) & (cols2 >= 0) & (cols2 < w)
        pixel = (rows * w + cols)[inside]
        targets.append(pixel * (h * w) + (rows2 * w + cols2)[inside])
        sources.append(k * h * w + pixel)
    return torch.cat(targets), torch.cat(sources)


def _coarsest_inverse(stencil: Tensor) -> Tensor:
    """``(B, n, n)`` float64 inverse of each coarsest-grid stencil (inactive points: zero rows
    and columns); Jacobi where the float32 Galerkin operator is not numerically definite."""
    b, _, h, w = stencil.shape
    n = h * w
    targets, sources = _dense_positions(h, w, stencil.device)
    dense = torch.zeros(b, n * n, dtype=torch.float64, device=stencil.device)
    dense[:, targets] = stencil.reshape(b, 9 * n)[:, sources].to(torch.float64)
    dense = dense.view(b, n, n)
    diagonal = dense.diagonal(dim1=1, dim2=2)
    inactive = diagonal <= 1e-6 * diagonal.amax(1, keepdim=True).clamp_min(1e-300)
    diagonal.add_(inactive.to(dense.dtype))
    factor, info = torch.linalg.cholesky_ex(dense)
    if bool((info != 0).any()):  # float32 rounding in the Galerkin product: nudge the diagonal
        nudge = torch.where(info != 0, 1.0 + 1e-5, 1.0).to(dense.dtype)
        dense.diagonal(dim1=1, dim2=2).mul_(nudge[:, None])
        factor, info = torch.linalg.cholesky_ex(dense)
    if bool((info != 0).any()):  # still not definite: Jacobi for those masks
        jacobi = torch.diag_embed(dense.diagonal(dim1=1, dim2=2))
        dense = torch.where((info != 0)[:, None, None], jacobi, dense)
        factor = torch.linalg.cholesky(dense)
    inverse = torch.cholesky_inverse(factor)
    keep = (~inactive).to(inverse.dtype)
    return inverse.mul_(keep[:, :, None] * keep[:, None, :])


class _Hierarchy:
    """The multigrid hierarchy of a batch of masks ``removed`` ``(B, 1, H, W)`` float64 0/1."""

    def __init__(self, removed: Tensor, ws: _Workspace) -> None:
        b, _, h, w = removed.shape
        inner = torch.float32
        degree = _degree(h, w, removed.device)
        self.ws = ws
        self.centre64 = removed * (degree + 1.0 / 3.0)
        self.neighbours64 = removed / 12.0
        self.removed = removed.to(inner)
        self.centre = self.centre64.to(inner)
        self.neighbours = self.neighbours64.to(inner)
        self.fine_jacobi = (_FINE_DAMPING * removed / degree).to(inner)
        self.shapes = [(h, w)]
        self.stencils: list[Tensor] = []
        self.coarse_jacobi: list[Tensor] = []
        self.coarse_active: list[Tensor] = []
        fine_h, fine_w = h, w
        while max(fine_h, fine_w) > COARSEST_SIZE:
            coarse_h, coarse_w = (fine_h + 1) // 2, (fine_w + 1) // 2
            probes = _prolonged_probes(fine_h, fine_w, inner, removed.device)
            padded, values = ws.bordered("probes", (b, 9, fine_h, fine_w), inner)
            applied = ws.get("probes_applied", (b, 9, fine_h, fine_w), inner)
            if not self.stencils:  # the finest operator on the masked prolongations
                torch.mul(self.removed, probes, out=values)
                sums = _neighbourhood_sum(
                    padded, ws.get("probe_sums", values.shape, inner), ws, "probes"
                )
                torch.mul(self.centre, values, out=applied)
                applied.addcmul_(self.neighbours, sums, value=-1.0)
            else:
                values.copy_(probes.expand(b, 9, fine_h, fine_w))
                _stencil_apply(_split_stencil(self.stencils[-1]), padded, None, applied, ws)
            stencil = _coarse_stencil(restrict(applied, ws, "probes"))
            diagonal = stencil[:, _CENTRE : _CENTRE + 1]
            active = diagonal > 1e-6 * diagonal.amax((1, 2, 3), keepdim=True).clamp_min(1e-30)
            self.stencils.append(stencil)
            self.coarse_active.append(active.to(inner))
            self.coarse_jacobi.append(
                _COARSE_DAMPING * active.to(inner) / torch.where(active, diagonal, 1.0)
            )
            self.shapes.append((coarse_h, coarse_w))
            fine_h, fine_w = coarse_h, coarse_w
        self.coarsest_inverse = _coarsest_inverse(self.stencils[-1]).to(inner)
        self.stencil_views = [_split_stencil(s) for s in self.stencils]

    def select(self, keep: Tensor) -> _Hierarchy:
        """The hierarchy of the masks ``keep`` (bool) only."""
        new = _Hierarchy.__new__(_Hierarchy)
        new.__dict__.update(self.__dict__)
        for name in (
            "centre64",
            "neighbours64",
            "removed",
            "centre",
            "neighbours",
            "fine_jacobi",
            "coarsest_inverse",
        ):
            setattr(new, name, getattr(self, name)[keep])
        new.stencils = [s[keep] for s in self.stencils]
        new.stencil_views = [_split_stencil(s) for s in new.stencils]
        new.coarse_jacobi = [s[keep] for s in self.coarse_jacobi]
        new.coarse_active = [s[keep] for s in self.coarse_active]
        return new

    def residual64(self, rhs: Tensor, solution: Tensor) -> Tensor:
        """``rhs - A solution`` in float64 (a workspace buffer)."""
        ws = self.ws
        sums = _neighbourhood_sum_of(
            solution, ws.get("sums64", solution.shape, solution.dtype), ws, "64"
        )
        out = torch.addcmul(
            rhs, self.neighbours64, sums, out=ws.get("residual64", solution.shape, solution.dtype)
        )
        return out.addcmul_(self.centre64, solution, value=-1.0)

    def apply(self, padded: Tensor, out: Tensor) -> Tensor:
        """``out`` = ``A v`` in float32, ``v`` the interior of the zero-bordered ``padded``."""
        sums = _neighbourhood_sum(padded, self.ws.get("sums", out.shape, out.dtype), self.ws, "A")
        torch.mul(self.centre, padded[..., 1:-1, 1:-1], out=out)
        return out.addcmul_(self.neighbours, sums, value=-1.0)

    def _residual(self, level: int, padded: Tensor, rhs: Tensor, out: Tensor) -> Tensor:
        if level == 0:
            sums = _neighbourhood_sum(
                padded, self.ws.get("sums0", rhs.shape, rhs.dtype), self.ws, "0"
            )
            torch.addcmul(rhs, self.neighbours, sums, out=out)
            return out.addcmul_(self.centre, padded[..., 1:-1, 1:-1], value=-1.0)
        return _stencil_apply(self.stencil_views[level - 1], padded, rhs, out, self.ws)

    def vcycle(self, rhs: Tensor, level: int = 0) -> Tensor:
        """The V-cycle's approximation of :math:`A_l^{-1}` ``rhs`` (``rhs`` ``(B, C, h, w)``
        float32, zero on inactive points), a view into a workspace buffer (valid until the
        next call)."""
        ws = self.ws
        b, c, h, w = rhs.shape
        if level == len(self.stencils):
            solved = torch.bmm(rhs.reshape(b, c, h * w), self.coarsest_inverse)  # symmetric
            return solved.view(b, c, h, w)
        jacobi = self.fine_jacobi if level == 0 else self.coarse_jacobi[level - 1]
        sweeps = 2 if level >= _TWO_SWEEPS_FROM_LEVEL else 1
        padded, x = ws.bordered(f"x{level}", rhs.shape, rhs.dtype)
        residual = ws.get(f"residual{level}", rhs.shape, rhs.dtype)
        torch.mul(jacobi, rhs, out=x)  # the first sweep from zero
        for _ in range(sweeps - 1):
            x.addcmul_(jacobi, self._residual(level, padded, rhs, residual))
        coarse_h, coarse_w = self.shapes[level + 1]
        self._residual(level, padded, rhs, residual)
        coarse_rhs = restrict(
            residual,
            ws,
            f"L{level}",
            ws.get(f"coarse{level}", (b, c, coarse_h, coarse_w), rhs.dtype),
        )
        correction = self.vcycle(coarse_rhs, level + 1)
        mask = self.removed if level == 0 else self.coarse_active[level - 1]
        _add_prolonged(correction, mask, x, ws, f"L{level}")
        for _ in range(sweeps):
            x.addcmul_(jacobi, self._residual(level, padded, rhs, residual))
        return x


def _dot(a: Tensor, b: Tensor, ws: _Workspace) -> Tensor:
    """``(B, C)`` inner products over the pixels."""
    return torch.mul(a, b, out=ws.get("dot", a.shape, a.dtype)).sum((2, 3))


def _preconditioned_cg(
    hierarchy: _Hierarchy, rhs64: Tensor, limit: Tensor, max_iterations: int
) -> tuple[Tensor, Tensor]:
    """Mixed-precision PCG on ``A v = rhs64`` for every mask of the batch; ``limit`` ``(B,)``:
    the step size below which a mask stops (after its float64 residual replacement). Returns
    the float64 solution and ``(B,)`` converged."""
    ws = hierarchy.ws
    b, c, h, w = rhs64.shape
    solution = torch.zeros_like(rhs64)
    converged = torch.zeros(b, dtype=torch.bool, device=rhs64.device)
    base64 = torch.zeros_like(rhs64)  # the float64 solution at the last replacement
    residual = rhs64.to(torch.float32)
    correction = torch.zeros_like(residual)  # float32, since the last replacement
    padded = torch.zeros(b, c, h + 2, w + 2, dtype=residual.dtype, device=residual.device)
    direction = padded[..., 1:-1, 1:-1]
    direction.copy_(hierarchy.vcycle(residual))
    rz = _dot(residual, direction, ws)
    product = torch.empty_like(residual)
    rows = torch.arange(b, device=rhs64.device)
    largest_step = torch.zeros(b, dtype=residual.dtype, device=residual.device)
    replaced = torch.zeros(b, dtype=torch.bool, device=rhs64.device)
    for iteration in range(1, max_iterations + 1):
        hierarchy.apply(padded, product)
        curvature = _dot(direction, product, ws)
        # a channel with a zero right-hand side (or already solved) has zero direction
        alpha = torch.where(curvature > 0, rz / curvature, 0.0)[..., None, None]
        correction.addcmul_(direction, alpha)
        residual.addcmul_(product, alpha, value=-1.0)
        largest = torch.maximum(direction.amax((2, 3)), direction.amin((2, 3)).neg_())
        step = (alpha[..., 0, 0].abs() * largest).amax(1)
        largest_step = torch.maximum(largest_step, step)
        finished = (replaced & (step < limit)) | ~torch.isfinite(step)
        if iteration == max_iterations:
            finished = torch.ones_like(finished)
        if bool(finished.any()):
            solution[rows[finished]] = base64[finished].add_(correction[finished])
            converged[rows[finished]] = replaced[finished] & (step[finished] < limit[finished])
            keep = ~finished
            if not bool(keep.any()):
                break
            rows, largest_step, rz, replaced, step, limit = (
                t[keep] for t in (rows, largest_step, rz, replaced, step, limit)
            )
            hierarchy = hierarchy.select(keep)
            correction, residual, product = correction[keep], residual[keep], product[keep]
            base64, rhs64, padded = base64[keep], rhs64[keep], padded[keep]
            direction = padded[..., 1:-1, 1:-1]
        due = ~replaced & (step <= _REPLACEMENT_DROP * largest_step)
        if bool(due.any()):  # flush into float64 and recompute the residual there
            flushed = due.nonzero()[:, 0]  # those masks only: each mask's arithmetic is its own
            base64[flushed] += correction[flushed]
            correction[flushed] = 0.0
            residual[flushed] = hierarchy.residual64(rhs64, base64)[flushed].to(residual.dtype)
            replaced = replaced | due
        z = hierarchy.vcycle(residual)
        rz_new = _dot(residual, z, ws)
        beta = torch.where(rz > 0, rz_new / rz, 0.0)[..., None, None]
        torch.addcmul(z, direction, beta, out=direction)
        rz = rz_new
    return solution, converged


def multigrid_imputation(
    inputs: Tensor,
    removed: Tensor,
    tolerance: float = DEFAULT_TOLERANCE,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> tuple[Tensor, Tensor]:
    """ROAD's linear imputation (no noise) by multigrid-preconditioned CG.

    Args:
        inputs (Tensor): ``(N, C, H, W)`` images, at least one of ``H``, ``W`` larger than
            ``COARSEST_SIZE``; any device with float64.
        removed (Tensor): ``(N, 1, H, W)`` bool, True where a pixel is removed; every image
            keeps at least one pixel.
        tolerance (float): a mask stops when, after its float64 residual replacement, its
            last CG step (max abs over channels and removed pixels) is below ``tolerance``
            times the largest absolute kept value of its image (the image is solved divided
            by that value, so the rule holds at every scale of pixels). Default: 1e-6 (max error
            about 1e-7 to 4e-7 against an exact solve on pixel values in [0, 1] on the
            benchmark's masks, measured at 28 and 224 px; up to 8e-7 on masks keeping 5 to
            15 pixels, and 2e-6 to 5e-6 on masks keeping 1 to 3, which ``road_imputation``
            therefore solves exactly).
        max_iterations (int): CG iterations per mask at most. Default: 60.

    Returns:
        tuple[Tensor, Tensor]: the imputed images (same dtype as ``inputs``; kept pixels
        unchanged) and ``(N,)`` bool, True where the mask met the stop rule (the others hold
        the last iterate).
    """
    n, c, h, w = inputs.shape
    if max(h, w) <= COARSEST_SIZE:
        raise ValueError(f"multigrid needs an image wider than {COARSEST_SIZE} pixels.")
    device = inputs.device
    ws = _Workspace(device)
    per_chunk = max(4, _CHUNK_PIXELS // (h * w))
    filled = torch.empty_like(inputs)
    converged = torch.zeros(n, dtype=torch.bool, device=device)
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        x = inputs[start:stop].detach().to(torch.float64)
        mask = removed[start:stop].reshape(-1, 1, h, w).to(torch.bool)
        known = torch.where(mask, 0.0, x)
        # the system is linear: solve for the image divided by its largest kept value, so
        # that the float32 cycles and the stop rule are the same at every scale of pixels
        scale = known.abs().flatten(1).amax(1)
        scale = torch.where(scale > 0, scale, 1.0).view(-1, 1, 1, 1)
        known = known / scale
        hierarchy = _Hierarchy(mask.to(torch.float64), ws)
        rhs = _neighbourhood_sum_of(known, torch.empty_like(known), ws, "rhs")
        rhs.mul_(hierarchy.neighbours64)
        limit = torch.full((stop - start,), tolerance, dtype=torch.float32, device=device)
        solution, done = _preconditioned_cg(hierarchy, rhs, limit, max_iterations)
        filled[start:stop] = torch.where(mask, solution * scale, x).to(inputs.dtype)
        converged[start:stop] = done
    return filled, converged
