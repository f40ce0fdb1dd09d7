"""NumPy schedulers built from a diffusers ``scheduler_config.json``.

A scheduler object holds only what its config determines and never changes; ``start(steps)``
returns a run that carries the per-generation state (timesteps and, for multistep methods,
earlier model outputs), so one loaded pipeline can serve concurrent requests.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.schedulers.ddim import DDIMScheduler

SCHEDULERS = {cls.name: cls for cls in (DDIMScheduler,)}
# Short names for the CLI and the ``scheduler=`` override, mapped to (class, config overrides).
ALIASES = {"ddim": ("DDIMScheduler", {})}


def from_config(config: dict, override: str | None = None):
    """Build the configured scheduler, or ``override`` (a short name or class name) on the same betas."""
    name = config.get("_class_name")
    extra: dict = {}
    if override is not None:
        if override in ALIASES:
            name, extra = ALIASES[override]
        elif override in SCHEDULERS:
            name = override
        else:
            raise InputError(
                f"scheduler: expected one of {', '.join(sorted(ALIASES) + sorted(SCHEDULERS))}, got {override!r}"
            )
    if name not in SCHEDULERS:
        raise InputError(
            f"scheduler_config.json: _class_name {name!r} is not supported; supported: "
            f"{', '.join(sorted(SCHEDULERS))} (or pass a scheduler override: {', '.join(sorted(ALIASES))})"
        )
    cls = SCHEDULERS[name]
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k in cls.defaults}
    return cls({**fields, **extra})


def read_config(path: Path) -> dict:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: expected a diffusers scheduler_config.json, could not read it: {e}") from e
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ArtifactError(f"{path}: expected a JSON object with '_class_name', got {type(config).__name__}")
    return config
