r"""The ``captum-ext`` command line.

``captum-ext report`` writes an HTML report for a model and a folder of images, made of
sections (``--sections``): contrastive explanations ("Why P? Why P, rather than Q? What if not
P? What sets P apart from its look-alikes?"), the VOICE uncertainty of the Grad-CAM
explanation, the deletion / insertion scores of the three maps, "Which predictions can I
trust?" (GradTrust and the trust baselines, accuracy-retention curves, the least-trusted
images), minimal activation-matching masks with
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
work starts. ``score`` leaves out image files that cannot be read, writes the scores of the
others and then ends with status 2 naming them all. Ctrl-C ends a command with status 130;
SIGTERM and SIGHUP end it the same way (its clean-up done) with status 143 and 129.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from captum_ext._utils.deprecation import moved_names
from captum_ext.viz.build import (
    ADAPTATION_MESSAGES,
    FINAL_LAYER_SCORES,
    SECTION_REGISTRY,
    USER_MODEL_SECTIONS,
    OutputError,
    ReportConfig,
    SectionTooBigError,
    build_report,
    check_output,
    format_timings,
    gradtrust_kwargs,
    gradtrust_model,
    name_the_option,
    writing_to,
)

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


# the report's logic moved to captum_ext.viz.build; the private names that code reached into
# the CLI module for still resolve there, with a DeprecationWarning
__getattr__ = moved_names(
    __name__,
    {
        "_OutputError": "captum_ext.viz.build:OutputError",
        "_TooBigError": "captum_ext.viz.build:SectionTooBigError",
        "_INVERSION_BATCH": "captum_ext.viz.build:INVERSION_BATCH",
        "_check_output": "captum_ext.viz.build:check_output",
        "_writing_to": "captum_ext.viz.build:writing_to",
        "_format_timings": "captum_ext.viz.build:format_timings",
        "_pick_layer": "captum_ext.viz.build:pick_layer",
        "_read_class_names": "captum_ext.data.loading:read_class_names",
        "_folder_labels": "captum_ext.data.loading:folder_labels",
        "_gradtrust_model": "captum_ext.viz.build:gradtrust_model",
        "_gradtrust_kwargs": "captum_ext.viz.build:gradtrust_kwargs",
        "_name_the_option": "captum_ext.viz.build:name_the_option",
    },
)


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
    "dotted name of the final layer (the one that produces the logits), whose weight "
    "gradients GradTrust measures: a linear layer, or for a model without one the final "
    "convolution (e.g. classifier.1, SqueezeNet's 1 x 1 convolution). Default: the last "
    "linear layer of the model, also of a TorchScript (scripted or traced) model, where it "
    "must be a linear layer"
)

#: what --model's help says of a factory given no --weights
_RANDOM_WEIGHTS_HELP = (
    "Without --weights a factory's model keeps the weights it was built with: a "
    "torchvision.models builder's are random, which a warning on stderr (and on the report "
    "page) says, naming torchvision's checkpoint file to pass as --weights for its "
    "pretrained weights; other factories are not judged (they may load trained weights)."
)

#: the sections of ``captum-ext report``, in their default order, and what each shows: read
#: from :data:`captum_ext.viz.build.SECTION_REGISTRY`, the one list the help text, the errors
#: and the documentation are built from
SECTION_DESCRIPTIONS: dict[str, str] = {
    name: spec.description for name, spec in SECTION_REGISTRY.items()
}
SECTIONS = tuple(SECTION_DESCRIPTIONS)


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
    from captum_ext.metrics.dataset import TRUST_SCORES

    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in TRUST_SCORES]
    if not text.strip() or unknown:
        shown = ", ".join(repr(name) for name in unknown) if unknown else repr(text)
        plural = "s" if len(unknown) > 1 else ""
        raise argparse.ArgumentTypeError(
            f"unknown score{plural} {shown}; expected a comma-separated list of "
            f"{', '.join(TRUST_SCORES)}"
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
        help="a TorchScript file, a torch.export archive (.pt2), or 'package.module:factory' "
        "called with no arguments (e.g. torchvision.models:resnet18; a torchvision builder is "
        "built with the class count of --weights). " + _RANDOM_WEIGHTS_HELP + " Default: the "
        "bundled digit classifier.",
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
        "automatically for every torchvision classifier family (ResNet, VGG, DenseNet, "
        "MobileNet, EfficientNet, ConvNeXt, RegNet, Swin, ViT, ...) and for transformers with "
        "numbered pre-norm blocks (also when saved as TorchScript or a torch.export archive)",
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
        + " (described above). Default: "
        + ",".join(name for name, spec in SECTION_REGISTRY.items() if spec.in_defaults)
        + " for the bundled model, "
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
        "--introspection-head",
        metavar="FILE",
        help="fitted IntrospectiveNetwork for the introspection section, written by its save "
        "method (default for the bundled model: its shipped head)",
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
        "(-1 if unknown), prediction, correct (True / False; empty where the label is "
        "unknown), then one column per score. Under torchrun each "
        "process scores a share of the batches and rank 0 writes the file. Without --model "
        "and --images: the bundled digit classifier on its 40 sample digits.",
    )
    score.add_argument(
        "--model",
        metavar="SPEC",
        help="a TorchScript file, a torch.export archive (.pt2), or 'package.module:factory' "
        "called with no arguments (a torchvision builder is built with the class count of "
        "--weights). " + _RANDOM_WEIGHTS_HELP + " Default: the bundled digit classifier.",
    )
    score.add_argument(
        "--weights",
        metavar="FILE",
        help="state dict for --model (read with weights_only=True) or a .safetensors file",
    )
    score.add_argument(
        "--images",
        metavar="DIR",
        help="folder of images (read recursively, sorted by path, one batch at a time: a "
        "large folder never sits in memory whole). A first-level sub-folder "
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
        + " (default: gradtrust,softmax). The gradtrust column holds the natural log of "
        "GradTrust (its values span many orders of magnitude; the ranking is the same). "
        "energy and purview need the logits: for a model that ends in a softmax or "
        "log_softmax they are left out, with a note.",
    )
    score.add_argument("--final-layer", metavar="NAME", help=_FINAL_LAYER_HELP)
    score.add_argument(
        "--out", metavar="FILE", default="scores.csv", help="the CSV file (default: scores.csv)"
    )
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
    from captum_ext.metrics.dataset import TRUST_SCORES

    return list(TRUST_SCORES)


#: options naming a file, a folder or a layer, where an empty value is a mistake
_PATH_OPTIONS = (
    "--model", "--weights", "--layer", "--images", "--classes", "--out", "--mask-net",
    "--introspection-head", "--final-layer", "--mask-layers",
)  # fmt: skip


def _warning_line(prog: str) -> Callable[..., None]:
    """Warnings shown as one line ``captum-ext report: warning: ...`` on stderr, as the
    command's errors are, not as Python's two lines naming a source file of the package."""

    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"{prog}: warning: {' '.join(str(message).split())}"
        if text in shown:  # the same warning from every section that meets it: once a run
            return
        shown.add(text)
        print(text, file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run ``captum-ext`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.error("choose a command: report, score")
    prog = f"{_PROG} {args.command}"
    for option in _PATH_OPTIONS:  # "" read the current folder, or was ignored
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if isinstance(value, str) and not value.strip():
            print(
                f"{prog}: error: `{option}` is empty; give a value or leave it out.",
                file=sys.stderr,
            )
            return 2
    try:
        with warnings.catch_warnings(), _stop_signals_interrupt():
            warnings.showwarning = _warning_line(prog)  # restored after the block
            with _closed_pipe_guard() as guard:
                status = args.handler(args)
            return 141 if guard.closed else status
    except (OutputError, SectionTooBigError, *_USER_ERRORS) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        message = message.replace("`final_layer`=", "`--final-layer`=")  # the methods' name
        if message.startswith("`layer`: ") and "pass `--final-layer`" in message:
            # GradTrust's `layer` is the command's --final-layer (its --layer is another one)
            message = "`--final-layer`: " + message[len("`layer`: ") :]
        if args.command == "report":  # the methods' argument is the command's --layer
            message = message.replace("`layer`=", "`--layer`=")
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except _Stopped as stopped:
        print(f"{prog}: stopped by {signal.Signals(stopped.signal_number).name}", file=sys.stderr)
        return 128 + stopped.signal_number  # the status a shell gives a tool the signal ended
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a write past the guard (the reader went away): stop quietly
        _silence_stdout()
        return 141  # 128 + SIGPIPE, the status a shell gives a tool its pipe closed on


#: signals that end a command as Ctrl-C does (a timeout, a job scheduler, a closed terminal)
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")


class _Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP while a command runs, so that the
    command unwinds as after Ctrl-C: temporary files are removed and a report lists the
    figures it wrote, for the next run into its folder to clean up."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """Run the block with SIGTERM and SIGHUP raising :class:`_Stopped`, where they have
    their default action (which ends the process at once, skipping every clean-up); a signal
    ignored (``nohup``) or handled by the caller keeps its handler. The handlers are put back
    afterwards. Outside the main thread (where Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signal_number: int, frame: Any) -> None:
        raise _Stopped(signal_number)

    replaced = {}
    for name in _STOP_SIGNALS:
        number = getattr(signal, name, None)  # Windows has no SIGHUP
        if number is None or signal.getsignal(number) is not signal.SIG_DFL:
            continue
        replaced[number] = signal.signal(number, stop)
    try:
        yield
    finally:
        for number, previous in replaced.items():
            signal.signal(number, previous)


class _StdoutGuard:
    """``sys.stdout`` while a command runs: once the reader of the output has gone away
    (``captum-ext score ... | head``), writes are dropped instead of raising
    ``BrokenPipeError`` mid-run, so the command still writes its results (the report,
    the CSV) and then ends with status 141, as other command-line tools do."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.closed = False

    def write(self, text: str) -> int:
        if not self.closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self.closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def _close(self) -> None:
        self.closed = True
        _silence_stdout()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _closed_pipe_guard() -> Iterator[_StdoutGuard]:
    """Run the block with :class:`_StdoutGuard` as ``sys.stdout``; flushed and put back
    after it."""
    stream = sys.stdout
    guard = _StdoutGuard(stream)
    if stream is None:  # no standard output at all (`>&-`, pythonw): print() skips it
        yield guard
        return
    sys.stdout = guard
    try:
        yield guard
    finally:
        guard.flush()
        sys.stdout = stream


def _silence_stdout() -> None:
    """Point standard output at the null device, so that the interpreter's own flush at exit
    does not meet the closed pipe again (and print a second error)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real file behind sys.stdout
        pass


# --------------------------------------------------------------------------------------
# report


def _report_config(args: argparse.Namespace) -> ReportConfig:
    """The :class:`~captum_ext.viz.build.ReportConfig` of the parsed ``report`` arguments."""
    fields = {field.name for field in dataclasses.fields(ReportConfig)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    return ReportConfig(**values, progress=not args.no_progress)


def _run_report(args: argparse.Namespace) -> int:
    result = build_report(_report_config(args))
    print(f"Report written to {result.index}")
    print(format_timings(result.timings))
    return 0


# --------------------------------------------------------------------------------------
# score


def _check_out_is_no_image(out: Path, images: str | None) -> None:
    """Refuse an ``--out`` that is an existing image file (one of ``--images`` among them):
    the scores, written as CSV over it, destroyed it."""
    from captum_ext.data.loading import IMAGE_EXTENSIONS

    if not (out.is_file() and out.suffix.lower() in IMAGE_EXTENSIONS):
        return
    root = None if images is None else Path(images).expanduser()
    if root is not None and root.is_dir() and out.resolve().is_relative_to(root.resolve()):
        what = f"one of the `--images` files (in {images!r})"
    else:
        what = "an existing image file"
    raise ValueError(
        f"`--out` {str(out)!r} is {what}: the scores (CSV) would be written over it; give "
        "`--out` a .csv file (e.g. 'scores.csv')."
    )


def _run_score(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    from captum_ext._utils.training import distributed_from_environment
    from captum_ext._utils.validation import model_input_dtype, parse_device, to_model_input
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import DIGIT_CLASSES
    from captum_ext.data.loading import (
        COMMAND_LINE_NAMES,
        ImageFolderDataset,
        check_class_names,
        check_folder_labels,
        check_model_takes,
        load_model,
        read_class_names,
        resolve_inputs,
        with_logits_output,
    )
    from captum_ext.metrics.dataset import score_dataset

    device = parse_device(args.device, argument="--device")
    if args.model is None and args.weights is not None:
        raise ValueError("`--weights` needs `--model` (the architecture the weights are for).")
    out = Path(args.out).expanduser()
    _check_out_is_no_image(out, args.images)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        check_output(out, folder=False)
    flags = COMMAND_LINE_NAMES  # the loaders' errors name this command's options
    class_names = read_class_names(args.classes, argument_names=flags) if args.classes else None
    if class_names is None and args.model is None:
        class_names = list(DIGIT_CLASSES)
    default_transform = "digits" if args.model is None else "imagenet"
    if args.images is None:  # the bundled sample digits, in memory
        inputs = resolve_inputs(
            transform=args.transform,
            class_names=class_names,
            limit=args.limit,
            argument_names=flags,
        )
        dataset = TensorDataset(inputs.images, inputs.labels)
        labels, names = inputs.labels, inputs.names
    else:  # read batch by batch: a large folder never sits in memory whole
        folder = ImageFolderDataset(
            args.images,
            default_transform if args.transform is None else args.transform,
            class_names=class_names,
            limit=args.limit,
            argument_names=flags,
        )
        # a damaged file is noted and left out, not the end of the scores of all the others
        dataset = _UnreadableLeftOut(folder)
        labels, names = folder.labels, folder.names
    # a few images to read the model's output on (how to read it, and its classes)
    images = default_collate(_probe_items(dataset))[0]

    with distributed_from_environment(device) as device:
        if args.model is None:
            model = load_bundled_model().to(device)
        else:
            model = load_model(args.model, args.weights, device, argument_names=flags)
            images = to_model_input(images, model)  # float32 pixels, a half or float64 model
        check_model_takes(model, images[:2].to(device))  # images it cannot take: one line
        loaded = model
        if any(name in FINAL_LAYER_SCORES for name in args.scores):
            # TorchScript: a wrapper running an eager copy of the final linear layer
            model = gradtrust_model(model, args.final_layer, images[:2].to(device))
        if args.model is not None:
            # on every image read so far: one output per image that lies in [0, 1] on all of
            # them is warned of as a sigmoid's probability
            model, adapted = with_logits_output(model, images.to(device))
            if adapted and int(os.environ.get("RANK", "0")) == 0:
                print(ADAPTATION_MESSAGES[model.reads])
        if class_names is not None:
            check_class_names(model, images[:1].to(device), class_names)
        from captum_ext._utils.layers import root_module
        from captum_ext._utils.model_state import preserved_state

        with preserved_state([root_module(model)]), torch.no_grad():
            probe_logits = model(images.to(device))
        num_classes = probe_logits.shape[-1]
        check_folder_labels(labels, names, num_classes)
        args.scores = _without_level_scores(args.scores, model, probe_logits)
        options = gradtrust_kwargs(loaded, args.final_layer, reads=getattr(model, "reads", None))

        dtype = model_input_dtype(loaded)

        def collate(items):  # pixels in the model's dtype (float32 read; half, float64 model)
            batch, batch_labels = default_collate(items)
            return (batch if dtype is None else batch.to(dtype)), batch_labels

        loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
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
            raise name_the_option(error) from None
        unreadable = {}
        if isinstance(dataset, _UnreadableLeftOut):
            dataset.folder.warn_transparent()
            unreadable = _gathered(dataset.unreadable)  # from every process under torchrun
            table = _rows_left_out(table, unreadable)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            with writing_to(out):
                rows = [names[int(i)] for i in table["index"]]
                path = table.to_csv(out, extra={"path": rows})
            known = table["label"] >= 0
            summary = f"{len(table)} examples"
            if known.any():
                accuracy = table["correct"][known].double().mean().item()
                labelled = "" if known.all() else f" on {int(known.sum())} labelled"
                summary += f", accuracy {accuracy:.1%}{labelled}"
            else:
                summary += ", no labels"
            print(f"Scores written to {path} ({summary}; scores: {', '.join(args.scores)})")
        if unreadable:  # the scores of the others are written: now the error, on rank 0
            if rank == 0:
                raise ValueError(
                    f"{_cannot_read(unreadable)}; left out of {str(path)!r}, which holds the "
                    f"scores of the other {len(table)} images."
                )
            return 2
    return 0


class _UnreadableLeftOut(torch.utils.data.Dataset):
    """``captum-ext score``'s view of an :class:`~captum_ext.data.loading.ImageFolderDataset`
    in which a file that cannot be read as an image (damaged, truncated, not an image) does
    not end the run: it is noted in ``unreadable`` (index -> (name, why)) and stands in as a
    blank image of the others' size, whose row :func:`_rows_left_out` drops before the CSV is
    written. Any other error (an image of another size, say) is raised as it is.

    Args:
        folder (ImageFolderDataset): the images.
    """

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self.unreadable: dict[int, tuple[str, str]] = {}
        self.blank: Any = None  # zeros of the first image's size, once one is read

    def __len__(self) -> int:
        return len(self.folder)

    def read(self, index: int) -> Any:
        """Item ``index`` of the folder, or None (noted) when its file cannot be read."""
        try:
            item = self.folder[index]
        except ValueError:
            why = _why_unreadable(self.folder.paths[index])
            if why is None:  # the file reads: the error is about something else
                raise
            self.unreadable[index] = (self.folder.names[index], why)
            return None
        if self.blank is None:
            self.blank = torch.zeros_like(item[0])
        return item

    def __getitem__(self, index: int) -> Any:
        item = self.read(index)
        if item is None:
            return self.blank, self.folder.labels[index]
        return item


def _why_unreadable(path: Path) -> str | None:
    """Why Pillow cannot read the image file ``path`` (one line), or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning
            with Image.open(path) as image:
                image.load()
    except MemoryError:
        raise
    except UnidentifiedImageError:
        return "not an image file Pillow can read"
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, EOFError, ...
        return " ".join(f"{type(error).__name__}: {error}".split())
    return None


def _probe_items(dataset: Any) -> list[Any]:
    """The first :data:`_PROBE_IMAGES` readable items of ``dataset``, the unreadable ones
    before them noted. A ValueError naming ``--images`` when there is none, or when the
    first file cannot be read (the folder reader compares every image with the first
    file's size, so nothing can be read then): it lists every unreadable file at once."""
    if not isinstance(dataset, _UnreadableLeftOut) or len(dataset) == 0:
        return [dataset[i] for i in range(min(_PROBE_IMAGES, len(dataset)))]
    items = []
    for index in range(len(dataset)):
        if len(items) == _PROBE_IMAGES:
            break
        item = dataset.read(index)
        if item is not None:
            items.append(item)
        elif index == 0:
            break
    if items and 0 not in dataset.unreadable:
        return items
    folder = dataset.folder
    scanned = folder.paths[:_SCAN_ON_FAILURE]  # decoding every file of a large folder: hours
    for index, path in enumerate(scanned):  # to list the unreadable ones at once
        if index not in dataset.unreadable:
            why = _why_unreadable(path)
            if why is not None:
                dataset.unreadable[index] = (folder.names[index], why)
    more = (
        f" (among the first {len(scanned)} of {len(folder.paths)} files; others may follow)"
        if len(scanned) < len(folder.paths)
        else ""
    )
    raise ValueError(
        f"{_cannot_read(dataset.unreadable)}{more}; nothing was scored: remove or replace "
        f"{'it' if len(dataset.unreadable) == 1 else 'them'} and run again."
    )


#: files checked to list the unreadable ones when the first file cannot be read (each is
#: decoded: about 4 ms for a 512 px JPEG)
_SCAN_ON_FAILURE = 200


def _cannot_read(unreadable: dict[int, tuple[str, str]]) -> str:
    """The start of the error listing the files that cannot be read, in path order."""
    listed = ", ".join(f"{name!r} ({why})" for _, (name, why) in sorted(unreadable.items()))
    count = len(unreadable)
    return f"`--images`: cannot read image{'' if count == 1 else f's ({count} files)'} {listed}"


def _gathered(unreadable: dict[int, tuple[str, str]]) -> dict[int, tuple[str, str]]:
    """The unreadable files noted by every process under torch.distributed (each reads its
    own batches), or by this one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(unreadable)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, unreadable)
    merged: dict[int, tuple[str, str]] = {}
    for part in everyone:
        merged.update(part)
    return merged


def _rows_left_out(table: Any, unreadable: dict[int, tuple[str, str]]) -> Any:
    """``table`` less the rows of the unreadable files (their blank stand-ins)."""
    from captum_ext.metrics import ScoreTable

    if not unreadable:
        return table
    dropped = torch.tensor(sorted(unreadable), dtype=table["index"].dtype)
    kept = ~torch.isin(table["index"], dropped)
    return ScoreTable({name: table[name][kept] for name in table.columns})


#: images read before scoring to check the model and see how its output is to be read (the
#: rest are read batch by batch as they are scored)
_PROBE_IMAGES = 2

#: scores that read the logits' level (their log-sum-exp), not only their softmax
_LEVEL_SCORES = ("energy", "purview")


def _without_level_scores(scores: list[str], model: Any, logits: Any) -> list[str]:
    """``scores`` less energy and purview, with a printed note, for a model whose outputs are
    read as probabilities (a final softmax, read as log-probabilities) or are
    log-probabilities (a final log_softmax): those have lost the constant per row of the
    logits that the two scores read (the energy of log-probabilities is 0 for every image),
    and the functions refuse them. A ValueError naming ``--scores`` when nothing is left."""
    from captum_ext.metrics.trust_baselines import _log_probability_rows

    dropped = [name for name in scores if name in _LEVEL_SCORES]
    if not dropped:
        return scores
    if getattr(model, "reads", None) == "probabilities":
        why = "it returns probabilities, read as log-probabilities"
    elif _log_probability_rows(logits) >= 2:  # one row may be real logits by chance
        why = "it returns log-probabilities (it ends in a log_softmax)"
    else:
        return scores
    kept = [name for name in scores if name not in _LEVEL_SCORES]
    named = " and ".join(dropped)
    message = (
        f"{named} need{'s' if len(dropped) == 1 else ''} the model's logits, and {why}: "
        "those have lost the constant per row of the logits that "
        f"{'it reads' if len(dropped) == 1 else 'they read'} (the energy of log-probabilities "
        "is 0 for every image). Score the model without its final softmax / log_softmax for "
        f"{'it' if len(dropped) == 1 else 'them'}."
    )
    if not kept:
        raise ValueError(f"`--scores`: {message}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Note: {named} left out: {message}")
    return kept


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
