"""A tensor shared by all examples, nested in ``additional_forward_args``, whose first
dimension happens to equal N is read as per-example (the documented rule): the perturbation
metrics refuse the logits whose classes then change with the rows, naming the argument."""

import pytest
import torch
import torch.nn as nn

from captum_ext.metrics import deletion, insertion
from captum_ext.metrics.structure import structure_deletion

N = C = 4  # as many classes (prototypes) as images, by coincidence


class ProtoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1))

    def forward(self, x, extra):
        return self.f(x).flatten(1) @ extra["proto"].T  # (rows, C)


@pytest.fixture
def case():
    torch.manual_seed(0)
    return ProtoNet().eval(), torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8), torch.randn(C, 8)


@pytest.mark.parametrize("metric", [deletion, insertion])
def test_a_nested_shared_table_with_n_rows_is_refused(case, metric):
    net, x, maps, proto = case
    with pytest.raises(ValueError, match="additional_forward_args.*closure"):
        metric(net, x, maps, additional_forward_args=({"proto": proto},), n_steps=5)


def test_structure_deletion_refuses_it_too(case):
    net, x, maps, proto = case
    with pytest.raises(ValueError, match="additional_forward_args"):
        structure_deletion(net, x, maps, additional_forward_args=({"proto": proto},))


def test_the_closure_opt_out_scores_the_table_as_shared(case):
    net, x, maps, proto = case
    bound = deletion(lambda x: net(x, {"proto": proto}), x, maps, n_steps=5)
    # the same images with one more example: the table no longer has N rows
    x5, maps5 = torch.cat([x, x[:1]]), torch.cat([maps, maps[:1]])
    five = deletion(net, x5, maps5, additional_forward_args=({"proto": proto},), n_steps=5)
    torch.testing.assert_close(bound, five[:N])


def test_check_logits_like_clean():
    from captum_ext.metrics._perturbation import check_logits_like_clean

    check_logits_like_clean(torch.zeros(6, 4), (4,), N)
    check_logits_like_clean(torch.zeros(6, 9), None, N)  # nothing to compare with yet
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(4,\).*`additional_forward_args`"):
        check_logits_like_clean(torch.zeros(6, 6), (4,), N)
