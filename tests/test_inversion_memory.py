"""Inversion memory: O(batch x (K + pixels + activations)), never K^2 per example (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, model_snapshot
from torch import nn

from captum_ext.inversion import ConditionedGenerator, hot_matrices
from captum_ext.inversion.generator import (
    InversionCost,
    available_memory_bytes,
    estimate_inversion_cost,
)

ROOT = Path(__file__).resolve().parents[1]


def _full_hot_matrices_f64(labels: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's construction, by hand: row k and column k of a K x K zero matrix."""
    m = torch.zeros(labels.shape[0], 1, k, k, dtype=torch.float64)
    for i, label in enumerate(labels.tolist()):
        m[i, 0, label, :] = 1
        m[i, 0, :, label] = 1
    return m


@pytest.mark.parametrize("k, size", [(5, 5), (7, 3), (13, 5), (50, 17), (100, 64), (37, 64)])
def test_resized_hot_matrices_equal_the_resized_full_construction(k, size):
    labels = torch.arange(k)
    full = _full_hot_matrices_f64(labels, k)
    expected = F.interpolate(full, size=(size, size), mode="area")
    got = hot_matrices(labels, k, dtype=torch.float64, size=size)
    assert got.shape == (k, 1, size, size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    if size == k:
        assert torch.equal(got, full)


def test_generator_works_at_a_capped_size_for_many_classes():
    g = ConditionedGenerator(1000, (3, 32, 32), latent_dim=8, width=8).double()
    assert g.matrix_size == 64
    labels = torch.tensor([0, 499, 999])
    vectors, matrices = g.conditioning_for(labels, generator=torch.Generator().manual_seed(0))
    assert matrices.shape == (3, 1, 64, 64)  # was 3 x 1 x 1000 x 1000
    g.eval()
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = g(z, vectors.double(), matrices.double())
        # full K x K matrices are still accepted and give the same images
        full = g(z, vectors.double(), _full_hot_matrices_f64(labels, 1000))
    assert out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out, full, rtol=0, atol=1e-12)


def test_generator_unchanged_up_to_max_matrix_size():
    """Up to max_matrix_size classes the generator is the paper's K x K one."""
    for k in (10, 37, 64):
        g = ConditionedGenerator(k, (1, 28, 28), latent_dim=6, width=8).double().eval()
        assert g.matrix_size == k
        labels = torch.arange(4) % k
        torch.manual_seed(0)
        z = torch.randn(4, 6, dtype=torch.float64)
        vectors = torch.softmax(torch.randn(4, k, dtype=torch.float64), 1)
        with torch.no_grad():
            got = g(z, vectors, g.hot_matrices(labels, dtype=torch.float64))
            want = g(z, vectors, _full_hot_matrices_f64(labels, k))
        assert torch.equal(got, want)


def test_max_matrix_size_is_validated():
    with pytest.raises(ValueError, match="`max_matrix_size`"):
        ConditionedGenerator(10, max_matrix_size=1)
    with pytest.raises(ValueError, match="`size`"):
        hot_matrices(torch.tensor([0]), 4, size=0)


def _thousand_class_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 1000),
    ).eval()


def test_estimate_inversion_cost_scales_with_the_batch_and_leaves_the_model():
    model = _thousand_class_net()
    snap = model_snapshot(model)
    small = estimate_inversion_cost(model, (3, 32, 32), batch_size=8, steps=5)
    large = estimate_inversion_cost(model, (3, 32, 32), batch_size=64, steps=10)
    assert_model_unchanged(model, snap)
    assert isinstance(small, InversionCost)
    assert small.num_classes == 1000 and small.matrix_size == 64
    assert small.per_example_bytes == large.per_example_bytes
    assert large.bytes - small.bytes == 2 * 56 * large.per_example_bytes
    # at least the working feature map (width 64 + 1 matrix channel, 64 x 64, float32)
    assert large.per_example_bytes >= 65 * 64 * 64 * 4
    # and far below the K x K map of the paper's construction (64 x 1000 x 1000 floats)
    assert large.per_example_bytes < 64 * 1000 * 1000 * 4 / 10
    assert large.seconds > 0 and "batch 64" in large.describe()
    assert large.fits(10**15) and not large.fits(1000)
    assert available_memory_bytes() is None or available_memory_bytes() > 0


def test_estimate_inversion_cost_validates():
    with pytest.raises(TypeError, match="`model`"):
        estimate_inversion_cost(lambda x: x, (3, 8, 8))
    with pytest.warns(DeprecationWarning, match="`classifier` is renamed `model`"):
        cost = estimate_inversion_cost(classifier=_thousand_class_net(), input_shape=(3, 8, 8))
    assert cost.bytes > 0
    with pytest.raises(ValueError, match="`batch_size`"):
        estimate_inversion_cost(_thousand_class_net(), (3, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match="`probe_bytes`"):
        estimate_inversion_cost(_thousand_class_net(), (3, 8, 8), probe_bytes=0)


CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from captum_ext.inversion import NetworkInversion

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    base = status("VmSize")  # torch alone maps a few GB of address space
    budget = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (base + budget, base + budget))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 1000),
    ).eval()
    inversion = NetworkInversion(model, input_shape=(3, 32, 32), batch_size=64, seed=0)
    inversion.fit(2, progress=False)
    images = inversion.sample(torch.arange(0, 1000, 50), generator=0)
    assert images.shape == (20, 3, 32, 32)
    print("peak address space beyond the import:", status("VmPeak") - base)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_thousand_class_inversion_runs_under_a_memory_limit():
    """A 1000-class model, batch 64, 32 x 32 inputs, under 2 GiB of address space beyond
    the import of torch (measured peak about 0.7 GB; the K x K construction asked for
    16.4 GB at once: 64 x 64 channels x 1000 x 1000 floats)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(2 * 2**30)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak address space" in done.stdout


def test_cost_estimate_names_a_bad_input_shape_and_memory_of_unknown_devices_is_none():
    """estimate_inversion_cost ran the model on the shape unchecked: torch's "Given groups=1,
    weight of size [16, 1, 3, 3] ..." for 3 channels, "Output size is too small" for (1, 5).
    available_memory_bytes("cuda") without a driver raised, and "meta" reported the CPU's
    memory; both are unknown (None), as documented."""
    from captum_ext.bundled import load_bundled_model

    model = load_bundled_model()
    with pytest.raises(ValueError, match=r"`input_shape` \(3, 28, 28\): the model fails"):
        estimate_inversion_cost(model, (3, 28, 28))
    with pytest.raises(ValueError, match=r"`input_shape` must be \(C, H, W\)"):
        estimate_inversion_cost(model, (1, 5))
    assert available_memory_bytes("meta") is None
    if not torch.cuda.is_available():
        assert available_memory_bytes("cuda") is None
    assert available_memory_bytes("cpu") is None or available_memory_bytes("cpu") > 0
