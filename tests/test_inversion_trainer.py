"""NetworkInversion: the classifier left unchanged, presets, checkpoints and resume,
sampling, errors, 2 gloo processes, a real fit on the bundled model (slow) and CUDA."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from _distributed import run_gloo
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch import nn

from captum_ext.bundled import BUNDLED_INVERSION_OPTIONS, load_bundled_model
from captum_ext.data import normalize_digits
from captum_ext.inversion import (
    LOSS_TERMS,
    PRESETS,
    ConditionedGenerator,
    NetworkInversion,
)

SHAPE = (3, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


CLASSES = 5


def tiny_classifier() -> nn.Module:
    model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    model.train()  # the trainer must freeze it in eval mode and give back train mode
    model.features[0].bias.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    return model


def tiny_generator(conditioning: str = "vector_matrix", seed: int = 0) -> ConditionedGenerator:
    torch.manual_seed(seed)
    return ConditionedGenerator(
        CLASSES, SHAPE, latent_dim=8, conditioning=conditioning, width=8, preprocess=(0.5, 0.25)
    )


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.state_dict().items()}


class Flaky(nn.Module):
    """Wraps a classifier and raises on the ``fail_at``-th forward call."""

    def __init__(self, inner: nn.Module, fail_at: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.inner(x)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fit_trains_the_generator_and_leaves_the_classifier_unchanged(preset):
    model = tiny_classifier()
    before = model_snapshot(model)
    generator = tiny_generator(PRESETS[preset]["conditioning"])
    start = params_of(generator)
    inversion = NetworkInversion(model, generator, preset=preset, batch_size=6, seed=3)
    history = inversion.fit(4, progress=False)
    assert_model_unchanged(model, before)
    assert any(not torch.equal(start[k], v) for k, v in params_of(generator).items())
    assert history["step"] == [1, 2, 3, 4]
    assert set(history) == {"step", "phase", "loss", *LOSS_TERMS}
    phases = PRESETS[preset]["phases"]
    expected_phase = [0, 0, 1, 1] if len(phases) == 2 else [0] * 4
    assert history["phase"] == expected_phase
    for step in range(4):
        weights = phases[history["phase"][step]]["weights"]
        total = 0.0
        for name in LOSS_TERMS:
            value = history[name][step]
            assert math.isnan(value) == (weights.get(name, 0) == 0), (name, step)
            if not math.isnan(value):
                total += weights[name] * value
        assert history["loss"][step] == pytest.approx(total, rel=1e-5)
    assert generator.training  # the generator's own mode is restored (train by default)


def test_classifier_unchanged_when_fit_raises():
    model = tiny_classifier()
    before = model_snapshot(model)
    flaky = Flaky(model, fail_at=5)  # probes use 2 calls; fails inside the second step
    inversion = NetworkInversion(flaky, tiny_generator(), preset="reconstruction", batch_size=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        inversion.fit(4, progress=False)
    assert_model_unchanged(model, before)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    path = tmp_path / "ckpt" / "inversion.pt"
    reference = NetworkInversion(
        tiny_classifier(), tiny_generator(), preset="reconstruction", batch_size=4, seed=1
    )
    full = reference.fit(8, progress=False)

    flaky = Flaky(tiny_classifier(), fail_at=None)
    first = NetworkInversion(flaky, tiny_generator(), preset="reconstruction", batch_size=4, seed=1)
    # each reconstruction step calls the classifier 3 times in phase 2 (clean, perturbed,
    # weight gradient) and once in phase 1: step 6 is in phase 2
    flaky.fail_at = flaky.calls + 4 + 3 + 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit(8, progress=False, checkpoint=path, checkpoint_every=2)
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name != path.name]
    state = torch.load(path, weights_only=True)
    assert state["fit_step"] == 4

    second = NetworkInversion(
        tiny_classifier(), tiny_generator(seed=99), preset="reconstruction", batch_size=4, seed=1
    )
    resumed = second.fit(8, progress=False, checkpoint=path, resume=True)
    for name, value in params_of(reference.generator).items():
        assert torch.equal(value, params_of(second.generator)[name]), name
    assert resumed["step"] == full["step"]
    for key in ("loss", *LOSS_TERMS):
        assert resumed[key] == pytest.approx(full[key], nan_ok=True, rel=0, abs=0), key
    # a different `steps` cannot resume that fit
    with pytest.raises(ValueError, match="`steps`"):
        NetworkInversion(tiny_classifier(), tiny_generator(), preset="reconstruction").fit(
            6, progress=False, checkpoint=path, resume=True
        )


def _interrupted_at_step_4(path, seed: int = 0) -> None:
    """An 8-step reconstruction fit (batch 4) that crashes in step 6, checkpointed at 4."""
    flaky = Flaky(tiny_classifier(), fail_at=None)
    first = NetworkInversion(
        flaky, tiny_generator(), preset="reconstruction", batch_size=4, seed=seed
    )
    flaky.fail_at = flaky.calls + 4 + 3 + 2  # step 6 is in phase 2 (3 calls a step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit(8, progress=False, checkpoint=path, checkpoint_every=2)


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"lr": 1e-5}, "`lr`=1e-05 (the checkpoint's: 0.001)"),
        ({"betas": (0.9, 0.99)}, "`betas`=(0.9, 0.99) (the checkpoint's: (0.5, 0.999))"),
        ({"seed": 99}, "`seed`=99 (the checkpoint's: 1)"),
        ({"batch_size": 6}, "`batch_size`=6 (the checkpoint's: 4)"),
    ],
)
def test_resume_refuses_other_settings_instead_of_taking_the_checkpoints(tmp_path, settings, named):
    """The optimiser's saved state brought the old learning rate and betas back, and the
    saved random state the old seed's draws: `NetworkInversion(lr=1e-5)` resumed at 1e-3
    (the lr a FloatingPointError tells the user to lower), without a word."""
    path = tmp_path / "inversion.pt"
    _interrupted_at_step_4(path, seed=1)
    options = {"preset": "reconstruction", "batch_size": 4, "seed": 1, **settings}
    other = NetworkInversion(tiny_classifier(), tiny_generator(), **options)
    before = params_of(other.generator)
    with pytest.raises(ValueError, match=re.escape(named)):
        other.fit(8, progress=False, checkpoint=path, resume=True)
    assert all(torch.equal(v, params_of(other.generator)[k]) for k, v in before.items())


def test_a_checkpoint_of_another_generator_width_is_named_and_loads_nothing(tmp_path):
    """torch's bare "Error(s) in loading state_dict" named neither `checkpoint` nor what
    differs, after copying every tensor that fitted."""
    path = tmp_path / "inversion.pt"
    _interrupted_at_step_4(path)
    wider = ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=12, preprocess=(0.5, 0.25))
    before = params_of(wider)
    with pytest.raises(ValueError, match=r"`checkpoint` belongs to another architecture"):
        NetworkInversion(tiny_classifier(), wider, preset="reconstruction", batch_size=4).fit(
            8, progress=False, checkpoint=path, resume=True
        )
    assert all(torch.equal(v, params_of(wider)[k]) for k, v in before.items())


def test_a_checkpoint_of_other_images_is_not_resumed(tmp_path):
    """A 3 x 8 x 8 fit's checkpoint was resumed by an inversion of 3 x 7 x 7 images without a
    word (its weights have the same shapes), and by a 1-channel one with torch's "size
    mismatch" error."""
    path = tmp_path / "inversion.pt"
    _interrupted_at_step_4(path)
    other = ConditionedGenerator(CLASSES, (3, 7, 7), latent_dim=8, width=8, preprocess=(0.5, 0.25))
    smaller = NetworkInversion(tiny_classifier(), other, preset="reconstruction", batch_size=4)
    with pytest.raises(ValueError, match=r"`checkpoint` is for a generator with image_shape"):
        smaller.fit(8, progress=False, checkpoint=path, resume=True)
    wider = ConditionedGenerator(CLASSES, SHAPE, latent_dim=6, width=8, preprocess=(0.5, 0.25))
    with pytest.raises(ValueError, match=r"`checkpoint` is for a generator with latent_dim 8"):
        NetworkInversion(tiny_classifier(), wider, preset="reconstruction", batch_size=4).fit(
            8, progress=False, checkpoint=path, resume=True
        )


@pytest.mark.parametrize(
    "setting",
    [{"latent_dim": 16}, {"dropout": 0.5}, {"input_shape": (3, 16, 16)}],
)
def test_built_in_generator_settings_are_refused_with_a_generator(setting):
    """With `generator_net` they were accepted and ignored (latent 100, dropout 0.1 and the
    generator's own shape kept)."""
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"`{name}`"):
        NetworkInversion(tiny_classifier(), tiny_generator(), **setting)
    same = {"latent_dim": 8, "dropout": 0.1, "input_shape": SHAPE}[name]  # the generator's own
    NetworkInversion(tiny_classifier(), tiny_generator(), **{name: same})


def test_consecutive_fits_continue_and_follow_a_changed_classifier():
    model = tiny_classifier()
    inversion = NetworkInversion(model, tiny_generator(), batch_size=4)
    inversion.fit(2, progress=False)
    # the classifier is trained in place between calls (as TIE does)
    with torch.no_grad():
        model.classifier.weight.mul_(2)
    second = inversion.fit(2, progress=False)
    assert second["step"] == [3, 4]
    assert inversion.history["step"] == [1, 2, 3, 4]
    # or replaced by another one with the same classes
    other = make_tiny_cnn(seed=5, dtype=torch.float32, num_classes=CLASSES)
    before = model_snapshot(other)
    inversion.model = other
    inversion.fit(1, progress=False)
    assert_model_unchanged(other, before)
    with pytest.raises(ValueError, match="`generator_net`"):
        inversion.model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES + 1)


def test_sample_one_image_per_label_reproducibly():
    inversion = NetworkInversion(tiny_classifier(), tiny_generator(), batch_size=4)
    inversion.fit(2, progress=False)
    labels = torch.tensor([4, 0, 0, 2, 1, 3, 3])
    images = inversion.sample(labels, generator=11)
    assert images.shape == (7, *SHAPE) and not images.requires_grad
    assert torch.equal(images, inversion.sample(labels, generator=11))
    assert not torch.equal(images, inversion.sample(labels, generator=12))
    assert inversion.generator.training  # mode restored
    # batching does not change the images: the same draws in the same order
    torch.testing.assert_close(images, inversion.sample(labels, generator=11, batch_size=3))
    # the images are the generator's eval-mode output for the drawn z and conditioning
    g = torch.Generator().manual_seed(11)
    gen = inversion.generator.eval()
    with torch.no_grad():
        direct = gen.generate(labels, generator=g)
    gen.train()
    torch.testing.assert_close(images, direct)
    grid, grid_labels = inversion.sample_classes(3, generator=0)
    assert grid.shape == (15, *SHAPE)
    assert grid_labels.tolist() == [k for k in range(CLASSES) for _ in range(3)]


def test_progress_bar_and_default_generator(capsys):
    model = load_bundled_model()
    inversion = NetworkInversion(model, batch_size=4, latent_dim=8, **BUNDLED_INVERSION_OPTIONS)
    assert inversion.generator.out_shape == (1, 28, 28)
    assert inversion.generator.num_classes == 10
    assert inversion.generator.conditioning == "vector_matrix"
    inversion.fit(1, progress=True)
    assert "inversion" in capsys.readouterr().err
    inversion.fit(1, progress=False)
    assert capsys.readouterr().err == ""
    images = inversion.sample([0, 9])
    # the bundled options: normalize_digits of 255 * pixels
    assert images.min() >= float(normalize_digits(torch.tensor(0.0))) - 1e-5
    counterfeit = NetworkInversion(model, preset="counterfeit", batch_size=4, latent_dim=8)
    assert counterfeit.generator.conditioning == "one_hot"
    # the input shape comes from the model's `input_shape` attribute; no preprocessing
    # unless given (the library does not know the bundled model)
    assert counterfeit.generator.out_shape == (1, 28, 28)
    assert counterfeit.generator.preprocess is None


def test_weights_override():
    model = tiny_classifier()
    inversion = NetworkInversion(
        model,
        tiny_generator(),
        preset="reconstruction",
        weights={"cosine": 0.0, "total_variation": 2.0, "pixel_range": 3.0},
        batch_size=4,
    )
    phase1, phase2 = inversion._phases
    assert phase1["cosine"] == 0 and phase2["cosine"] == 0
    assert "total_variation" not in phase1 and phase2["total_variation"] == 2.0
    history = inversion.fit(2, progress=False)
    assert math.isnan(history["cosine"][0]) and math.isnan(history["total_variation"][0])
    assert not math.isnan(history["total_variation"][1])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"preset": "invert"}, "preset"),
        ({"weights": {"kl": 1, "style": 2}}, "weights"),
        ({"weights": {"kl": -1}}, "weights"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"betas": (0.5,)}, "betas"),
        ({"seed": -2}, "seed"),
        ({"preprocess": (0.5, 0.2)}, "preprocess"),
        ({"value_range": (0, 255)}, "value_range"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, argument):
    model = tiny_classifier()
    before = model_snapshot(model)
    with pytest.raises((ValueError, TypeError), match=f"`{argument}"):
        NetworkInversion(model, tiny_generator(), **kwargs)
    assert_model_unchanged(model, before)


def test_other_errors_name_the_argument(tmp_path):
    model = tiny_classifier()
    with pytest.raises(ValueError, match="`input_shape`"):
        NetworkInversion(model)
    with pytest.raises(ValueError, match="`generator_net`"):
        NetworkInversion(model, ConditionedGenerator(CLASSES + 1, SHAPE, width=8))
    with pytest.raises(TypeError, match="`generator_net`"):
        NetworkInversion(model, nn.Linear(3, 3))
    with pytest.raises(TypeError, match="`model`"):
        NetworkInversion(lambda x: x, tiny_generator())
    inversion = NetworkInversion(model, tiny_generator(), batch_size=4)
    with pytest.raises(ValueError, match="`steps`"):
        inversion.fit(0, progress=False)
    with pytest.raises(ValueError, match="`batch_size`"):
        inversion.fit(1, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="`checkpoint`"):
        inversion.fit(1, resume=True, progress=False)
    with pytest.raises(ValueError, match="`checkpoint_every`"):
        inversion.fit(1, checkpoint=tmp_path / "c.pt", checkpoint_every=0, progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="`checkpoint`"):
        inversion.fit(1, checkpoint=tmp_path / "bad.pt", resume=True, progress=False)
    with pytest.raises(ValueError, match="`labels`"):
        inversion.sample([CLASSES])
    with pytest.raises(TypeError, match="`generator`"):
        inversion.sample([0], generator="seed")


def test_resume_without_a_file_starts_from_the_beginning(tmp_path):
    path = tmp_path / "fresh.pt"
    a = NetworkInversion(tiny_classifier(), tiny_generator(), batch_size=4, seed=2)
    a.fit(3, progress=False, checkpoint=path, resume=True)
    b = NetworkInversion(tiny_classifier(), tiny_generator(), batch_size=4, seed=2)
    b.fit(3, progress=False)
    for name, value in params_of(a.generator).items():
        assert torch.equal(value, params_of(b.generator)[name]), name
    assert torch.load(path, weights_only=True)["fit_step"] == 3


def _gloo_fit(rank, world, out_dir):
    model = tiny_classifier()
    before = model_snapshot(model)
    inversion = NetworkInversion(model, tiny_generator(), batch_size=4, seed=7)
    history = inversion.fit(3, progress=False, checkpoint=os.path.join(out_dir, "c.pt"))
    inversion.fit(1, progress=False)  # a second fit reuses the DDP wrapper
    assert_model_unchanged(model, before)
    assert not isinstance(inversion.generator, nn.parallel.DistributedDataParallel)
    torch.save(
        {"params": params_of(inversion.generator), "kl": history["kl"]},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.slow  # two spawned processes each import torch (about 30 s on 2 shared cores)
def test_two_gloo_processes_end_with_identical_generators(tmp_path):
    run_gloo(_gloo_fit, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["params"].items():
        if name.endswith("num_batches_tracked") or "running" in name:
            continue  # buffers: DDP broadcasts rank 0's before each forward
        assert torch.equal(value, ranks[1]["params"][name]), name
    # each rank drew its own labels and noise
    assert ranks[0]["kl"] != ranks[1]["kl"]
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["sampler"], state["rng"][1]["sampler"])
    # a single process trained the same way differs (it sees only one rank's batches)
    single = NetworkInversion(tiny_classifier(), tiny_generator(), batch_size=4, seed=7)
    single.fit(3, progress=False)
    assert any(
        not torch.equal(v, ranks[0]["params"][k]) for k, v in params_of(single.generator).items()
    )


def _consistency(inversion: NetworkInversion, model: nn.Module, per_class: int = 20):
    images, labels = inversion.sample_classes(per_class, generator=123)
    with torch.no_grad():
        probs = model(images).softmax(1)
    return (probs.argmax(1) == labels).float().mean().item(), probs.max(1).values.mean().item()


@pytest.mark.slow
def test_short_fit_on_the_bundled_model_raises_label_consistency():
    model = load_bundled_model()
    before = model_snapshot(model)
    torch.manual_seed(0)
    generator = ConditionedGenerator(
        10, (1, 28, 28), width=32, preprocess=normalize_digits, value_range=(0, 255)
    )
    inversion = NetworkInversion(model, generator, batch_size=64, seed=0)
    start, _ = _consistency(inversion, model)
    inversion.fit(250, progress=False)
    consistency, _ = _consistency(inversion, model)
    assert_model_unchanged(model, before)
    assert start < 0.3  # chance is 0.1
    assert consistency > 0.6, consistency


@pytest.mark.slow
def test_short_counterfeit_fit_is_confidently_classified():
    model = load_bundled_model()
    torch.manual_seed(0)
    generator = ConditionedGenerator(
        10,
        (1, 28, 28),
        conditioning="one_hot",
        width=32,
        preprocess=normalize_digits,
        value_range=(0, 255),
    )
    inversion = NetworkInversion(model, generator, preset="counterfeit", batch_size=32, seed=0)
    start, _ = _consistency(inversion, model)
    inversion.fit(250, progress=False)
    consistency, confidence = _consistency(inversion, model)
    assert start < 0.3  # chance is 0.1
    assert consistency > 0.6, consistency
    # one-hot targets: the classifier becomes confident (an untrained generator gets ~0.67,
    # all its images in one class)
    assert confidence > 0.9, confidence


@pytest.mark.cuda
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cuda_fit_under_autocast(preset):
    model = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES).cuda()
    before = model_snapshot(model)
    generator = tiny_generator(PRESETS[preset]["conditioning"]).to("cuda")
    inversion = NetworkInversion(model, generator, preset=preset, batch_size=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        history = inversion.fit(4, progress=False)
        images = inversion.sample(torch.arange(CLASSES, device="cuda"), generator=0)
    assert_model_unchanged(model, before)
    assert images.device.type == "cuda" and images.shape == (CLASSES, *SHAPE)
    assert all(math.isfinite(v) for v in history["loss"])
    assert generator.to_image.weight.device.type == "cuda"
    full = inversion.sample(torch.arange(CLASSES, device="cuda"), generator=0)
    assert full.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_bundled_model_builds_its_generator_on_the_device():
    model = load_bundled_model().cuda()
    inversion = NetworkInversion(model, batch_size=16, **BUNDLED_INVERSION_OPTIONS)
    assert next(inversion.generator.parameters()).device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        inversion.fit(3, progress=False)
    assert inversion.sample([3, 7]).device.type == "cuda"


# ----------------------------------------------------------------------------- renamed names
def test_old_keywords_and_classifier_alias_warn_and_work():
    model = tiny_classifier()
    with pytest.warns(DeprecationWarning, match="renamed"):
        old = NetworkInversion(classifier=model, generator=tiny_generator(), batch_size=4)
    new = NetworkInversion(model, tiny_generator(), batch_size=4)
    torch.testing.assert_close(old.sample([0, 1], generator=3), new.sample([0, 1], generator=3))
    with pytest.warns(DeprecationWarning, match="renamed model"):
        assert old.classifier is model
    other = make_tiny_cnn(seed=5, dtype=torch.float32, num_classes=CLASSES)
    with pytest.warns(DeprecationWarning, match="renamed model"):
        old.classifier = other
    assert old.model is other
    with pytest.warns(DeprecationWarning, match="`normalize` is renamed `preprocess`"):
        built = NetworkInversion(model, input_shape=SHAPE, normalize=(0.5, 0.25), batch_size=4)
    assert built.generator.preprocess is not None
    with pytest.warns(DeprecationWarning):
        from captum_ext.inversion.trainer import NetworkInversion as Moved
    assert Moved is NetworkInversion


class _Generic(nn.Module):
    """A non-DigitCNN model on 3 x 10 x 10 images taking 0..255 pixels (its own scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.flatten(self.body(x / 255.0)))


@pytest.mark.parametrize("batch_size", [2, 4, 5])
def test_generic_model_with_explicit_input_shape_and_preprocess(batch_size):
    torch.manual_seed(0)
    model = _Generic()
    seen = []

    def preprocess(pixels):
        seen.append((float(pixels.detach().min()), float(pixels.detach().max())))
        return pixels

    inversion = NetworkInversion(
        model,
        input_shape=(3, 10, 10),
        preprocess=preprocess,
        value_range=(0, 255),
        batch_size=batch_size,
        latent_dim=4,
    )
    history = inversion.fit(2, progress=False)
    assert len(history["loss"]) == 2
    images, pixels = inversion.sample(torch.arange(3), return_pixels=True)
    assert images.shape == (3, 3, 10, 10)
    assert float(pixels.max()) <= 1.0 and float(images.max()) > 1.0  # scaled to 0..255
    assert all(lo >= 0 and hi <= 255 for lo, hi in seen)
