"""The LoRA artifact of a training stage (DESIGN.md §4).

Layout::

    <artifact>/
      generator/   pytorch_lora_weights.safetensors + adapter_config.json   (EMA weights)
      fake_score/  (same; optional)
      manifest.json  stage, backbone, base model id + revision, parent (uri + sha256) for
                     stacking, sampler settings, config hash, data version, metrics,
                     sha256 + size of every file

``stack_chain`` follows ``parent`` links so a cold-start -> RL stack is loaded in order.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtdmd.artifacts.fs import MANIFEST, ArtifactError
from rtdmd.artifacts.store import fetch_dir, publish_dir
from rtdmd.lora.io import load_lora_dir, save_lora_dir

ROLES = ("generator", "fake_score")


@dataclass
class Adapter:
    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    targets: list[str]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraArtifact:
    uri: str
    path: Path
    manifest: dict
    adapters: dict[str, Adapter] = field(default_factory=dict)

    @property
    def backbone(self) -> str:
        return self.manifest.get("backbone", "")

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()


def publish_lora_artifact(uri: str, adapters: dict[str, Adapter], fields: dict) -> dict:
    """Write adapters to a temp dir and publish them (atomic locally, manifest-last on S3)."""
    unknown = set(adapters) - set(ROLES)
    if unknown:
        raise ArtifactError(f"unknown adapter roles {sorted(unknown)}; expected {ROLES}")
    with tempfile.TemporaryDirectory() as tmp:
        for role, ad in adapters.items():
            save_lora_dir(Path(tmp) / role, ad.state, rank=ad.rank, alpha=ad.alpha, targets=ad.targets)
        return publish_dir(tmp, uri, {"kind": "rtdmd-lora", **fields})


def load_lora_artifact(uri: str, *, backbone: str | None = None, expected_sha256: str | None = None,
                       cache_dir: str | Path | None = None) -> LoraArtifact:
    """Fetch + verify an artifact; refuse a backbone or parent-checksum mismatch."""
    path = fetch_dir(uri, cache_dir)
    manifest = json.loads((path / MANIFEST).read_text())
    art = LoraArtifact(uri=uri, path=path, manifest=manifest)
    if manifest.get("kind") != "rtdmd-lora":
        raise ArtifactError(f"{uri} is not an RTDMD LoRA artifact (manifest kind={manifest.get('kind')!r})")
    if backbone is not None and manifest.get("backbone") != backbone:
        raise ArtifactError(
            f"{uri} was trained for backbone '{manifest.get('backbone')}', not '{backbone}'"
        )
    if expected_sha256 is not None and art.manifest_sha256 != expected_sha256:
        raise ArtifactError(f"{uri}: manifest sha256 {art.manifest_sha256[:12]}… != expected {expected_sha256[:12]}…")
    for role in ROLES:
        if (path / role).is_dir():
            state, cfg = load_lora_dir(path / role)
            art.adapters[role] = Adapter(state, int(cfg["r"]), float(cfg["lora_alpha"]), list(cfg["target_modules"]))
    if "generator" not in art.adapters:
        raise ArtifactError(f"{uri} has no generator adapter")
    return art


def stack_chain(uri: str, *, backbone: str | None = None, cache_dir=None) -> list[LoraArtifact]:
    """``[root, ..., uri]``: the artifact and its ancestors, oldest first, checksums verified."""
    chain: list[LoraArtifact] = []
    current, expected = uri, None
    while current:
        art = load_lora_artifact(current, backbone=backbone, expected_sha256=expected, cache_dir=cache_dir)
        chain.append(art)
        parent = art.manifest.get("parent") or {}
        current, expected = parent.get("uri"), parent.get("manifest_sha256")
        if len(chain) > 8:
            raise ArtifactError(f"{uri}: parent chain longer than 8 (cycle?)")
    return list(reversed(chain))
