"""Queueing-theory validation of the simulator's own executor (sim.studies.queueing: GPU + StageQueue +
BatchEngine with synthetic service laws) against closed forms.

Statistics: each check runs R independent seeded replications of N requests, drops the first
10% of requests of each (the empty-system warm-up transient), takes one estimate per
replication and compares the mean over replications with theory:
    |mean - theory| < 4 * SE + bias,   SE = std(estimates, ddof=1) / sqrt(R)
where `bias` is a small allowance (1-3% of theory) for what is left of the transient and for the
finite-sample bias of a ratio/quantile estimator. A correct simulator fails a 4-SE check with
probability ~6e-5 per test; the seeds are fixed, so the suite is deterministic anyway.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.config import SimConfig
from sim.studies.queueing import run_queueing, sample_service, simulate
from sim.rng import stream
from sim.workloads.laws import gamma_arrivals

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP = 0.10


# --- closed forms -------------------------------------------------------------------------------

def erlang_c(c: int, a: float) -> float:
    """Probability of waiting in M/M/c with offered load a = lambda/mu (Erlang C)."""
    rho = a / c
    s = sum(a ** k / math.factorial(k) for k in range(c))
    top = a ** c / math.factorial(c) / (1 - rho)
    return top / (s + top)


def mmc_wq(c: int, lam: float, mu: float) -> float:
    return erlang_c(c, lam / mu) / (c * mu - lam)


def pk_wq(lam: float, es: float, es2: float) -> float:
    """Pollaczek-Khinchine mean wait of M/G/1."""
    rho = lam * es
    return lam * es2 / (2 * (1 - rho))


def gamma_m1_sigma(lam: float, mu: float, k: float) -> float:
    """Root in (0,1) of sigma = A*(mu(1-sigma)), A*(s) = (1 + s/(k lam))^(-k) (Gamma arrivals)."""
    def f(s: float) -> float:
        return (1 + mu * (1 - s) / (k * lam)) ** (-k) - s
    lo, hi = 1e-12, 1 - 1e-12        # f(lo) > 0 > f(hi) when lam < mu: bisect to ~1e-16
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --- replication harness ----------------------------------------------------------------------

def replicate(servers: int, lam: float, shape: float, law: str, mean: float, cv: float,
              n: int, reps: int, seed0: int, stat) -> np.ndarray:
    """One estimate `stat(wait, sojourn)` per replication, warm-up dropped."""
    out = []
    for r in range(reps):
        seed = seed0 + r
        arr = gamma_arrivals(n, lam, shape, stream(seed, "arrivals"))
        svc = sample_service(law, mean, cv, n, stream(seed, "service"))
        res = simulate(servers, arr, svc)
        assert np.isfinite(res["end"]).all()
        k = int(WARMUP * n)
        out.append(stat(res["start"][k:] - arr[k:], res["end"][k:] - arr[k:]))
    return np.asarray(out)


def assert_close(est: np.ndarray, theory: float, bias_rel: float, what: str) -> None:
    m = float(est.mean())
    se = float(est.std(ddof=1) / math.sqrt(len(est)))
    tol = 4 * se + bias_rel * abs(theory)
    assert abs(m - theory) < tol, (f"{what}: simulated {m:.5f} vs theory {theory:.5f} "
                                   f"(SE {se:.5f}, tolerance {tol:.5f}, R={len(est)})")
    # the check must have teeth: the tolerance stays within ~10% of the quantity
    assert tol < 0.15 * abs(theory), f"{what}: tolerance {tol:.4f} too loose vs {theory:.4f}"


def mean_soj(w, s):
    return s.mean()


def mean_wait(w, s):
    return w.mean()


# --- M/M/1 --------------------------------------------------------------------------------------

def test_mm1_mean_sojourn():
    lam, mu = 0.7, 1.0
    est = replicate(1, lam, 1.0, "exponential", 1 / mu, 1.0, 20000, 24, 100, mean_soj)
    assert_close(est, 1 / (mu - lam), 0.01, "M/M/1 mean sojourn")


def test_mm1_p99_sojourn():
    """Sojourn in FCFS M/M/1 is Exp(mu - lambda): p99 = -ln(0.01)/(mu - lambda)."""
    lam, mu = 0.7, 1.0
    est = replicate(1, lam, 1.0, "exponential", 1 / mu, 1.0, 20000, 24, 200,
                    lambda w, s: np.percentile(s, 99))
    assert_close(est, -math.log(0.01) / (mu - lam), 0.02, "M/M/1 p99 sojourn")


# --- M/M/c (Erlang C) -----------------------------------------------------------------------------

@pytest.mark.parametrize("c,lam", [(2, 1.6), (4, 3.2)])
def test_mmc_mean_wait_erlang_c(c, lam):
    mu = 1.0
    est = replicate(c, lam, 1.0, "exponential", 1 / mu, 1.0, 20000, 24, 300 + 10 * c, mean_wait)
    assert_close(est, mmc_wq(c, lam, mu), 0.02, f"M/M/{c} mean wait (Erlang C)")


def test_erlang_c_closed_form_sanity():
    # c=1 reduces to M/M/1: P(wait) = rho, Wq = rho/(mu - lam)
    assert erlang_c(1, 0.7) == pytest.approx(0.7)
    assert mmc_wq(1, 0.7, 1.0) == pytest.approx(0.7 / 0.3)
    # textbook value: c=2, a=1.6 -> C = 0.7111...
    assert erlang_c(2, 1.6) == pytest.approx(2.56 / 3.6, rel=1e-12)


# --- M/D/1 and M/G/1 (Pollaczek-Khinchine) -------------------------------------------------------

def test_md1_mean_wait_pk():
    lam, s = 0.7, 1.0
    est = replicate(1, lam, 1.0, "deterministic", s, 0.0, 20000, 24, 400, mean_wait)
    assert_close(est, pk_wq(lam, s, s * s), 0.01, "M/D/1 mean wait (P-K)")


def test_mg1_lognormal_cv2_mean_wait_pk():
    lam, s, cv = 0.5, 1.0, 2.0
    # heavy tail (E[S^2]=5, E[S^3]=125): more replications, longer runs
    est = replicate(1, lam, 1.0, "lognormal", s, cv, 30000, 30, 500, mean_wait)
    assert_close(est, pk_wq(lam, s, s * s * (1 + cv * cv)), 0.02, "M/G/1 lognormal cv=2 mean wait")


def test_sample_service_moments():
    rng = stream(7, "service-moments")
    x = sample_service("lognormal", 2.0, 2.0, 400_000, rng)
    assert x.mean() == pytest.approx(2.0, rel=0.03)
    assert x.std() / x.mean() == pytest.approx(2.0, rel=0.08)
    assert (sample_service("constant", 1.5, 0.0, 10, rng) == 1.5).all()


# --- Gamma/M/1 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.5, 4.0])
def test_gamma_m1_mean_sojourn(k):
    lam, mu = 0.7, 1.0
    sigma = gamma_m1_sigma(lam, mu, k)
    theory = 1 / (mu * (1 - sigma))
    est = replicate(1, lam, k, "exponential", 1 / mu, 1.0, 20000, 24, 600 + int(10 * k), mean_soj)
    assert_close(est, theory, 0.015, f"Gamma(k={k})/M/1 mean sojourn")


def test_gamma_m1_sigma_reduces_to_mm1():
    # k=1 is Poisson: sigma = rho
    assert gamma_m1_sigma(0.7, 1.0, 1.0) == pytest.approx(0.7, rel=1e-9)
    # burstier arrivals wait longer; smoother ones less
    assert gamma_m1_sigma(0.7, 1.0, 0.5) > 0.7 > gamma_m1_sigma(0.7, 1.0, 4.0)


# --- exact sample-path identities ----------------------------------------------------------------

def _qcfg(**kw) -> SimConfig:
    cfg = SimConfig()
    cfg.experiment = "queueing"
    for k, v in kw.items():
        setattr(cfg.queueing, k, v)
    return cfg


@pytest.mark.parametrize("servers,rate,law,shape", [(1, 0.8, "exponential", 1.0),
                                                    (3, 2.5, "lognormal", 0.5),
                                                    (2, 1.9, "deterministic", 4.0)])
def test_littles_law_exact(servers, rate, law, shape, tmp_path):
    cfg = _qcfg(servers=servers, arrival_rate=rate, service_law=law, arrival_shape=shape,
                service_cv=2.0, num_requests=5000)
    s = run_queueing(cfg, tmp_path)
    assert s["completed"] == 5000
    assert s["time_avg_in_system"] == pytest.approx(s["littles_law_rhs"], rel=1e-9)
    # both sides are also lambda_hat * W: L = X * W
    assert s["littles_law_rhs"] == pytest.approx(
        s["request_throughput"] * s["mean_e2el_ms"] / 1e3, rel=1e-9)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "requests.parquet").exists()


@pytest.mark.parametrize("servers", [1, 2, 5])
def test_conservation_and_fcfs(servers):
    n = 4000
    arr = gamma_arrivals(n, 0.9 * servers, 0.5, stream(11, "arrivals"))
    svc = sample_service("exponential", 1.0, 1.0, n, stream(11, "service"))
    r = simulate(servers, arr, svc)
    start, end = r["start"], r["end"]
    assert np.isfinite(end).all()                          # every request served exactly once
    assert (start >= arr - 1e-12).all()                    # never before its arrival
    np.testing.assert_allclose(end - start, svc, rtol=1e-9, atol=1e-12)   # service not split
    assert r["busy"] == pytest.approx(svc.sum(), rel=1e-9)  # work conserved
    assert r["duration"] == pytest.approx(end.max(), rel=1e-12)
    assert (np.diff(start) >= -1e-12).all()                # central FCFS queue: starts in order
    assert r["area"] == pytest.approx((end - arr).sum(), rel=1e-9)
    # never more than `servers` in service at once
    ev = sorted([(t, 1) for t in start] + [(t, -1) for t in end], key=lambda x: (x[0], x[1]))
    busy = peak = 0
    for _, d in ev:
        busy += d
        peak = max(peak, busy)
    assert peak <= servers
    if servers == 1:   # Lindley recursion, exactly
        exp_start = np.empty(n)
        prev = 0.0
        for i in range(n):
            exp_start[i] = max(arr[i], prev)
            prev = exp_start[i] + svc[i]
        np.testing.assert_allclose(start, exp_start, rtol=1e-9, atol=1e-9)


def test_work_conserving_multi_server():
    """With c servers nobody waits while a server is idle: at each start, the number of
    requests in service just before it is < c or the request arrived while all were busy."""
    n, c = 3000, 3
    arr = gamma_arrivals(n, 2.4, 1.0, stream(5, "arrivals"))
    svc = sample_service("exponential", 1.0, 1.0, n, stream(5, "service"))
    r = simulate(c, arr, svc)
    start, end = r["start"], r["end"]
    waited = start > arr + 1e-12
    for i in np.nonzero(waited)[0][:500]:
        # when i arrived, c requests were in service
        in_service = np.sum((start <= arr[i] + 1e-12) & (end > arr[i] + 1e-12))
        assert in_service >= c, f"request {i} waited with {in_service} of {c} servers busy"


# --- CLI ----------------------------------------------------------------------------------------------

def test_cli_queueing_writes_summary(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "sim", "+experiment=queueing", "queueing.servers=2",
         "queueing.arrival_rate=1.6", "queueing.num_requests=3000", "seed=1",
         f"hydra.run.dir={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["experiment"] == "queueing" and s["servers"] == 2 and s["completed"] == 3000
    assert s["mean_queue_ms"] > 0 and s["mean_e2el_ms"] > s["mean_queue_ms"]
    # E2E = wait + service (mean 1 s)
    assert s["mean_e2el_ms"] - s["mean_queue_ms"] == pytest.approx(1000.0, rel=0.1)
    assert s["time_avg_in_system"] == pytest.approx(s["littles_law_rhs"], rel=1e-9)
