"""VOICE's reference post-processing of CAM maps without materialising the upsampled maps.

The reference order per contrast map M_k (h x w, after ReLU) is: bilinear upsampling to the
input size (``align_corners=False``), min-max normalisation, then the population variance over
the contrasts, then a final min-max. Materialising K upsampled maps costs K x H x W per example
(999 x 224 x 224 for ResNet-18), several times the gradients themselves. Here the same numbers
come from low-resolution quantities only:

* Bilinear upsampling is separable and linear: U = A_h M A_w^T with interpolation matrices
  A_h (H x h), A_w (W x w) read off ``F.interpolate`` itself (so the weights are torch's own).
  Each row of A has at most two non-zero weights, on adjacent columns, summing to 1.
* min / max of U exactly: output rows that interpolate the same pair of low-resolution rows
  (r, r+1) are convex combinations linear in the weight on r+1, so, column by column, their
  extremes lie on the rows with the smallest and the largest such weight. The same holds for
  columns; min / max of U over all H x W pixels equal those over the (<= 2h) x (<= 2w)
  candidate sub-grid, which is computed directly.
* Constants pass through the interpolation (rows sum to 1), so the normalised upsampled map is
  the upsampling of the normalised low-resolution map M'_k = (M_k - lo_k) / (hi_k - lo_k).
* sum_k U'_k = A_h (sum_k M'_k) A_w^T, and since only neighbouring low-resolution values meet
  in a pixel, sum_k U'_k[i, j]^2 needs only the banded second moments
  E00 = sum_k M'^2, E01 = sum_k M'[r, s] M'[r, s+1], E10 = sum_k M'[r, s] M'[r+1, s],
  E11 = sum_k M'[r, s] M'[r+1, s+1], Ea = sum_k M'[r+1, s] M'[r, s+1]:

      sum_k U'_k^2 = A2_h E00 A2_w^T + 2 A2_h E01 P_w^T + 2 P_h E10 A2_w^T
                     + 2 P_h (E11 + Ea) P_w^T

  with A2 = A * A (element-wise) and P[i, r] = A[i, r] A[i, r+1].

Memory is O(contrasts x h x w) (maps are buffered up to ``BUFFER_ELEMENTS`` before their
moments are formed) plus a few full-size maps per example; the cost is O(contrasts x h x w)
plus O(H x W x (h + w)) per example for the final maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_ext._utils.precision import precise_dtype


def interpolation_matrix(low: int, high: int, dtype: torch.dtype, device) -> Tensor:
    """(high x low) weights of 1-D linear interpolation, ``align_corners=False`` (torch's)."""
    eye = torch.eye(low, dtype=dtype, device=device).unsqueeze(0)  # (1, low, low): channels
    return F.interpolate(eye, size=high, mode="linear", align_corners=False)[0].T.contiguous()


def _two_adjacent(matrix: Tensor) -> bool:
    """Every row has at most two non-zero weights, on adjacent columns."""
    nonzero = matrix != 0
    count = nonzero.sum(1)
    if bool((count > 2).any()) or bool((count == 0).any()):
        return False
    first = nonzero.float().argmax(1)
    second = (first + 1).clamp(max=matrix.shape[1] - 1)
    rows = torch.arange(matrix.shape[0], device=matrix.device)
    covered = nonzero[rows, first].long() + (nonzero[rows, second] & (second != first)).long()
    return bool((covered == count).all())


def extreme_rows(matrix: Tensor) -> Tensor:
    """Indices of the rows of an interpolation matrix on which the extremes of A @ T lie.

    Rows are grouped by their first non-zero column r; within a group each row is
    (1 - t) T[r] + t T[r + 1], linear in t = A[i, r + 1], so per column the extremes are at the
    rows with the smallest and largest t of the group.
    """
    nonzero = matrix != 0
    first = nonzero.float().argmax(1)
    low = matrix.shape[1]
    rows = torch.arange(matrix.shape[0], device=matrix.device)
    upper = matrix[rows, (first + 1).clamp(max=low - 1)]
    t = torch.where(first + 1 < low, upper, torch.zeros_like(upper))
    keep = []
    for group in torch.unique(first).tolist():
        members = rows[first == group]
        values = t[members]
        keep.append(members[values.argmin()])
        keep.append(members[values.argmax()])
    return torch.unique(torch.stack(keep))


class UpsampledMoments:
    """Accumulates VOICE's reference variance of (N, B, h, w) map chunks at size (H, W).

    ``normalise`` gives the low-resolution M' whose upsampling is the min-max normalised
    upsampled map; ``add`` takes ReLU-ed maps whose M' enter weighted first and banded
    second moments;
    ``variance`` returns the (N, H, W) population variance over the weighted maps.
    """

    def __init__(self, low: tuple[int, int], size: tuple[int, int], dtype, device) -> None:
        # E[x^2] - E[x]^2 cancels, and the final min-max magnifies what is left: the
        # (small, low-resolution) moments are formed in float64 where the device has it
        device = torch.device(device)
        self.dtype = precise_dtype(device)
        self.out_dtype = dtype
        (h, w), (height, width) = low, size
        self.a_h = interpolation_matrix(h, height, self.dtype, device)
        self.a_w = interpolation_matrix(w, width, self.dtype, device)
        self.rows_h = self.a_h[extreme_rows(self.a_h)]
        self.rows_w = self.a_w[extreme_rows(self.a_w)]
        self.total = self.e00 = self.e01 = self.e10 = self.e11 = None
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.pending_elements = 0

    @staticmethod
    def applies(low: tuple[int, ...], size: tuple[int, ...], dtype, device) -> bool:
        """Whether the exact route holds (2-D maps, two-adjacent-tap interpolation)."""
        if len(low) != 2 or len(size) != 2:
            return False
        compute = precise_dtype(device)
        return all(
            _two_adjacent(interpolation_matrix(n, m, compute, device))
            for n, m in zip(low, size, strict=True)
        )

    def normalise(self, maps: Tensor) -> Tensor:
        """(N, B, h, w) ReLU-ed maps -> M', zero where the upsampled map is constant.

        "Constant" as :func:`~captum_ext._utils.maps.minmax_normalize` (the materialising
        route) reads it: a span of the upsampled map of at most ``8 eps max|U|``, eps that
        of the maps' dtype, is rounding, not a pattern to stretch to [0, 1]."""
        eps = torch.finfo(maps.dtype).eps if maps.is_floating_point() else 0.0
        maps = maps.to(self.dtype)
        grid = torch.einsum("ir,nbrs,js->nbij", self.rows_h, maps, self.rows_w).flatten(2)
        low = grid.amin(-1)[..., None, None]
        span = grid.amax(-1)[..., None, None] - low
        rounding = 8 * eps * grid.abs().amax(-1)[..., None, None]
        # a constant map upsamples to a constant (rows sum to 1); rounding must not make
        # its min-max normalisation amplify last-bit noise to [0, 1]
        flat = maps.flatten(2)
        constant = (flat.amax(-1) == flat.amin(-1))[..., None, None] | (span <= rounding)
        span = torch.where(constant, torch.zeros_like(span), span)
        safe = torch.where(span > 0, span, torch.ones_like(span))
        return torch.where(span > 0, (maps - low) / safe, torch.zeros_like(maps))

    #: maps buffered before their moments are formed: a few large operations instead of a
    #: few dozen small ones per chunk (the chunks of 1000 classes at 7 x 7 are all buffered)
    BUFFER_ELEMENTS = 1 << 22

    def add(self, maps: Tensor, weight: Tensor) -> None:
        """Accumulate the (N, B, h, w) ReLU-ed maps with (N, B) weights (0 or 1)."""
        self.pending.append((maps, weight))
        self.pending_elements += maps.numel()
        if self.pending_elements >= self.BUFFER_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        maps = torch.cat([m for m, _ in self.pending], dim=1)
        weight = torch.cat([w for _, w in self.pending], dim=1)
        self.pending, self.pending_elements = [], 0
        self._accumulate(self.normalise(maps), weight)

    def _accumulate(self, normalised: Tensor, weight: Tensor) -> None:
        m = normalised * weight.to(self.dtype)[..., None, None]  # weights are 0 / 1
        parts = (
            m.sum(1),
            (m * normalised).sum(1),
            (m[..., :, :-1] * normalised[..., :, 1:]).sum(1),
            (m[..., :-1, :] * normalised[..., 1:, :]).sum(1),
            (m[..., :-1, :-1] * normalised[..., 1:, 1:]).sum(1)
            + (m[..., 1:, :-1] * normalised[..., :-1, 1:]).sum(1),
        )
        if self.total is None:
            self.total, self.e00, self.e01, self.e10, self.e11 = parts
        else:
            self.total, self.e00, self.e01, self.e10, self.e11 = (
                old + new
                for old, new in zip(
                    (self.total, self.e00, self.e01, self.e10, self.e11), parts, strict=True
                )
            )

    def sums(self) -> tuple[Tensor, Tensor]:
        """(N, H, W) sum_k w_k U'_k and sum_k w_k U'_k^2 at full size."""
        self._flush()
        a_h, a_w = self.a_h, self.a_w
        a2_h, a2_w = a_h.square(), a_w.square()
        p_h, p_w = a_h[:, :-1] * a_h[:, 1:], a_w[:, :-1] * a_w[:, 1:]

        def sandwich(left: Tensor, middle: Tensor, right: Tensor) -> Tensor:
            return left @ middle @ right.T

        total = sandwich(a_h, self.total, a_w)
        total_sq = sandwich(a2_h, self.e00, a2_w)
        if p_w.shape[1]:
            total_sq = total_sq + 2 * sandwich(a2_h, self.e01, p_w)
        if p_h.shape[1]:
            total_sq = total_sq + 2 * sandwich(p_h, self.e10, a2_w)
        if p_h.shape[1] and p_w.shape[1]:
            total_sq = total_sq + 2 * sandwich(p_h, self.e11, p_w)
        return total, total_sq
