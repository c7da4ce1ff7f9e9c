r"""Shifted sigma schedules for few-step denoising step lists (spec §1.2 – §1.5).

Conventions (rectified flow, §1.1): ``x_σ = (1 − σ)·x0 + σ·ε``; σ = 0 is data, σ = 1 is noise.
``N = num_train_timesteps = 1000``; the model timestep is the float ``t = N·σ`` (§1.2).

A *denoising step list* is a list of raw, unshifted timesteps in ``(0, N]``, strictly
descending (§1.4), e.g. ``[1000, 750, 500, 250]``. With ``r = step / N`` the shifted sigma is

* static shift (``"sd3"``, SD3-M / SD3.5-M)::

      σ = shift·r / (1 + (shift − 1)·r)        (shift = 3.0; rounded to 6 decimals)

* dynamic shift (``"flux1"``, ``"flux2_klein"``), exponential or linear time-shift::

      σ = e^μ / (e^μ + (1/r − 1))             (time_shift_type = "exponential")
      σ = μ   / (μ   + (1/r − 1))             (time_shift_type = "linear")

  - FLUX.1: ``μ = base_shift + (max_shift − base_shift)/(max_seq − base_seq)·(L − base_seq)``
    with ``L`` = number of packed 2×2 tokens (512 px → L = 1024 → μ = 0.63).
  - FLUX.2-klein, "empirical μ" with ``L`` = tokens of the patchified latent and ``n`` = the
    number of step-list entries actually used::

        L > 4300:  μ = a2·L + b2
        else:      μ = m200 + (n − 200)·(m200 − m10)/190,  m200 = a2·L + b2,  m10 = a1·L + b1

    plus an optional terminal stretch when the scheduler config has a truthy
    ``shift_terminal = τ``: ``q = 1 − σ; σ ← 1 − q / (q_last / (1 − τ))``.

* ``"linear"``: no shift, ``σ = r`` (used by the toy 2-D backbone).

A terminal ``σ_K = 0`` is appended (§1.4). :func:`dmd_sigma_table` builds the 1000-entry
ascending table of §1.5 (SD3 static shift; FLUX tables unshifted).

Deliberate choices / departures (see also spec §12):

* ``shift_terminal`` is honoured for ``"flux2_klein"`` only, exactly as the spec says
  ("FLUX.2 only"). A truthy ``shift_terminal`` passed for ``"flux1"`` is ignored with a
  ``UserWarning`` (the released FLUX.1-dev scheduler config has none).
* Only the SD3 helper rounds to 6 decimals (as in the reference); FLUX sigmas and the
  :func:`dmd_sigma_table` entries are not rounded.
* ``shift`` is only meaningful for ``"sd3"``; passing it for another family is an error rather
  than being silently ignored.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

NUM_TRAIN_TIMESTEPS = 1000

FAMILIES = ("sd3", "flux1", "flux2_klein", "linear")

# FLUX.1 scheduler defaults (dynamic shifting).
FLUX1_BASE_SHIFT = 0.5
FLUX1_MAX_SHIFT = 1.15
FLUX1_BASE_IMAGE_SEQ_LEN = 256
FLUX1_MAX_IMAGE_SEQ_LEN = 4096

# FLUX.2 "empirical mu" constants (§1.3).
FLUX2_A1 = 8.73809524e-05
FLUX2_B1 = 1.89833333
FLUX2_A2 = 0.00016927
FLUX2_B2 = 0.45666666
FLUX2_LARGE_SEQ_LEN = 4300

SD3_DEFAULT_SHIFT = 3.0

_TIME_SHIFT_TYPES = ("exponential", "linear")


# ----------------------------------------------------------------------------------------------
# elementary shift rules
# ----------------------------------------------------------------------------------------------
def static_shift(r: float, shift: float) -> float:
    """SD3 static shift ``σ = shift·r / (1 + (shift − 1)·r)`` (no rounding)."""
    return shift * r / (1.0 + (shift - 1.0) * r)


def dynamic_shift(r: float, mu: float, kind: str = "exponential") -> float:
    """Dynamic time shift of a raw fraction ``r ∈ (0, 1]``.

    ``kind="exponential"``: ``σ = e^μ / (e^μ + (1/r − 1))``;
    ``kind="linear"``: ``σ = μ / (μ + (1/r − 1))``.
    """
    if not r > 0.0:
        raise ValueError(f"dynamic_shift needs r > 0, got r={r!r}")
    if kind == "exponential":
        m = math.exp(mu)
    elif kind == "linear":
        m = float(mu)
    else:
        raise ValueError(f"time_shift_type/kind must be one of {_TIME_SHIFT_TYPES}, got {kind!r}")
    return m / (m + (1.0 / r - 1.0))


def flux1_mu(
    seq_len: int,
    base_seq_len: int = FLUX1_BASE_IMAGE_SEQ_LEN,
    max_seq_len: int = FLUX1_MAX_IMAGE_SEQ_LEN,
    base_shift: float = FLUX1_BASE_SHIFT,
    max_shift: float = FLUX1_MAX_SHIFT,
) -> float:
    """FLUX.1 resolution-dependent μ: linear in the packed token count ``L``."""
    if max_seq_len == base_seq_len:
        raise ValueError(
            f"max_image_seq_len must differ from base_image_seq_len, both are {base_seq_len!r}"
        )
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + m * (seq_len - base_seq_len)


def flux2_empirical_mu(seq_len: int, num_steps: int) -> float:
    """FLUX.2-klein "empirical μ" for ``L = seq_len`` tokens and ``n = num_steps`` steps."""
    if seq_len > FLUX2_LARGE_SEQ_LEN:
        return FLUX2_A2 * seq_len + FLUX2_B2
    m200 = FLUX2_A2 * seq_len + FLUX2_B2
    m10 = FLUX2_A1 * seq_len + FLUX2_B1
    return m200 + (num_steps - 200) * (m200 - m10) / 190.0


def shift_terminal_stretch(sigmas: Sequence[float], shift_terminal: float) -> list[float]:
    """Stretch so that the last listed sigma becomes ``shift_terminal`` (FLUX.2 only).

    ``q = 1 − σ;  σ ← 1 − q / (q_last / (1 − τ))``. ``sigmas`` excludes the terminal 0.
    """
    tau = float(shift_terminal)
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal!r}")
    q = [1.0 - s for s in sigmas]
    q_last = q[-1]
    if q_last == 0.0:
        raise ValueError("shift_terminal stretch undefined: the last listed sigma equals 1.0")
    scale = q_last / (1.0 - tau)
    return [1.0 - qi / scale for qi in q]


def packed_seq_len(family: str, latent_height: int, latent_width: int) -> int:
    """Image token count ``L`` used by the dynamic shift, from the latent grid the algorithm
    works on (§1.6): FLUX.1 latents ``[16, res/8, res/8]`` are packed into 2×2 tokens,
    FLUX.2-klein latents ``[128, res/16, res/16]`` are already patchified (1 token per pixel)."""
    if family == "flux1":
        return (latent_height // 2) * (latent_width // 2)
    if family == "flux2_klein":
        return latent_height * latent_width
    raise ValueError(f"packed_seq_len is only defined for flux1/flux2_klein, got family={family!r}")


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _validate_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _validate_step_list(step_list: Any, num_train_timesteps: int) -> list[float]:
    if isinstance(step_list, torch.Tensor):
        step_list = step_list.detach().cpu().reshape(-1).tolist()
    if isinstance(step_list, (str, bytes)) or not isinstance(step_list, Sequence):
        raise ValueError(f"step_list must be a sequence of numbers, got {step_list!r}")
    if len(step_list) == 0:
        raise ValueError("step_list must be non-empty, got []")
    steps: list[float] = []
    for i, s in enumerate(step_list):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise ValueError(f"step_list[{i}] must be a real number, got {s!r}")
        fs = float(s)
        if not math.isfinite(fs) or not 0.0 < fs <= num_train_timesteps:
            raise ValueError(
                f"step_list[{i}] = {s!r} is outside (0, {num_train_timesteps}]"
            )
        if steps and not fs < steps[-1]:
            raise ValueError(
                f"step_list must be strictly descending: step_list[{i}] = {s!r} "
                f"is not < step_list[{i - 1}] = {steps[-1]!r}"
            )
        steps.append(fs)
    return steps


def _validate_seq_len(image_seq_len: Any, family: str) -> int:
    if image_seq_len is None:
        raise ValueError(
            f"image_seq_len is required for family {family!r} (number of image tokens L)"
        )
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, numbers.Integral):
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    if image_seq_len <= 0:
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    return int(image_seq_len)


# ----------------------------------------------------------------------------------------------
# public schedule builders
# ----------------------------------------------------------------------------------------------
def shifted_sigmas(
    step_list: Sequence[float],
    family: str,
    *,
    shift: float | None = None,
    image_seq_len: int | None = None,
    num_steps: int | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[float]:
    """Shifted sigmas ``[σ_0, …, σ_{K−1}, 0.0]`` for a denoising step list (§1.3, §1.4).

    Args:
        step_list: raw timesteps in ``(0, N]``, strictly descending.
        family: ``"sd3"`` | ``"flux1"`` | ``"flux2_klein"`` | ``"linear"``.
        shift: static shift (``"sd3"`` only; default ``scheduler_config["shift"]`` or 3.0).
        image_seq_len: image token count ``L`` (required for ``"flux1"``/``"flux2_klein"``).
        num_steps: optionally use only the first ``num_steps`` entries of ``step_list``
            (``num_inference_steps`` truncation); ``n`` of the FLUX.2 empirical μ is the number
            of entries actually used.
        scheduler_config: optional scheduler config mapping; keys read: ``shift`` (sd3),
            ``base_shift``, ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len`` (flux1),
            ``time_shift_type`` (flux1/flux2_klein), ``shift_terminal`` (flux2_klein),
            ``use_dynamic_shifting`` (flux1/flux2_klein; ``false`` = static ``shift``).
        num_train_timesteps: ``N`` (1000).

    Returns:
        python list of ``K + 1`` floats, strictly descending, ending in exactly ``0.0``.
    """
    _validate_family(family)
    steps = _validate_step_list(step_list, num_train_timesteps)
    if num_steps is not None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise ValueError(f"num_steps must be an int, got {num_steps!r}")
        if not 1 <= num_steps <= len(steps):
            raise ValueError(
                f"num_steps must be in [1, len(step_list)={len(steps)}], got {num_steps!r}"
            )
        steps = steps[: int(num_steps)]
    cfg: Mapping[str, Any] = scheduler_config if scheduler_config is not None else {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"scheduler_config must be a mapping or None, got {type(cfg).__name__}")
    if shift is not None and family != "sd3":
        raise ValueError(f"shift={shift!r} only applies to family 'sd3', not {family!r}")

    rs = [s / num_train_timesteps for s in steps]

    if family == "linear":
        sigmas = list(rs)
    elif family == "sd3":
        sh = shift if shift is not None else cfg.get("shift", SD3_DEFAULT_SHIFT)
        sh = float(sh)
        if not (math.isfinite(sh) and sh > 0.0):
            raise ValueError(f"shift must be a positive finite number, got {sh!r}")
        sigmas = [round(static_shift(r, sh), 6) for r in rs]
    elif cfg.get("use_dynamic_shifting", True) is False:
        # a FLUX scheduler configured without dynamic shifting uses its static ``shift`` (as
        # diffusers' flow-match scheduler does); the released FLUX schedulers set the flag true
        sh = float(cfg.get("shift", 1.0))
        if not (math.isfinite(sh) and sh > 0.0):
            raise ValueError(f"shift must be a positive finite number, got {sh!r}")
        sigmas = [static_shift(r, sh) for r in rs]
    else:
        seq_len = _validate_seq_len(image_seq_len, family)
        kind = cfg.get("time_shift_type") or "exponential"
        if kind not in _TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {_TIME_SHIFT_TYPES}, got {kind!r}")
        if family == "flux1":
            mu = flux1_mu(
                seq_len,
                base_seq_len=cfg.get("base_image_seq_len", FLUX1_BASE_IMAGE_SEQ_LEN),
                max_seq_len=cfg.get("max_image_seq_len", FLUX1_MAX_IMAGE_SEQ_LEN),
                base_shift=cfg.get("base_shift", FLUX1_BASE_SHIFT),
                max_shift=cfg.get("max_shift", FLUX1_MAX_SHIFT),
            )
            sigmas = [dynamic_shift(r, mu, kind) for r in rs]
            if cfg.get("shift_terminal"):
                warnings.warn(
                    "shift_terminal is only applied for flux2_klein (spec §1.3); ignored for flux1",
                    UserWarning,
                    stacklevel=2,
                )
        else:  # flux2_klein
            mu = flux2_empirical_mu(seq_len, len(steps))
            sigmas = [dynamic_shift(r, mu, kind) for r in rs]
            if cfg.get("shift_terminal"):
                sigmas = shift_terminal_stretch(sigmas, cfg["shift_terminal"])

    sigmas = [float(s) for s in sigmas]
    for i in range(1, len(sigmas)):
        if not sigmas[i] < sigmas[i - 1]:
            raise ValueError(f"shifted sigmas are not strictly descending: {sigmas!r}")
    if not sigmas[-1] > 0.0:
        raise ValueError(f"last shifted sigma must be > 0, got {sigmas!r}")
    sigmas.append(0.0)
    return sigmas


def timesteps_from_sigmas(
    sigmas: Sequence[float] | torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[float] | torch.Tensor:
    """Model timesteps ``t_i = N·σ_i`` (float, no rounding), excluding a trailing terminal 0.

    A python sequence gives a python list of floats; a 1-D tensor gives a tensor of the same dtype.
    """
    if isinstance(sigmas, torch.Tensor):
        s = sigmas.reshape(-1)
        if s.numel() and s[-1].item() == 0.0:
            s = s[:-1]
        return s * num_train_timesteps
    vals = [float(v) for v in sigmas]
    if vals and vals[-1] == 0.0:
        vals = vals[:-1]
    return [num_train_timesteps * v for v in vals]


def dmd_sigma_table(
    family: str,
    shift: float = SD3_DEFAULT_SHIFT,
    *,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain-DMD training sigma table (§1.5): ``σ_tab[k] = rule((k + 1)/N)``, ``k = 0..N−1``.

    Ascending, ``N`` entries, no zero, last entry 1. ``"sd3"`` uses the static shift (not
    rounded); the FLUX families and ``"linear"`` are unshifted. Computed in float64, returned
    in ``dtype``. Index ``k`` → noise level ``σ_tab[k]``, model timestep ``N·σ_tab[k]``.
    """
    _validate_family(family)
    r = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    if family == "sd3":
        sh = float(shift)
        if not (math.isfinite(sh) and sh > 0.0):
            raise ValueError(f"shift must be a positive finite number, got {shift!r}")
        table = sh * r / (1.0 + (sh - 1.0) * r)
    else:
        table = r
    return table.to(dtype)
