"""Which data version did a step use? DVC lookups for pipeline steps (read-only).

:func:`data_version` answers, for a DVC-tracked path (a stage output in ``dvc.lock`` or a
``dvc add``-ed ``*.dvc`` file) at a git revision (or the workspace): the resolved commit, the
stage, the out and its md5 / size / file count, and — for a prepared prompt directory — the
``data_version`` from its ``manifest.json``. A training step records this dict (MLflow tags,
the LoRA manifest) so the exact data can be fetched again with :func:`open_at` /
``dvc get`` / ``dvc pull``.

:func:`open_at` / :func:`read_at` are thin wrappers over ``dvc.api.open`` / ``dvc.api.read``
(files come from the workspace, the local cache, or the configured remote at ``rev``).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import yaml


class DataVersionError(LookupError):
    """The path is not tracked by DVC at that revision (or the repo/rev is unknown)."""


def _git(repo: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:  # pragma: no cover - git missing
        return None
    return res.stdout if res.returncode == 0 else None


def resolve_rev(repo: str | Path = ".", rev: str | None = None) -> str | None:
    """Full commit sha of ``rev`` (``HEAD`` when None); None if the repo has no such commit."""
    out = _git(Path(repo), "rev-parse", "--verify", "--quiet", f"{rev or 'HEAD'}^{{commit}}")
    if out is None:
        if rev is not None:
            raise DataVersionError(f"{repo}: unknown git revision {rev!r}")
        return None
    return out.strip()


def _read_repo_file(repo: Path, rel: str, rev: str | None) -> str | None:
    if rev is None:
        p = repo / rel
        return p.read_text(encoding="utf-8") if p.is_file() else None
    return _git(repo, "show", f"{rev}:{rel}")


def _rel(path: str | Path, repo: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(repo)
        except ValueError:
            raise DataVersionError(f"{path} is not inside the repository {repo}") from None
    return PurePosixPath(*p.parts).as_posix().rstrip("/")


def _out_info(out: dict) -> dict:
    return {k: out[k] for k in ("md5", "size", "nfiles", "hash") if k in out}


def _contains(out_path: str, rel: str) -> bool:
    out_path = out_path.rstrip("/")
    return rel == out_path or rel.startswith(out_path + "/")


def data_version(path: str | Path, repo: str | Path = ".", rev: str | None = None) -> dict[str, Any]:
    """Version record of a DVC-tracked ``path`` at ``rev`` (None = the workspace's ``dvc.lock``).

    Raises :class:`DataVersionError` if nothing tracks the path.
    """
    repo = Path(repo).resolve()
    rel = _rel(path, repo)
    commit = resolve_rev(repo, rev)
    record: dict[str, Any] = {"path": rel, "repo": str(repo), "rev": rev, "commit": commit}
    lock_text = _read_repo_file(repo, "dvc.lock", rev)
    if lock_text:
        lock = yaml.safe_load(lock_text) or {}
        for stage, info in (lock.get("stages") or {}).items():
            for out in info.get("outs") or []:
                if _contains(out["path"], rel):
                    record.update({"tracked_by": "dvc.lock", "stage": stage, "out": out["path"], **_out_info(out)})
                    if rel != out["path"].rstrip("/"):
                        record["member"] = rel[len(out["path"].rstrip("/")) + 1:]
                    break
            if "stage" in record:
                break
    if "tracked_by" not in record:
        parts = rel.split("/")
        for i in range(len(parts), 0, -1):
            cand = "/".join(parts[:i])
            text = _read_repo_file(repo, cand + ".dvc", rev)
            if text:
                meta = yaml.safe_load(text) or {}
                outs = meta.get("outs") or []
                if outs:
                    out = outs[0]
                    record.update({"tracked_by": cand + ".dvc", "out": cand, **_out_info(out)})
                    if cand != rel:
                        record["member"] = rel[len(cand) + 1:]
                    break
    if "tracked_by" not in record:
        where = f"at {rev}" if rev else "in the workspace"
        raise DataVersionError(f"{rel} is not tracked by DVC {where} (no dvc.lock out or .dvc file covers it)")
    # A prepared prompt directory carries its own content hash.
    manifest_rel = f"{record['out']}/manifest.json"
    try:
        text = read_at(manifest_rel, repo=repo, rev=rev) if rev else _read_repo_file(repo, manifest_rel, None)
        if text:
            m = json.loads(text)
            record["manifest_data_version"] = m.get("data_version")
    except Exception:  # noqa: BLE001 - the manifest is optional (not every out is a prepared set)
        pass
    return record


def open_at(path: str, repo: str | Path = ".", rev: str | None = None, mode: str = "r",
            remote: str | None = None, encoding: str | None = None):
    """``dvc.api.open`` of a tracked file at ``rev`` (a context manager)."""
    import dvc.api

    return dvc.api.open(str(path), repo=str(repo), rev=rev, mode=mode, remote=remote, encoding=encoding)


def read_at(path: str, repo: str | Path = ".", rev: str | None = None, mode: str = "r",
            remote: str | None = None, encoding: str | None = None):
    """``dvc.api.read`` of a tracked file at ``rev``."""
    import dvc.api

    return dvc.api.read(str(path), repo=str(repo), rev=rev, mode=mode, remote=remote, encoding=encoding)
