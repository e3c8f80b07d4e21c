"""The gradient engine's automatic chunk of classes counts the backward pass's working
memory, not only the chunk's gradients (audit 42: VOICE(Saliency) on 4 images of a
100-class resnet18 at 224 px peaked 2.7 GB over its inputs against the ~1 GiB documented)."""

import pytest
import torch
from torch import nn

import captum_ext._utils.batched_grad as engine
from captum_ext._utils.hooks import counted_output_bytes


class _Wide(nn.Module):
    """Small inputs, wide activations after ``body.0``, many classes."""

    def __init__(self, classes: int = 40):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(2, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_counted_output_bytes_counts_leaf_outputs_from_the_layer_on():
    model = _Wide().eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), counted_output_bytes() as everything:
        model(x)
    stem, wide, pooled, logits = 3 * 2 * 64 * 4, 3 * 64 * 64 * 4, 3 * 64 * 4, 3 * 40 * 4
    # stem, conv, relu, pool, flatten, linear: the containers (Sequential) are not leaves
    assert everything.bytes == stem + 2 * wide + 2 * pooled + logits
    with torch.no_grad(), counted_output_bytes(model.body) as downstream:
        model(x)
    assert downstream.bytes == 2 * wide + 2 * pooled + logits
    assert downstream.total == everything.total == everything.bytes  # all of them, always


def test_the_automatic_chunk_shrinks_with_the_working_memory(monkeypatch):
    """With a bound that the gradients alone fit eight times over, the working memory of the
    wide activations after the layer makes the engine take fewer classes per backward pass;
    the gradients and VOICE's maps are the same whatever the chunk."""
    from captum_ext.attr import VOICE, GradCAM

    torch.manual_seed(0)
    model = _Wide().eval()
    x = torch.randn(2, 1, 8, 8)
    reference = engine.class_gradients(model, (x,), "all", layer=model.body, max_batch=1)
    maps = VOICE(GradCAM(model, model.body)).attribute(x, max_batch=1)
    chunks = []
    original = engine.auto_chunk
    monkeypatch.setattr(
        engine, "auto_chunk", lambda *a, **k: chunks.append(original(*a, **k)) or chunks[-1]
    )
    per_class_gradients = 2 * 64 * 64 * 4 + 2 * 40 * 4  # the layer's gradients and the logits'
    monkeypatch.setattr(engine, "_CHUNK_BYTES", 8 * per_class_gradients)
    result = engine.class_gradients(model, (x,), "all", layer=model.body)
    working = (2 * (2 * 64 * 64 * 4) + 2 * (2 * 64 * 4) + 2 * 40 * 4) // 2  # half the outputs
    assert chunks == [8 * per_class_gradients // (per_class_gradients + working)]
    assert chunks[0] < 8  # before: 8, by the gradients alone
    for got, expected in zip(result.result, reference.result, strict=True):
        torch.testing.assert_close(got, expected)
    voiced = VOICE(GradCAM(model, model.body)).attribute(x)
    assert chunks[-1] < 8
    torch.testing.assert_close(voiced.uncertainty, maps.uncertainty)
    torch.testing.assert_close(voiced.explanation, maps.explanation)


def test_an_explicit_max_batch_is_taken_as_given():
    assert engine.auto_chunk(5, 40, (torch.zeros(10),), working_bytes=1 << 40) == 5
    assert engine.auto_chunk(None, 40, (torch.zeros(10),), working_bytes=1 << 40) == 1
    with pytest.raises(ValueError, match="max_batch"):
        engine.auto_chunk(0, 40, (torch.zeros(10),))


def test_per_example_chunks_count_the_working_memory(monkeypatch):
    """GradTrust's per-example gradients were chunked by the gradients' bytes alone: at an
    early layer of a resnet18 at 224 px, 8 images went in one chunk and peaked 1.7 GB over
    the inputs for 12 MB of gradients. The first example now measures the module outputs,
    and the other chunks count them; the scores are the same whatever the chunks."""
    from captum_ext.metrics import gradtrust

    torch.manual_seed(0)
    model = _Wide(classes=5).eval()
    x = torch.randn(6, 1, 8, 8)
    reference = gradtrust(model, x, layer="body.0", log=True)
    sizes = []
    original = engine.vmap

    def recording(fn, *args, **kwargs):
        batched = original(fn, *args, **kwargs)

        def call(xs, *rest):
            if isinstance(xs, tuple):
                sizes.append(xs[0].shape[0])
            return batched(xs, *rest)

        return call

    monkeypatch.setattr(engine, "vmap", recording)
    gradient = 5 * (64 * 2 * 9 + 64) * 4  # k = 5 cotangents x the conv's weight and bias
    monkeypatch.setattr(engine, "PER_EXAMPLE_CHUNK_BYTES", 50 * gradient)  # 25 by gradients
    scores = gradtrust(model, x, layer="body.0", log=True)
    assert sizes[0] == 1 and sum(sizes) == 6
    assert max(sizes[1:]) < 5  # by the gradients alone: the other 5 in one chunk
    torch.testing.assert_close(scores, reference)


def test_per_example_gradients_of_scripted_modules_still_run():
    """The chunk estimate hooked every module holding a parameter asked for, and a
    ScriptModule refuses hooks: GradTrust over a scripted model (or an eager one with a
    scripted head) with ``layer="all"`` failed inside torch."""
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits
    from captum_ext.metrics import gradtrust

    x = load_sample_digits()[0][:3]
    model = load_bundled_model().eval()
    expected = gradtrust(model, x, layer="all")

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(model.features, model.pool, model.flatten)
            self.head = torch.jit.script(model.classifier)

        def forward(self, inputs):
            return self.head(self.body(inputs))

    torch.testing.assert_close(gradtrust(Mixed().eval(), x, layer="all"), expected)
    torch.testing.assert_close(gradtrust(torch.jit.script(model), x, layer="all"), expected)
