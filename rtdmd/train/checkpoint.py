"""Training checkpoints: complete state, atomic publication, resume (spec §9; DESIGN.md §4).

Layout (local dir or ``s3://`` prefix)::

    <ckpt_dir>/step-<N>/state.safetensors   every tensor: LoRA of each role, EMA shadow,
                                            optimizer moments, per-rank torch RNG states, extras
                    /state.json             everything else: step, config hash, schedulers,
                                            optimizer param groups, EMA counters, data position,
                                            per-rank python/numpy RNG, stage extras, metrics
                    /manifest.json          sha256 of the two files above
                    /COMPLETE               written last (holds the manifest's sha256)

No pickle anywhere: tensors go to safetensors, the rest to JSON. Local writes are built in a
temp sibling and renamed into place (the marker is inside, so a directory named ``step-<N>``
is complete by construction; a crash leaves only a ``.step-<N>.tmp-*`` sibling, removed by the
next save). On S3 the files and manifest are uploaded first and ``COMPLETE`` last. Resume picks
the highest step with a marker; partial checkpoints are ignored. After a save only the newest
``keep_last`` complete checkpoints are kept.

Corruption: :meth:`CheckpointStore.load_latest` verifies the newest complete checkpoint (marker =
sha256 of the manifest, manifest paths safe, every file's sha256) and, if it fails, quarantines
it — renamed to ``step-<N>.corrupt-<UTC time>`` (on S3 its marker is replaced by ``QUARANTINED``),
never deleted — and falls back to the previous complete one with a warning. Saves are
byte-deterministic for identical state (sorted safetensors header, sorted JSON).

Only global rank 0 writes (after collective gathers of sharded state); every rank reads.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtdmd.artifacts.fs import (ArtifactError, atomic_dir, atomic_write_bytes, check_manifest_paths, save_safetensors,
                               sha256_file, write_manifest)
from rtdmd.dist import full_tensor, shard_like
from rtdmd.artifacts.store import delete_prefix, fetch_dir, is_s3, join, publish_dir, s3_client, split_s3

COMPLETE = "COMPLETE"
TENSORS = "state.safetensors"
STATE = "state.json"
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, corrupt or belongs to a different config."""


def step_dir_name(step: int) -> str:
    return f"step-{int(step)}"


class CheckpointStore:
    """Complete checkpoints under ``root`` (local path or ``s3://bucket/prefix``)."""

    def __init__(self, root: str, keep_last: int = 3):
        self.root = str(root).rstrip("/")
        self.keep_last = int(keep_last)

    # ---- listing -------------------------------------------------------------------------
    def _s3_keys(self) -> list[str]:
        bucket, prefix = split_s3(self.root)
        client = s3_client()
        keys, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix + "/"}
            if token:
                kw["ContinuationToken"] = token
            resp = client.list_objects_v2(**kw)
            keys += [o["Key"][len(prefix) + 1:] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return keys
            token = resp["NextContinuationToken"]

    def complete_steps(self) -> list[int]:
        steps = []
        if is_s3(self.root):
            for key in self._s3_keys():
                parts = key.split("/")
                if len(parts) == 2 and parts[1] == COMPLETE and _STEP.match(parts[0]):
                    steps.append(int(_STEP.match(parts[0])[1]))
        else:
            root = Path(self.root)
            if root.is_dir():
                for d in root.iterdir():
                    m = _STEP.match(d.name)
                    if m and d.is_dir() and (d / COMPLETE).is_file():
                        steps.append(int(m[1]))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ---- save ------------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
        """Write one checkpoint (rank 0 only); returns its URI."""
        def fill(d: Path) -> str:
            save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, d / TENSORS)
            (d / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
            write_manifest(d, {"kind": "rtdmd-checkpoint", "step": int(step)})
            return sha256_file(d / "manifest.json")

        uri = join(self.root, step_dir_name(step))
        if is_s3(self.root):
            with tempfile.TemporaryDirectory() as tmp:
                digest = fill(Path(tmp))
                publish_dir(tmp, uri, {"kind": "rtdmd-checkpoint", "step": int(step)})
            bucket, prefix = split_s3(uri)
            s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{COMPLETE}", Body=digest.encode())
        else:
            root = Path(self.root)
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step-*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            with atomic_dir(Path(uri)) as tmp:
                digest = fill(tmp)
                atomic_write_bytes(tmp / COMPLETE, digest.encode())
        self.prune()
        return uri

    def prune(self) -> None:
        steps = self.complete_steps()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            uri = join(self.root, step_dir_name(old))
            if is_s3(uri):
                # the marker first: a half-deleted checkpoint is never taken as complete
                delete_prefix(uri, first=(COMPLETE,))
            else:
                (Path(uri) / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(uri, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------
    def load(self, step: int, cache_dir: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        uri = join(self.root, step_dir_name(step))
        try:
            if is_s3(uri):
                path = fetch_dir(uri, cache_dir)
            else:
                path = Path(uri)
                _verify_local(path)
            return load_file(str(path / TENSORS)), json.loads((path / STATE).read_text())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"checkpoint {uri} is unreadable: {' '.join(str(exc).split())[:300]}") from None

    def load_latest(self, *, quarantine: bool = True, warn=print):
        """``(step, tensors, state)`` of the newest checkpoint that verifies, or ``None``.

        A failing one is quarantined (only when ``quarantine``: rank 0) and the previous complete
        checkpoint is tried, with a warning naming both.
        """
        for step in reversed(self.complete_steps()):
            try:
                return (step, *self.load(step))
            except CheckpointError as exc:
                where = self.quarantine(step) if quarantine else "left for rank 0 to quarantine"
                warn(f"warning: {exc}; quarantined ({where}); falling back to the previous complete checkpoint")
        return None

    def quarantine(self, step: int) -> str:
        """Take ``step-<N>`` out of the resume candidates without deleting it; returns where it went."""
        import datetime as _dt

        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        uri = join(self.root, step_dir_name(step))
        if is_s3(uri):
            bucket, prefix = split_s3(uri)
            client = s3_client()
            client.put_object(Bucket=bucket, Key=f"{prefix}/QUARANTINED", Body=stamp.encode())
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{COMPLETE}")
            return f"{uri}/QUARANTINED"
        target = Path(self.root) / f"{step_dir_name(step)}.corrupt-{stamp}"
        try:
            Path(uri).rename(target)
        except OSError:
            return "could not rename"
        return str(target)


def _verify_local(path: Path) -> None:
    """Marker matches the manifest, manifest paths are safe, state files listed and unmodified."""
    try:
        manifest = check_manifest_paths(json.loads((path / "manifest.json").read_text()), str(path / "manifest.json"))
    except ArtifactError as exc:
        raise CheckpointError(str(exc)) from None
    marker = (path / COMPLETE).read_text().strip()
    if marker and marker != sha256_file(path / "manifest.json"):
        raise CheckpointError(f"{path / 'manifest.json'} does not match the checksum in its {COMPLETE} marker")
    for rel in (TENSORS, STATE):
        if rel not in manifest["files"]:
            raise CheckpointError(f"{path / 'manifest.json'} does not list {rel}")
    for rel, info in manifest["files"].items():
        if rel != COMPLETE and sha256_file(path / rel) != info["sha256"]:
            raise CheckpointError(f"{path / rel} does not match its manifest checksum")


# ---- state (de)serialisation helpers ----------------------------------------------------------
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states as (JSON part, tensor part)."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tens = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tens[f"cuda_{i}"] = s
    return js, tens


def set_rng_state(js: dict[str, Any], tens: dict[str, torch.Tensor]) -> None:
    v, keys, gauss = js["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tens["torch_cpu"])
    cuda = [tens[k] for k in sorted(tens) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Full (un-sharded) optimizer state keyed by parameter name; collective under FSDP."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{names[idx]}/{k}"] = full_tensor(v).detach().cpu().clone()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"param_groups": groups}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                         js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    names = list(params)
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        if name not in index:
            raise CheckpointError(f"optimizer state names parameter {name!r} the model does not have")
        p = params[name]
        state.setdefault(index[name], {})[k] = shard_like(p, v) if v.dim() > 0 else v.clone()
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
