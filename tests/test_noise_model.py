"""The Rician magnitude misfit ([inversion] noise_snr): J = w/N sum (sqrt(|S/S0|^2 + 2 sigma^2)
- |T|)^2, sigma = 1/SNR, against magnitude data with Rician noise ([target] noise_snr).

References: the formula evaluated with numpy from the model's own normalised signals; the
second moment of Rician data, E|S + n|^2 = |S|^2 + 2 sigma^2 (sampled); second-order Taylor
remainders of the kappa gradient (eigenbasis model at a fixed mode count, frozen basis, full
order). Runs serially and under mpiexec -n 2.
"""

import numpy as np
import pytest
from test_tissue_gradient import TEXT, kappa_taylor_rates

from spinverse_fem.config import parse_config
from spinverse_fem.errors import InputError

SNR = 20.0
NOISY = TEXT + f"[target]\nnoise_snr = {SNR}\nseed = 3\n[inversion]\nnoise_snr = {SNR}\n"


@pytest.fixture(scope="module")
def case():
    from mpi4py import MPI

    from spinverse_fem.inverse.case import Case

    return Case(MPI.COMM_WORLD, parse_config(NOISY, source="noisy.toml"))


def test_rician_misfit_value_is_the_formula(case):
    """Reference: numpy on the model's normalised signals and the (real, noisy) targets."""
    kappa = case.start_kappa()
    mis = case.misfit()
    assert mis.noise_sigma == pytest.approx(1.0 / SNR)
    J = mis.cost(kappa)
    value = 0.0
    for s, t in zip(mis.signals(kappa), case.targets.signals):
        p = np.sqrt(np.abs(s) ** 2 + 2.0 / SNR**2)
        value += np.sum((p - np.abs(t)) ** 2)
    assert J == pytest.approx(mis.weight / mis.num_measurements * value, rel=1e-12)


def test_rician_second_moment():
    """Reference: E|S + n|^2 = |S|^2 + 2 sigma^2 for n = (n1 + i n2) sigma, n1, n2 ~ N(0, 1):
    the bias the model adds, sampled (1e6 draws, 4 standard errors)."""
    rng = np.random.default_rng(0)
    sigma, S = 1.0 / SNR, 0.3
    n = 1_000_000
    T = np.abs(S + sigma * (rng.standard_normal(n) + 1j * rng.standard_normal(n)))
    m2 = np.mean(T**2)
    se = np.std(T**2) / np.sqrt(n)
    assert abs(m2 - (S**2 + 2.0 * sigma**2)) < 4.0 * se


@pytest.mark.parametrize("model, basis", [("reduced", "eigen"), ("reduced", "frozen"),
                                          ("full", "eigen")])
def test_rician_misfit_gradient_taylor(case, model, basis):
    """Reference: Taylor remainders in a random direction of kappa at the start: rates >= 1.9
    (the gradient differs from least squares only in the output cotangent)."""
    rates, rem, slope = kappa_taylor_rates(case, model, basis, seed=8)
    print(f"{model} {basis}: slope {slope:.4g}, remainders {rem}, rates {rates}")
    assert abs(slope) > 1e-8
    assert np.all(rates >= 1.9), (rates, rem)


@pytest.mark.parametrize("value", ["0.0", "-5.0", '"high"'])
def test_bad_noise_snr_is_refused(value):
    with pytest.raises(InputError) as err:
        parse_config(TEXT + f"[inversion]\nnoise_snr = {value}\n", source="noisy.toml")
    assert "inversion.noise_snr" in str(err.value)
