"""Introspective learning: features against a float64 autograd loop, the stage-2 head, files."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _distributed import run_gloo
from _helpers import assert_model_unchanged, check_regeneration, model_snapshot
from torch import nn

from captum_ext.introspection import IntrospectiveNetwork, introspective_features

REPO_ROOT = Path(__file__).resolve().parents[1]


def features_by_autograd(model, x, weight, form, k=None, normalize="per_class"):
    """One example and one class at a time: d CE(f(x), Q) / d weight by autograd."""
    rows = []
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1])[0]
        p = logits.softmax(0)
        if form == "all_ones":
            loss = -(torch.log_softmax(logits, 0)).sum()  # sum_Q CE(z, Q)
            classes = [None]
        elif form == "topk":
            classes = p.topk(k).indices.tolist()
        else:
            classes = list(range(logits.shape[0]))
        grads = []
        for q in classes:
            if q is not None:
                loss = F.cross_entropy(logits[None], torch.tensor([q]))
            (g,) = torch.autograd.grad(loss, weight, retain_graph=True)
            grads.append(g.flatten())
        g = torch.stack(grads)
        if normalize == "per_class":
            g = g / g.norm(dim=1, keepdim=True)
        elif normalize == "global":
            g = g / g.norm()
        rows.append(g.flatten())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def model64(bundled_model):
    return copy.deepcopy(bundled_model).double()


@pytest.mark.parametrize(
    "form, k, normalize",
    [
        ("per_class", None, "per_class"),
        ("per_class", None, "global"),
        ("per_class", None, None),
        ("topk", 3, "per_class"),
        ("all_ones", None, "per_class"),
    ],
)
def test_closed_form_equals_the_autograd_loop(model64, bundled_digits, form, k, normalize):
    x = bundled_digits[0][:5].double()
    before = model_snapshot(model64)
    got = introspective_features(model64, x, form=form, k=k, normalize=normalize)
    assert_model_unchanged(model64, before)
    expected = features_by_autograd(model64, x, model64.classifier.weight, form, k, normalize)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


def test_any_other_layer_goes_through_autograd(model64, bundled_digits):
    x = bundled_digits[0][:3].double()
    conv = model64.features[6]
    got = introspective_features(model64, x, layer="features.6", form="topk", k=2)
    expected = features_by_autograd(model64, x, conv.weight, "topk", 2)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


def test_batch_equals_one_by_one(bundled_model, bundled_digits):
    x = bundled_digits[0][:6]
    batch = introspective_features(bundled_model, x)
    for i in range(6):
        alone = introspective_features(bundled_model, x[i : i + 1])
        torch.testing.assert_close(alone[0], batch[i])


def test_train_mode_model_comes_back_as_found(bundled_digits):
    from captum_ext.bundled import load_bundled_model

    model = load_bundled_model().train()
    before = model_snapshot(model)
    introspective_features(model, bundled_digits[0][:4], layer="features.6")
    assert_model_unchanged(model, before)
    assert model.training


def test_bad_input_gets_clear_errors(bundled_model, bundled_digits):
    x = bundled_digits[0][:2]
    with pytest.raises(ValueError, match="`form`"):
        introspective_features(bundled_model, x, form="everything")
    with pytest.raises(ValueError, match="`normalize`"):
        introspective_features(bundled_model, x, normalize="l1")
    with pytest.raises(ValueError, match="`k`"):
        introspective_features(bundled_model, x, form="topk", k=11)
    with pytest.raises(ValueError, match="`inputs`"):
        introspective_features(bundled_model, torch.full_like(x, float("nan")))
    no_linear = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="layer"):
        introspective_features(no_linear, x)
    one_class = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    with pytest.raises(ValueError, match="C >= 2"):
        introspective_features(one_class, x)
    network = IntrospectiveNetwork(bundled_model)
    with pytest.raises(ValueError, match="`labels`"):
        network.fit(x, torch.tensor([1, 2, 3]), progress=False)
    with pytest.raises(ValueError, match="`labels`"):
        network.fit(x, torch.tensor([1, 12]), progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        network.predict(x)
    with pytest.raises(TypeError, match="`model`"):
        IntrospectiveNetwork(lambda t: t)


@pytest.mark.parametrize("form", ["per_class", "all_ones"])
@pytest.mark.parametrize("k", [3, -5, "abc", 2.5])
def test_k_outside_topk_is_refused_not_ignored(bundled_model, bundled_digits, form, k):
    """`k` only selects the classes of form="topk"; with the other forms any value was
    accepted and ignored (the full features came back)."""
    with pytest.raises((ValueError, TypeError), match="`k`"):
        introspective_features(bundled_model, bundled_digits[0][:2], form=form, k=k)
    with pytest.raises((ValueError, TypeError), match="`k`"):
        IntrospectiveNetwork(bundled_model, form=form, k=k)


@pytest.mark.parametrize("k", [0, -1, "3", 2.5])
def test_a_bad_k_is_refused_when_the_network_is_made(bundled_model, k):
    with pytest.raises((ValueError, TypeError), match="`k`"):
        IntrospectiveNetwork(bundled_model, form="topk", k=k)


def test_a_file_saved_with_an_unused_k_still_loads(tmp_path, bundled_model, bundled_digits):
    """Before `k` was refused outside form="topk", a network made with form="per_class",
    k=3 saved k=3 (never used); such files must load, their k dropped."""
    x, y = bundled_digits[0][:8], bundled_digits[1][:8]
    network = IntrospectiveNetwork(bundled_model, hidden_width=8)
    expected = network.fit(x, y, epochs=1, progress=False).predict_proba(x)
    network.k = 3  # as the constructor kept it before
    for suffix in (".pt", ".safetensors"):
        path = network.save(tmp_path / f"old{suffix}")
        loaded = IntrospectiveNetwork.load(path, bundled_model)
        assert loaded.k is None
        torch.testing.assert_close(loaded.predict_proba(x), expected)


def test_resume_without_a_checkpoint_folder_is_refused(bundled_model, bundled_digits):
    """fit(resume=True) without `checkpoint_dir` trained from scratch without a word, and
    resume="no" counted as True."""
    x, y = bundled_digits[0][:8], bundled_digits[1][:8]
    network = IntrospectiveNetwork(bundled_model, hidden_width=8)
    with pytest.raises(ValueError, match="`resume=True` needs the `checkpoint_dir`"):
        network.fit(x, y, epochs=1, resume=True, progress=False)
    for flag, value in (("resume", "no"), ("progress", "False")):
        options = {"progress": False, flag: value}
        with pytest.raises(TypeError, match=f"`{flag}`"):
            network.fit(x, y, epochs=1, **options)
    assert network.head is None  # nothing trained


def test_probabilities_keep_a_float64_models_precision(model64, bundled_digits):
    """predict_proba cast the logits of a float64 head to float32 (relative error up to
    1.5e-6 on the small probabilities)."""
    x, y = bundled_digits[0][:16].double(), bundled_digits[1][:16]
    net = IntrospectiveNetwork(model64, hidden_width=16).fit(x, y, epochs=1, progress=False)
    probabilities = net.predict_proba(x)
    assert probabilities.dtype == torch.float64
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-13, atol=0)


def _toy_problem():
    """A random stage-1 MLP on 2-D points, labelled by its own prediction: the classes are
    separable in its features, so stage 2 must learn them."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    points = torch.randn(300, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(points).argmax(1)
    return model, points, labels


def test_the_head_learns_a_separable_toy_problem():
    model, points, labels = _toy_problem()
    before = model_snapshot(model)
    network = IntrospectiveNetwork(model, hidden_width=32)
    network.fit(points, labels, epochs=60, batch_size=64, lr=3e-3, progress=False)
    assert_model_unchanged(model, before)
    accuracy = (network.predict(points) == labels).float().mean().item()
    assert accuracy >= 0.95
    probabilities = network.predict_proba(points)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(300))


def test_loader_equals_tensors_and_resume_is_bit_identical(tmp_path):
    model, points, labels = _toy_problem()
    straight = IntrospectiveNetwork(model, hidden_width=8).fit(
        points, labels, epochs=4, batch_size=50, progress=False, seed=1
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(points, labels), batch_size=100
    )
    from_loader = IntrospectiveNetwork(model, hidden_width=8).fit(
        loader, epochs=4, batch_size=50, progress=False, seed=1
    )
    interrupted = IntrospectiveNetwork(model, hidden_width=8).fit(
        points, labels, epochs=2, batch_size=50, progress=False, seed=1, checkpoint_dir=tmp_path
    )
    resumed = IntrospectiveNetwork(model, hidden_width=8).fit(
        points,
        labels,
        epochs=4,
        batch_size=50,
        progress=False,
        seed=1,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    for key, value in straight.head.state_dict().items():
        assert torch.equal(value, from_loader.head.state_dict()[key])
        assert torch.equal(value, resumed.head.state_dict()[key])
    assert interrupted is not resumed
    (tmp_path / "introspection.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        IntrospectiveNetwork(model, hidden_width=8).fit(
            points, labels, epochs=4, progress=False, checkpoint_dir=tmp_path, resume=True
        )


def test_save_and_load_round_trip(tmp_path, bundled_model, bundled_digits):
    images, labels = bundled_digits
    network = IntrospectiveNetwork(bundled_model, form="topk", k=3, hidden_width=16)
    network.fit(images, labels, epochs=2, progress=False)
    path = network.save(tmp_path / "head.pt")
    loaded = IntrospectiveNetwork.load(path, bundled_model)
    assert (loaded.form, loaded.k, loaded.normalize) == ("topk", 3, "per_class")
    torch.testing.assert_close(loaded.predict_proba(images), network.predict_proba(images))
    assert set(torch.load(path, weights_only=True)) >= {"config", "head"}
    pytest.importorskip("safetensors")
    safe = IntrospectiveNetwork.load(network.save(tmp_path / "head.safetensors"), bundled_model)
    assert (safe.form, safe.k, safe.normalize) == ("topk", 3, "per_class")
    torch.testing.assert_close(safe.predict_proba(images), network.predict_proba(images))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="`path`"):
        IntrospectiveNetwork.load(tmp_path / "bad.safetensors", bundled_model)


def test_bundled_network_reproduces_its_recorded_heldout_numbers(bundled_model):
    from captum_ext.bundled import load_bundled_introspective_network
    from captum_ext.data import load_mnist_split, normalize_digits
    from captum_ext.metrics import expected_calibration_error

    info = json.loads(
        resources.files("captum_ext.data").joinpath("bundled_introspection_head.json").read_text()
    )
    network = load_bundled_introspective_network(bundled_model)
    split = load_mnist_split()
    heldout = normalize_digits(torch.from_numpy(split.heldout_images)).unsqueeze(1)
    labels = torch.from_numpy(split.heldout_labels).long()
    intro = network.predict_proba(heldout)
    accuracy = float((intro.argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(info["heldout_accuracy_introspective"], abs=1e-9)
    ece = float(expected_calibration_error(intro, labels))
    assert ece == pytest.approx(info["heldout_ece_introspective"], abs=1e-6)


@pytest.mark.slow
def test_script_regenerates_the_bundled_head(tmp_path):
    """Bit for bit where this CPU computes as the machine that fitted it did; otherwise
    deterministic here and within half a point of its recorded read-outs (see
    ``check_regeneration``)."""
    pytest.importorskip("mlxtend")

    def head(path):
        saved = torch.load(path, weights_only=True)
        return {**saved["head"], "config": saved["config"]}

    check_regeneration(
        REPO_ROOT / "scripts" / "train_bundled_introspection.py",
        tmp_path / "refitted",
        REPO_ROOT / "captum_ext" / "data",
        {"bundled_introspection_head.pt": head},
        "bundled_introspection_head.json",
        {
            "heldout_accuracy_feed_forward": 0.0,
            "heldout_accuracy_introspective": 0.005,
            "heldout_ece_introspective": 0.005,
        },
    )


def _gloo_job(rank, world, out_dir):
    model, points, labels = _toy_problem()
    network = IntrospectiveNetwork(model, hidden_width=8).fit(
        points, labels, epochs=3, batch_size=25, progress=False, checkpoint_dir=out_dir
    )
    torch.save(network.head.state_dict(), f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_train_identical_heads(tmp_path):
    run_gloo(_gloo_job, tmp_path)
    heads = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in heads[0]:
        assert torch.equal(heads[0][name], heads[1][name]), name
    state = torch.load(tmp_path / "introspection.pt", weights_only=True)
    assert state["epoch"] == 3 and state["world_size"] == 2
    for name in heads[0]:
        assert torch.equal(state["head"][name], heads[0][name]), name
    model, points, labels = _toy_problem()
    alone = IntrospectiveNetwork(model, hidden_width=8).fit(
        points, labels, epochs=3, batch_size=25, progress=False
    )
    # each rank saw half of every epoch: the distributed head is not the single-process one
    assert any(not torch.equal(alone.head.state_dict()[k], heads[0][k]) for k in heads[0])


@pytest.mark.cuda
def test_cuda_model_features_and_network_stay_on_the_device(bundled_model, bundled_digits):
    images, labels = bundled_digits
    gpu = copy.deepcopy(bundled_model).cuda()
    x = images.cuda()
    features = introspective_features(gpu, x[:4])
    assert features.is_cuda
    torch.testing.assert_close(features.cpu(), introspective_features(bundled_model, images[:4]))
    autograd = introspective_features(gpu, x[:2], layer="features.6", form="topk", k=2)
    assert autograd.is_cuda
    with torch.autocast("cuda", dtype=torch.float16):
        half = introspective_features(gpu, x[:4])
    assert torch.isfinite(half).all()
    network = IntrospectiveNetwork(gpu, hidden_width=16).fit(
        x, labels.cuda(), epochs=2, progress=False
    )
    assert network.predict_proba(x[:3]).is_cuda


def test_output_transform_reaches_every_step(bundled_model, bundled_digits):
    """A model returning a dict works with ``output_transform`` in fit and predict."""

    class DictModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x)}

    images, labels = bundled_digits
    wrapped = DictModel(bundled_model)
    network = IntrospectiveNetwork(
        wrapped, hidden_width=8, output_transform=lambda out: out["logits"]
    )
    network.fit(images, labels, epochs=1, progress=False)
    assert network.predict_proba(images[:2]).shape == (2, 10)
    torch.testing.assert_close(
        network.features(images[:3]), introspective_features(bundled_model, images[:3])
    )


@pytest.mark.parametrize("scale", [3.0, 30.0, 1000.0])
@pytest.mark.parametrize("normalize", ["per_class", "global"])
def test_confident_models_give_the_float64_features_in_float32(bundled_digits, scale, normalize):
    """Logit gaps of about 29, 290 and 9,700: the prediction's own row (p - e_P) has entries
    of exp(-gap); its norm must neither underflow nor cancel, so float32 features equal the
    float64 ones and stay unit rows."""
    from _helpers import make_confident_model

    model = make_confident_model(scale)
    images = bundled_digits[0][:8]
    features = introspective_features(model, images, normalize=normalize)
    reference = introspective_features(
        copy.deepcopy(model).double(), images.double(), normalize=normalize
    )
    torch.testing.assert_close(features.double(), reference, atol=1e-5, rtol=0)
    rows = features.reshape(8, 10, -1).norm(dim=2)
    if normalize == "per_class":
        assert ((rows - 1).abs() < 1e-5).logical_or(rows == 0).all()
    else:
        torch.testing.assert_close(rows.square().sum(1), torch.ones(8), atol=1e-5, rtol=0)


def test_fit_takes_a_float64_model_and_every_documented_batch_form(
    model64, bundled_digits, tmp_path
):
    """fit on a float64 model failed ("mat1 and mat2 must have the same dtype": the head was
    float32); a generator of (x, y) batches raised a bare StopIteration and a list of
    {'pixel_values', 'labels'} dicts a KeyError (the first batch was read a second time).
    The fitted head keeps the model's float64 through save and load."""
    x, y = bundled_digits[0][:24].double(), bundled_digits[1][:24]
    options = {"epochs": 2, "batch_size": 8, "progress": False}
    net = IntrospectiveNetwork(model64).fit(x, y, **options)
    assert next(net.head.parameters()).dtype == torch.float64
    reference = net.predict_proba(x)
    for loader in (
        ((x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)),  # a generator, read once
        [{"pixel_values": x[i : i + 8], "labels": y[i : i + 8]} for i in range(0, 24, 8)],
    ):
        fitted = IntrospectiveNetwork(model64).fit(loader, **options)
        torch.testing.assert_close(fitted.predict_proba(x), reference)
    path = net.save(tmp_path / "head.pt")
    loaded = IntrospectiveNetwork.load(path, model64)
    torch.testing.assert_close(loaded.predict_proba(x), reference, rtol=0, atol=0)


def test_load_takes_the_output_transform_and_refuses_another_model(
    bundled_model, bundled_digits, tmp_path
):
    """load() had no output_transform, so a network fitted on a model returning a dict could
    not be used after loading; loading a head onto another model ended in torch's "mat1 and
    mat2 shapes cannot be multiplied" at the first prediction. fit no longer resets the
    caller's global RNG."""

    class DictOutput(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return {"logits": self.model(x)}

    wrapped = DictOutput(bundled_model).eval()
    x, y = bundled_digits[0][:16], bundled_digits[1][:16]
    transform = lambda out: out["logits"]  # noqa: E731
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    net = IntrospectiveNetwork(wrapped, output_transform=transform).fit(
        x, y, epochs=1, progress=False, seed=5
    )
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG untouched
    path = net.save(tmp_path / "head.pt")
    loaded = IntrospectiveNetwork.load(path, wrapped, output_transform=transform)
    torch.testing.assert_close(loaded.predict(x), net.predict(x))
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 7)).eval()
    mismatched = IntrospectiveNetwork.load(path, other)
    with pytest.raises(ValueError, match="head takes 6400 features, but this model .* gives 38416"):
        mismatched.predict(x)


def _gloo_uneven_job(rank, world, out_dir):
    model, points, labels = _toy_problem()
    keep = 60 if rank == 0 else 40  # each rank given its own share, the usual DDP habit
    try:
        IntrospectiveNetwork(model, hidden_width=8).fit(
            points[:keep], labels[:keep], epochs=1, batch_size=25, progress=False
        )
        message = "trained"
    except ValueError as error:
        message = str(error)
    with open(f"{out_dir}/rank{rank}.txt", "w") as handle:
        handle.write(message)


@pytest.mark.slow
def test_ranks_with_different_training_sets_are_refused_not_left_waiting(tmp_path):
    """Each rank took another number of steps, and one waited in DDP's all-reduce until the
    process group timed out (30 minutes by default)."""
    run_gloo(_gloo_uneven_job, tmp_path)
    for rank in range(2):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert "holds [60, 40] examples on the 2 processes" in said, said


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(tmp_path):
    """Resuming with another number of processes trained on other shares without a word."""
    from captum_ext._utils.training import load_checkpoint, save_checkpoint

    model, points, labels = _toy_problem()
    IntrospectiveNetwork(model, hidden_width=8).fit(
        points, labels, epochs=1, batch_size=25, progress=False, checkpoint_dir=tmp_path
    )
    state = load_checkpoint(tmp_path / "introspection.pt")
    state["world_size"] = 2  # as written under torchrun with two processes
    save_checkpoint(state, tmp_path / "introspection.pt")
    with pytest.raises(ValueError, match="written by 2 processes; resume it with the same"):
        IntrospectiveNetwork(model, hidden_width=8).fit(
            points, labels, epochs=2, batch_size=25, progress=False, checkpoint_dir=tmp_path,
            resume=True,
        )  # fmt: skip
