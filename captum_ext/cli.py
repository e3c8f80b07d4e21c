r"""The ``captum-ext`` command line.

``captum-ext report`` writes an HTML report for a model and a folder of images, made of
sections (``--sections``): contrastive explanations ("Why P? Why P, rather than Q? What if not
P?"), the VOICE uncertainty of the Grad-CAM explanation, the deletion / insertion scores of
the three maps, "Which predictions can I trust?" (GradTrust and the trust baselines,
accuracy-retention curves, the least-trusted images), minimal activation-matching masks with
the circuits they use, and network inversion ("What does the model think each class looks
like?"). The bundled model gets all six (it ships a trained mask net and generator); a model
of your own gets the first four unless ``--sections`` asks for more. Before the inversion
generator is trained for your own model its memory is estimated
(:func:`captum_ext.inversion.estimate_inversion_cost`): asked for by name it stops with exit
status 2 when it would not fit, otherwise it is left out with one line on stderr and on the
page. GradTrust reads the final linear layer (``--final-layer``, default the last one; inside a
TorchScript file too, scripted or traced). With no arguments it uses the bundled digit
classifier and its sample digits::

    captum-ext report                                   # -> report/index.html
    captum-ext report --model torchvision.models:resnet18 --weights r18.pt \
        --images photos/ --classes imagenet_classes.txt --out r18-report
    captum-ext report --model model.ts --layer features.7 --images digits/ --transform digits
    captum-ext report --sections voice --voice-contrasts 5

``captum-ext score`` writes a CSV of per-example predictions and trust scores (GradTrust and
its baselines, :func:`captum_ext.metrics.score_dataset`); it runs unchanged under ``torchrun``
(every process scores a share of the batches, rank 0 writes the file)::

    captum-ext score                                    # bundled model and digits -> scores.csv
    captum-ext score --model torchvision.models:resnet18 --weights r18.pt --images val/ \
        --scores gradtrust,softmax,entropy --out r18-scores.csv
    torchrun --nproc-per-node 2 -m captum_ext score --images val/ --no-progress

Bad arguments end with exit status 2 and a one-line message on stderr; so does an output
location that cannot be written (a read-only or full disk): ``--out`` is checked before any
work starts.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_PROG = "captum-ext"
_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class _OutputError(Exception):
    """The output location (``--out``) cannot be written."""


class _TooBigError(Exception):
    """A section asked for by name needs more memory than is free."""


#: the training batch of the inversion generator for a model of your own
_INVERSION_BATCH = 64


def _describe_os_error(error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason}: {error.filename!r}" if error.filename else reason


def _check_output(out: Path, *, folder: bool) -> None:
    """Fail early, before any work, when ``--out`` cannot be written: a scratch file must be
    creatable in the ``--out`` folder (or the folder the ``--out`` file goes in), or, when
    that does not exist yet, in its nearest existing parent (nothing is created there). The
    temporary files of an earlier run that was killed while writing are removed."""
    from captum_ext._utils.training import _remove_stale_temporaries

    target = out if folder else out.parent
    try:
        if not folder and out.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(out))
        existing = target.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        handle, scratch = tempfile.mkstemp(prefix=".captum-ext-check.", dir=existing)
        os.close(handle)
        os.unlink(scratch)
        if existing == target.absolute():
            _remove_stale_temporaries(out / "index.html" if folder else out)
    except OSError as error:
        raise _OutputError(
            f"`--out` {str(out)!r} cannot be written ({_describe_os_error(error)})."
        ) from error


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _is_under(name: Any, out: Path) -> bool:
    try:
        return Path(os.fsdecode(name)).resolve().is_relative_to(out.resolve())
    except (TypeError, ValueError, OSError):
        return False


@contextmanager
def _writing_to(out: Path):
    """A failure to write (full disk, folder made read-only meanwhile) names ``--out``; other
    OS errors (e.g. a missing input file) pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS and not (
            error.filename is not None and _is_under(error.filename, out)
        ):
            raise
        raise _OutputError(
            f"writing to `--out` {str(out)!r} failed ({_describe_os_error(error)})."
        ) from error


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


_FINAL_LAYER_HELP = (
    "dotted name of the final linear layer (the one that produces the logits), whose weight "
    "gradients GradTrust measures. Default: the last linear layer of the model, also of a "
    "TorchScript (scripted or traced) model"
)
_GRADTRUST_SCORES = ("gradtrust", "gradtrust_reference")


def _name_the_option(error: Exception) -> Exception:
    """GradTrust's advice to "pass `layer`" becomes advice to pass ``--final-layer``."""
    text = str(error)
    if "pass `layer`" not in text:
        return error
    return type(error)(text.replace("pass `layer`", "pass `--final-layer`"))


def _gradtrust_model(model: Any, final_layer: str | None, example: Any, layer: str | None = None):
    """For a TorchScript model: a wrapper whose final linear layer GradTrust can read
    (:func:`captum_ext._utils.torchscript.expose_final_layer`), also exposing ``layer``.
    Eager models are returned unchanged (``--final-layer`` goes to GradTrust's ``layer``)."""
    import torch

    from captum_ext._utils.torchscript import expose_final_layer

    if not isinstance(model, torch.jit.ScriptModule):
        return model
    return expose_final_layer(model, final_layer, layer=layer, example=example)


def _gradtrust_kwargs(model: Any, final_layer: str | None) -> dict[str, dict[str, Any]]:
    import torch

    if final_layer is None or isinstance(model, torch.jit.ScriptModule):
        return {}
    return {name: {"layer": final_layer} for name in _GRADTRUST_SCORES}


#: the sections of ``captum-ext report``, in their default order, and what each shows: the
#: one list the help text, the errors and the documentation are built from
SECTION_DESCRIPTIONS: dict[str, str] = {
    "contrastive": "Grad-CAM ('Why P?'), ContrastCAM ('Why P, rather than Q?') and "
    "CounterfactualCAM ('What if not P?') maps",
    "voice": "the VOICE uncertainty of the Grad-CAM explanation",
    "metrics": "deletion and insertion AUCs of the three maps",
    "trust": "which predictions can be trusted: GradTrust vs the trust baselines, accuracy "
    "retention, the least-trusted images",
    "masks": "minimal activation-matching masks and the circuits of x and m * x (your own "
    "model needs --mask-net)",
    "inversion": "what the model thinks each class looks like (network inversion; trained for "
    "--inversion-steps on your own model, skipped when it would not fit in memory)",
}
SECTIONS = tuple(SECTION_DESCRIPTIONS)
#: the default sections for a model of your own (masks need --mask-net, inversion trains)
USER_MODEL_SECTIONS = ("contrastive", "voice", "metrics", "trust")


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SECTIONS]
    if not text.strip() or unknown:
        shown = ", ".join(repr(name) for name in unknown) if unknown else repr(text)
        plural = "s" if len(unknown) > 1 else ""
        raise argparse.ArgumentTypeError(
            f"unknown section{plural} {shown}; expected a comma-separated list of "
            f"{', '.join(SECTIONS)}"
        )
    return list(dict.fromkeys(names))  # in the order given, once each


def _contrasts(text: str) -> str | int:
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or a positive integer k (the k most likely classes after the "
            f"prediction), got {text!r}"
        )
    return value


def _score_list(text: str) -> list[str]:
    from captum_ext.metrics.dataset import SCORES

    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SCORES]
    if not text.strip() or unknown:
        shown = ", ".join(repr(name) for name in unknown) if unknown else repr(text)
        plural = "s" if len(unknown) > 1 else ""
        raise argparse.ArgumentTypeError(
            f"unknown score{plural} {shown}; expected a comma-separated list of {', '.join(SCORES)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-ext`` (subcommands ``report`` and ``score``)."""
    from captum_ext import __version__

    parser = _OneLineParser(
        prog=_PROG,
        description="Contrastive, counterfactual and uncertainty explanations for image "
        "classifiers (a Captum plugin).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    report = commands.add_parser(
        "report",
        help=f"write an HTML report of {len(SECTIONS)} sections: {', '.join(SECTIONS)}",
        description="Explain a classifier's predictions on a folder of images and write an "
        f"HTML page of {len(SECTIONS)} sections: "
        + "; ".join(f"{name}: {text}" for name, text in SECTION_DESCRIPTIONS.items())
        + ". Without --model and --images: the bundled digit classifier on its 40 sample "
        "digits.",
    )
    report.add_argument(
        "--model",
        metavar="SPEC",
        help="a TorchScript file, or 'package.module:factory' called with no arguments "
        "(e.g. torchvision.models:resnet18). Default: the bundled digit classifier.",
    )
    report.add_argument(
        "--weights",
        metavar="FILE",
        help="state dict for --model (torch.save(model.state_dict(), FILE); read with "
        "weights_only=True) or a .safetensors file",
    )
    report.add_argument(
        "--layer",
        metavar="NAME",
        help="dotted name of the layer to explain (from model.named_modules()); picked "
        "automatically for torchvision ResNet, VGG, DenseNet and MobileNet models",
    )
    report.add_argument(
        "--images",
        metavar="DIR",
        help="folder of images (read recursively, sorted by path; sub-folders named after "
        "classes give the true class). Default: the 40 bundled sample digits.",
    )
    report.add_argument(
        "--transform",
        choices=("imagenet", "none", "digits"),
        help="preprocessing of --images: imagenet (resize 256, crop 224, ImageNet "
        "normalisation), none (scale to [0, 1] only), digits (grey 28 x 28, the bundled "
        "model's normalisation). Default: digits for the bundled model, else imagenet.",
    )
    report.add_argument(
        "--classes",
        metavar="FILE",
        help="text file of class names, one per line, in the order of the model's outputs",
    )
    report.add_argument("--out", metavar="DIR", default="report", help="output folder")
    report.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        metavar="N",
        help="images per attribution call (default: 64)",
    )
    report.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    report.add_argument(
        "--limit", type=_positive_int, metavar="N", help="explain only the first N images"
    )
    report.add_argument(
        "--sections",
        type=_sections,
        default=None,
        metavar="LIST",
        help="comma-separated sections of the report, shown in the order given, from: "
        + ", ".join(SECTIONS)
        + " (described above). Default: all of them for the bundled model, "
        + ",".join(USER_MODEL_SECTIONS)
        + " for your own",
    )
    report.add_argument(
        "--mask-net",
        metavar="FILE",
        help="mask net for the masks section, written by ActivationMatchingMask.save (default "
        "for the bundled model: its shipped mask net)",
    )
    report.add_argument(
        "--mask-layers",
        metavar="LIST",
        help="comma-separated layers the --mask-net was trained to match (default: --layer)",
    )
    report.add_argument(
        "--inversion-steps",
        type=_positive_int,
        default=300,
        metavar="N",
        help="generator steps of the inversion section for your own model, batch 64 (the "
        "bundled model uses its shipped generator; default: 300)",
    )
    report.add_argument(
        "--inversion-classes",
        type=_positive_int,
        default=20,
        metavar="N",
        help="classes shown in the inversion section: a model with more classes (e.g. 1000) "
        "gets a random sample of N of them (default: 20)",
    )
    report.add_argument(
        "--voice-contrasts",
        type=_contrasts,
        default="all",
        metavar="K",
        help="contrast classes of the VOICE uncertainty: 'all' (every class but the "
        "prediction, as in the paper) or an integer k, the k most likely classes after the "
        "prediction (default: all)",
    )
    report.add_argument(
        "--metrics-steps",
        type=_positive_int,
        default=20,
        metavar="N",
        help="steps of each deletion / insertion curve in the metrics section; every step "
        "is a forward pass per image and map, so fewer is faster (default: 20)",
    )
    report.add_argument(
        "--final-layer",
        metavar="NAME",
        help=_FINAL_LAYER_HELP,
    )
    report.add_argument(
        "--least-trusted",
        type=_non_negative_int,
        default=10,
        metavar="N",
        help="least-trusted images (lowest GradTrust) shown with their maps in the trust "
        "section (default: 10)",
    )
    report.add_argument("--title", default=None, help="page title")
    report.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    report.set_defaults(handler=_run_report)
    _add_score_parser(commands)
    return parser


def _add_score_parser(commands: Any) -> None:
    score = commands.add_parser(
        "score",
        help="write a CSV of per-example predictions and trust scores (GradTrust, softmax "
        "confidence, ...); works under torchrun",
        description="Score every image of a folder with GradTrust and the baseline trust "
        "scores (higher = more trusted) and write one CSV row per image: index, path, label "
        "(-1 if unknown), prediction, correct, then one column per score. Under torchrun each "
        "process scores a share of the batches and rank 0 writes the file. Without --model "
        "and --images: the bundled digit classifier on its 40 sample digits.",
    )
    score.add_argument(
        "--model",
        metavar="SPEC",
        help="a TorchScript file, or 'package.module:factory' called with no arguments. "
        "Default: the bundled digit classifier.",
    )
    score.add_argument(
        "--weights",
        metavar="FILE",
        help="state dict for --model (read with weights_only=True) or a .safetensors file",
    )
    score.add_argument(
        "--images",
        metavar="DIR",
        help="folder of images (read recursively, sorted by path). A first-level sub-folder "
        "gives the true class when its name is a class index (e.g. 3/) or a name from "
        "--classes; otherwise the label is -1. Default: the 40 bundled sample digits.",
    )
    score.add_argument(
        "--transform",
        choices=("imagenet", "none", "digits"),
        help="preprocessing of --images (as for 'report'). Default: digits for the bundled "
        "model, else imagenet.",
    )
    score.add_argument(
        "--classes",
        metavar="FILE",
        help="text file of class names, one per line, in the order of the model's outputs",
    )
    score.add_argument(
        "--scores",
        type=_score_list,
        default=["gradtrust", "softmax"],
        metavar="LIST",
        help="comma-separated scores, one CSV column each, from: "
        + ", ".join(_score_names())
        + " (default: gradtrust,softmax)",
    )
    score.add_argument("--final-layer", metavar="NAME", help=_FINAL_LAYER_HELP)
    score.add_argument("--out", metavar="FILE", default="scores.csv", help="the CSV file")
    score.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="default: 64"
    )
    score.add_argument(
        "--device",
        default="cpu",
        help="torch device (default: cpu). Under torchrun, 'cuda' means each process's "
        "cuda:LOCAL_RANK.",
    )
    score.add_argument(
        "--limit", type=_positive_int, metavar="N", help="score only the first N images"
    )
    score.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the dropout masks of mc_dropout (default: 0)",
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    score.set_defaults(handler=_run_score)


def _score_names() -> list[str]:
    from captum_ext.metrics.dataset import SCORES

    return list(SCORES)


def main(argv: list[str] | None = None) -> int:
    """Run ``captum-ext`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.error("choose a command: report, score")
    prog = f"{_PROG} {args.command}"
    try:
        return args.handler(args)
    except (_OutputError, _TooBigError, *_USER_ERRORS) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------
# report


def _read_class_names(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"`--classes` file not found: {path!r}.")
    names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"`--classes` file {path!r} is empty; expected one class name per line.")
    return names


def _conv_layer_names(model: Any) -> list[str]:
    names = []
    for name, module in model.named_modules():
        kind = getattr(module, "original_name", type(module).__name__)
        if name and "Conv" in kind:
            names.append(name)
    return names


def _pick_layer(model: Any, layer: str | None) -> str:
    from captum_ext.data.loading import default_cam_layer

    if layer is not None:
        return layer
    picked = default_cam_layer(model)
    kind = getattr(model, "original_name", type(model).__name__)
    if picked is None:
        candidates = _conv_layer_names(model)[-3:]
        hint = f" (the last convolutions are {', '.join(candidates)})" if candidates else ""
        raise ValueError(
            f"`--layer` is required for a {kind} model{hint}; give the dotted name of the "
            "layer to explain, from model.named_modules()."
        )
    print(
        f"Explaining layer {picked!r}, the last convolutional block of {kind} (--layer to change)."
    )
    return picked


def _true_labels(folders: list[str], class_names: list[str] | None) -> list[int | None] | None:
    if class_names is None or not any(folders):
        return None
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index.get(folder) for folder in folders]
    return labels if any(label is not None for label in labels) else None


def _masks_section(args, model, forward, layer_name, images, display, class_names, out):
    """The minimal-mask section: the bundled mask net, or ``--mask-net`` for your own model."""
    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.bundled import load_bundled_mask_explainer
    from captum_ext.viz import minimal_mask_section

    if args.mask_net is None:
        if args.model is not None:
            raise ValueError(
                "the masks section needs `--mask-net` for your own model: a mask net trained "
                "with ActivationMatchingMask.fit and written with its save method."
            )
        explainer = load_bundled_mask_explainer(model)
    else:
        layers = args.mask_layers.split(",") if args.mask_layers else [layer_name]
        explainer = ActivationMatchingMask(forward, [name.strip() for name in layers])
        explainer.load(args.mask_net)
    return minimal_mask_section(
        forward,
        images,
        display,
        class_names,
        out,
        progress=not args.no_progress,
        explainer=explainer,
        labels=args.report_labels,
        names=args.report_names,
        batch_size=args.batch_size,
    )


def _inversion_section(args, model, images, transform, class_names, out):
    """The inversion section: the bundled generator, or one trained for ``--inversion-steps``."""
    import torch

    from captum_ext.bundled import load_bundled_inversion
    from captum_ext.data import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        denormalize_digits,
        normalize_digits,
    )
    from captum_ext.inversion import NetworkInversion
    from captum_ext.viz import inversion_section

    if transform == "digits":
        normalize, denormalize = normalize_digits, denormalize_digits
    elif transform == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).reshape(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD).reshape(1, -1, 1, 1)
        normalize = (IMAGENET_MEAN, IMAGENET_STD)

        def denormalize(x):
            return x * std.to(x.device) + mean.to(x.device)
    else:
        normalize, denormalize = None, None
    if args.model is None:
        inversion = load_bundled_inversion(model)
    else:
        reason = _inversion_too_big(args, model, tuple(images.shape[1:]))
        if reason is not None:
            if args.sections is not None:  # asked for by name: say why it cannot be done
                raise _TooBigError(reason)
            return reason
        inversion = NetworkInversion(
            model,
            input_shape=tuple(images.shape[1:]),
            normalize=normalize,
            batch_size=_INVERSION_BATCH,
            seed=0,
        )
        inversion.fit(args.inversion_steps, progress=not args.no_progress)
    return inversion_section(
        inversion,
        out,
        class_names=class_names,
        denormalize=denormalize,
        max_classes=args.inversion_classes,
    )


def _format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


def _inversion_too_big(args, model, input_shape: tuple[int, ...]) -> str | None:
    """One line saying why the inversion generator cannot be trained for ``model`` (a
    TorchScript model, or one whose training would not fit in the memory that is free:
    :func:`captum_ext.inversion.estimate_inversion_cost`), or None when it fits (or the free
    memory is unknown)."""
    import torch

    from captum_ext import inversion as inv

    if isinstance(model, torch.jit.ScriptModule):
        return (
            "the inversion section needs an eager model (it reads layers with hooks, which a "
            "TorchScript model does not take); give --model as 'package.module:factory' "
            "with --weights"
        )
    cost = inv.estimate_inversion_cost(
        model, input_shape, batch_size=_INVERSION_BATCH, steps=args.inversion_steps
    )
    available = inv.available_memory_bytes(args.report_device)
    if available is None or cost.fits(available):
        return None
    return (
        f"the inversion section needs {cost.describe()}, more than the "
        f"{_format_bytes(available)} free on {args.report_device} (with a 1.5x margin)"
    )


def _run_report(args: argparse.Namespace) -> int:
    import torch

    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import (
        BUNDLED_CAM_LAYER,
        DIGIT_CLASSES,
        load_sample_digits,
    )
    from captum_ext.data.loading import (
        _parse_device,
        denormalize_for_display,
        expose_layer,
        load_image_folder,
        load_model,
    )
    from captum_ext.viz import (
        Report,
        contrastive_section,
        explanation_metrics_section,
        trust_section,
        voice_section,
    )

    device = _parse_device(args.device)
    if args.model is None and args.weights is not None:
        raise ValueError("`--weights` needs `--model` (the architecture the weights are for).")
    out = Path(args.out).expanduser()
    _check_output(out, folder=True)
    if args.model is None:
        model = load_bundled_model().to(device)
        model_description = "bundled digit classifier (captum_ext.data.load_bundled_model)"
        layer_name = args.layer or BUNDLED_CAM_LAYER
        default_transform = "digits"
    else:
        model = load_model(args.model, args.weights, device)
        model_description = args.model + (f" + {args.weights}" if args.weights else "")
        layer_name = None
        default_transform = "imagenet"

    class_names = _read_class_names(args.classes) if args.classes else None
    if args.images is None:
        if args.transform not in (None, "digits"):
            raise ValueError(
                "`--transform` applies to `--images`; the bundled sample digits are already "
                "normalised for the bundled model (transform 'digits')."
            )
        transform = "digits"
        images, labels_tensor = load_sample_digits()
        if args.limit is not None:
            images, labels_tensor = images[: args.limit], labels_tensor[: args.limit]
        names = [f"sample digit {i}" for i in range(images.shape[0])]
        if class_names is None and args.model is None:
            class_names = list(DIGIT_CLASSES)
        labels = labels_tensor.tolist() if class_names is not None else None
        images_description = f"{images.shape[0]} bundled sample digits"
    else:
        transform = args.transform or default_transform
        images, paths, folders = load_image_folder(
            args.images, transform, labels_from_subfolders=True, limit=args.limit
        )
        if class_names is None and args.model is None:
            class_names = list(DIGIT_CLASSES)
        root = Path(args.images).expanduser()
        names = [p.relative_to(root).as_posix() for p in paths]
        labels = _true_labels(folders, class_names)
        images_description = f"{images.shape[0]} images from {args.images}"

    if layer_name is None:
        layer_name = _pick_layer(model, args.layer)
    sections = args.sections or list(SECTIONS if args.model is None else USER_MODEL_SECTIONS)
    example = images[:2].to(device)
    trust_problem = None
    if isinstance(model, torch.jit.ScriptModule) and "trust" in sections:
        # GradTrust reads the final linear layer: run an eager copy of it (same weights)
        try:
            forward = _gradtrust_model(model, args.final_layer, example, layer=layer_name)
            layer = forward.tap
        except ValueError as error:
            if args.final_layer is not None or args.sections is not None:
                raise
            trust_problem = error  # the other sections are still possible
            forward, layer = expose_layer(model, layer_name, example=example)
    else:
        forward, layer = expose_layer(model, layer_name, example=example)
    display = denormalize_for_display(images, transform)

    report = Report(
        args.title or "captum-ext report",
        metadata={
            "Model": model_description,
            "Layer": layer_name,
            "Images": images_description,
            "Transform": transform,
            "Device": str(device),
            "Sections": ", ".join(sections),
            "torch": torch.__version__,
        },
    )
    with _writing_to(out):
        common = {"labels": labels, "names": names, "batch_size": args.batch_size}
        args.report_labels, args.report_names = labels, names
        args.report_device = device
        timings: list[tuple[str, float]] = []
        for name in sections:
            started = time.perf_counter()
            try:
                if name in ("masks", "inversion"):
                    if name == "masks":
                        built = _masks_section(
                            args, model, forward, layer_name, images, display, class_names, out
                        )
                    else:
                        built = _inversion_section(args, model, images, transform, class_names, out)
                        if isinstance(built, str):  # from the default sections, and too big
                            print(f"captum-ext report: {built}; left out", file=sys.stderr)
                            report.metadata.append(("Inversion section", f"left out: {built}"))
                            continue
                    report.add_section(built)
                    continue
                if name == "contrastive":
                    build, options = contrastive_section, {}
                elif name == "voice":
                    build, options = voice_section, {"contrasts": args.voice_contrasts}
                elif name == "metrics":
                    build, options = explanation_metrics_section, {"n_steps": args.metrics_steps}
                else:
                    build, options = trust_section, {"least_trusted": args.least_trusted}
                    options["score_kwargs"] = _gradtrust_kwargs(model, args.final_layer)
                arguments = (forward, layer, images, display, class_names, out)
                try:
                    if name == "trust" and trust_problem is not None:
                        raise trust_problem
                    section = build(*arguments, progress=not args.no_progress, **common, **options)
                except (ValueError, TypeError) as error:
                    if name != "trust":
                        raise
                    error = _name_the_option(error)
                    if args.sections is not None:
                        raise error from None
                    # asked for by default only: a model GradTrust cannot read (e.g. TorchScript,
                    # whose final nn.Linear is compiled) still gets the other sections
                    reason = str(error).strip().splitlines()[0]
                    print(f"captum-ext report: trust section left out: {reason}", file=sys.stderr)
                    report.metadata.append(("Trust section", f"left out: {reason}"))
                    continue
                report.add_section(section)
            finally:
                timings.append((name, time.perf_counter() - started))
        started = time.perf_counter()
        index = report.write(out)
        timings.append(("(writing the page)", time.perf_counter() - started))
    print(f"Report written to {index}")
    print(_format_timings(timings))
    return 0


def _format_timings(timings: list[tuple[str, float]]) -> str:
    """The time each section took, one line each, as ``captum-ext report`` prints at the end."""
    width = max(len(name) for name, _ in timings)
    lines = ["Time per section:"]
    lines += [f"  {name:<{width}}  {seconds:8.1f} s" for name, seconds in timings]
    lines.append(f"  {'total':<{width}}  {sum(s for _, s in timings):8.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# score


def _folder_labels(folders: list[str], class_names: list[str] | None) -> list[int]:
    index = {name: i for i, name in enumerate(class_names or [])}
    labels = []
    for folder in folders:
        if folder in index:
            labels.append(index[folder])
        elif folder.isdigit() and (class_names is None or int(folder) < len(class_names)):
            labels.append(int(folder))
        else:
            labels.append(-1)
    return labels


def _init_distributed(device: Any) -> tuple[Any, bool]:
    """Initialise torch.distributed from torchrun's environment when WORLD_SIZE > 1; returns
    the device of this process and whether the process group was created here."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device, False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def _check_class_count(model: Any, example: Any, class_names: list[str], device: Any) -> None:
    """``--classes`` must name every output of the model (as ``report`` requires)."""
    import torch

    try:
        with torch.no_grad():
            logits = model(example.to(device))
    except Exception:  # the scoring itself reports a model that fails on the images
        return
    outputs = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    if outputs is not None and outputs != len(class_names):
        raise ValueError(
            f"`--classes` has {len(class_names)} names but the model has {outputs} outputs."
        )


def _run_score(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import DIGIT_CLASSES, load_sample_digits
    from captum_ext.data.loading import _parse_device, load_image_folder, load_model
    from captum_ext.metrics.dataset import score_dataset

    device = _parse_device(args.device)
    if args.model is None and args.weights is not None:
        raise ValueError("`--weights` needs `--model` (the architecture the weights are for).")
    out = Path(args.out).expanduser()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        _check_output(out, folder=False)
    class_names = _read_class_names(args.classes) if args.classes else None
    if class_names is None and args.model is None:
        class_names = list(DIGIT_CLASSES)
    if args.images is None:
        if args.transform not in (None, "digits"):
            raise ValueError(
                "`--transform` applies to `--images`; the bundled sample digits are already "
                "normalised for the bundled model (transform 'digits')."
            )
        images, labels = load_sample_digits()
        if args.limit is not None:
            images, labels = images[: args.limit], labels[: args.limit]
        names = [f"sample digit {i}" for i in range(images.shape[0])]
    else:
        transform = args.transform or ("digits" if args.model is None else "imagenet")
        images, paths, folders = load_image_folder(
            args.images, transform, labels_from_subfolders=True, limit=args.limit
        )
        labels = torch.tensor(_folder_labels(folders, class_names), dtype=torch.int64)
        root = Path(args.images).expanduser()
        names = [p.relative_to(root).as_posix() for p in paths]

    device, created = _init_distributed(device)
    try:
        if args.model is None:
            model = load_bundled_model().to(device)
        else:
            model = load_model(args.model, args.weights, device)
        if class_names is not None:
            _check_class_count(model, images[:1], class_names, device)
        options = _gradtrust_kwargs(model, args.final_layer)
        if any(name in _GRADTRUST_SCORES for name in args.scores):
            model = _gradtrust_model(model, args.final_layer, images[:2].to(device))
        loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
        if "mc_dropout" in args.scores:
            options["mc_dropout"] = {"generator": args.seed}
        options = {name: value for name, value in options.items() if name in args.scores}
        try:
            table = score_dataset(
                model,
                loader,
                args.scores,
                device=device,
                progress=not args.no_progress,
                score_kwargs=options,
            )
        except (ValueError, TypeError) as error:
            raise _name_the_option(error) from None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            with _writing_to(out):
                path = table.to_csv(out, extra={"path": names})
            known = table["label"] >= 0
            summary = f"{len(table)} examples"
            if known.any():
                accuracy = table["correct"][known].double().mean().item()
                labelled = "" if known.all() else f" on {int(known.sum())} labelled"
                summary += f", accuracy {accuracy:.1%}{labelled}"
            else:
                summary += ", no labels"
            print(f"Scores written to {path} ({summary}; scores: {', '.join(args.scores)})")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
