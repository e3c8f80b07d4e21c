"""Half-precision models (``model.half()``, ``model.to(torch.bfloat16)``) in the generator
training, the sanity checks and ``masking_score``.

Before: NetworkInversion trained its generator, and Adam, in the model's float16 (Adam's
``eps`` = 1e-8 is 0 in float16): after one step 15 of the bundled generator's parameters were
inf or NaN and its samples NaN, without a warning, and the next fit blamed the learning rate.
``model_randomisation``, ``class_sensitivity``, ``weight_gradient_norm`` and
``perturbed_kl_ce`` gave float32 images to a half-precision model, which torch refuses
("Input type (float) and bias type (c10::Half) should be the same"), although the explainers
they call cast them (docs/conventions.md). ``masking_score`` ran its unmasked forward on the
images' dtype but its masked one on the float32 heatmap's: float16 images of a float32 model
were scored with an explicit target and refused without one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.attr import GradCAM
from captum_ext.inversion import (
    ConditionedGenerator,
    NetworkInversion,
    one_hot_vectors,
    perturbed_kl_ce,
    weight_gradient_norm,
)
from captum_ext.metrics import class_sensitivity, masking_score, model_randomisation

HALF = [torch.float16, torch.bfloat16]
SHAPE, CLASSES = (3, 8, 8), 5


def _twins(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A small conv net in float32 and its copy in ``dtype``."""
    model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    return model, copy.deepcopy(model).to(dtype)


def _inversion(model: nn.Module, **kwargs) -> NetworkInversion:
    options = {"input_shape": SHAPE, "batch_size": 8, "seed": 1, "latent_dim": 8, **kwargs}
    return NetworkInversion(model, preprocess=(0.5, 0.25), **options)


# ----------------------------------------------------------------- NetworkInversion


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_inverting_a_half_model_keeps_a_float32_generator(dtype):
    _, model = _twins(dtype)
    before = model_snapshot(model)
    inversion = _inversion(model)
    history = inversion.fit(3, progress=False)
    assert all(math.isfinite(value) for value in history["loss"])
    for name, param in inversion.generator.named_parameters():
        assert param.dtype == torch.float32, name
        assert bool(torch.isfinite(param).all()), name
    for state in inversion.optimizer.state.values():  # Adam's moments: float32 too
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    images, pixels = inversion.sample(torch.arange(CLASSES), generator=0, return_pixels=True)
    # the samples as the model takes them: in its dtype, finite
    assert images.dtype == pixels.dtype == dtype
    assert bool(torch.isfinite(images).all()) and bool(torch.isfinite(pixels).all())
    assert inversion.sample(torch.arange(0)).dtype == dtype
    assert model(images).dtype == dtype  # runs on the model as it is
    assert_model_unchanged(model, before)  # the model keeps its dtype and state


@pytest.mark.parametrize("preset", ["inversion", "reconstruction"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_half_model_loss_trajectory_follows_its_float32_twin(dtype, preset):
    """Same generator initialisation and draws: the half model's losses differ from the
    float32 model's by its rounding only (the reconstruction preset's second half adds the
    perturbed KL/CE and the weight-gradient norm, which call the model themselves)."""
    full, half = _twins(dtype)
    expected = _inversion(full, preset=preset).fit(6, progress=False)
    got = _inversion(half, preset=preset).fit(6, progress=False)
    for key in ("loss", "kl", "ce", "perturbed", "weight_gradient"):
        want, have = torch.tensor(expected[key]), torch.tensor(got[key])
        torch.testing.assert_close(have, want, rtol=0.01, atol=0.02, equal_nan=True)
    if preset == "reconstruction":
        assert math.isfinite(got["weight_gradient"][-1]) and math.isfinite(got["perturbed"][-1])


def test_a_float16_generator_net_of_a_half_model_is_trained_in_float32():
    _, model = _twins(torch.float16)
    torch.manual_seed(0)
    generator = ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=8).half()
    inversion = NetworkInversion(model, generator, batch_size=4, seed=1)
    assert inversion.generator is generator
    assert all(p.dtype == torch.float32 for p in generator.parameters())
    inversion.fit(2, progress=False)
    # converted back to half after a fit: the next fit trains it in float32 again
    generator.half()
    history = inversion.fit(2, progress=False)
    assert all(math.isfinite(value) for value in history["loss"])
    assert all(p.dtype == torch.float32 for p in generator.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in generator.parameters())


def test_a_half_model_refused_for_a_half_generator_is_advised_float32():
    """Adam in float16 is what the fix avoids: the advice is float32, not the model's
    dtype."""
    _, model = _twins(torch.float16)
    inversion = _inversion(model)
    inversion.generator.half()
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*torch\.float16") as raised:
        inversion.model = copy.deepcopy(model).to(torch.bfloat16)
    assert "inversion.generator.float()" in str(raised.value)


def test_a_model_converted_to_half_after_the_generator_was_built():
    model, _ = _twins(torch.float16)
    inversion = _inversion(model)
    inversion.fit(1, progress=False)
    model.half()
    history = inversion.fit(2, progress=False)
    assert all(math.isfinite(value) for value in history["loss"])
    assert next(inversion.generator.parameters()).dtype == torch.float32
    assert inversion.sample(torch.arange(3)).dtype == torch.float16


def test_a_half_model_inversion_resumes_bit_for_bit(tmp_path, monkeypatch):
    _, model = _twins(torch.float16)
    reference = _inversion(copy.deepcopy(model))
    expected = reference.fit(4, progress=False, checkpoint=tmp_path / "a.pt", checkpoint_every=2)
    saved = torch.load(tmp_path / "a.pt", weights_only=False)
    assert all(
        v.dtype == torch.float32 for v in saved["generator"].values() if v.is_floating_point()
    )

    interrupted = _inversion(copy.deepcopy(model))
    record, calls = NetworkInversion._record, []

    def stop_at_step_three(self, *args):
        record(self, *args)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(NetworkInversion, "_record", stop_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(4, progress=False, checkpoint=tmp_path / "b.pt", checkpoint_every=2)
    monkeypatch.undo()
    resumed = interrupted.fit(
        4, progress=False, checkpoint=tmp_path / "b.pt", checkpoint_every=2, resume=True
    )
    for key in expected:
        torch.testing.assert_close(
            torch.tensor(resumed[key]), torch.tensor(expected[key]), rtol=0, atol=0, equal_nan=True
        )
    for got, want in zip(interrupted.generator.parameters(), reference.generator.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------- inversion losses


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_weight_gradient_norm_casts_float32_images_for_a_half_model(dtype):
    full, half = _twins(dtype)
    images = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    before = model_snapshot(half)
    got = weight_gradient_norm(half, images.requires_grad_(), labels)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got))
    (gradient,) = torch.autograd.grad(got, images)  # through the cast, to the float32 images
    assert gradient.dtype == torch.float32 and bool(torch.isfinite(gradient).all())
    expected = weight_gradient_norm(full, images.detach(), labels)
    torch.testing.assert_close(got.detach(), expected, rtol=0.1, atol=1e-3)
    assert_model_unchanged(half, before)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_perturbed_kl_ce_casts_float32_pixels_for_a_half_model(dtype):
    full, half = _twins(dtype)
    pixels = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    conditioning = one_hot_vectors(torch.arange(4), CLASSES)
    got = perturbed_kl_ce(half.eval(), pixels, conditioning, generator=1)
    expected = perturbed_kl_ce(full.eval(), pixels, conditioning, generator=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)


# ----------------------------------------------------------------- sanity checks


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_model_randomisation_of_a_half_model_on_float32_images(dtype, bundled_model, sample_digits):
    x = sample_digits[0][:2]  # float32
    half = copy.deepcopy(bundled_model).to(dtype)
    before = model_snapshot(half)
    result = model_randomisation(
        lambda m: GradCAM(m, "features.7"), half, x, target=3, layers=["classifier"]
    )
    assert result.layers == ["classifier"]
    assert bool(torch.isfinite(result.original).all())
    assert all(bool(torch.isfinite(v).all()) for v in result.similarity.values())
    # the default target: the prediction of the model in its own dtype
    default = model_randomisation(
        lambda m: GradCAM(m, "features.7"), half, x, layers=["features.6"]
    )
    assert default.layers == ["features.6"] and default.original.shape == (2, 1, 28, 28)
    assert_model_unchanged(half, before)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_class_sensitivity_of_a_half_model_on_float32_images(dtype, bundled_model, sample_digits):
    x = sample_digits[0][:4]  # float32
    half = copy.deepcopy(bundled_model).to(dtype)
    before = model_snapshot(half)
    result = class_sensitivity(lambda m: GradCAM(m, "features.7"), half, x)
    with torch.no_grad():
        logits = half(x.to(dtype)).float()
    assert torch.equal(result.target, logits.argmax(dim=1))
    others = logits.scatter(1, result.target[:, None], -math.inf)
    assert torch.equal(result.contrast, others.argmax(dim=1))  # the runner-up
    assert all(bool(torch.isfinite(v).all()) for v in result.similarity.values())
    assert_model_unchanged(half, before)


# ----------------------------------------------------------------- masking_score


def _heat(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_masking_score_feeds_the_model_one_dtype_with_or_without_a_target(
    bundled_model, sample_digits
):
    """float16 images of a model that casts them itself: the masked images were float32
    (promoted by the heatmap) but the unmasked ones float16."""
    x = sample_digits[0][:3].half()
    seen: list[torch.dtype] = []

    def forward(images):
        seen.append(images.dtype)
        return bundled_model(images.float())

    chosen = masking_score(forward, x, _heat(3))
    dtypes_without_target = list(seen)
    seen.clear()
    given = masking_score(forward, x, _heat(3), target=forward(x).argmax(dim=1))
    assert dtypes_without_target == [torch.float16, torch.float16]
    assert seen == [torch.float16, torch.float16]  # the argmax forward, the masked one
    assert torch.equal(chosen, given)


def test_masking_score_of_float16_images_on_a_float32_model_is_refused_alike(
    bundled_model, sample_digits
):
    """With or without a target (as deletion and insertion): torch's error with the note that
    names both dtypes."""
    x = sample_digits[0][:2].half()
    messages = []
    for target in (None, torch.tensor([3, 1])):
        with pytest.raises(RuntimeError) as raised:
            masking_score(bundled_model, x, _heat(2), target=target)
        notes = " ".join(getattr(raised.value, "__notes__", []) or [str(raised.value)])
        assert "torch.float16" in notes and "torch.float32" in notes
        messages.append(str(raised.value).splitlines()[0])
    assert messages[0] == messages[1]


@pytest.mark.parametrize("images_dtype", ["own", "float32"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_masking_score_of_a_half_model_target_none_equals_its_argmax(
    dtype, images_dtype, bundled_model, sample_digits
):
    half = copy.deepcopy(bundled_model).to(dtype)
    x = sample_digits[0][:4]
    x = x.to(dtype) if images_dtype == "own" else x
    with torch.no_grad():
        predicted = half(x.to(dtype)).argmax(dim=1)
    for score in ("probability", "correct"):
        chosen = masking_score(half, x, _heat(4), score=score)
        given = masking_score(half, x, _heat(4), target=predicted, score=score)
        assert torch.equal(chosen, given)
        assert bool(torch.isfinite(chosen).all())
