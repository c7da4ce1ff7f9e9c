"""Pure tensor math of the RTDMD training method (no model code, no I/O).

Every function here works on plain ``torch.Tensor`` objects / python numbers and is unit
tested on small random tensors (``tests/algorithms``). Section numbers refer to the method
specification ``algorithm.md``.

Modules
-------
``rtdmd.algorithms.schedules``
    Shifted sigma schedules for denoising step lists (§1.3, §1.4), timestep <-> sigma
    conversion (§1.2) and the 1000-entry plain-DMD sigma table (§1.5).
``rtdmd.algorithms.cps``
    The CPS sampler step, its mean/std, the (simplified or exact) transition log-probability and
    the stateless step-with-log-prob used by GRPO, incl. the Flow-GRPO ``"sde"`` variant (§2).
``rtdmd.algorithms.dmd``
    Generic DMD generator loss (§4.1), plain-DMD timestep-index sampling and plain fake-score
    flow-matching loss (§4.2).
``rtdmd.algorithms.ac_dmd``
    AC-DMD on trajectory sub-intervals: sub-interval start (§5.1), renoising timesteps (§5.2),
    sub-interval forward noising (§5.3), theoretical target (§5.4), inverse-scale weighted
    fake-score loss (§5.5) and shared-noise back-projections for the generator loss (§5.6).
``rtdmd.algorithms.consistency``
    Consistency (martingale) regulariser on the fake denoiser (§5.7).

Further modules of this package (e.g. ``ema``, ``grpo``, ``reward_bp``,
``rtdmd_objective``: stage-2 EMA, GRPO/SubGRPO and the hybrid objective) document their
equations in their own docstrings.

Importing this package imports nothing heavy; import the submodules directly.
"""
