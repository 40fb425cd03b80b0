"""Plain-dict registries: a lookup that names the valid choices when a name is unknown."""

from __future__ import annotations

from vlmlab.config import ConfigError


def lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(registry)}")
    return registry[name]
