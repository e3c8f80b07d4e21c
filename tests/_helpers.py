"""Plain helpers shared by the tests: tiny models, model snapshots, reference methods.

Import them with ``from _helpers import ...`` (the tests folder is on ``sys.path``);
``tests/conftest.py`` holds only fixtures and hooks.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CONFIDENT_SCALES",
    "ResidualBlock",
    "TinyCNN",
    "assert_model_unchanged",
    "check_regeneration",
    "guided_copy",
    "importable_module",
    "make_confident_model",
    "make_tiny_cnn",
    "model_snapshot",
]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class TinyCNN(nn.Module):
    """conv -> batchnorm -> in-place ReLU -> residual block -> dropout -> pool -> linear.

    ``features.3`` (the residual block) is the usual layer to explain: N x 8 x 6 x 6 for
    6 x 6 inputs.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            ResidualBlock(width),
            nn.Dropout2d(0.3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, 16), nn.ReLU(), nn.Dropout(0.2))
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.head(self.pool(self.features(x))))


def make_tiny_cnn(seed: int = 0, dtype=torch.float64, **kwargs) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN(**kwargs)
    # non-trivial batchnorm statistics, so eval-mode batchnorm is not the identity
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.to(dtype).eval()


#: Factors applied to the bundled model's logits by :func:`make_confident_model`. The bundled
#: model's median top-1/top-2 logit gap on the 40 sample digits is 9.7, so these give median
#: gaps of about 29, 290 and 9,700 (ImageNet models are at the low end of that range).
CONFIDENT_SCALES = (3.0, 30.0, 1000.0)


def make_confident_model(scale: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The bundled digit model with every logit multiplied by ``scale`` (the final linear
    layer's weight and bias scaled): same predictions and maps up to the factor, ``scale``
    times the logit gaps. Real trained models are this confident; float32 arithmetic that
    forms ``exp(z)`` or ``1 - p`` breaks on them."""
    from captum_ext.bundled import load_bundled_model

    model = load_bundled_model()
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    return model.to(dtype).eval()


class _HandGuidedReLU(torch.autograd.Function):
    """Guided backprop's ReLU, written independently of the library: positive gradients only,
    where the input was positive."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0)


class _HandGuidedReLUModule(nn.Module):
    def forward(self, x):
        return _HandGuidedReLU.apply(x)


def guided_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose nn.ReLU modules do guided backprop (reference only)."""
    guided = copy.deepcopy(model)
    for module in list(guided.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, _HandGuidedReLUModule())
    return guided


def model_snapshot(model: nn.Module) -> dict:
    """Everything a method must leave unchanged on a model."""
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {
            name: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for name, m in model.named_modules()
        },
        "global_hooks": (
            len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks),
            len(nn.modules.module._global_backward_hooks),
        ),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), f"parameter {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), f"buffer {name} changed"
    for key in ("requires_grad", "training", "hooks", "global_hooks", "grad_enabled"):
        assert before[key] == after[key], f"{key} changed"
    assert before["default_dtype"] == after["default_dtype"]
    for name, grad in before["grads"].items():
        assert after["grads"][name] is grad, f".grad of {name} changed"


def importable_module(name: str, source: str, tmp_path: Path, monkeypatch) -> Iterator[str]:
    """Write ``source`` as module ``name`` in a folder put on ``sys.path`` (for the command
    line's ``--model package.module:factory``); yields the name, forgets the module after.
    Use from a fixture: ``yield from importable_module(...)``."""
    folder = tmp_path / "mods"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    yield name
    sys.modules.pop(name, None)


def check_regeneration(
    script: Path,
    out_dir: Path,
    committed_dir: Path,
    weight_files: dict[str, Callable[[Any], dict]],
    info_file: str,
    quality: dict[str, float],
    timeout: int = 900,
) -> None:
    """A bundled file's script regenerates it: on this machine, bit for bit from run to run;
    against the committed files, bit for bit where this CPU does the arithmetic as the
    machine that wrote them did, otherwise to the recorded ``quality`` read-outs (key ->
    tolerance), with a warning saying so.

    Float kernels differ between CPU kinds (AVX2 / AVX-512, MKL and oneDNN paths), and a
    training run amplifies their rounding into other weights: seen here, a 16-epoch training
    of the bundled digit model ended 0.979 against the committed 0.982 held-out accuracy on
    an AVX-512 machine. ``weight_files`` maps each file to a loader returning a flat dict of
    tensors and plain values.
    """
    import json
    import subprocess
    import warnings

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *args, "--quiet"],
            cwd=script.parents[1],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    first = run("--out-dir", str(out_dir))
    assert first.returncode == 0, first.stdout + first.stderr
    again = run("--check", "--out-dir", str(out_dir))  # a second run, compared with the first
    assert again.returncode == 0 and "check OK" in again.stdout, again.stdout + again.stderr

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return a == b

    identical = True
    for name, load in weight_files.items():
        fresh, committed = load(out_dir / name), load(committed_dir / name)
        assert fresh.keys() == committed.keys(), name
        identical &= all(same(fresh[key], committed[key]) for key in committed)
    if identical:
        return
    fresh_info = json.loads((out_dir / info_file).read_text())
    committed_info = json.loads((committed_dir / info_file).read_text())
    for key, tolerance in quality.items():
        assert abs(fresh_info[key] - committed_info[key]) <= tolerance, (
            key,
            fresh_info[key],
            committed_info[key],
        )
    warnings.warn(
        f"{script.name}: this CPU's float arithmetic differs from that of the machine that "
        "wrote the committed files, so its retrained weights are not bit-identical to them; "
        "checked instead: the script is deterministic here, and "
        + ", ".join(
            f"{key} {fresh_info[key]:g} (committed {committed_info[key]:g})" for key in quality
        ),
        UserWarning,
        stacklevel=2,
    )


def finer_scores_by_full_orderings(logits, alpha, positions):
    """Finer-CAM's scores from every class's full ordering of all C classes (N x C x C), ties
    in class order (a stable sort): the formula as written, the reference for the chunked
    nearest-class selection."""
    n, classes = logits.shape
    distance = (logits[:, :, None] - logits[:, None, :]).abs()
    distance = distance - torch.eye(classes, dtype=logits.dtype)
    compared = distance.detach().argsort(dim=2, stable=True)[:, :, list(positions)]
    probability = logits.softmax(dim=1)
    weights = probability[:, None, :].expand(n, classes, classes).gather(2, compared)
    others = logits[:, None, :].expand(n, classes, classes).gather(2, compared)
    return (weights * (logits[:, :, None] - alpha * others)).sum(2) / (weights.sum(2) + 1e-9)
