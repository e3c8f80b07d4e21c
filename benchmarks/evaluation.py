"""ROAD imputation: our batched conjugate-gradient solve vs a per-image scipy sparse solve.

The soundness/completeness reference pipeline (soco, after ROAD) builds one sparse linear
system per image and step and solves it with scipy on the CPU; the 96 soundness steps make
that the dominant cost. ``captum_ext.metrics.road_imputation`` solves every image and step of
a batch at once: on the CPU by one sparse LU of the block-diagonal system ("direct"), on other
devices by conjugate gradients with the Laplacian as a 3 x 3 convolution ("cg"; timed here on
the CPU too).

Both sides impute the same (image, removal mask) pairs in one process; the masks are those of
completeness (9 thresholds) and soundness (96 area steps) for random maps. Prints the agreement
(max abs difference) and the ratio as a JSON line. ``--quick`` runs a smaller set.

Run: ``python benchmarks/evaluation.py`` (a few minutes on 2 CPU cores). Cases: 64 digits at
28 x 28 with every completeness and soundness mask (6,720 systems), and 2 images at
224 x 224 with the 9 completeness masks (each 224-px solve takes about a second or more).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as linalg
import torch

from captum_ext.metrics.remove_and_debias import (
    DEFAULT_COMPLETENESS_THRESHOLDS,
    DEFAULT_SOUNDNESS_RATIOS,
    road_imputation,
)

_OFFSETS = [(dr, dq) for dr in (-1, 0, 1) for dq in (-1, 0, 1) if (dr, dq) != (0, 0)]


def scipy_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """One image: the linear-imputation system assembled with numpy and solved by scipy."""
    c, h, w = image.shape
    unknown = np.flatnonzero(removed.ravel())
    index = -np.ones(h * w, dtype=np.int64)
    index[unknown] = np.arange(unknown.size)
    rows_r, cols_q = np.divmod(unknown, w)
    flat = image.reshape(c, -1)
    diagonal = np.zeros(unknown.size)
    b = np.zeros((unknown.size, c))
    rows, cols, values = [], [], []
    for dr, dq in _OFFSETS:
        weight = 1 / 6 if dr == 0 or dq == 0 else 1 / 12
        rr, qq = rows_r + dr, cols_q + dq
        inside = (rr >= 0) & (rr < h) & (qq >= 0) & (qq < w)
        neighbour = np.where(inside, rr * w + qq, 0)
        diagonal += weight * inside
        is_unknown = inside & (index[neighbour] >= 0)
        is_known = inside & ~is_unknown
        rows.append(np.flatnonzero(is_unknown))
        cols.append(index[neighbour[is_unknown]])
        values.append(np.full(int(is_unknown.sum()), -weight))
        b[is_known] += weight * flat[:, neighbour[is_known]].T
    rows.append(np.arange(unknown.size))
    cols.append(np.arange(unknown.size))
    values.append(diagonal)
    a = sparse.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(unknown.size, unknown.size),
    )
    solution = linalg.spsolve(a, b).reshape(unknown.size, c)
    out = flat.copy()
    out[:, unknown] = solution.T
    return out.reshape(c, h, w)


def masks(n: int, size: int, seed: int, steps: str) -> torch.Tensor:
    """Removal masks of completeness (by value) and/or soundness (by area) for random maps."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size * size, generator=generator)
    out = []
    if steps in ("both", "completeness"):
        top = maps.max(dim=1, keepdim=True).values
        out += [maps > (1 - t) * top for t in DEFAULT_COMPLETENESS_THRESHOLDS]
    if steps in ("both", "soundness"):
        ranks = maps.argsort(dim=1).argsort(dim=1)
        out += [ranks < int(size * size * r) for r in DEFAULT_SOUNDNESS_RATIOS]
    return torch.stack(out, dim=1).view(n * len(out), size, size)


def run(n: int, size: int, steps: str, scipy_limit: int | None) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=generator)
    removed = masks(n, size, 1, steps)
    repeats = removed.shape[0] // n
    stacked = images.repeat_interleave(repeats, dim=0)
    start = time.perf_counter()
    ours = road_imputation(stacked, removed, noise=0.0, solver="direct")
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    chunk = 256 if size <= 64 else 16
    cg = torch.cat(
        [
            road_imputation(stacked[i : i + chunk], removed[i : i + chunk], noise=0.0, solver="cg")
            for i in range(0, stacked.shape[0], chunk)
        ]
    )
    cg_s = time.perf_counter() - start
    count = stacked.shape[0] if scipy_limit is None else min(scipy_limit, stacked.shape[0])
    # an even spread of the (image, step) pairs when only some are solved by scipy
    picked = np.linspace(0, stacked.shape[0] - 1, count).round().astype(int)
    start = time.perf_counter()
    reference = [scipy_imputation(stacked[i].double().numpy(), removed[i].numpy()) for i in picked]
    scipy_s = (time.perf_counter() - start) * stacked.shape[0] / count
    cg_difference = float((cg - ours).abs().max())
    difference = max(
        float(np.abs(ours[i].double().numpy() - r).max()) for i, r in zip(picked, reference)
    )
    return {
        "images": n,
        "size": size,
        "steps": steps,
        "systems": int(stacked.shape[0]),
        "scipy_systems_timed": int(count),
        "ours_direct_batched_s": round(ours_s, 2),
        "ours_cg_s": round(cg_s, 2),
        "scipy_per_image_s": round(scipy_s, 2),
        "speedup_direct": round(scipy_s / ours_s, 2),
        "speedup_cg": round(scipy_s / cg_s, 2),
        "max_abs_difference_direct": difference,
        "max_abs_difference_cg_vs_direct": cg_difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = (
        [run(16, 28, "both", None)]
        if args.quick
        else [run(64, 28, "both", None), run(2, 224, "completeness", None)]
    )
    print(json.dumps({"benchmark": "road_imputation", "torch": torch.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
