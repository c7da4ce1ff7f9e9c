"""Tests for rtdmd.algorithms.schedules (spec §1.2–§1.5; invariants 1, 2, 29)."""

import math
import warnings

import pytest
import torch

from rtdmd.algorithms import schedules as S

torch.set_num_threads(1)

STEPS = [1000, 750, 500, 250]


def _approx(a, b, tol=1e-4):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= tol, (a, b)


# ---------------------------------------------------------------- invariant 1 (static shift)
def test_sd3_static_shift_maps_four_steps_to_spec_values():
    sig = S.shifted_sigmas(STEPS, "sd3")
    assert sig == [1.0, 0.9, 0.75, 0.5, 0.0]


def test_sd3_static_shift_is_rounded_to_six_decimals_and_reads_config_shift():
    sig = S.shifted_sigmas([1000, 700, 333], "sd3", shift=3.0)
    for s in sig:
        assert s == round(s, 6)
    # 333/1000 with shift 3: 0.999/1.666 = 0.5996398...
    assert sig[2] == round(3 * 0.333 / (1 + 2 * 0.333), 6)
    assert S.shifted_sigmas(STEPS, "sd3", scheduler_config={"shift": 1.0})[:-1] == [1.0, 0.75, 0.5, 0.25]
    # explicit shift wins over the config
    assert S.shifted_sigmas(STEPS, "sd3", shift=3.0, scheduler_config={"shift": 1.0})[1] == 0.9


# ---------------------------------------------------------------- invariant 1 (dynamic shift)
def test_flux1_mu_for_1024_tokens_is_0p63():
    assert S.flux1_mu(1024) == pytest.approx(0.63, abs=1e-12)
    assert S.flux1_mu(256) == pytest.approx(0.5)
    assert S.flux1_mu(4096) == pytest.approx(1.15)


def test_flux1_dynamic_shift_equals_exponential_formula():
    sig = S.shifted_sigmas(STEPS, "flux1", image_seq_len=1024)
    mu = 0.63
    for step, s in zip(STEPS, sig):
        r = step / 1000
        assert s == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / r - 1), abs=1e-12)
    _approx(sig, [1.0, 0.8492, 0.6525, 0.3849, 0.0])


def test_flux1_1024px_schedule_matches_table():
    # 1024 px -> latent 128x128 -> packed 64x64 = 4096 tokens
    assert S.packed_seq_len("flux1", 128, 128) == 4096
    _approx(S.shifted_sigmas(STEPS, "flux1", image_seq_len=4096), [1.0, 0.9045, 0.7595, 0.5128, 0.0])


def test_flux2_klein_empirical_mu_and_512px_schedule():
    assert S.packed_seq_len("flux2_klein", 32, 32) == 1024
    assert S.flux2_empirical_mu(1024, 4) == pytest.approx(2.0307, abs=1e-4)
    _approx(S.shifted_sigmas(STEPS, "flux2_klein", image_seq_len=1024), [1.0, 0.9581, 0.8840, 0.7175, 0.0])


def test_flux2_klein_1024px_schedule_matches_table():
    _approx(S.shifted_sigmas(STEPS, "flux2_klein", image_seq_len=4096), [1.0, 0.9674, 0.9081, 0.7672, 0.0])


def test_flux2_empirical_mu_large_sequence_branch_is_linear():
    L = 5000
    assert S.flux2_empirical_mu(L, 4) == pytest.approx(S.FLUX2_A2 * L + S.FLUX2_B2)
    assert S.flux2_empirical_mu(L, 4) == S.flux2_empirical_mu(L, 50)  # n-independent


def test_flux2_klein_uses_number_of_steps_actually_used():
    full = S.shifted_sigmas(STEPS, "flux2_klein", image_seq_len=1024)
    trunc = S.shifted_sigmas(STEPS, "flux2_klein", image_seq_len=1024, num_steps=2)
    mu2 = S.flux2_empirical_mu(1024, 2)
    assert len(trunc) == 3 and trunc[-1] == 0.0
    assert trunc[1] == pytest.approx(S.dynamic_shift(0.75, mu2), abs=1e-12)
    assert trunc[1] != pytest.approx(full[1], abs=1e-6)


def test_flux2_shift_terminal_stretch_puts_last_sigma_at_terminal():
    base = S.shifted_sigmas(STEPS, "flux2_klein", image_seq_len=1024)
    sig = S.shifted_sigmas(STEPS, "flux2_klein", image_seq_len=1024, scheduler_config={"shift_terminal": 0.2})
    assert sig[0] == pytest.approx(1.0)
    assert sig[3] == pytest.approx(0.2, abs=1e-12)
    q_last = 1 - base[3]
    for b, s in zip(base[:-1], sig[:-1]):
        assert s == pytest.approx(1 - (1 - b) / (q_last / (1 - 0.2)), abs=1e-12)
    assert sig[-1] == 0.0


def test_flux1_ignores_shift_terminal_with_warning():
    base = S.shifted_sigmas(STEPS, "flux1", image_seq_len=1024)
    with pytest.warns(UserWarning, match="shift_terminal"):
        sig = S.shifted_sigmas(STEPS, "flux1", image_seq_len=1024, scheduler_config={"shift_terminal": 0.2})
    assert sig == base


def test_flux_linear_time_shift_type_and_config_overrides():
    cfg = {"time_shift_type": "linear", "base_shift": 0.3, "max_shift": 2.0,
           "base_image_seq_len": 100, "max_image_seq_len": 1100}
    sig = S.shifted_sigmas(STEPS, "flux1", image_seq_len=600, scheduler_config=cfg)
    mu = 0.3 + (2.0 - 0.3) / 1000 * 500
    for step, s in zip(STEPS, sig):
        r = step / 1000
        assert s == pytest.approx(mu / (mu + 1 / r - 1), abs=1e-12)


def test_linear_family_is_unshifted():
    assert S.shifted_sigmas(STEPS, "linear") == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert S.shifted_sigmas([900, 10], "linear") == [0.9, 0.01, 0.0]


# ---------------------------------------------------------------- invariant 2
@pytest.mark.parametrize("family,kw", [("sd3", {}), ("flux1", {"image_seq_len": 1024}),
                                       ("flux2_klein", {"image_seq_len": 1024}), ("linear", {})])
def test_schedule_has_k_plus_one_sigmas_ending_in_zero_and_timesteps_are_1000_sigma(family, kw):
    steps = [1000, 800, 600, 400, 200]
    sig = S.shifted_sigmas(steps, family, **kw)
    assert len(sig) == len(steps) + 1
    assert sig[-1] == 0.0 and all(isinstance(s, float) for s in sig)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    ts = S.timesteps_from_sigmas(sig)
    assert len(ts) == len(steps)
    assert ts == [1000.0 * s for s in sig[:-1]]
    tt = S.timesteps_from_sigmas(torch.tensor(sig, dtype=torch.float32))
    assert tt.dtype == torch.float32 and tt.shape == (len(steps),)
    assert torch.equal(tt, torch.tensor(sig[:-1], dtype=torch.float32) * 1000)


def test_timesteps_from_sigmas_keeps_nonzero_last_entry():
    assert S.timesteps_from_sigmas([1.0, 0.5]) == [1000.0, 500.0]


# ---------------------------------------------------------------- invariant 29
def test_dmd_sigma_table_sd3_is_shifted_ascending_without_zero():
    tab = S.dmd_sigma_table("sd3", shift=3.0, dtype=torch.float64)
    assert tab.shape == (1000,)
    assert bool((tab > 0).all()) and bool((tab[1:] > tab[:-1]).all())
    assert tab[-1].item() == 1.0
    for k in (0, 1, 249, 499, 998, 999):
        r = (k + 1) / 1000
        assert tab[k].item() == pytest.approx(3 * r / (1 + 2 * r), abs=1e-15)
    assert S.dmd_sigma_table("sd3").dtype == torch.float32


@pytest.mark.parametrize("family", ["flux1", "flux2_klein", "linear"])
def test_dmd_sigma_table_flux_is_unshifted(family):
    tab = S.dmd_sigma_table(family, dtype=torch.float64)
    assert tab.shape == (1000,) and tab.min().item() > 0
    assert torch.allclose(tab, torch.arange(1, 1001, dtype=torch.float64) / 1000, atol=0, rtol=0)


# ---------------------------------------------------------------- validation
def test_empty_step_list_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        S.shifted_sigmas([], "sd3")


@pytest.mark.parametrize("bad", [0, -5, 1001, float("nan")])
def test_out_of_range_step_is_rejected_with_its_value(bad):
    with pytest.raises(ValueError, match=r"step_list\[1\]"):
        S.shifted_sigmas([1000, bad], "linear")


def test_non_descending_step_list_is_rejected_naming_the_value():
    with pytest.raises(ValueError, match="descending.*750"):
        S.shifted_sigmas([1000, 750, 750], "sd3")
    with pytest.raises(ValueError, match="descending.*800"):
        S.shifted_sigmas([500, 800], "sd3")


def test_non_numeric_step_is_rejected():
    with pytest.raises(ValueError, match="real number"):
        S.shifted_sigmas([1000, "750"], "sd3")
    with pytest.raises(ValueError):
        S.shifted_sigmas("1000", "sd3")


@pytest.mark.parametrize("family", ["flux1", "flux2_klein"])
def test_missing_image_seq_len_is_a_clear_error(family):
    with pytest.raises(ValueError, match="image_seq_len"):
        S.shifted_sigmas(STEPS, family)
    with pytest.raises(ValueError, match="image_seq_len"):
        S.shifted_sigmas(STEPS, family, image_seq_len=0)


def test_unknown_family_and_misplaced_options_are_rejected():
    with pytest.raises(ValueError, match="family"):
        S.shifted_sigmas(STEPS, "sdxl")
    with pytest.raises(ValueError, match="shift"):
        S.shifted_sigmas(STEPS, "flux1", image_seq_len=1024, shift=3.0)
    with pytest.raises(ValueError, match="num_steps"):
        S.shifted_sigmas(STEPS, "sd3", num_steps=5)
    with pytest.raises(ValueError, match="num_steps"):
        S.shifted_sigmas(STEPS, "sd3", num_steps=0)
    with pytest.raises(ValueError, match="time_shift_type"):
        S.shifted_sigmas(STEPS, "flux1", image_seq_len=1024, scheduler_config={"time_shift_type": "cubic"})
    with pytest.raises(ValueError, match="family"):
        S.dmd_sigma_table("sdxl")


def test_no_warning_for_default_flux1_config():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.shifted_sigmas(STEPS, "flux1", image_seq_len=1024, scheduler_config={"shift_terminal": None})


def test_flux_scheduler_without_dynamic_shifting_uses_its_static_shift():
    """The scheduler flag is honoured: use_dynamic_shifting false means sigma = shift·r / (1 + (shift−1)·r)."""
    from rtdmd.algorithms.schedules import shifted_sigmas

    cfg = {"use_dynamic_shifting": False, "shift": 3.0}
    for fam in ("flux2_klein", "flux1"):
        got = shifted_sigmas([1000, 750, 500, 250], fam, image_seq_len=1024, scheduler_config=cfg)
        assert got == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
        dyn = shifted_sigmas([1000, 750, 500, 250], fam, image_seq_len=1024,
                             scheduler_config={"use_dynamic_shifting": True, "shift": 3.0})
        assert dyn[1:4] != pytest.approx(got[1:4])
