"""Bring a DVC stage's outputs up to date in the workspace, refusing what DVC cannot version.

The flow's prep step calls :func:`reproduce` on the ``prepare`` stage of the repository's
``dvc.yaml`` instead of running the prep module itself:

1. ``dvc status --with-deps <stage>``: an **output** of the stage or of an upstream stage that
   differs from ``dvc.lock`` (a hand-edited or an extra file in ``data/prompts`` or
   ``data/prepared``) is something ``dvc repro`` would overwrite and ``dvc.lock`` does not record,
   so it is refused with one line naming the files and the two ways out (``dvc commit <stage>``
   records them, ``dvc checkout`` / ``git checkout`` discards them). Changed code, params or
   source files, and missing outputs, are fine: reproducing versions them.
2. ``dvc repro <stage>`` re-runs exactly what changed (a no-op when everything matches the lock;
   DVC's run cache restores outputs it has produced before).
3. The stage is checked clean again, and its version record (:func:`rtdmd.data.dvc_access.data_version`:
   commit, md5 of the out in ``dvc.lock``, manifest data version) is returned, with
   ``lock_committed`` telling whether ``dvc.lock`` as used is the committed one (else
   ``dvc.api`` cannot read this data at a revision until it is committed).

:func:`tracked_versions` lists the DVC version (md5 from ``dvc.lock`` or the ``*.dvc`` file) of
everything tracked under a directory, e.g. the reward checkpoints (``dvc add`` /
``dvc import-url``-ed, or a stage's outs).

    python -m rtdmd.data.dvc_workspace prepare            # check + repro + print the version record
    python -m rtdmd.data.dvc_workspace --check-only prepare data/reward_ckpts/real.dvc

Exit status 2 with one line on a dirty workspace (or no DVC project), no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from rtdmd.data.dvc_access import data_version

#: output states ``dvc status`` reports that ``dvc repro`` can rebuild (nothing of the user's is lost)
REBUILDABLE = {"deleted", "not in cache"}


class DvcWorkspaceError(RuntimeError):
    """The workspace cannot be versioned as it is (or is not a DVC project); ``str`` is one line."""


def _dvc(repo: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATER": "1"}
    return subprocess.run(cmd, cwd=str(repo), capture_output=capture, text=True, check=False, env=env)


def _last_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (res.stderr or "").splitlines() + (res.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or [f"exit {res.returncode}"])[-1]


def require_project(repo: str | Path) -> Path:
    repo = Path(repo).resolve()
    if not (repo / ".dvc").is_dir() or not (repo / "dvc.yaml").is_file():
        raise DvcWorkspaceError(f"{repo} is not a DVC project (no .dvc/ or dvc.yaml): run from the repository "
                                "checkout (git clone + `dvc pull`), where dvc.yaml defines the data stages")
    return repo


def status(repo: str | Path, targets: Iterable[str], with_deps: bool = True) -> dict[str, Any]:
    """``dvc status --json [--with-deps] <targets>`` as a dict (empty when everything matches)."""
    repo = Path(repo)
    res = _dvc(repo, "status", "--json", *(["--with-deps"] if with_deps else []), *targets)
    if res.returncode != 0:
        raise DvcWorkspaceError(f"`dvc status {' '.join(targets)}` failed in {repo}: {_last_line(res)}")
    text = res.stdout.strip()
    return json.loads(text[text.index("{"):]) if "{" in text else {}


def _changed_files(repo: Path, out: str) -> list[str]:
    """Files under ``out`` that differ from what DVC (or git, for ``cache: false`` outs) recorded."""
    res = _dvc(repo, "data", "status", "--granular", "--json")
    files: list[str] = []
    if res.returncode == 0 and "{" in res.stdout:
        unc = json.loads(res.stdout[res.stdout.index("{"):]).get("uncommitted", {})
        for state, label in (("modified", "modified"), ("added", "untracked"), ("deleted", "deleted")):
            files += [f"{p} {label}" for p in unc.get(state, [])
                      if p.startswith(out.rstrip("/") + "/") and not p.endswith("/")]
    if not files:  # cache: false outs (kept in git): ask git
        git = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all", "--", out],
                             capture_output=True, text=True, check=False)
        for ln in git.stdout.splitlines():
            code, path = ln[:2], ln[3:]
            files.append(f"{path} {'untracked' if code == '??' else 'deleted' if 'D' in code else 'modified'}")
    return files


def dirty_outputs(st: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(stage or .dvc file, out path, state)`` of every output that differs from its record and that
    ``dvc repro`` could not rebuild without losing it."""
    found = []
    for stage, entries in st.items():
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            for out, state in (entry.get("changed outs") or {}).items():
                if state not in REBUILDABLE:
                    found.append((stage, out, str(state)))
    return found


def check_versionable(repo: str | Path, targets: Iterable[str]) -> dict[str, Any]:
    """Raise :class:`DvcWorkspaceError` (one line) if an output of ``targets`` (with upstream stages)
    was changed by hand; returns the ``dvc status`` dict otherwise."""
    repo = require_project(repo)
    targets = list(targets)
    st = status(repo, targets)
    dirty = dirty_outputs(st)
    if dirty:
        stage, out, state = dirty[0]
        files = _changed_files(repo, out)
        shown = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "") if files else f"{out} {state}"
        name = stage.split(":")[-1]
        record = f"dvc commit {name}" if not name.endswith(".dvc") else f"dvc add {out}"
        in_git = subprocess.run(["git", "-C", str(repo), "ls-files", "--", out], capture_output=True, text=True,
                                check=False).stdout.strip()
        discard = f"git checkout -- {out} && git clean -fd -- {out}" if in_git else f"dvc checkout --force {out}"
        raise DvcWorkspaceError(
            f"dirty DVC workspace: {shown} vs dvc.lock ({out} is an output of '{name}'); record the change with "
            f"`{record}` and commit dvc.lock, or discard it with `{discard}`; then run again")
    return st


def lock_committed(repo: Path, paths: Iterable[str] = ("dvc.lock", "dvc.yaml")) -> bool:
    """Are ``paths`` unchanged against git HEAD (so the recorded commit pins this data)?"""
    res = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", *paths],
                         capture_output=True, text=True, check=False)
    return res.returncode == 0 and not res.stdout.strip()


def _stage(repo: Path, stage: str) -> dict[str, Any]:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text()) or {}
    info = (spec.get("stages") or {}).get(stage)
    if info is None:
        raise DvcWorkspaceError(f"{repo / 'dvc.yaml'}: no stage '{stage}' (stages: {', '.join(spec.get('stages') or {})})")
    return info


def stage_outs(repo: Path, stage: str) -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for o in _stage(repo, stage).get("outs") or []]


def stage_cmd(repo: Path, stage: str) -> str:
    """The ``cmd:`` of a ``dvc.yaml`` stage (one command; a list is an error here)."""
    cmd = _stage(repo, stage).get("cmd")
    if not isinstance(cmd, str):
        raise DvcWorkspaceError(f"{repo / 'dvc.yaml'}: stage '{stage}' cmd is {cmd!r}; expected one command string")
    return cmd


def reproduce(repo: str | Path, stage: str, *, also_check: Iterable[str] = (),
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check (``stage`` and ``also_check`` targets), ``dvc repro <stage>``, check again; the version
    record of the stage's first out."""
    repo = require_project(repo)
    outs = stage_outs(repo, stage)
    check_versionable(repo, [stage, *also_check])
    log(f"[rtdmd] dvc repro {stage} (in {repo})")
    res = _dvc(repo, "--wait-for-lock", "repro", stage)
    log(res.stdout.rstrip())
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise DvcWorkspaceError(f"`dvc repro {stage}` failed (exit {res.returncode}): {_last_line(res)}")
    left = status(repo, [stage])
    if left:
        raise DvcWorkspaceError(f"`dvc repro {stage}` left the workspace different from dvc.lock: {json.dumps(left)[:300]}")
    record = data_version(outs[0], repo=repo)
    record["lock_committed"] = lock_committed(repo)
    if not record["lock_committed"]:
        log(f"[rtdmd] note: dvc.lock differs from git HEAD; `git add dvc.lock && git commit` pins this data version "
            f"to a revision (md5 {record.get('md5')})")
    return record


def tracked_versions(path: str | Path, repo: str | Path = ".") -> dict[str, str]:
    """``{out path: md5}`` of every DVC-tracked output under (or containing) ``path``: ``dvc.lock``
    stage outs and ``*.dvc`` files (``dvc add`` / ``dvc import`` / ``dvc import-url``)."""
    repo = Path(repo).resolve()
    p = Path(path)
    p = (p if p.is_absolute() else repo / p).resolve()
    try:
        rel = p.relative_to(repo).as_posix()
    except ValueError:
        return {}
    rel = "" if rel == "." else rel

    def related(out: str) -> bool:
        out = out.rstrip("/")
        return not rel or out == rel or out.startswith(rel + "/") or rel.startswith(out + "/")

    found: dict[str, str] = {}
    lock = repo / "dvc.lock"
    if lock.is_file():
        for info in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
            for out in info.get("outs") or []:
                if related(out["path"]) and out.get("md5"):
                    found[out["path"].rstrip("/")] = out["md5"]
    base = p if p.is_dir() else p.parent
    candidates = set(base.rglob("*.dvc")) if base.is_dir() else set()
    candidates |= {q.with_name(q.name + ".dvc") for q in [p, *p.parents] if q != repo and repo in q.parents}
    for dvcfile in sorted(c for c in candidates if c.is_file()):
        meta = yaml.safe_load(dvcfile.read_text()) or {}
        for out in meta.get("outs") or []:
            target = (dvcfile.parent / out["path"]).relative_to(repo).as_posix()
            if related(target) and out.get("md5"):
                found[target] = out["md5"]
    return dict(sorted(found.items()))


def tracked_targets(path: str | Path, repo: str | Path = ".") -> list[str]:
    """``dvc status`` targets of what :func:`tracked_versions` lists (stage names and ``.dvc`` files)."""
    repo = Path(repo).resolve()
    outs = set(tracked_versions(path, repo))
    targets = []
    lock = repo / "dvc.lock"
    if lock.is_file():
        for stage, info in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).items():
            if any(o["path"].rstrip("/") in outs for o in info.get("outs") or []):
                targets.append(stage)
    targets += [o + ".dvc" for o in sorted(outs) if (repo / (o + ".dvc")).is_file()]
    return targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.data.dvc_workspace", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="+", help="dvc.yaml stage(s) (or .dvc files with --check-only)")
    ap.add_argument("--repo", default=".", help="DVC project root (default: .)")
    ap.add_argument("--check-only", action="store_true", help="refuse a dirty workspace, but do not reproduce")
    a = ap.parse_args(argv)
    try:
        if a.check_only:
            check_versionable(a.repo, a.stage)
            print(f"clean: {', '.join(a.stage)} (outputs match dvc.lock)")
        else:
            for stage in a.stage:
                print(json.dumps(reproduce(a.repo, stage, log=lambda m: print(m, file=sys.stderr)), sort_keys=True))
    except DvcWorkspaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
