"""Checkpoint state of a :class:`~captum_ext.inversion.NetworkInversion` (private module).

Shared by ``NetworkInversion.fit`` and ``TIE.fit`` (which stores its inversion inside its
own checkpoint): one place that writes and reads the generator, optimiser, step counters,
history and every rank's random state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from captum_ext._utils.training import distributed_shard, load_fitting_state, unwrap_distributed

__all__ = [
    "CHECKPOINT_FORMAT",
    "inversion_state",
    "objective_settings",
    "restore_inversion",
    "rng_devices",
]

#: the ``format`` entry of a NetworkInversion checkpoint
CHECKPOINT_FORMAT = "captum_ext.NetworkInversion/1"

_CHECKPOINT_KEYS = (
    "preset",
    "num_classes",
    "world_size",
    "generator",
    "optimizer",
    "step",
    "fit_step",
    "fit_steps",
    "fit_start",
    "rng",
    "history",
)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state ``torch.random.fork_rng`` must fork for ``device``."""
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


#: the names of a NetworkInversion's settings in its own signature; TIE passes its own
NETWORK_INVERSION_NAMES = {
    "steps": "steps",
    "lr": "lr",
    "betas": "betas",
    "seed": "seed",
    "batch_size": "batch_size",
}


def inversion_state(
    inversion: Any, fit_step: int, steps: int, fit_start: int, batch_size: int
) -> dict[str, Any]:
    """What a checkpoint of ``inversion`` holds after ``fit_step`` of ``steps`` steps of
    ``batch_size`` images (every rank's random state is gathered, so all ranks must call
    it)."""
    rng = dict(inversion._rng)
    shard = distributed_shard()
    if shard is not None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * shard[1]
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        ranks = gathered
    else:
        ranks = [{k: v.cpu() for k, v in rng.items()}]
    return {
        "format": CHECKPOINT_FORMAT,
        "preset": inversion.preset,
        "num_classes": inversion.generator.num_classes,
        "image_shape": list(unwrap_distributed(inversion.generator).out_shape),
        "latent_dim": int(unwrap_distributed(inversion.generator).latent_dim),
        "world_size": len(ranks),
        "generator": unwrap_distributed(inversion.generator).state_dict(),
        "optimizer": inversion.optimizer.state_dict(),
        "step": inversion._step,
        "fit_step": fit_step,
        "fit_steps": steps,
        "fit_start": fit_start,
        "seed": int(inversion.seed),
        "batch_size": int(batch_size),
        "rng": ranks,
        "history": {key: list(values) for key, values in inversion.history.items()},
        "objective": objective_settings(inversion),
    }


#: the objective settings of a checkpoint written before they were recorded: the
#: constructor's defaults (the loss weights default to the preset's, see
#: :func:`_saved_objective`)
_OBJECTIVE_DEFAULTS: dict[str, Any] = {
    "eps": 0.1,
    "feature_layer": None,
    "feature_layer_input": False,
}


def objective_settings(inversion: Any) -> dict[str, Any]:
    """The settings that shape the loss of ``inversion``'s fit besides its preset, as plain
    values a ``weights_only`` checkpoint holds: the loss weights of every phase (dicts of
    floats), the perturbation size ``eps`` and the feature layer as its dotted name in the
    model (None: the one found automatically, compared as given). The generator's
    ``preprocess`` is a function of the generator, not compared here."""
    layer = inversion._feature_layer
    if layer is not None and not isinstance(layer, str):
        names = {id(m): n for n, m in unwrap_distributed(inversion.model).named_modules()}
        # a module outside the model is known by its class only
        layer = names.get(id(layer), f"<{type(layer).__qualname__}>")
    return {
        "weights": [{k: float(v) for k, v in phase.items()} for phase in inversion._phases],
        "eps": float(inversion.eps),
        "feature_layer": layer,
        "feature_layer_input": bool(inversion._feature_layer_input),
    }


def _saved_objective(state: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's objective settings, a missing one (written before it was recorded)
    with its default: the preset's loss weights, ``eps`` 0.1, the automatic feature layer."""
    from captum_ext.inversion.network_inversion import _phase_weights  # imports this module

    saved = dict(state.get("objective") or {})
    if "weights" not in saved:
        saved["weights"] = _phase_weights(state["preset"], None)
    return {**_OBJECTIVE_DEFAULTS, **saved}


def _differing_weights(own: list, saved: list, name: str) -> list[str]:
    """Each loss term whose weight differs, per phase: "`weights['ce']`=10.0 (the
    checkpoint's: 1.0)" (a list over the phases for a preset of several)."""
    if len(own) != len(saved):  # (the preset is checked first: not reached)
        return [f"`{name}`={own!r} (the checkpoint's: {saved!r})"]
    differ = []
    terms = list(dict.fromkeys(term for phase in [*own, *saved] for term in phase))
    for term in terms:
        mine = [float(phase.get(term, 0.0)) for phase in own]
        theirs = [float(phase.get(term, 0.0)) for phase in saved]
        if mine != theirs:
            if len(mine) == 1:
                mine, theirs = mine[0], theirs[0]
            differ.append(f"`{name}[{term!r}]`={mine!r} (the checkpoint's: {theirs!r})")
    return differ


def _differing_settings(
    inversion: Any, state: Mapping[str, Any], steps: int, batch_size: int, names: Mapping
) -> list[str]:
    """The settings of this call that differ from the checkpointed fit's, as
    "`name`=value (the checkpoint's: value)": the optimiser's state would bring the old
    learning rate and betas back, and the random state the old seed's draws, without a word;
    and other loss weights, ``eps`` or feature layer would continue on another objective.
    (Checkpoints written before the seed, batch size or objective were recorded are not
    checked for those.)"""
    own_group = inversion.optimizer.param_groups[0]
    saved_groups = state["optimizer"].get("param_groups") or [{}]
    ours = {"steps": steps, "seed": int(inversion.seed), "batch_size": int(batch_size)}
    theirs = {
        "steps": state["fit_steps"],
        "seed": state.get("seed"),
        "batch_size": state.get("batch_size"),
    }
    for key in ("lr", "betas"):
        ours[key], theirs[key] = own_group.get(key), saved_groups[0].get(key)
    differ = []
    for key in ("steps", "lr", "betas", "seed", "batch_size"):
        mine, saved = ours[key], theirs[key]
        if isinstance(mine, tuple | list):
            mine, saved = tuple(mine), tuple(saved) if saved is not None else None
        if saved is not None and mine != saved:
            differ.append(f"`{names[key]}`={mine!r} (the checkpoint's: {saved!r})")
    # the objective: a checkpoint written before it was recorded is not compared for it (the
    # settings it was fitted with cannot be told: the user's, not necessarily the
    # defaults); in a recorded one, a setting added since is compared with its default
    if "objective" not in state:
        return differ
    own, saved_objective = objective_settings(inversion), _saved_objective(state)
    differ += _differing_weights(
        own["weights"], saved_objective["weights"], names.get("weights", "weights")
    )
    for key in ("eps", "feature_layer", "feature_layer_input"):
        if own[key] != saved_objective[key]:
            differ.append(
                f"`{names.get(key, key)}`={own[key]!r} (the checkpoint's: {saved_objective[key]!r})"
            )
    return differ


def restore_inversion(
    inversion: Any,
    state: Mapping[str, Any],
    steps: int,
    batch_size: int,
    names: Mapping[str, str] = NETWORK_INVERSION_NAMES,
) -> tuple[int, int]:
    """Load ``state`` (from :func:`inversion_state`) into ``inversion`` after checking it
    belongs to the same fit, with the same settings (named as in ``names``); returns
    ``(fit_step, fit_start)``."""
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("`checkpoint` was not written by NetworkInversion.fit.")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"`checkpoint` lacks the entries {missing} a NetworkInversion.fit writes.")
    num_classes = inversion.generator.num_classes
    if state["preset"] != inversion.preset or state["num_classes"] != num_classes:
        raise ValueError(
            f"`checkpoint` is for preset {state['preset']!r} with {state['num_classes']} "
            f"classes, not {inversion.preset!r} with {num_classes}."
        )
    generator = unwrap_distributed(inversion.generator)
    for key, own in (
        ("image_shape", list(generator.out_shape)),
        ("latent_dim", generator.latent_dim),
    ):
        # (checkpoints written before these were recorded are not checked here)
        if key in state and state[key] != own:
            raise ValueError(
                f"`checkpoint` is for a generator with {key} {state[key]}, not {own}: it "
                "belongs to another fit."
            )
    differ = _differing_settings(inversion, state, steps, batch_size, names)
    if differ:
        raise ValueError(
            f"`resume`: {', '.join(differ)} differ from the interrupted fit's; resume with "
            "the same settings, or start a new fit without `resume`."
        )
    shard = distributed_shard()
    rank, world = (0, 1) if shard is None else shard
    if state["world_size"] != world:
        raise ValueError(
            f"`resume`: the checkpoint was written by {state['world_size']} processes, "
            f"this run has {world}."
        )
    load_fitting_state(inversion.generator, state["generator"], "`checkpoint`")
    inversion.optimizer.load_state_dict(state["optimizer"])
    inversion._step = int(state["step"])
    inversion.history = {key: list(values) for key, values in state["history"].items()}
    inversion._rng = dict(state["rng"][rank])
    return int(state["fit_step"]), int(state["fit_start"])
