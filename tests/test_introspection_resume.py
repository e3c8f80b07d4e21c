"""IntrospectiveNetwork.fit with checkpoints: settings a resume must match, checkpoints of
another head, what an interrupted fit leaves, random layers in the head, later calls."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from captum_ext._utils.training import load_checkpoint, save_checkpoint
from captum_ext.introspection import IntrospectiveNetwork

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"batch_size": 50, "lr": 1e-3, "weight_decay": 0.0, "seed": 1}


def _toy_problem():
    """A random stage-1 MLP on 2-D points, labelled by its own prediction (3 classes, 72
    features per example)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    points = torch.randn(200, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(points).argmax(1)
    return model, points, labels


def _fit(model, points, labels, head=None, **options):
    network = IntrospectiveNetwork(model, head, hidden_width=options.pop("hidden_width", 8))
    return network.fit(points, labels, progress=False, **{**SETTINGS, **options})


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_other_settings_and_fewer_epochs(tmp_path):
    """fit(lr=1e-6, seed=55, resume=True) gave exactly the head of the checkpoint's lr=1e-3,
    seed=1 fit (the optimiser's state set the old lr back, the generator the old order), and
    epochs=1 on a 2-epoch checkpoint returned the 2-epoch head."""
    model, points, labels = _toy_problem()
    full = _fit(model, points, labels, epochs=2, checkpoint_dir=tmp_path)
    path = re.escape(repr(str(tmp_path / "introspection.pt")))
    for name, value, written in [
        ("lr", 1e-6, "0.001"),
        ("seed", 55, "1"),
        ("batch_size", 25, "50"),
        ("weight_decay", 0.1, "0.0"),
    ]:
        with pytest.raises(
            ValueError,
            match=rf"`{name}`={value}, but the checkpoint in `checkpoint_dir` \({path}\) was "
            rf"written with {written}; resume with the same",
        ):
            _fit(model, points, labels, epochs=3, checkpoint_dir=tmp_path, resume=True,
                 **{name: value})  # fmt: skip
    with pytest.raises(ValueError, match=r"`epochs`=1, but .* already holds 2 epochs; resume"):
        _fit(model, points, labels, epochs=1, checkpoint_dir=tmp_path, resume=True)
    # the same settings: the finished fit as it was, and a longer one continues it
    again = _fit(model, points, labels, epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert _same_parameters(again.head, full.head)
    longer = _fit(model, points, labels, epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert _same_parameters(longer.head, _fit(model, points, labels, epochs=3).head)


def test_a_checkpoint_of_another_head_is_refused_by_name_and_changes_nothing(tmp_path):
    """A checkpoint of another hidden_width ended in torch's bare "Error(s) in loading
    state_dict", which names neither `checkpoint_dir` nor the file."""
    model, points, labels = _toy_problem()
    _fit(model, points, labels, epochs=1, checkpoint_dir=tmp_path, hidden_width=8)
    path = str(tmp_path / "introspection.pt")
    message = rf"`checkpoint_dir`: the checkpoint {re.escape(repr(path))} belongs to another "
    message += r"architecture .*0\.weight"
    with pytest.raises(ValueError, match=message):
        _fit(model, points, labels, epochs=2, checkpoint_dir=tmp_path, resume=True,
             hidden_width=16)  # fmt: skip
    # a fitted network of another width: its head is left as it was
    network = _fit(model, points, labels, epochs=1, hidden_width=16)
    head = network.head
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="belongs to another architecture"):
        network.fit(points, labels, epochs=2, progress=False, checkpoint_dir=tmp_path,
                    resume=True, **SETTINGS)  # fmt: skip
    assert network.head is head and not head.training
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())


class _HeadWithState(nn.Module):
    """A given head with a buffer (batch norm), a frozen layer and a layer in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(72, 8)
        self.norm = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.last = nn.Linear(8, 3)

    def forward(self, features):
        return self.last(self.frozen(self.norm(self.first(features)).relu()).relu())


@pytest.mark.parametrize("with_checkpoints", [True, False])
def test_an_interrupted_fit_leaves_a_given_head_as_it_was(tmp_path, with_checkpoints):
    """Only the parameter values came back: the user's eval-mode head was left in train mode
    with its .grad filled (the docstring promises the head "as it was before the call").
    Without a checkpoint folder nothing was put back at all."""
    model, points, labels = _toy_problem()
    torch.manual_seed(0)
    head = _HeadWithState().eval()
    head.norm.train()  # one submodule in train mode
    head.frozen.requires_grad_(False)
    head.first.weight.grad = torch.full_like(head.first.weight, 0.5)
    grad = head.first.weight.grad
    parameters = dict(head.named_parameters())
    values = {k: v.clone() for k, v in head.state_dict().items()}
    calls = {"n": 0}

    def interrupt(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 6:  # in the second epoch, after the first checkpoint
            raise KeyboardInterrupt

    handle = head.last.register_forward_hook(interrupt)
    folder = tmp_path if with_checkpoints else None
    with pytest.raises(KeyboardInterrupt):
        _fit(model, points, labels, head, epochs=3, checkpoint_dir=folder)
    handle.remove()
    if with_checkpoints:
        assert load_checkpoint(tmp_path / "introspection.pt")["epoch"] == 1
    assert {n: m.training for n, m in head.named_modules()} == {
        "": False, "first": False, "norm": True, "frozen": False, "last": False,
    }  # fmt: skip
    assert dict(head.named_parameters()) == parameters  # the same objects
    assert {n: p.requires_grad for n, p in head.named_parameters()} == {
        n: not n.startswith("frozen") for n in parameters
    }
    assert head.first.weight.grad is grad and torch.equal(grad, torch.full_like(grad, 0.5))
    assert all(p.grad is None for n, p in head.named_parameters() if n != "first.weight")
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in values.items())


def test_an_interrupted_first_fit_leaves_the_network_unfitted(monkeypatch):
    """The default head was attached before training, so after Ctrl-C an unfitted network
    predicted with a half-trained head (in train mode) instead of saying it is not fitted."""
    import captum_ext.introspection.network as network_module

    model, points, labels = _toy_problem()
    built = network_module.make_head
    calls = {"n": 0}

    def interrupting_head(*args, **kwargs):
        head = built(*args, **kwargs)

        def interrupt(module, inputs, output):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

        head.register_forward_hook(interrupt)
        return head

    monkeypatch.setattr(network_module, "make_head", interrupting_head)
    network = IntrospectiveNetwork(model, hidden_width=8)
    with pytest.raises(KeyboardInterrupt):
        network.fit(points, labels, epochs=2, progress=False, **SETTINGS)
    assert network.head is None
    with pytest.raises(RuntimeError, match="not fitted"):
        network.predict(points[:4])


def _dropout_head() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    head = nn.Sequential(nn.Linear(72, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return head


def test_a_head_with_dropout_is_fixed_by_the_seed_and_resumes_bit_identically(tmp_path):
    """`seed` "fixes every random draw of a fit" and resume=True "ends bit-identical to an
    uninterrupted fit": the global RNG that dropout draws from was re-seeded at each call's
    start and not saved, so a resumed fit drew other dropout masks."""
    model, points, labels = _toy_problem()
    torch.manual_seed(1)
    straight = _fit(model, points, labels, _dropout_head(), epochs=3)
    head = _dropout_head()  # (nn.Linear draws its initialisation from the global RNG)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    other_rng = _fit(model, points, labels, head, epochs=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG as it was
    assert _same_parameters(straight.head, other_rng.head)
    assert not _same_parameters(straight.head, _fit(model, points, labels, _dropout_head(),
                                                    epochs=3, seed=2).head)  # fmt: skip
    _fit(model, points, labels, _dropout_head(), epochs=1, checkpoint_dir=tmp_path)
    resumed = _fit(model, points, labels, _dropout_head(), epochs=3, checkpoint_dir=tmp_path,
                   resume=True)  # fmt: skip
    assert _same_parameters(straight.head, resumed.head)
    # a checkpoint written before the global random state was saved still resumes; a head
    # without random layers ends bit-identical all the same (as the docstring says)
    deterministic = _fit(model, points, labels, epochs=3)
    _fit(model, points, labels, epochs=1, checkpoint_dir=tmp_path / "old")
    file = tmp_path / "old" / "introspection.pt"
    old = {k: v for k, v in load_checkpoint(file).items() if k not in ("rng", "seed")}
    save_checkpoint({k: v for k, v in old.items() if k != "batch_size"}, file)
    old_resumed = _fit(model, points, labels, epochs=3, checkpoint_dir=file.parent, resume=True)
    assert _same_parameters(deterministic.head, old_resumed.head)


def test_a_later_call_continues_from_the_current_head_as_documented(tmp_path):
    """A second fit kept training the fitted head with a new optimiser and the shuffling
    seeded afresh, and `seed` did not re-initialise it; undocumented until now."""
    model, points, labels = _toy_problem()
    network = _fit(model, points, labels, epochs=2)
    continued_from = {k: v.clone() for k, v in network.head.state_dict().items()}
    network.fit(points, labels, epochs=2, progress=False, **{**SETTINGS, "seed": 2})
    # by definition: a head holding the first call's parameters, fitted with seed=2
    head = IntrospectiveNetwork(model, hidden_width=8).fit(points, labels, epochs=1,
                                                          progress=False).head  # fmt: skip
    head.load_state_dict(continued_from)
    same = _fit(model, points, labels, head, epochs=2, seed=2)
    assert _same_parameters(network.head, same.head)
    assert not _same_parameters(network.head, _fit(model, points, labels, epochs=4).head)
    network.head = None  # starts afresh, as the docstring says
    network.fit(points, labels, epochs=2, progress=False, **{**SETTINGS, "seed": 2})
    assert _same_parameters(network.head, _fit(model, points, labels, epochs=2, seed=2).head)
    doc = " ".join(IntrospectiveNetwork.fit.__doc__.split())
    assert "A later call continues." in doc
    assert "is not re-initialised" in doc and "a new Adam optimiser" in doc
    assert "set ``network.head = None`` first" in doc


def test_a_shuffled_loader_follows_the_seed_and_leaves_the_callers_stream(bundled_model):
    """The loader was iterated before the seeded block: it drew its base seed and shuffled
    order from the caller's generator, so the head depended on the caller's seed."""
    from torch.utils.data import DataLoader, TensorDataset

    from captum_ext.data import load_sample_digits
    from captum_ext.introspection import IntrospectiveNetwork

    images, labels = load_sample_digits()
    heads = []
    for caller_seed in (0, 1):
        torch.manual_seed(caller_seed)
        expected = torch.rand(3)
        torch.manual_seed(caller_seed)
        loader = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=4, shuffle=True)
        network = IntrospectiveNetwork(bundled_model)
        network.fit(loader, epochs=1, seed=3, progress=False)
        assert torch.equal(torch.rand(3), expected)  # the caller's stream is untouched
        heads.append({k: v.clone() for k, v in network.head.state_dict().items()})
    for key in heads[0]:
        assert torch.equal(heads[0][key], heads[1][key]), key


def test_loading_a_head_or_the_bundled_model_draws_nothing(tmp_path, bundled_model):
    """Modules built only to be overwritten by saved weights drew their initialisation from
    the caller's global generator."""
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits
    from captum_ext.introspection import IntrospectiveNetwork

    images, labels = load_sample_digits()
    network = IntrospectiveNetwork(bundled_model)
    network.fit(images[:16], labels[:16], epochs=1, progress=False)
    path = network.save(tmp_path / "head.pt")
    for load in (load_bundled_model, lambda: IntrospectiveNetwork.load(path, bundled_model)):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        load()
        assert torch.equal(torch.rand(3), expected)
