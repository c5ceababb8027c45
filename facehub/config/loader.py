"""Where settings come from: one TOML file plus ``FACEHUB_*`` environment overrides.

A container should need nothing but environment variables, so every key of the
file can also be set as ``FACEHUB_<SECTION>_<KEY>`` (``FACEHUB_DETECTOR_SOURCE``,
``FACEHUB_CLOUD_PASSWORD``); top-level keys are ``FACEHUB_<KEY>``
(``FACEHUB_DEVICE_ID``). Values are coerced to each field's type here and
validated by the schema once, and every error names the key (and the
variable it came from).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import fields
from typing import Any, Mapping

from facehub.config.schema import Config, ConfigError

ENV_PREFIX = "FACEHUB_"


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the file (if any), apply ``FACEHUB_*`` overrides, validate, return the result.

    The file defaults to ``$FACEHUB_CONFIG`` when no path is given.
    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    config = Config()
    if path:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        _apply_mapping(config, data, prefix="")
    _apply_env(config, env)
    return config.validate()


def _apply_mapping(target: Any, data: Mapping[str, Any], prefix: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in data.items():
        label = _close(f"{prefix}{key}")
        if key not in known:
            raise ConfigError(f"{label}: unknown setting")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label}: must be a table of settings")
            _apply_mapping(current, value, prefix=f"{prefix}{key}.")
        else:
            setattr(target, key, _coerce(label, value, type(current)))


def _apply_env(config: Config, env: Mapping[str, str]) -> None:
    sections = {f.name for f in fields(config) if dataclasses.is_dataclass(getattr(config, f.name))}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            _apply_mapping(getattr(config, section), {key: raw}, prefix=f"{var} ({section}.")
        else:
            _apply_mapping(config, {rest: raw}, prefix=f"{var} (")


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Turn a file or environment value into the setting's type, or name the key."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def _close(name: str) -> str:
    """Close the '(' opened for environment variable names in error messages."""
    return name + ")" if "(" in name and not name.endswith(")") else name
