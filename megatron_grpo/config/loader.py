"""Load a run configuration: YAML composition + CLI dotlist overrides onto the structured schema.

Composition: a YAML file may list ``defaults: [base.yaml, ...]`` (paths relative to it); those are
merged first, then the file itself, then ``key=value`` overrides from the command line. Every
problem becomes one :class:`ConfigError` line naming the key, where it came from, and what would be
valid (closest key, expected type), before any process group or model is touched.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import GRPOConfig


class ConfigError(ValueError):
    """A configuration problem, stated in one actionable line."""


def _valid_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of the schema (list items as `.0`), for "did you mean" suggestions."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
                keys.extend(_valid_keys(child, full + "."))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False)):
            if isinstance(child, (DictConfig, ListConfig)):
                keys.extend(_valid_keys(child, f"{prefix}{i}."))
    return keys


def _suggest(bad_key: str, schema: DictConfig) -> str:
    parent, _, leaf = bad_key.rpartition(".")
    keys = _valid_keys(schema)
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    if close:
        return f"{parent + '.' if parent else ''}{close[0]}"
    close = difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    return ", ".join(siblings[:12]) if siblings else ""


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        hint = _suggest(key, base)
        top = key.split(".")[0]
        if top in base:
            where = f"unknown config key '{key}'"
        else:
            where = f"unknown config section '{top}'" + (f" (in '{key}')" if key != top else "")
        raise ConfigError(f"{source}: {where}; valid here: {hint}" if hint and "," in hint
                          else f"{source}: {where}; did you mean '{hint}'?" if hint
                          else f"{source}: {where}") from None
    except ValidationError as e:
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: config key '{e.full_key}': {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {str(e).splitlines()[0]}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """The file's `defaults` (recursively) followed by the file, as (source, mapping) pairs."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' chain: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    defaults = data.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    layers: list[tuple[str, dict]] = []
    for d in defaults:
        layers.extend(_read_yaml(path.parent / str(d), (*seen, path)))
    layers.append((str(path), data))
    return layers


def load_config(config_path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- YAML layers <- CLI overrides. Returns a structured, type-checked DictConfig."""
    cfg = OmegaConf.structured(GRPOConfig)
    if config_path is not None:
        for source, data in _read_yaml(Path(config_path), ()):
            cfg = _merge(cfg, OmegaConf.create(data), source)
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: {str(e).splitlines()[0]}") from None
        cfg = _merge(cfg, dot, "command line")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' is required: set it in the YAML or as {missing[0]}=...")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config interpolation failed: {str(e).splitlines()[0]}") from None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the resolved config next to the run's outputs (atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path
