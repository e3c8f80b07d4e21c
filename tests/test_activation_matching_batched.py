"""ActivationMatchingMask per-image mode fitted several images at once (``batch_size``):
each image keeps its own mask net, seeds and Adam state, so the masks equal a one-by-one fit
written out here with plain modules and one Adam per image."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_ext._utils.seeding import content_keys
from captum_ext.attr import ActivationMatchingMask, MaskLossWeights
from captum_ext.attr._activation_matching_loss import Reference, mask_objective
from captum_ext.attr._activation_matching_training import derived_seed
from captum_ext.attr._mask_net import build_mask_net
from captum_ext.bundled import BUNDLED_MASK_LAYERS

TINY_LAYERS = ["features.1", "features.3", "head"]
# every term on, the robustness term too, so that the per-image backgrounds matter
ALL_TERMS = MaskLossWeights(1.0, 2.0, 0.5, 5.0, 0.3, 2.0, 1.0, nec=0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_images(n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64)


def one_by_one(explainer, x, steps, lr, seed, attempt=0):
    """The per-image fit written out: one fresh net and one Adam per image, the image's own
    loss only. Returns the probabilities after the last step (``keep="last"``) and those of
    ``keep="best"``: the step with the lowest loss among those whose hard mask is non-empty
    and keeps the class (the later one on ties), else the last. ``attempt`` > 0: the seeds
    of that restart."""
    extra = (attempt,) if attempt else ()
    model, layers = explainer.forward_func, explainer.layers
    baseline = explainer._baseline_for(x)
    out, best_out = [], []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        (key,) = content_keys(xi)  # the image's seeds come from its pixels, not its index
        with torch.no_grad():
            explainer_ref = explainer._reference(xi)
        target = explainer_ref.logits.argmax(1)
        net = build_mask_net(
            x.shape[1],
            x.shape[2],
            x.shape[3],
            generator=torch.Generator().manual_seed(derived_seed(seed, key, 0, *extra)),
            dtype=x.dtype,
        )
        optimiser = torch.optim.Adam(net.parameters(), lr=lr)
        noise_gen = torch.Generator().manual_seed(derived_seed(seed, key, 1, *extra))
        best, best_loss = None, math.inf
        for _ in range(steps):
            noise = torch.randn(xi.shape, generator=noise_gen, dtype=x.dtype)
            probabilities = torch.sigmoid(net(xi))
            loss, _, _ = mask_objective(
                model,
                layers,
                explainer.layer_weights,
                explainer.weights,
                xi,
                probabilities,
                target,
                Reference(explainer_ref.logits, explainer_ref.activations),
                baseline,
                noise,
                explainer.necessity_margin,
            )
            with torch.no_grad():
                mask = (probabilities > 0.5).to(x.dtype)
                kept = model(mask * xi + (1 - mask) * baseline).argmax(1) == target
            if bool(kept) and bool(mask.any()) and float(loss.detach()) <= best_loss:
                best, best_loss = probabilities.detach().clone(), float(loss.detach())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            out.append(torch.sigmoid(net(xi)))
        best_out.append(out[-1] if best is None else best)
    model.zero_grad(set_to_none=True)
    return torch.cat(out), torch.cat(best_out)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_batched_per_image_equals_a_one_by_one_fit_written_out(batch_size):
    model = make_tiny_cnn().eval()
    x = tiny_images(5)
    explainer = ActivationMatchingMask(model, TINY_LAYERS, weights=ALL_TERMS, baseline=-0.3)
    kwargs = dict(mode="per_image", steps=8, lr=5e-2, seed=4, batch_size=batch_size, restarts=0)
    last = explainer.attribute(x, keep="last", return_details=True, progress=False, **kwargs)
    best = explainer.attribute(x, keep="best", return_details=True, progress=False, **kwargs)
    expected_last, expected_best = one_by_one(explainer, x, steps=8, lr=5e-2, seed=4)
    assert torch.allclose(last.probabilities, expected_last, rtol=0, atol=1e-10)
    assert torch.equal(last.mask, (expected_last > 0.5).to(x.dtype))
    assert torch.allclose(best.probabilities, expected_best, rtol=0, atol=1e-10)
    # the test has teeth: the best iterate differs from the last for some image
    assert not torch.equal(expected_best > 0.5, expected_last > 0.5)


def test_batched_per_image_keeps_each_images_own_best_iterate_on_the_bundled_model(
    bundled_model, bundled_digits
):
    model = bundled_model.double()
    try:
        x = bundled_digits[0][:4].double()
        explainer = ActivationMatchingMask(model, list(BUNDLED_MASK_LAYERS), weights="sparse")
        kwargs = dict(mode="per_image", steps=12, seed=1, return_details=True, progress=False)
        alone = explainer.attribute(x, batch_size=1, **kwargs)
        together = explainer.attribute(x, batch_size=3, **kwargs)
        assert torch.allclose(alone.probabilities, together.probabilities, rtol=0, atol=1e-9)
        assert torch.equal(alone.mask, together.mask)
        assert torch.equal(alone.agreement, together.agreement)
        # each image alone: the same as its row of the batch
        first = explainer.attribute(x[:1], batch_size=4, **kwargs)
        assert torch.allclose(first.probabilities, together.probabilities[:1], atol=1e-9)
    finally:
        model.float()


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(1, 5), batch_size=st.integers(1, 6), seed=st.integers(0, 50))
def test_chunking_never_changes_the_masks(n, batch_size, seed):
    model = make_tiny_cnn().eval()
    x = tiny_images(n, seed=seed)
    explainer = ActivationMatchingMask(model, TINY_LAYERS, weights=ALL_TERMS)
    kwargs = dict(mode="per_image", steps=3, lr=1e-2, seed=seed, progress=False)
    a = explainer.attribute(x, batch_size=1, return_details=True, **kwargs)
    b = explainer.attribute(x, batch_size=batch_size, return_details=True, **kwargs)
    assert torch.allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-10)
    assert b.mask.shape == (n, 1, 8, 8)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_restarts_refit_exactly_the_images_whose_fit_fails(batch_size):
    """A restart refits an image whose returned hard mask is empty or changes the class, with
    that attempt's seeds (written out by ``one_by_one``), and leaves the others untouched;
    ``fits`` counts the fits per image."""
    model = make_tiny_cnn().eval()
    x = tiny_images(5)
    explainer = ActivationMatchingMask(model, TINY_LAYERS, weights=ALL_TERMS, baseline=-0.3)
    kwargs = dict(mode="per_image", steps=8, lr=5e-2, seed=4, batch_size=batch_size)
    kwargs.update(return_details=True, progress=False)
    first = explainer.attribute(x, restarts=0, **kwargs)
    again = explainer.attribute(x, restarts=2, **kwargs)
    failed = ~(first.agreement & first.mask.flatten(1).any(1))
    assert failed.any() and not failed.all()  # the test has teeth
    assert torch.equal(first.fits, torch.ones(5, dtype=torch.long))
    assert torch.equal(again.fits > 1, failed)
    assert int(again.fits.max()) <= 3
    assert torch.equal(again.probabilities[~failed], first.probabilities[~failed])
    for attempt in (1, 2):
        rows = again.fits == attempt + 1
        if rows.any():
            _, expected = one_by_one(explainer, x, steps=8, lr=5e-2, seed=4, attempt=attempt)
            assert torch.allclose(again.probabilities[rows], expected[rows], rtol=0, atol=1e-10)
    # an image that needed a restart but not the last one kept its class
    settled = again.fits < 3
    assert bool((again.agreement & again.mask.flatten(1).any(1))[settled].all())


def test_restarts_rescue_collapsed_fits_on_the_bundled_model(bundled_model, bundled_digits):
    """On the confident bundled model some initialisations collapse to an empty mask in the
    first steps (the sigmoid saturates). The first seed with such a fit is searched for (which
    seeds collapse can depend on the CPU's rounding); restarts refit exactly the failed
    images, more digits keep their class, and every image that did not use its last attempt
    keeps it."""
    x = bundled_digits[0][:12]
    explainer = ActivationMatchingMask(bundled_model, list(BUNDLED_MASK_LAYERS), weights="sparse")
    kwargs = dict(mode="per_image", steps=25, batch_size=12, return_details=True, progress=False)
    for seed in range(12):
        first = explainer.attribute(x, restarts=0, seed=seed, **kwargs)
        kept_first = first.agreement & first.mask.flatten(1).any(1)
        if not kept_first.all():
            break
    else:
        pytest.fail("no first fit failed at seeds 0-11 (about 1 in 12 images fails per seed)")
    again = explainer.attribute(x, restarts=3, seed=seed, **kwargs)
    kept_again = again.agreement & again.mask.flatten(1).any(1)
    assert torch.equal(again.fits > 1, ~kept_first)
    assert int(kept_again.sum()) > int(kept_first.sum())
    assert bool(kept_again[again.fits < 4].all())


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_restarts_names_the_argument(value, error):
    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    with pytest.raises(error, match="`restarts`"):
        explainer.attribute(tiny_images(2), mode="per_image", steps=1, restarts=value)


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_batch_size_names_the_argument(value, error):
    explainer = ActivationMatchingMask(make_tiny_cnn(), TINY_LAYERS)
    with pytest.raises(error, match="`batch_size`"):
        explainer.attribute(tiny_images(2), mode="per_image", steps=1, batch_size=value)


def test_batched_per_image_leaves_the_model_as_it_was():
    model = make_tiny_cnn().eval()
    before = model_snapshot(model)
    explainer = ActivationMatchingMask(model, TINY_LAYERS, weights=ALL_TERMS)
    explainer.attribute(tiny_images(3), mode="per_image", steps=2, batch_size=3, progress=False)
    assert_model_unchanged(model, before)


def test_an_images_mask_and_read_outs_do_not_depend_on_the_batch_around_it():
    """Per-image seeds came from the image's index in the call: the same image got another
    mask alone (182 of 784 pixels differed on the bundled model) or in a reversed batch, and
    the sufficiency backgrounds were one draw for the whole batch (0.72 in a batch, 0.75
    alone). Both now come from the image's own pixels and the seed."""
    model = make_tiny_cnn().eval()
    x = tiny_images(4, seed=3)
    explainer = ActivationMatchingMask(model, TINY_LAYERS, weights=ALL_TERMS)
    kwargs = dict(mode="per_image", steps=4, lr=1e-2, seed=2, progress=False)
    kwargs.update(return_details=True, sufficiency_samples=16)
    batch = explainer.attribute(x, **kwargs)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = explainer.attribute(x[order], **kwargs)
    alone = explainer.attribute(x[2:3], **kwargs)
    torch.testing.assert_close(
        shuffled.probabilities, batch.probabilities[order], rtol=0, atol=1e-10
    )
    torch.testing.assert_close(alone.probabilities[0], batch.probabilities[2], rtol=0, atol=1e-10)
    assert torch.equal(shuffled.sufficiency, batch.sufficiency[order])
    assert torch.equal(alone.sufficiency[0], batch.sufficiency[2])
    other = explainer.attribute(x, **{**kwargs, "seed": 3})
    assert not torch.equal(other.probabilities, batch.probabilities)  # the seed still counts


def test_batch_size_one_fits_each_image_exactly_as_alone():
    """The reference activations came from one forward pass of the whole call, so in
    float32 an image's mask moved with the other images even with batch_size=1 (Adam's
    steps amplify the last-bit differences of the batched convolution: up to 31 pixels of a
    bundled digit's mask). Each chunk's reference is its own forward pass now."""
    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits

    model = load_bundled_model()
    images, labels = load_sample_digits()
    x, y = images[[3, 17, 30]], labels[[3, 17, 30]]
    explainer = ActivationMatchingMask(model, ["features.7"])

    def fit(rows):
        return explainer.attribute(
            x[rows], target=y[rows], mode="per_image", steps=40, seed=0, batch_size=1,
            restarts=0, progress=False,
        )  # fmt: skip

    together = fit([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(fit([i]), together[[i]], rtol=0, atol=0)
