"""Rules of the reference-config importer (``rtdmd.config.reference_import``).

:class:`Builder` holds the reference files (flattened to dotted keys) and the params mapping
being built; every reference key is consumed by exactly one rule — ``map``, ``same``, ``fixed``
or ``ignore`` — and :meth:`Builder.unmapped` lists the keys no rule consumed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import yaml

from rtdmd.config.typed import ConfigError

FAMILIES = {"flux2_klein": "flux2_klein", "flux": "flux1", "sd35": "sd3", "sd3": "sd3"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHARDING = {"full_shard": "full_shard", "hybrid": "hybrid_shard", "hybrid_shard": "hybrid_shard",
            "shard_grad_op": "shard_grad_op"}
IGNORED_REASON = {
    "path": "a location on the reference's machines; ours come from params paths / the environment",
    "logging": "experiment-tracker settings (MLflow replaces W&B here)",
    "media": "how many images are logged, not what is trained",
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("reward_fn", "reward_dataset_map"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _read(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return _flat(data)


def _prompts(path: str) -> str:
    """``dataset/<name>`` (the reference's layout) → ``data/prompts/<name>``."""
    return re.sub(r"^(\./)?dataset/", "data/prompts/", str(path))


def _milestone(path: str) -> int:
    m = re.search(r"checkpoint-(\d+)", str(path))
    if not m:
        raise ConfigError(f"cannot read the stage-1 checkpoint step from load_path {path!r} "
                          f"(expected .../checkpoint-<step>/...)")
    return int(m.group(1))


class Builder:
    """Collects params fields; each reference key is consumed by exactly one rule."""

    def __init__(self, files: dict[str, dict[str, Any]], sources: dict[str, str]):
        self.files, self.sources = files, sources
        self.used: dict[str, set[str]] = {f: set() for f in files}
        self.out: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        self.notes: list[str] = []

    def get(self, f: str, key: str, default: Any = KeyError) -> Any:
        self.used[f].add(key)
        if key in self.files[f]:
            return self.files[f][key]
        if default is KeyError:
            raise ConfigError(f"{self.sources[f]}: required key '{key}' is missing")
        return default

    def has(self, f: str, key: str) -> bool:
        return key in self.files[f]

    def set(self, field: str, value: Any, f: str, key: str) -> None:
        node = self.out
        *parents, leaf = field.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        self.origin[field] = f"{self.sources[f]}:{key}"

    def value(self, field: str) -> Any:
        node: Any = self.out
        for p in field.split("."):
            node = node[p]
        return node

    def map(self, f: str, key: str, field: str, conv: Callable[[Any], Any] = lambda v: v, **kw) -> None:
        if "default" in kw and not self.has(f, key):
            self.used[f].add(key)
            self.set(field, kw["default"], f, key)
            return
        self.set(field, conv(self.get(f, key)), f, key)

    def same(self, f: str, key: str, field: str, conv: Callable[[Any], Any] = lambda v: v) -> None:
        if not self.has(f, key):
            self.used[f].add(key)
            return
        got, want = conv(self.get(f, key)), self.value(field)
        if got != want:
            raise ConfigError(f"{self.sources[f]}: '{key}' = {self.files[f][key]!r} disagrees with "
                              f"{self.origin.get(field, field)} = {want!r} (params has one '{field}' for both)")

    def fixed(self, f: str, key: str, allowed: Any, why: str) -> None:
        if not self.has(f, key):
            self.used[f].add(key)
            return
        got = self.get(f, key)
        ok = got in allowed if isinstance(allowed, (tuple, set, frozenset)) else got == allowed
        if not ok:
            raise ConfigError(f"{self.sources[f]}: '{key}' = {got!r} is not supported; expected {allowed!r} ({why})")

    def ignore(self, f: str, key: str, reason: str) -> None:
        if self.has(f, key):
            self.used[f].add(key)
            self.notes.append(f"{self.sources[f]}: '{key}' ignored — {IGNORED_REASON.get(reason, reason)}")

    def ignore_prefix(self, f: str, prefix: str, reason: str) -> None:
        for key in [k for k in self.files[f] if k.startswith(prefix)]:
            self.ignore(f, key, reason)

    def unmapped(self) -> list[str]:
        return [f"{self.sources[f]}: {k}" for f in self.files for k in self.files[f] if k not in self.used[f]]


def _family(v: Any) -> str:
    if v not in FAMILIES:
        raise ConfigError(f"model.model_type {v!r} is not supported; expected one of {sorted(FAMILIES)}")
    return FAMILIES[v]


def _dtype(v: Any) -> str:
    if v not in DTYPES:
        raise ConfigError(f"dtype {v!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[v]
