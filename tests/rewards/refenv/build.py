"""Build (once, cached) the isolated environment that runs the reference reward packages.

The reference packages pin an old stack (``image-reward==1.5``: timm 0.6.13, transformers 4.x;
``hpsv3==1.0.0``: transformers 4.45.2; ``hpsv2x==1.2.0``: its own bundled open_clip), which
cannot live next to the project's transformers 5 / timm 1.x. So they get their own venv:

* ``python -m venv`` **without** system site-packages, under
  ``$RTDMD_REFENV_ROOT`` (default ``~/.cache/rtdmd``) as ``refenv-<hash of the recipe>``;
* the project's torch is **reused, not downloaded**: a ``.pth`` file puts a directory of
  symlinks on ``sys.path`` holding only torch, torchvision and their own dependencies
  (numpy, pillow, sympy, ..., the CUDA wheels) from the interpreter that runs this script;
* the rest comes from PyPI with ``pip install``: first the pinned dependency set
  (:data:`DEPS`, resolved by pip against the linked torch; ``--no-build-isolation`` so that
  sdists such as ``fairscale`` build against that torch instead of downloading one), then
  the three reference packages with ``--no-deps`` (:data:`REFERENCE_PACKAGES`; their declared
  pins include ``deepspeed``, ``protobuf==3.20.3`` and ``pytest==7.2.0``, none of which the
  scoring path imports);
* a ``.complete`` stamp is written last; a half-built directory is deleted and rebuilt.

Usage: ``python tests/rewards/refenv/build.py`` prints the env's python path (building it first
when needed). Tests call :func:`ensure_refenv`. A first build takes a few minutes (mostly
downloads: about 60 packages, 0.5 GB); later calls return at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Pinned dependency set of the reference half (resolved by pip around the linked torch).
DEPS = (
    "transformers==4.45.2",
    "tokenizers==0.20.3",
    "huggingface_hub==0.25.2",
    "safetensors==0.4.5",
    "timm==0.6.13",
    "fairscale==0.4.13",
    "clip-anytorch==2.6.0",
    "diffusers==0.31.0",
    "accelerate==1.0.1",
    "datasets==3.0.2",
    "peft==0.13.2",
    "trl==0.11.4",
    "fire==0.7.0",
    "omegaconf==2.3.0",
    "pandas==2.2.3",
    "matplotlib==3.9.2",
    "tensorboard==2.18.0",
    "setuptools==80.9.0",
    "wheel",
    "clint==0.5.1",
    "args==0.1.0",
    "ftfy==6.3.1",
    "regex",
    "pyyaml",
    "rich==13.9.4",
)
#: The reference implementations themselves (``--no-deps``).
REFERENCE_PACKAGES = ("image-reward==1.5", "hpsv2x==1.2.0", "hpsv3==1.0.0")
#: Distributions taken from the running interpreter (symlinked), never downloaded.
SHARED = ("torch", "torchvision", "triton", "numpy", "pillow", "sympy", "mpmath", "networkx", "jinja2",
          "markupsafe", "filelock", "typing_extensions")
SHARED_PREFIXES = ("nvidia", "cuda")


def recipe() -> dict:
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "deps": list(DEPS),
            "reference": list(REFERENCE_PACKAGES), "layout": 3}


def env_dir() -> Path:
    root = Path(os.environ.get("RTDMD_REFENV_ROOT", Path.home() / ".cache" / "rtdmd"))
    h = hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"refenv-{h}"


def python_of(d: Path) -> Path:
    return d / "bin" / "python"


def _site_packages() -> Path:
    import torch

    return Path(torch.__file__).resolve().parent.parent


def _shared_entries(site: Path) -> list[Path]:
    """Top-level entries (packages, modules, .libs, dist-info) of the shared distributions."""
    from importlib import metadata

    out: set[Path] = set()
    for dist in metadata.distributions(path=[str(site)]):
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        if name not in SHARED and not name.startswith(SHARED_PREFIXES):
            continue
        for f in dist.files or ():
            top = f.parts[0]
            if top in ("..", "bin") or top.endswith(".pth"):
                continue
            out.add(site / top)
    return sorted(p for p in out if p.exists())


def _run(cmd: list[str], log, env: dict | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"reference env build step failed (exit {r.returncode}): {' '.join(cmd)}; "
                           f"see {log.name}")


def build(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with open(d.parent / f"{d.name}.log", "w") as log:
        t0 = time.time()
        _run([sys.executable, "-m", "venv", str(d)], log)
        py = str(python_of(d))
        site = Path(subprocess.check_output([py, "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())
        link = d / "shared-torch"
        link.mkdir()
        for p in _shared_entries(_site_packages()):
            (link / p.name).symlink_to(p)
        (site / "_rtdmd_shared_torch.pth").write_text(str(link) + "\n")
        # the shared distributions are pinned to the linked versions: pip must never fetch another torch
        # (this replaces any machine-wide constraint file, e.g. one capping torch below a local label)
        from importlib import metadata

        pins = [f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions(path=[str(link)])]
        (d / "constraints.txt").write_text("\n".join(sorted(pins)) + "\n")
        env = dict(os.environ, PIP_CONSTRAINT=str(d / "constraints.txt"))
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        _run(pip + ["setuptools==80.9.0", "wheel"], log, env)
        _run(pip + ["--no-build-isolation", *DEPS], log, env)
        _run(pip + ["--no-deps", "--no-build-isolation", *REFERENCE_PACKAGES], log, env)
        _run([py, "-c", "import torch, transformers, timm, ImageReward, hpsv2, hpsv3; "
                        "assert transformers.__version__ == '4.45.2', transformers.__version__; "
                        f"assert torch.__version__ == {recipe()['torch']!r}, torch.__version__"], log)
        log.write(f"built in {time.time() - t0:.0f} s\n")
    (d / ".complete").write_text(json.dumps(recipe()))


def ensure_refenv() -> Path:
    """The reference env's python (built now if absent or incomplete). Raises on a failed build."""
    d = env_dir()
    if not (d / ".complete").is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        import fcntl

        with open(d.parent / f"{d.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (d / ".complete").is_file():
                build(d)
    return python_of(d)


if __name__ == "__main__":
    print(ensure_refenv())
