"""Privacy accountants for a hospital's DP-SGD history: epsilon of a list of (noise multiplier,
sample rate, steps), and the noise a planned run needs to land at a target epsilon.

Three accountants, each an upper bound on the true epsilon of the Poisson-subsampled Gaussian:
- rdp: Opacus' Renyi DP, over orders up to 4096 (Opacus' own stop at 63, where the bound of a
  well-noised run is still falling: "Optimal order is the largest alpha").
- prv: Opacus' privacy-loss random variables (Gopi et al. 2021), its upper bound.
- pld: Google's dp-accounting privacy-loss distributions, its pessimistic estimate.
"auto" (the default) takes the smallest of those that compute: the minimum of valid upper bounds
is a valid upper bound, so the hospital adds no more noise than its budget needs. The ledger
records which accountant gave each figure.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant

log = logging.getLogger("aseanfl")

ACCOUNTANTS = ("rdp", "prv", "pld")
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                   + [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 2048, 4096])
PLD_INTERVAL = 1e-3  # dp-accounting's grid for the loss; coarser is looser, never optimistic
MAX_NOISE = 1e4

History = list[tuple[float, float, int]]


def _rdp(history: History, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():  # a largest-order optimum past 4096 means epsilon is tiny anyway
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta, alphas=list(RDP_ORDERS)))


def _prv(history: History, delta: float) -> float:
    acc = PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta))


def _pld(history: History, delta: float) -> float:
    import dp_accounting  # a second library's analysis; imported late (absl, scipy) for the rdp-only paths
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for noise, rate, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), int(steps))
    return float(acc.get_epsilon(delta))


_BY_NAME = {"rdp": _rdp, "prv": _prv, "pld": _pld}


def merged(history: History) -> History:
    """Entries with the same noise and sample rate as one entry of all their steps: composing
    the same mechanism k and then m times is composing it k + m times, under every accountant;
    a ledger's rounds usually share both, so each figure costs one entry, not one per round."""
    steps: dict[tuple[float, float], int] = {}
    for noise, rate, n in history:
        key = (float(noise), float(rate))
        steps[key] = steps.get(key, 0) + int(n)
    return [(noise, rate, n) for (noise, rate), n in steps.items()]


def accounted(history: History, delta: float, accountant: str) -> tuple[float, str]:
    """(epsilon, the accountant that gave it). `accountant` 'auto': the smallest valid figure."""
    if not history:
        return 0.0, accountant if accountant != "auto" else "rdp"
    history = merged(history)
    if accountant != "auto":
        return _BY_NAME[accountant](history, delta), accountant
    figures = {}
    for name in ACCOUNTANTS:
        try:
            figures[name] = _BY_NAME[name](history, delta)
        except (ValueError, ArithmeticError, RuntimeError) as exc:  # outside a method's numeric range: the others hold
            log.debug("accountant %s cannot bound this history: %s", name, exc)
    name = min(figures, key=figures.__getitem__)
    return figures[name], name


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    return accounted(history, delta, accountant)[0]


@lru_cache(maxsize=64)
def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
              tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (within `tolerance` of epsilon) whose run of `steps` steps
    stays at or under `epsilon`. Under 'auto' each accountant is searched and the smallest
    noise taken: a run is as private as its tightest valid bound says."""
    names = ("pld", "prv", "rdp") if accountant == "auto" else (accountant,)  # usually tightest first
    best = None
    for name in names:
        method = _BY_NAME[name]
        try:
            # epsilon falls as the noise grows: a method above epsilon at the best noise so far
            # cannot do with less, and is not searched (the result is the same, in a third of the time)
            if best is not None and method([(best, sample_rate, steps)], delta) > epsilon:
                continue
            best = _search(method, epsilon, delta, sample_rate, steps, tolerance, best)
        except (ValueError, ArithmeticError, RuntimeError) as exc:
            if accountant != "auto":
                raise ValueError(f"accountant {name}: {exc}") from None
            log.debug("accountant %s cannot calibrate: %s", name, exc)
    if best is None:
        raise ValueError(f"no accountant reaches epsilon {epsilon} with delta {delta}")
    return best


def _search(method, epsilon: float, delta: float, rate: float, steps: int, tolerance: float,
            high: float | None = None) -> float:
    """Bisection on the noise multiplier, as Opacus' get_noise_multiplier does (`high`: a noise
    known to be enough)."""
    low, high = 0.0, high or 1.0
    while (eps_high := method([(high, rate, steps)], delta)) > epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE:
            raise ValueError("the privacy budget is too low")
    while epsilon - eps_high > tolerance and high - low > 1e-4:
        mid = (low + high) / 2
        eps = method([(mid, rate, steps)], delta)
        if eps < epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high
