"""Model variants of the evaluation matrix and the inference CLI: parsing, resolving, building.

Variant spec syntax (one ``--variant`` per model; shell-safe, no quoting needed)::

    NAME=KIND[:ARG,ARG,...]

``NAME``   ``[A-Za-z0-9][A-Za-z0-9_.-]*`` — used for file names, table rows and MLflow run names.
``KIND``   one of

* ``teacher``   — the frozen teacher transformer, sampled with Euler (``eta=0``) and CFG (or
  FLUX.1's guidance embedding) at ``guidance``; defaults: ``steps=eval.teacher_steps``,
  ``guidance=sampler.teacher_guidance``.
* ``generator`` — the generator's base weights (``model.generator_init`` or the teacher), no LoRA,
  sampled like the student: CPS over ``sampler.step_list`` with ``eta=sampler.eta``, no CFG.
* ``lora``      — the generator with LoRA artifact(s) merged in order, sampled like ``generator``.
  Positional ``ARG``s (tokens without a known ``key=``) are artifact URIs (local dir or
  ``s3://``). Each URI is expanded with its ``parent`` chain (``stack_chain``: oldest first,
  checksums verified), so ``lora:<rl artifact>`` runs cold start + RL; duplicates across URIs are
  merged once. ``chain=false`` takes the listed artifacts only.

Options (``key=value``, any kind): ``steps=N`` (N evenly spaced timesteps 1000…1000/N),
``step_list=1000/750/500/250`` (explicit, ``/``-separated, strictly descending in (0, 1000]),
``eta=F`` in [0, 1], ``guidance=F`` (> 0; for ``generator``/``lora`` a value != 1 samples with CFG
like the teacher), ``chain=true|false`` (``lora`` only).

Examples::

    teacher-50=teacher:steps=50,guidance=4.0
    teacher-4=teacher:steps=4
    base-4=generator
    cold-start-4=lora:s3://bucket/runs/42/cold_start
    rtdmd-4=lora:artifacts/run42/rl                 # its parent (the cold start) is merged first
    rtdmd-8=lora:artifacts/run42/rl,steps=8,eta=0.5
    rl-only=lora:artifacts/run42/rl,chain=false

Errors are :class:`VariantError` (a ``ValueError``) naming the offending spec and what is allowed.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

KINDS = ("teacher", "generator", "lora")
OPTIONS = ("steps", "step_list", "eta", "guidance", "chain")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class VariantError(ValueError):
    """A variant spec is malformed or cannot be resolved; the message names the spec."""


@dataclass
class Variant:
    """A resolved model variant: which weights, and how to sample them."""

    name: str
    kind: str
    step_list: list[float]
    eta: float
    guidance: float
    lora_uris: list[str] = field(default_factory=list)
    follow_parents: bool = True
    spec: str = ""

    @property
    def teacher_mode(self) -> bool:
        """Sample with the teacher convention (CFG / guidance embedding)?"""
        return self.kind == "teacher" or self.guidance != 1.0

    @property
    def role(self) -> str:
        return "teacher" if self.kind == "teacher" else "generator"

    @property
    def nfe(self) -> int:
        """Transformer forwards per sample (x2 with two-pass CFG is not counted; steps only)."""
        return len(self.step_list)

    def sampler_settings(self) -> dict:
        return {"step_list": list(self.step_list), "num_steps": len(self.step_list), "eta": self.eta,
                "guidance": self.guidance, "teacher_mode": self.teacher_mode, "role": self.role}

    def to_dict(self) -> dict:
        return asdict(self)


def _bool(text: str, spec: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise VariantError(f"variant '{spec}': chain={text!r} is not a boolean (use true or false)")


def _float(key: str, text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise VariantError(f"variant '{spec}': {key}={text!r} is not a number") from None


def even_step_list(n: int) -> list[float]:
    from rtdmd.sampling import teacher_step_list

    return [float(s) for s in teacher_step_list(n)]


def check_step_list(steps: Sequence[float], spec: str) -> list[float]:
    steps = [float(s) for s in steps]
    if not steps:
        raise VariantError(f"variant '{spec}': the step list is empty")
    if not all(0 < s <= 1000 for s in steps):
        raise VariantError(f"variant '{spec}': step_list entries must be in (0, 1000], got {steps}")
    if not all(a > b for a, b in zip(steps, steps[1:])):
        raise VariantError(f"variant '{spec}': step_list must be strictly descending, got {steps}")
    return steps


def split_spec(text: str) -> tuple[str, str, list[str], dict[str, str]]:
    """``NAME=KIND[:ARGS]`` -> ``(name, kind, positional args, options)`` (syntax only)."""
    if not isinstance(text, str) or "=" not in text:
        raise VariantError(f"variant {text!r} must look like NAME=KIND[:ARGS] with KIND one of {', '.join(KINDS)} "
                           "(e.g. teacher-50=teacher:steps=50 or rtdmd-4=lora:path/to/artifact)")
    name, rest = text.split("=", 1)
    name = name.strip()
    if not _NAME.match(name):
        raise VariantError(f"variant '{text}': name {name!r} must match {_NAME.pattern} (letters, digits, _ . -)")
    kind, _, body = rest.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise VariantError(f"variant '{text}': unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    positional: list[str] = []
    options: dict[str, str] = {}
    for token in (t.strip() for t in body.split(",")) if body.strip() else ():
        if not token:
            raise VariantError(f"variant '{text}': empty item between commas")
        key, eq, value = token.partition("=")
        if eq and key.strip().lower() in OPTIONS:
            key = key.strip().lower()
            if key in options:
                raise VariantError(f"variant '{text}': option {key!r} given twice")
            options[key] = value.strip()
        elif eq and re.fullmatch(r"[a-z_]+", key.strip()):
            raise VariantError(f"variant '{text}': unknown option {key.strip()!r}; options are {', '.join(OPTIONS)}")
        else:
            positional.append(token)
    return name, kind, positional, options


def parse_variant(text: str, params) -> Variant:
    """Parse one spec against ``params`` (defaults from ``params.sampler`` / ``params.eval``)."""
    name, kind, positional, options = split_spec(text)
    if kind != "lora" and positional:
        raise VariantError(f"variant '{text}': kind '{kind}' takes no artifact URI (got {positional}); "
                           "only 'lora' variants load artifacts")
    if kind == "lora" and not positional:
        raise VariantError(f"variant '{text}': a lora variant needs at least one artifact URI, "
                           f"e.g. {name}=lora:path/to/artifact")
    if "chain" in options and kind != "lora":
        raise VariantError(f"variant '{text}': chain= applies to lora variants only")
    if "steps" in options and "step_list" in options:
        raise VariantError(f"variant '{text}': give steps= or step_list=, not both")
    sampler = params.sampler
    if kind == "teacher":
        step_list = even_step_list(int(getattr(params.eval, "teacher_steps", 0) or sampler.teacher_steps))
        eta, guidance = 0.0, float(sampler.teacher_guidance)
    else:
        step_list = [float(s) for s in sampler.step_list]
        eta, guidance = float(sampler.eta), float(sampler.guidance)
    if "steps" in options:
        try:
            n = int(options["steps"])
        except ValueError:
            raise VariantError(f"variant '{text}': steps={options['steps']!r} is not an integer") from None
        if n < 1:
            raise VariantError(f"variant '{text}': steps must be >= 1, got {n}")
        # the configured list when it has that length (so `steps=4` keeps a tuned 4-step list)
        step_list = [float(s) for s in sampler.step_list] if (kind != "teacher" and n == len(sampler.step_list)) \
            else even_step_list(n)
    if "step_list" in options:
        parts = [p for p in re.split(r"[/ ]", options["step_list"]) if p]
        step_list = [_float("step_list", p, text) for p in parts]
    step_list = check_step_list(step_list, text)
    if "eta" in options:
        eta = _float("eta", options["eta"], text)
    if not 0.0 <= eta <= 1.0:
        raise VariantError(f"variant '{text}': eta must be in [0, 1], got {eta}")
    if "guidance" in options:
        guidance = _float("guidance", options["guidance"], text)
    if guidance <= 0:
        raise VariantError(f"variant '{text}': guidance must be > 0, got {guidance}")
    follow = _bool(options["chain"], text) if "chain" in options else True
    return Variant(name=name, kind=kind, step_list=step_list, eta=eta, guidance=guidance,
                   lora_uris=list(positional), follow_parents=follow, spec=text)


def parse_variants(items, params) -> list[Variant]:
    """Specs (strings), ``{name: "KIND:ARGS"}`` or :class:`Variant` objects -> unique variants."""
    if isinstance(items, (str, Variant)):
        items = [items]
    if isinstance(items, Mapping):
        items = [f"{k}={v}" for k, v in items.items()]
    out: list[Variant] = []
    for item in items or ():
        out.append(item if isinstance(item, Variant) else parse_variant(item, params))
    if not out:
        raise VariantError("no model variants given; pass at least one, e.g. --variant teacher-4=teacher:steps=4")
    seen: set[str] = set()
    for v in out:
        if v.name in seen:
            raise VariantError(f"variant name '{v.name}' is used twice; names must be unique")
        seen.add(v.name)
    return out


def default_variants(params, lora_uris: Iterable[str] = ()) -> list[str]:
    """The paper's comparison: teacher at its default NFE with CFG, teacher at the student's NFE,
    and one ``lora`` variant per given artifact (named after its stage when known)."""
    n = len(params.sampler.step_list)
    specs = [f"teacher-{params.eval.teacher_steps}=teacher", f"teacher-{n}=teacher:steps={n}"]
    for i, uri in enumerate(lora_uris):
        specs.append(f"lora{i}-{n}=lora:{uri}")
    return specs


# ----------------------------------------------------------------------------- resolution
@dataclass
class ResolvedArtifact:
    uri: str
    stage: str
    backbone: str
    manifest_sha256: str
    files: dict[str, str]
    rank: int
    alpha: float
    scale: float

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_lora_stack(uris: Sequence[str], params, *, follow_parents: bool = True, cache_dir=None) -> list:
    """LoRA artifacts to merge, in order: each URI expanded with its parents (oldest first),
    duplicates (same manifest sha256) kept once. Returns ``LoraArtifact`` objects."""
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.lora.artifact import load_lora_artifact, stack_chain

    out, seen = [], set()
    for uri in uris:
        try:
            chain = (stack_chain(uri, backbone=params.name, cache_dir=cache_dir) if follow_parents
                     else [load_lora_artifact(uri, backbone=params.name, cache_dir=cache_dir)])
        except (ArtifactError, OSError, ValueError) as exc:
            raise VariantError(f"LoRA artifact {uri!r}: {exc}") from None
        for art in chain:
            key = art.manifest_sha256
            if key not in seen:
                seen.add(key)
                out.append(art)
    return out


def describe_artifact(art) -> ResolvedArtifact:
    ad = art.adapters["generator"]
    files = {rel: (info.get("sha256") if isinstance(info, dict) else str(info))
             for rel, info in (art.manifest.get("files") or {}).items()}
    return ResolvedArtifact(uri=str(art.uri), stage=str(art.manifest.get("stage", "")), backbone=art.backbone,
                            manifest_sha256=art.manifest_sha256, files=files, rank=ad.rank, alpha=ad.alpha,
                            scale=ad.scale)


def build_variant_net(backbone, variant: Variant, artifacts: Sequence = ()):
    """A fresh transformer for ``variant`` with its LoRA stack merged into the base weights."""
    from rtdmd.lora import LoraError, merge_lora_into_base

    net = backbone.load_transformer(variant.role)
    for art in artifacts:
        ad = art.adapters["generator"]
        try:
            merge_lora_into_base(net, ad.state, ad.scale)
        except LoraError as exc:
            raise VariantError(f"variant '{variant.name}': cannot merge LoRA artifact {art.uri}: {exc}") from None
    net.requires_grad_(False)
    return net.eval()
