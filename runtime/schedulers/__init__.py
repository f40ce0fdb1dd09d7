"""NumPy schedulers built from a diffusers ``scheduler_config.json``, step for step as diffusers.

A scheduler object holds only what its config determines and never changes; ``start(steps)``
returns a run that carries the per-generation state (timesteps and, for multistep methods,
earlier model outputs), so one loaded pipeline can serve concurrent requests. ``start(steps,
strength)`` begins where diffusers' img2img ``get_timesteps`` does; ``start(steps, begin=i)``
begins at index ``i`` of the full schedule instead (diffusers' ``set_begin_index``, which SDXL's
``denoising_start`` uses; see ``conditioning.denoising_start_begin``), ignoring ``strength``.
The run's ``step(model_output, index, sample, noise)`` draws random numbers only through
``noise`` (in diffusers' order), so a seeded generator reproduces diffusers' stochastic samplers.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.schedulers.ddim import DDIMScheduler
from sdrt.runtime.schedulers.ddpm import DDPMScheduler
from sdrt.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler
from sdrt.runtime.schedulers.dpmsolver_single import DPMSolverSinglestepScheduler
from sdrt.runtime.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from sdrt.runtime.schedulers.flow_match import FlowMatchEulerDiscreteScheduler
from sdrt.runtime.schedulers.heun import HeunDiscreteScheduler
from sdrt.runtime.schedulers.lcm import LCMScheduler
from sdrt.runtime.schedulers.lms import LMSDiscreteScheduler
from sdrt.runtime.schedulers.pndm import PNDMScheduler
from sdrt.runtime.schedulers.unipc import UniPCMultistepScheduler

SCHEDULERS = {
    cls.name: cls
    for cls in (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        HeunDiscreteScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )
}

_KARRAS = {"use_karras_sigmas": True}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# Short names (as web UIs call the samplers) -> (diffusers class, config overrides). The model's
# own betas, prediction type and spacing stay underneath.
ALIASES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", _KARRAS),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", _KARRAS),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun-karras": ("HeunDiscreteScheduler", _KARRAS),
    "dpm++2m": ("DPMSolverMultistepScheduler", _DPMPP_2M),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_KARRAS}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", _DPMPP_2M_SDE),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **_KARRAS}),
    "dpm-single": ("DPMSolverSinglestepScheduler", {}),
    "dpm-single-karras": ("DPMSolverSinglestepScheduler", _KARRAS),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", _KARRAS),
    "lcm": ("LCMScheduler", {}),
}

# Every field any of our schedulers knows: a config may carry another scheduler's fields (SD 1.5's
# PNDM config has DDIM's clip_sample), which diffusers ignores too; a field nobody knows is a typo.
KNOWN_FIELDS = frozenset(f for cls in SCHEDULERS.values() for f in cls.defaults)


def names() -> list[str]:
    return sorted(ALIASES) + sorted(SCHEDULERS)


def resolve(config: dict, override: str | None = None) -> tuple[type, dict]:
    """The scheduler class and its config fields for ``config`` (and an optional override name)."""
    name, extra = config.get("_class_name"), {}
    if override is not None:
        if override in ALIASES:
            name, extra = ALIASES[override]
        elif override in SCHEDULERS:
            name = override
        else:
            raise InputError(f"scheduler: expected one of {', '.join(names())}, got {override!r}")
    if name not in SCHEDULERS:
        raise InputError(
            f"scheduler_config.json: _class_name {name!r} is not supported; supported: "
            f"{', '.join(sorted(SCHEDULERS))} (or pass a scheduler override: {', '.join(sorted(ALIASES))})"
        )
    unknown = sorted(k for k in config if not k.startswith("_") and k not in KNOWN_FIELDS)
    if unknown:
        raise InputError(
            f"scheduler_config.json: unknown fields {unknown}; {name} supports: {', '.join(SCHEDULERS[name].defaults)}"
        )
    cls = SCHEDULERS[name]
    own = SCHEDULERS.get(config.get("_class_name"))
    if own is not None and is_flow_matching(own) != is_flow_matching(cls):
        kind = "a flow-matching model (SD 3)" if is_flow_matching(own) else "a diffusion (noise-prediction) model"
        fitting = sorted(n for n, c in SCHEDULERS.items() if is_flow_matching(c) == is_flow_matching(own))
        raise InputError(
            f"scheduler: {name} does not fit {kind}, whose own scheduler is {own.name}; expected one of "
            f"{', '.join(fitting)}"
        )
    fields = {k: v for k, v in config.items() if k in cls.defaults}
    return cls, {**fields, **extra}


def is_flow_matching(cls: type) -> bool:
    """Whether a scheduler integrates a flow (SD 3's velocity along sigma) rather than a diffusion's noise."""
    return bool(getattr(cls, "flow_matching", False))


def from_config(config: dict, override: str | None = None):
    """Build the configured scheduler, or ``override`` (a short name or class name) on the same betas."""
    cls, fields = resolve(config, override)
    return cls(fields)


def read_config(path: Path) -> dict:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: expected a diffusers scheduler_config.json, could not read it: {e}") from e
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ArtifactError(f"{path}: expected a JSON object with '_class_name', got {type(config).__name__}")
    return config
