"""The shared engine: one forward + batched VJP equals a plain per-class loop (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_ext._utils.batched_grad import class_gradients
from captum_ext._utils.hooks import capture_layer, registered_hooks
from captum_ext._utils.layers import resolve_layer


def loop_gradients(model, inputs, layer, classes, score):
    """Reference: one forward and one backward per (example, class), hooks by hand."""
    rows = []
    for n in range(inputs.shape[0]):
        per_class = []
        for c in classes[n].tolist():
            store = {}

            def keep(module, args, output, store=store):
                store["a"] = output

            handle = layer.register_forward_hook(keep)
            try:
                logits = model(inputs[n : n + 1])
            finally:
                handle.remove()
            if score == "logit":
                value = logits[0, c]
            elif score == "cross_entropy":
                value = nn.functional.cross_entropy(logits, torch.tensor([c]))
            elif score == "probability":
                value = torch.softmax(logits, dim=1)[0, c]
            else:
                value = score(logits)[0, c]
            (grad,) = torch.autograd.grad(value, store["a"])
            per_class.append(grad[0])
        rows.append(torch.stack(per_class))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "score", ["logit", "cross_entropy", "probability", lambda z: z.sigmoid() * z]
)
@pytest.mark.parametrize("layer_name", ["features.3", "features.0", "head.1"])
@pytest.mark.parametrize("max_batch", [1, 2, None])
def test_engine_equals_per_class_loop(score, layer_name, max_batch, tiny_inputs):
    model = make_tiny_cnn()
    layer = resolve_layer(model, layer_name)
    classes = torch.tensor([[0, 3, 4], [2, 2, 1], [4, 0, 1], [1, 3, 0]])
    expected = loop_gradients(model, tiny_inputs, layer, classes, score)
    got = class_gradients(
        model, (tiny_inputs,), classes, layer=layer, score=score, max_batch=max_batch
    )
    assert got.multi
    assert torch.equal(got.classes, classes)
    torch.testing.assert_close(got.result[0], expected, rtol=0, atol=1e-9)


def test_engine_all_classes_and_default_classes(tiny_cnn, tiny_inputs):
    layer = tiny_cnn.features[3]
    every = class_gradients(tiny_cnn, (tiny_inputs,), "all", layer=layer, max_batch=2)
    assert every.result[0].shape == (4, 5, 8, 6, 6)
    predicted = class_gradients(tiny_cnn, (tiny_inputs,), None, layer=layer)
    assert not predicted.multi
    top = tiny_cnn(tiny_inputs).argmax(1)
    assert torch.equal(predicted.classes[:, 0], top)
    rows = torch.arange(4)
    torch.testing.assert_close(
        predicted.result[0][:, 0], every.result[0][rows, top], atol=1e-12, rtol=0
    )
    runner_up = class_gradients(
        tiny_cnn, (tiny_inputs,), None, layer=layer, default_classes="runner_up"
    )
    assert torch.equal(runner_up.classes[:, 0], tiny_cnn(tiny_inputs).topk(2).indices[:, 1])


def test_engine_gradient_with_respect_to_inputs_and_layer_input(tiny_cnn, tiny_inputs):
    x = tiny_inputs.clone().requires_grad_(True)
    logits = tiny_cnn(x)
    expected = torch.stack(
        [torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)[0] for c in range(5)], 1
    )
    got = class_gradients(tiny_cnn, (tiny_inputs,), "all", max_batch=3)
    torch.testing.assert_close(got.result[0], expected, atol=1e-12, rtol=0)
    assert not tiny_inputs.requires_grad
    # the input of the first conv is the model input
    via_layer = class_gradients(
        tiny_cnn, (tiny_inputs,), "all", layer=tiny_cnn.features[0], layer_input=True
    )
    torch.testing.assert_close(via_layer.result[0], expected, atol=1e-12, rtol=0)


def test_engine_reducer_sees_chunks_and_result_is_concatenated(tiny_cnn, tiny_inputs):
    widths = []

    def reduce(grads, activations):
        widths.append(grads[0].shape[1])
        return grads[0].sum(dim=(2, 3, 4))

    got = class_gradients(
        tiny_cnn, (tiny_inputs,), "all", layer=tiny_cnn.features[3], max_batch=2, reduce=reduce
    )
    assert widths == [2, 2, 1]
    full = class_gradients(tiny_cnn, (tiny_inputs,), "all", layer=tiny_cnn.features[3])
    torch.testing.assert_close(got.result, full.result[0].sum(dim=(2, 3, 4)))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    n_classes=st.integers(1, 5),
    max_batch=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_engine_shapes_and_batch_independence(n, n_classes, max_batch, seed):
    """Any batch size, class count and chunking: rows equal the examples computed alone."""
    model = make_tiny_cnn()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=generator, dtype=torch.float64)
    classes = torch.randint(0, 5, (n, n_classes), generator=generator)
    got = class_gradients(
        model, (x,), classes, layer=model.features[3], score="cross_entropy", max_batch=max_batch
    )
    assert got.result[0].shape == (n, n_classes, 8, 6, 6)
    for i in range(n):
        alone = class_gradients(
            model,
            (x[i : i + 1],),
            classes[i : i + 1],
            layer=model.features[3],
            score="cross_entropy",
        )
        torch.testing.assert_close(got.result[0][i], alone.result[0][0], atol=1e-10, rtol=0)


def test_engine_leaves_model_unchanged_on_success_and_failure(tiny_inputs):
    model = make_tiny_cnn()
    model.features[0].weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.head.train()  # a mixed train/eval state must survive as it is
    before = model_snapshot(model)
    class_gradients(model, (tiny_inputs,), "all", layer=model.features[3])
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="target"):
        class_gradients(model, (tiny_inputs,), 7, layer=model.features[3])
    assert_model_unchanged(model, before)

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom after the layer")

    model.pool = Boom()
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match="boom after the layer"):
        class_gradients(model, (tiny_inputs,), 0, layer=model.features[3])
    assert_model_unchanged(model, before)


def test_engine_restores_state_changed_by_forward(tiny_cnn, tiny_inputs):
    class Sneaky(nn.Module):
        """A model whose forward flips a submodule to train mode and the default dtype."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner.head.train()
            self.inner.classifier.weight.requires_grad_(False)
            torch.set_default_dtype(torch.float64)
            return self.inner(x)

    model = Sneaky(tiny_cnn)
    before = model_snapshot(model)
    class_gradients(model, (tiny_inputs,), 0, layer=tiny_cnn.features[3])
    assert_model_unchanged(model, before)


def test_registered_hooks_removed_when_body_raises(tiny_cnn):
    layer = tiny_cnn.features[3]
    with pytest.raises(KeyError):
        with registered_hooks(lambda: layer.register_forward_hook(lambda *a: None)):
            assert len(layer._forward_hooks) == 1
            raise KeyError("inside")
    assert len(layer._forward_hooks) == 0


def test_registered_hooks_removed_when_a_registration_fails(tiny_cnn):
    layer = tiny_cnn.features[3]

    def failing():
        raise RuntimeError("cannot register")

    with pytest.raises(RuntimeError):
        with registered_hooks(lambda: layer.register_forward_hook(lambda *a: None), failing):
            pass
    assert len(layer._forward_hooks) == 0


def test_capture_survives_inplace_relu_after_layer(tiny_cnn, tiny_inputs):
    # features.1 (batchnorm) is followed by ReLU(inplace=True)
    layer = tiny_cnn.features[1]
    with capture_layer(layer) as capture:
        tiny_cnn(tiny_inputs)
    (activation,) = capture.single_call("bn")
    assert bool((activation < 0).any()), "captured values must be the pre-ReLU output"


def test_layer_that_never_runs(tiny_cnn, tiny_inputs):
    unused = nn.Linear(2, 2).double()
    tiny_cnn.unused = unused
    with pytest.raises(ValueError, match="did not run"):
        class_gradients(tiny_cnn, (tiny_inputs,), 0, layer=unused)
    assert len(unused._forward_hooks) == 0


def test_layer_that_runs_twice():
    shared = nn.Linear(4, 4).double()
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    with pytest.raises(ValueError, match="ran 2 times"):
        class_gradients(model, (torch.randn(2, 4, dtype=torch.float64),), 0, layer=shared)


def test_resolve_layer_lists_close_names(tiny_cnn):
    assert resolve_layer(tiny_cnn, "features.3") is tiny_cnn.features[3]
    assert resolve_layer(tiny_cnn, tiny_cnn.pool) is tiny_cnn.pool
    with pytest.raises(ValueError, match=r"features\.3\.conv"):
        resolve_layer(tiny_cnn, "features.3.cnv")
    with pytest.raises(TypeError, match="layer"):
        resolve_layer(tiny_cnn, 3)
    with pytest.raises(TypeError, match="not an nn.Module"):
        resolve_layer(lambda x: tiny_cnn(x), "features.3")
    scripted = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TorchScript"):
        resolve_layer(tiny_cnn, scripted)


def test_engine_chunk_argument_validated(tiny_cnn, tiny_inputs):
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            class_gradients(tiny_cnn, (tiny_inputs,), "all", layer=tiny_cnn.pool, max_batch=bad)


def test_engine_unknown_score(tiny_cnn, tiny_inputs):
    with pytest.raises(ValueError, match="score"):
        class_gradients(tiny_cnn, (tiny_inputs,), 0, score="softmax-ish")


# ------------------------------------------------------------------ multi-dimensional outputs


class _PixelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh())
        self.head = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("score", ["logit", "cross_entropy", "probability"])
def test_engine_tuple_targets_on_pixel_outputs_equal_autograd(score, tiny_inputs):
    """(N, C, H, W) outputs: the tuple (c, h, w) is a class at a pixel; the softmax of the
    cross-entropy and probability scores runs over dim 1 at that pixel."""
    torch.manual_seed(3)
    model = _PixelNet().double().eval()
    rows = [(1, 2, 3), (0, 0, 0), (3, 5, 5), (-1, -2, 1)]
    expected = []
    for n, (c, h, w) in enumerate(rows):
        acts = model.body(tiny_inputs[n : n + 1])
        pixel = model.head(acts)[0, :, h, w]
        value = {
            "logit": pixel[c],
            "cross_entropy": -torch.log_softmax(pixel, 0)[c],
            "probability": torch.softmax(pixel, 0)[c],
        }[score]
        expected.append(torch.autograd.grad(value, acts)[0])
    got = class_gradients(
        model, (tiny_inputs,), rows, layer=model.body, score=score, allow_multidim=True
    )
    assert not got.multi and got.logits.shape == (4, 4, 6, 6)
    torch.testing.assert_close(got.result[0][:, 0], torch.cat(expected), rtol=1e-10, atol=1e-13)
    columns = got.classes[:, 0].tolist()
    assert columns == [1 * 36 + 2 * 6 + 3, 0, 3 * 36 + 5 * 6 + 5, 3 * 36 + 4 * 6 + 1]


def test_engine_scalar_outputs_and_multidim_only_when_allowed(tiny_inputs):
    torch.manual_seed(3)
    model = _PixelNet().double().eval()
    with pytest.raises(ValueError, match=r"\(N, classes\) logits.*output_transform"):
        class_gradients(model, (tiny_inputs,), (0, 0, 0), layer=model.body)
    scalar = lambda x: model(x).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    got = class_gradients(scalar, (tiny_inputs,), None, layer=model.body, allow_multidim=True)
    acts = model.body(tiny_inputs)
    (expected,) = torch.autograd.grad(model.head(acts).pow(2).mean(dim=(1, 2, 3)).sum(), acts)
    torch.testing.assert_close(got.result[0][:, 0], expected, rtol=1e-10, atol=1e-13)


def test_engine_grad_kwargs(tiny_cnn, tiny_inputs):
    layer = tiny_cnn.features[3]
    plain = class_gradients(tiny_cnn, (tiny_inputs,), "all", layer=layer, max_batch=2)
    kept = class_gradients(
        tiny_cnn,
        (tiny_inputs,),
        "all",
        layer=layer,
        max_batch=2,
        grad_kwargs={"retain_graph": True, "allow_unused": False},
    )
    torch.testing.assert_close(kept.result[0], plain.result[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="create_graph"):
        class_gradients(
            tiny_cnn, (tiny_inputs,), 0, layer=layer, grad_kwargs={"create_graph": True}
        )


# ---------------------------------------------------------------------------------------------
# the engine's other gradients: per-example parameter gradients, input gradients


def _mlp64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_per_example_parameter_gradients_match_float64_autograd(batch):
    from captum_ext._utils.batched_grad import per_example_parameter_gradients

    model = _mlp64()
    x = torch.randn(batch, 6, dtype=torch.float64)
    cot = torch.randn(batch, 2, 3, dtype=torch.float64)
    before = model_snapshot(model)
    got = per_example_parameter_gradients(
        model,
        (x,),
        (),
        {"m": model[2]},
        {"m.weight": model[2].weight, "m.bias": model[2].bias},
        cot,
        lambda grads: torch.cat([grads["m.weight"].flatten(2), grads["m.bias"]], 2).flatten(1),
        chunk_bytes=1,  # one example per chunk: the chunking is exercised too
    )
    assert_model_unchanged(model, before)
    expected = []
    for n in range(batch):
        rows = []
        for j in range(2):
            out = model(x[n : n + 1])[0]
            w, b = torch.autograd.grad((out * cot[n, j]).sum(), [model[2].weight, model[2].bias])
            rows.append(torch.cat([w.flatten(), b.flatten()]))
        expected.append(torch.cat(rows))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_input_gradients_match_float64_autograd(batch):
    from captum_ext._utils.batched_grad import input_gradients

    model = _mlp64().train()
    x = torch.randn(batch, 6, dtype=torch.float64)
    labels = torch.arange(batch)
    before = model_snapshot(model)

    def objective(logits):
        return torch.log_softmax(logits, 1).amax(1).sum()

    def forward(inputs, labels):
        return model(inputs) + 0 * labels.unsqueeze(1)

    (got, none) = input_gradients(forward, (x, labels), objective, None, None)
    assert none is None  # integer inputs get no gradient
    assert_model_unchanged(model, before)
    assert not x.requires_grad
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(objective(model(leaf)), [leaf])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="`inputs`"):
        input_gradients(forward, (labels, labels), objective)


def test_old_scores_name_of_the_engine_warns_and_still_works():
    import captum_ext._utils.batched_grad as engine

    with pytest.warns(DeprecationWarning, match="TARGET_SCORE_FUNCTIONS"):
        old = engine.SCORES
    assert old is engine.TARGET_SCORE_FUNCTIONS


def test_a_segmentation_output_error_points_to_what_each_function_takes():
    """Functions without an ``output_transform`` argument (the ROAD family, deletion /
    insertion, masking, PathwayGradient, LayerIBA) say to wrap the model instead of naming
    an argument they do not have; those with one (the trust scores, the CAMs) name it."""
    from captum_ext.attr import GradCAM, LayerIBA, PathwayGradient
    from captum_ext.metrics import completeness, deletion, energy, masking_score, road

    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    iba = LayerIBA(segmenter, segmenter[0], mean=torch.zeros(4, 8, 8), std=torch.ones(4, 8, 8))
    without = {
        "road": lambda: road(segmenter, x, maps, target=1),
        "completeness": lambda: completeness(segmenter, x, maps, target=1),
        "deletion": lambda: deletion(segmenter, x, maps[:, None], target=1),
        "masking_score": lambda: masking_score(segmenter, x, maps[:, None], target=1),
        "PathwayGradient": lambda: PathwayGradient(segmenter).attribute(x, target=1),
        "LayerIBA": lambda: iba.attribute(x, target=1, steps=1),
    }
    for name, call in without.items():
        with pytest.raises(ValueError, match=r"no `output_transform`: wrap the model") as caught:
            call()
        assert "pass `output_transform`" not in str(caught.value), name
    with pytest.raises(ValueError, match=r"pass `output_transform`"):
        energy(segmenter, x)
    with pytest.raises(ValueError, match=r"output_transform"):
        GradCAM(segmenter, segmenter[0]).attribute(x, target=1)


class _LogitsOutput:
    """Like a Hugging Face ``ImageClassifierOutput``: the logits as an attribute."""

    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("wrap", ["dict", "attribute"])
def test_a_hugging_face_style_output_error_says_how_to_take_its_logits(wrap):
    """A model returning its logits inside a dict or an output object (Hugging Face's
    classifiers) was told only to reduce its output to scores."""
    from captum_ext.attr import GradCAM
    from captum_ext.metrics import deletion, softmax_confidence

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, pixel_values):
            logits = self.head(self.features(pixel_values).mean(dim=(2, 3)))
            return {"logits": logits} if wrap == "dict" else _LogitsOutput(logits)

    model = Classifier().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pick = r"\['logits'\]" if wrap == "dict" else r"\.logits"
    with pytest.raises(
        ValueError, match=r"with a `logits` tensor.*output_transform=lambda out: out" + pick
    ):
        softmax_confidence(model, x)
    with pytest.raises(ValueError, match=r"output_transform=lambda out: out" + pick):
        GradCAM(model, model.features).attribute(x, target=0)
    with pytest.raises(
        ValueError, match=r"wrap the model, e.g. forward_func=lambda \*args: model\(\*args\)" + pick
    ):
        deletion(model, x, torch.rand(2, 1, 8, 8), target=0)
    # the remedy works
    confidence = softmax_confidence(
        model, x, output_transform=lambda out: out["logits"] if wrap == "dict" else out.logits
    )
    assert confidence.shape == (2,) and bool(((confidence > 0) & (confidence <= 1)).all())


@pytest.mark.parametrize("container", [tuple, list])
def test_a_tuple_output_error_says_how_to_take_its_first_element(container):
    """(logits, features) or (logits, aux_logits): the error named the type only."""
    from captum_ext.attr import GradCAM
    from captum_ext.metrics import deletion, softmax_confidence

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            pooled = self.features(x).mean(dim=(2, 3))
            return container([self.head(pooled), pooled])

    model = TwoOutputs().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"of \(2, 5\), \(2, 4\); .*lambda out: out\[0\]"):
        softmax_confidence(model, x)
    with pytest.raises(ValueError, match=r"lambda out: out\[0\]"):
        GradCAM(model, model.features).attribute(x, target=0)
    with pytest.raises(
        ValueError, match=r"wrap the model, forward_func=lambda \*args: model\(\*args\)\[0\]"
    ):
        deletion(model, x, torch.rand(2, 1, 8, 8), target=0)
    # the remedy works
    confidence = softmax_confidence(model, x, output_transform=lambda out: out[0])
    assert confidence.shape == (2,)


def test_nan_logits_from_finite_inputs_are_named_not_passed_on_silently():
    """A float16 model on inputs x 1e4 overflows inside: every logit NaN, and VOICE read
    the NaN gradients as all-zero maps with IoU 1 ("fully uncertain"), without a word."""
    from captum_ext.attr import VOICE, GradCAM
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import BUNDLED_CAM_LAYER, load_sample_digits
    from captum_ext.metrics import softmax_confidence

    model = load_bundled_model().half().eval()
    x = (load_sample_digits()[0][:2] * 1e4).half()
    assert bool(torch.isfinite(x).all())
    for call in (
        lambda: softmax_confidence(model, x),
        lambda: GradCAM(model, BUNDLED_CAM_LAYER).attribute(x),
        lambda: VOICE(GradCAM(model, BUNDLED_CAM_LAYER)).attribute(x),
    ):
        with pytest.warns(RuntimeWarning, match=r"holds NaN for 2 of 2 examples \(rows 0, 1\)"):
            call()
    # a metric names them once, by the user's examples, not once per chunk of perturbed rows
    from captum_ext.metrics import deletion_curves

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deletion_curves(model, x, torch.rand(2, 1, 28, 28), target=0, n_steps=20, batch_size=8)
    named = [str(w.message) for w in caught if "holds NaN" in str(w.message)]
    assert len(named) == 1 and "(rows 0, 1)" in named[0]
