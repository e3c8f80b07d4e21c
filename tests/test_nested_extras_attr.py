"""Per-example tensors nested in ``additional_forward_args`` (a dict, a list, a named tuple, a
tuple inside the tuple) follow the examples wherever a method re-indexes rows, as a plain
tensor does. Before, they were passed unchanged: a chunk of exactly N rows built from
repeated examples took them without a shape error and paired example i with example j's
metadata (Contrastive with contrast="all" and batch_size=N: maps off by 0.43), and other
chunk sizes died deep in torch.

Each method runs with the metadata given as a plain tensor (the reference, the rule that
was already right), then in each container; the model reads the same tensor either way,
so the results must be equal."""

from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, NoiseTunnel, Saliency
from torch import nn

from captum_ext.attr import VOICE, Contrastive, GradCAM, PathwayGradient

N, CLASSES = 4, 5
Pair = namedtuple("Pair", "meta scale")


class MetaNet(nn.Module):
    """forward(image, meta): the metadata gates the conv channels and adds to the logits, so
    example i's map changes when it gets example j's metadata."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.gate = nn.Linear(4, 6)
        self.head = nn.Linear(6, CLASSES)
        self.meta_head = nn.Linear(4, CLASSES)

    def forward(self, image, meta):
        a = F.relu(self.conv2(F.relu(self.conv1(image))))
        a = a * torch.sigmoid(3 * self.gate(meta))[:, :, None, None]
        return self.head(a.mean((2, 3))) + 3 * self.meta_head(meta)


class ReadsContainer(nn.Module):
    """The same network, its metadata read out of a container."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, image, container):
        if self.kind in ("dict", "ordered_dict", "defaultdict"):
            meta = container["meta"]
        elif self.kind == "named_tuple":
            meta = container.meta * container.scale
        else:  # "nested_tuple" (meta, meta) or "list" [meta]
            meta = container[0]
            if self.kind == "nested_tuple":
                meta = meta + 0 * container[1]
        return self.net(image, meta)


def wrap(meta, kind):
    """``additional_forward_args`` holding ``meta`` in a container of ``kind``."""
    return {
        "dict": ({"meta": meta},),
        "ordered_dict": (OrderedDict(meta=meta),),
        "defaultdict": (defaultdict(list, meta=meta),),
        "named_tuple": (Pair(meta, 1.0),),
        "nested_tuple": ((meta, meta),),
        "list": ([meta],),
    }[kind]


KINDS = ["dict", "ordered_dict", "defaultdict", "named_tuple", "nested_tuple", "list"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = MetaNet().eval()
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(N, 3, 8, 8, generator=generator)
    meta = 2 * torch.randn(N, 4, generator=generator)
    return net, image, meta


@pytest.mark.parametrize("kind", KINDS)
def test_contrastive_all_classes_in_chunks_of_n_rows(setup, kind):
    """N * C (example, class) rows in chunks of N rows: each chunk has the batch's length."""
    net, image, meta = setup
    expected = Contrastive(InputXGradient, net).attribute(
        image, contrast="all", additional_forward_args=meta, batch_size=N
    )
    got = Contrastive(InputXGradient, ReadsContainer(net, kind)).attribute(
        image, contrast="all", additional_forward_args=wrap(meta, kind), batch_size=N
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_contrastive_matches_a_loop_over_examples_with_dict_metadata(setup):
    net, image, meta = setup
    model = ReadsContainer(net, "dict")
    got = Contrastive(InputXGradient, model).attribute(
        image, contrast="all", additional_forward_args=wrap(meta, "dict"), batch_size=N
    )
    loop = torch.cat(
        [
            Contrastive(InputXGradient, model).attribute(
                image[i : i + 1],
                contrast="all",
                additional_forward_args=wrap(meta[i : i + 1], "dict"),
            )
            for i in range(N)
        ]
    )
    torch.testing.assert_close(got, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dict", "nested_tuple", "named_tuple"])
def test_voice_smoothgrad_repeats_nested_metadata(setup, kind):
    """Two noisy copies per example: 2N rows, so the metadata must be repeated with them."""
    net, image, meta = setup

    def voice(model, extra):
        explainer = VOICE(NoiseTunnel(Saliency(model)))
        return explainer.attribute(
            image, additional_forward_args=extra, nt_samples=2, stdevs=0.1, generator=0
        ).uncertainty

    expected = voice(net, meta)
    got = voice(ReadsContainer(net, kind), wrap(meta, kind))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dict", "nested_tuple"])
def test_pathway_gradient_integrated_passes_that_mix_examples(setup, kind):
    """n_steps * N = 12 rows in passes of 6, each mixing examples (before: a shape error
    deep in the model for a dict)."""
    net, image, meta = setup

    def attribute(model, extra):
        return PathwayGradient(model).attribute(
            image,
            layers=[net.conv1, net.conv2],
            score="integrated",
            n_steps=3,
            internal_batch_size=6,
            additional_forward_args=extra,
        )

    expected = attribute(net, meta)
    got = attribute(ReadsContainer(net, kind), wrap(meta, kind))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dict", "nested_tuple"])
def test_gradcam_several_targets_with_nested_metadata(setup, kind):
    net, image, meta = setup
    targets = torch.stack([torch.arange(N) % CLASSES, (torch.arange(N) + 1) % CLASSES], 1)
    expected = GradCAM(net, net.conv2).attribute(
        image, target=targets, additional_forward_args=meta
    )
    got = GradCAM(ReadsContainer(net, kind), net.conv2).attribute(
        image, target=targets, additional_forward_args=wrap(meta, kind)
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
