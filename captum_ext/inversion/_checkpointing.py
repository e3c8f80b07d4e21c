"""Checkpoint state of a :class:`~captum_ext.inversion.NetworkInversion` (private module).

Shared by ``NetworkInversion.fit`` and ``TIE.fit`` (which stores its inversion inside its
own checkpoint): one place that writes and reads the generator, optimiser, step counters,
history and every rank's random state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from captum_ext._utils.training import distributed_shard, unwrap_distributed

__all__ = ["CHECKPOINT_FORMAT", "inversion_state", "restore_inversion", "rng_devices"]

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


def inversion_state(inversion: Any, fit_step: int, steps: int, fit_start: int) -> dict[str, Any]:
    """What a checkpoint of ``inversion`` holds after ``fit_step`` of ``steps`` steps (every
    rank's random state is gathered, so all ranks must call it)."""
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
        "rng": ranks,
        "history": {key: list(values) for key, values in inversion.history.items()},
    }


def restore_inversion(inversion: Any, state: Mapping[str, Any], steps: int) -> tuple[int, int]:
    """Load ``state`` (from :func:`inversion_state`) into ``inversion`` after checking it
    belongs to the same fit; returns ``(fit_step, fit_start)``."""
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
    if state["fit_steps"] != steps:
        raise ValueError(
            f"`steps`={steps} differs from the interrupted fit's {state['fit_steps']}; "
            "resume with the same `steps`."
        )
    shard = distributed_shard()
    rank, world = (0, 1) if shard is None else shard
    if state["world_size"] != world:
        raise ValueError(
            f"`resume`: the checkpoint was written by {state['world_size']} processes, "
            f"this run has {world}."
        )
    inversion.generator.load_state_dict(state["generator"])
    inversion.optimizer.load_state_dict(state["optimizer"])
    inversion._step = int(state["step"])
    inversion.history = {key: list(values) for key, values in state["history"].items()}
    inversion._rng = dict(state["rng"][rank])
    return int(state["fit_step"]), int(state["fit_start"])
