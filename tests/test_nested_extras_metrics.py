"""The metrics with per-example tensors nested in ``additional_forward_args`` (a dict, a tuple
inside the tuple): every perturbed row gets its own example's metadata, as with a plain
tensor. Before, the nested tensors were passed unchanged: a chunk of exactly N rows paired
row i with example i's metadata whatever example the row came from (ROAD's probability off
by up to 0.995, deletion's AUC by 0.52), and other chunk sizes (insertion, GradTrust's
per-example gradients) died deep in torch.

The model reads the same metadata either way, so each score must equal the plain-tensor
one (the rule that was already right), and a loop over the examples."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_ext.metrics import (
    completeness,
    deletion,
    gradnorm,
    gradtrust,
    insertion,
    masking_score,
    purview,
    road,
    structure_deletion,
)

N, CLASSES = 4, 5


class MetaNet(nn.Module):
    """forward(image, meta): the metadata gates the conv channels and adds to the logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.gate = nn.Linear(4, 6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, CLASSES)
        self.meta_head = nn.Linear(4, CLASSES)

    def forward(self, image, meta):
        a = F.relu(self.conv2(F.relu(self.conv1(image))))
        a = a * torch.sigmoid(3 * self.gate(meta))[:, :, None, None]
        h = F.relu(self.hidden(a.mean((2, 3))))
        return self.head(h) + 3 * self.meta_head(meta)


class ReadsDict(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image, container):
        return self.net(image, container["meta"])


class ReadsNestedTuple(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image, pair):
        return self.net(image, pair[0] + 0 * pair[1])


def variants(net, meta):
    """(model, additional_forward_args) with the metadata as a plain tensor, in a dict and
    in a tuple inside the tuple."""
    return {
        "tensor": (net, meta),
        "dict": (ReadsDict(net).eval(), ({"meta": meta},)),
        "nested_tuple": (ReadsNestedTuple(net).eval(), ((meta, meta),)),
    }


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = MetaNet().eval()
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(N, 3, 8, 8, generator=generator)
    meta = 2 * torch.randn(N, 4, generator=generator)
    maps = torch.rand(N, 1, 8, 8, generator=generator)
    target = torch.arange(N) % CLASSES
    return net, image, meta, maps, target


PERTURBATION_METRICS = {
    # batch_size=N: the chunks of perturbed rows have exactly the batch's length
    "deletion": lambda m, x, a, t, e: deletion(
        m, x, a, target=t, additional_forward_args=e, n_steps=4, batch_size=N
    ),
    "insertion": lambda m, x, a, t, e: insertion(
        m, x, a, target=t, additional_forward_args=e, n_steps=4
    ),
    "masking_score": lambda m, x, a, t, e: masking_score(
        m, x, a, target=t, additional_forward_args=e
    ),
    "road": lambda m, x, a, t, e: (
        road(
            m, x, a, target=t, additional_forward_args=e, percentages=(0.2, 0.5), batch_size=N
        ).probability
    ),
    "completeness": lambda m, x, a, t, e: completeness(
        m, x, a, target=t, additional_forward_args=e, thresholds=(0.3, 0.6), batch_size=N
    ),
    "structure_deletion": lambda m, x, a, t, e: structure_deletion(
        m, x, a, target=t, additional_forward_args=e, thresholds=(0.3, 0.6), batch_size=N
    ),
}


@pytest.mark.parametrize("kind", ["dict", "nested_tuple"])
@pytest.mark.parametrize("metric", sorted(PERTURBATION_METRICS))
def test_perturbation_metric_gives_each_row_its_examples_metadata(setup, metric, kind):
    net, image, meta, maps, target = setup
    score = PERTURBATION_METRICS[metric]
    expected = score(net, image, maps, target, meta)
    model, extra = variants(net, meta)[kind]
    got = score(model, image, maps, target, extra)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_road_with_dict_metadata_matches_a_loop_over_examples(setup):
    net, image, meta, maps, target = setup
    model, _ = variants(net, meta)["dict"]

    def probability(i):
        rows = slice(i, i + 1)
        return road(
            model,
            image[rows],
            maps[rows],
            target=target[rows],
            additional_forward_args=({"meta": meta[rows]},),
            percentages=(0.2, 0.5),
        ).probability

    got = road(
        model,
        image,
        maps,
        target=target,
        additional_forward_args=({"meta": meta},),
        percentages=(0.2, 0.5),
        batch_size=N,
    ).probability
    loop = torch.cat([probability(i) for i in range(N)], dim=-1)
    torch.testing.assert_close(got, loop.view_as(got), rtol=0, atol=1e-6)


TRUST_SCORES = {
    # per-example weight gradients (vmapped), the final layer's and an inner layer's
    "gradtrust_autograd": lambda m, x, e: gradtrust(
        m, x, additional_forward_args=e, method="autograd", log=True
    ),
    "gradnorm_inner_layer": lambda m, x, e: gradnorm(
        m, x, additional_forward_args=e, layer=_net(m).hidden
    ),
    "purview": lambda m, x, e: purview(m, x, additional_forward_args=e),
}


def _net(model):
    return model if isinstance(model, MetaNet) else model.net


@pytest.mark.parametrize("kind", ["dict", "nested_tuple"])
@pytest.mark.parametrize("name", sorted(TRUST_SCORES))
def test_per_example_gradient_scores_with_nested_metadata(setup, name, kind):
    net, image, meta, _, _ = setup
    score = TRUST_SCORES[name]
    expected = score(net, image, meta)
    model, extra = variants(net, meta)[kind]
    torch.testing.assert_close(score(model, image, extra), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dict", "nested_tuple"])
def test_per_example_gradients_by_loop_with_nested_metadata(setup, kind):
    """A hook of the user's on a module sends the per-example gradients through the plain
    autograd loop (one example at a time): there too each example gets its own row."""
    net, image, meta, _, _ = setup
    expected = gradtrust(net, image, additional_forward_args=meta, method="autograd", log=True)
    model, extra = variants(net, meta)[kind]
    handle = net.conv1.register_forward_hook(lambda module, args, output: None)
    try:
        got = gradtrust(model, image, additional_forward_args=extra, method="autograd", log=True)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class MetaNetWithBatchNorm(MetaNet):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(6)

    def forward(self, image, meta):
        a = self.norm(F.relu(self.conv2(F.relu(self.conv1(image)))))
        a = a * torch.sigmoid(3 * self.gate(meta))[:, :, None, None]
        h = F.relu(self.hidden(a.mean((2, 3))))
        return self.head(h) + 3 * self.meta_head(meta)


@pytest.mark.parametrize("kind", ["dict", "nested_tuple"])
def test_train_mode_batch_norm_runs_each_example_with_its_metadata(kind):
    """A train-mode batch norm: the logits the gradients are taken of are read one example
    at a time (``logits_seen_per_example``), each with its own metadata row."""
    torch.manual_seed(0)
    net = MetaNetWithBatchNorm().train()
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(N, 3, 8, 8, generator=generator)
    meta = 2 * torch.randn(N, 4, generator=generator)
    expected = gradnorm(net, image, additional_forward_args=meta, layer=net.hidden)
    model, extra = variants(net, meta)[kind]
    model.train()
    got = gradnorm(model, image, additional_forward_args=extra, layer=net.hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
