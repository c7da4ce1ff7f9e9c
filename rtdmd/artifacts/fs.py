"""Atomic publication of directories and checksum manifests.

A directory is built under a sibling temp name and renamed into place only when complete, so a
reader never sees a half-written artifact; ``manifest.json`` lists the sha256 of every other
file and is written last. :func:`verify_manifest` refuses any mismatch, missing or extra file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or fails its checksums; the message names the file."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


HASH_WORKERS = 4  # files hashed at once: hashlib releases the GIL on 1 MiB blocks


def sha256_files(paths: Sequence[Path]) -> list[str]:
    """:func:`sha256_file` of each path, in order, several files at once (an artifact's two adapters
    hash on two cores; bench/runs/2026-12-06_orchestration.md)."""
    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(HASH_WORKERS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def check_relpath(rel: object, where: str) -> str:
    """A manifest entry must be a plain relative POSIX path inside its artifact.

    Refused: non-strings, empty names, absolute paths (``/x``, ``C:\\x``), backslashes and any
    ``..`` or ``.`` segment — a manifest naming ``../../etc/passwd`` must never make a reader
    hash, fetch or write outside the artifact.
    """
    text = rel if isinstance(rel, str) else None
    parts = text.split("/") if text else []
    if (not text or text.startswith("/") or "\\" in text or "\x00" in text or (len(text) > 1 and text[1] == ":")
            or any(p in ("", ".", "..") for p in parts)):
        raise ArtifactError(f"{where}: unsafe path {str(rel)[:120]!r} in the manifest "
                            "(expected a relative path inside the artifact, no '..' or absolute paths)")
    return text


def check_manifest_paths(manifest: object, where: str) -> dict:
    """Every key of ``manifest['files']`` passes :func:`check_relpath`; returns the manifest."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ArtifactError(f"{where}: manifest must be a JSON object with a 'files' mapping")
    for rel, info in manifest.get("files", {}).items():
        check_relpath(rel, where)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise ArtifactError(f"{where}: manifest entry {rel!r} lacks a sha256")
    return manifest


def canonical_safetensors(data: bytes) -> bytes:
    """Re-serialise a safetensors blob with a sorted, compact JSON header.

    The ``safetensors`` writer emits its ``__metadata__`` map in hash order, which changes from
    process to process, so identical tensors gave different file bytes. Offsets in the header are
    relative to the data block, so only the header is rewritten (padded with spaces to 8 bytes).
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch`` save with byte-deterministic output (see :func:`canonical_safetensors`)."""
    from safetensors.torch import save

    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def list_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def build_manifest(root: str | Path, fields: dict | None = None) -> dict:
    """``fields`` plus ``files: {relpath: {sha256, bytes}}`` of every file under ``root`` but the manifest."""
    root = Path(root)
    rels = list_files(root)
    digests = sha256_files([root / rel for rel in rels])
    manifest = dict(fields or {})
    manifest["files"] = {rel: {"sha256": d, "bytes": (root / rel).stat().st_size} for rel, d in zip(rels, digests)}
    return manifest


def manifest_text(manifest: dict) -> str:
    """The bytes ``manifest.json`` holds (one serialisation for local and S3 artifacts)."""
    return json.dumps(manifest, indent=2, sort_keys=True, default=str)


def write_manifest(root: str | Path, fields: dict | None = None) -> dict:
    """Write ``manifest.json`` with ``files: {relpath: {sha256, bytes}}`` plus ``fields``."""
    root = Path(root)
    manifest = build_manifest(root, fields)
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(manifest_text(manifest))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {Path(root)} is not a complete artifact")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    return check_manifest_paths(manifest, str(path))


def verify_manifest(root: str | Path) -> dict:
    """Check every file against the manifest; return the manifest or raise :class:`ArtifactError`."""
    root = Path(root)
    manifest = read_manifest(root)
    expected = manifest.get("files", {})
    present = set(list_files(root))
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing:
        raise ArtifactError(f"{root}: files listed in the manifest are missing: {', '.join(missing)}")
    if extra:
        raise ArtifactError(f"{root}: files not in the manifest: {', '.join(extra)}")
    rels = list(expected)
    for rel, digest in zip(rels, sha256_files([root / rel for rel in rels])):
        info = expected[rel]
        if digest != info["sha256"]:
            raise ArtifactError(
                f"{root / rel}: sha256 {digest[:12]}… does not match the manifest ({info['sha256'][:12]}…); "
                "the file is corrupt or was modified"
            )
    return manifest


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to ``final``; on success rename it into place, else remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            if not overwrite:
                raise ArtifactError(f"{final} already exists")
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_path(path: str | Path) -> None:
    """Remove a file, link or directory tree (best effort; used for replaced outputs)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
