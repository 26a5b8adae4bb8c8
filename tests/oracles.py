"""Analytic oracles shared by the sampler tests (imported as ``oracles``; pytest puts
tests/ on sys.path).

For Gaussian data x0 ~ N(mu, s^2) the exact (MMSE) eps-predictor is affine in x_t:
  x_t ~ N(sqrt(ab) mu, V),  V = ab s^2 + 1 - ab,  eps*(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) mu) / V,
so every sampler step is affine in x_t plus independent Gaussian noise, and the exact
law of a sampler's output follows by carrying x as an affine function of (x_T, z_1..z_n)
through the steps. ``propagate`` (DDPM/DDIM) and ``reference_sample`` (every sampler)
do that in float64 numpy straight from the papers' formulas, without samplers.py, so
sampled moments can be checked against exact numbers that already include the
discretization error of a given step sequence.

The probability-flow ODE of Gaussian data is known in closed form: its flow is affine and
increasing and maps the marginal at one level onto the marginal at another, so it keeps
the standardized value z = (x_t - sqrt(ab) mu) / sqrt(V) fixed (``exact_ode``), whatever
continuous path interpolates the discrete schedule.

Its reverse conditional q(x_{t-1} | x_t) is Gaussian too, with a variance fixed by t alone
(``reverse_variance``): the optimal learned variance (Nichol & Dhariwal 2021; Bao et al.
2022), which ``gaussian_eps_sigma`` outputs in the 2C-channel layout of variance.py;
``ref_vlb`` is the VLB term (KL, decoder NLL) written out in float64 from the papers.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.schedules import linear_betas, make_schedule

T = 1000
SCHED = make_schedule("linear", T)
BETAS = linear_betas(T)  # float64 reference values
AB = np.cumprod(1.0 - BETAS)


# --------------------------------------------------------------------------- model_fns


def coefs(x, t):
    """sqrt(alpha_bar), sqrt(1 - alpha_bar) at t [B], broadcast against x. Taken from the
    schedule's float64-derived tables: 1 - ab in float32 loses ~4 digits near t = 0."""
    a = jnp.take(SCHED.sqrt_alphas_cumprod, t).reshape(t.shape + (1,) * (x.ndim - 1))
    return a, jnp.take(SCHED.sqrt_one_minus_alphas_cumprod, t).reshape(a.shape)


def gaussian_eps_at(x, t, mu, s):
    a, sig = coefs(x, t)
    return sig * (x - a * mu) / (a**2 * s * s + sig**2)


@functools.lru_cache(maxsize=None)  # one function object per (mu, s): jit caches hit
def gaussian_eps(mu, s):
    """Exact eps-predictor for x0 ~ N(mu, s^2), as a model_fn(x_t, t)."""
    return functools.partial(gaussian_eps_at, mu=mu, s=s)


def mixture_eps(weights, means, stds):
    """Exact eps-predictor for a 1-D Gaussian mixture: E[x0 | x_t] = sum_k r_k(x_t) E_k, with
    component k giving x_t ~ N(a m_k, V_k), V_k = a^2 s_k^2 + 1 - a^2, and
    E_k = m_k + a s_k^2 (x_t - a m_k) / V_k; then eps = (x_t - a E[x0|x_t]) / sqrt(1 - a^2)."""
    w, m, sd = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

    def model_fn(x, t):
        a, sig = coefs(x, t)
        ak, xk = a[..., None], x[..., None]  # [..., 1] against the K components
        var = ak**2 * sd**2 + sig[..., None] ** 2
        logp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xk - ak * m) ** 2 / var
        r = jax.nn.softmax(logp, axis=-1)
        x0 = jnp.sum(r * (m + ak * sd**2 * (xk - ak * m) / var), axis=-1)
        return (x - a * x0) / sig

    return model_fn


# --------------------------------------------------------------------------- exact moments


def leading(n):
    """DDIM "leading" indices, written out independently of timesteps.ddim_timesteps."""
    return np.arange(0, T, T // n)[:n][::-1]


def pairs(ts):
    return list(zip(ts, list(ts[1:]) + [-1]))


def propagate(steps, mu, s, rule, eta=0.0):
    """Exact (mean, var, gain, offset) of the sampler output for x_T ~ N(0, 1) with the
    Gaussian oracle; output = gain * x_T + offset + independent noise. float64. A step
    with tp > t re-noises, x_tp ~ q(x_tp | x_t) (RePaint)."""
    m, v, gain, offset = 0.0, 1.0, 1.0, 0.0
    for t, tp in steps:
        ab, abp = AB[t], (1.0 if tp < 0 else AB[tp])
        if tp > t:  # sqrt(abp / ab) x + N(0, 1 - abp / ab)
            G = np.sqrt(abp / ab)
            m, v, gain, offset = G * m, G * G * v + 1.0 - abp / ab, G * gain, G * offset
            continue
        c = np.sqrt(1 - ab) / (ab * s * s + 1 - ab)  # eps = ge x + oe
        ge, oe = c, -c * np.sqrt(ab) * mu
        g0, o0 = (1 - np.sqrt(1 - ab) * ge) / np.sqrt(ab), -np.sqrt(1 - ab) * oe / np.sqrt(ab)
        if rule == "ddim":  # Song et al. eq. 12, 16
            sig2 = eta**2 * (1 - abp) / (1 - ab) * (1 - ab / abp)
            k = np.sqrt(1 - abp - sig2)
            G, off = np.sqrt(abp) * g0 + k * ge, np.sqrt(abp) * o0 + k * oe
        else:  # Ho et al. eq. 7 posterior mean of the (respaced: Nichol & Dhariwal 2021
            # sec. 4) chain, beta = 1 - ab / abp (= BETAS[t] for tp = t - 1); sigma^2 =
            # beta, beta_tilde or the exact reverse variance (the oracle's learned one,
            # reverse_variance), none on the step to the clean end
            beta = BETAS[t] if tp == t - 1 else 1.0 - ab / abp
            c1, c2 = (beta * np.sqrt(abp) / (1 - ab), (1 - abp) * np.sqrt(1 - beta) / (1 - ab))
            G, off = c1 * g0 + c2, c1 * o0
            beta_tilde = beta * (1 - abp) / (1 - ab)
            reverse = beta * (abp * s * s + 1 - abp) / (ab * s * s + 1 - ab)
            sig2 = {"fixedlarge": beta, "fixedsmall": beta_tilde, "learned": reverse}[rule]
            sig2 = 0.0 if tp < 0 else sig2
        m, v = G * m + off, G * G * v + sig2
        gain, offset = G * gain, G * offset + off
    return m, v, gain, offset


def alpha_sigma(t):
    """float64 (alpha, sigma) at index t; (1, 0) at the clean end t = -1."""
    return (1.0, 0.0) if t < 0 else (np.sqrt(AB[t]), np.sqrt(1.0 - AB[t]))


def exact_ode(x, t_from, t_to, mu, s):
    """The exact probability-flow ODE map of x from index t_from to t_to (Gaussian data)."""
    (a0, s0), (a1, s1) = alpha_sigma(t_from), alpha_sigma(t_to)
    z = (x - a0 * mu) / np.sqrt(a0**2 * s * s + s0**2)
    return a1 * mu + np.sqrt(a1**2 * s * s + s1**2) * z


def denoise(x, t, mu, s):
    """E[x0 | x_t] for Gaussian data: what every sampler's last step (to -1) returns."""
    a, sig = alpha_sigma(t)
    return mu + a * s * s * (x - a * mu) / (a**2 * s * s + sig**2)


def exact_ode_sample(x_T, ts, mu, s):
    """The exact ODE from ts[0] to the smallest index ts[-1], then the exact last step (the
    same first-order step to -1 that every sampler takes): the limit of every ODE solver
    on the grid ts as its steps shrink."""
    return denoise(exact_ode(x_T, ts[0], ts[-1], mu, s), ts[-1], mu, s)


def reference_sample(sampler, ts, mu, s):
    """``sampler``'s output with the Gaussian oracle, stepping ts[0] -> .. -> ts[-1] -> -1,
    as float64 coefficients c over (1, x_T, z_1, .., z_n): output = c[0] + c[1] x_T +
    sum_i c[1 + i] z_i, z_i the standard normal noise of step i. Written from the papers
    independently of samplers.py. For x_T ~ N(0, 1): mean c[0], variance sum(c[1:]^2)
    (``moments``).

    ddim (eta = 0): Song et al. 2021 eq. 12. euler / heun: Karras et al. 2022 Alg. 1 in
    x~ = x / alpha, sigma~ = sigma / alpha (dx~/dsigma~ = eps), Euler into -1. dpmpp_2m(_sde):
    Lu et al. 2022 (DPM-Solver++ Alg. 2 and its SDE variant), first order on the first step
    and into -1.
    """
    n = len(ts)
    e0 = np.zeros(n + 2)
    e0[0] = 1.0

    def oracle(v, t):  # (x0, eps) as coefficient vectors
        a, sig = alpha_sigma(t)
        c = a * s * s / (a**2 * s * s + sig**2)
        x0 = c * v + (1.0 - c * a) * mu * e0
        return x0, (v - a * x0) / sig

    v = np.zeros(n + 2)
    v[1] = 1.0
    x0_last, h_last = None, None
    for i, (t, tp) in enumerate(pairs(list(ts))):
        (a, sig), (ap, sp) = alpha_sigma(t), alpha_sigma(tp)
        x0, eps = oracle(v, t)
        z = np.zeros(n + 2)
        z[2 + i] = 1.0
        if sampler in ("ddim", "euler", "heun"):
            if sampler == "heun" and tp >= 0:
                x_euler = ap * (v / a + (sp / ap - sig / a) * eps)
                _, eps2 = oracle(x_euler, tp)
                v = ap * (v / a + (sp / ap - sig / a) * 0.5 * (eps + eps2))
            else:
                v = ap * x0 + sp * eps
        else:
            lam, lam_p = np.log(a / sig), (np.inf if tp < 0 else np.log(ap / sp))
            h = lam_p - lam
            d = x0
            if x0_last is not None and tp >= 0:
                r = h_last / h
                d = x0 + (x0 - x0_last) / (2.0 * r)
            if sampler == "dpmpp_2m":
                v = (sp / sig) * v + ap * (1.0 - np.exp(-h)) * d
            else:
                v = (
                    (sp / sig) * np.exp(-h) * v
                    + ap * (1.0 - np.exp(-2.0 * h)) * d
                    + sp * np.sqrt(1.0 - np.exp(-2.0 * h)) * z
                )
            x0_last, h_last = x0, h
    return v


def moments(coefficients):
    """(mean, var) of reference_sample's output for x_T ~ N(0, 1)."""
    return coefficients[0], float(np.sum(coefficients[1:] ** 2))


def check_moments(x, m, v, label):
    """Sample mean/var of x within 5 standard errors of the exact (m, v): se_mean =
    sqrt(v/N), se_var = v sqrt(2/(N-1)) (Gaussian output). A correct sampler fails this
    with probability < 1e-6 per check."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    se_m, se_v = np.sqrt(v / n), v * np.sqrt(2.0 / (n - 1))
    print(
        f"{label}: mean {x.mean():.5f} exact {m:.5f} ({(x.mean() - m) / se_m:+.2f} se); "
        f"var {x.var(ddof=1):.5f} exact {v:.5f} ({(x.var(ddof=1) - v) / se_v:+.2f} se)"
    )
    assert abs(x.mean() - m) < 5 * se_m, label
    assert abs(x.var(ddof=1) - v) < 5 * se_v, label


# --------------------------------------------------------------------------- learned variance


def reverse_variance(betas, s):
    """Var(x_{t-1} | x_t) [T] at every index t for x0 ~ N(mu, s^2) (any mu), float64.

    With V_t = ab_t s^2 + 1 - ab_t the variance of x_t (V = s^2 at the clean end) and
    x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, (x_{t-1}, x_t) is jointly Gaussian with
    covariance sqrt(alpha_t) V_{t-1}, so Var(x_{t-1} | x_t) = V_{t-1} - alpha_t V_{t-1}^2 /
    V_t = beta_t V_{t-1} / V_t, whatever x_t. Given the optimal mean E[x_{t-1} | x_t] it is
    the sigma_t^2 minimising E KL(q(x_{t-1} | x_t, x0) || N(mean, sigma^2)), i.e. beta_tilde
    plus the posterior mean's expected squared error (Bao et al. 2022, Analytic-DPM,
    Thm. 1; the tests check the two forms agree). It lies in [beta_tilde_t, beta_t] for
    s <= 1: V_{t-1} <= V_t iff s <= 1, and V_{t-1} (1 - ab_t) - V_t (1 - ab_{t-1}) =
    (ab_{t-1} - ab_t) s^2 >= 0."""
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return betas * (ab_prev * s * s + 1 - ab_prev) / (ab * s * s + 1 - ab)


def learned_values(betas, s):
    """(v [T], inside [T]): the variance values v = 2 frac - 1 whose log-variance frac log
    beta_t + (1 - frac) log beta_tilde_t (improved DDPM eq. 15; beta_tilde at index 0 is
    index 1's, as schedules.py's clipped table) is log reverse_variance, frac clipped to
    [0, 1]; ``inside`` where it needed no clipping (every t >= 1 for s <= 1; index 0, whose
    beta_tilde is replaced, may fall outside: DDPM adds no noise there). float64."""
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    small = betas * (1 - ab_prev) / (1 - ab)
    log_small = np.log(np.concatenate([small[1:2], small[1:]]))
    log_large = np.log(betas)
    frac = (np.log(reverse_variance(betas, s)) - log_small) / (log_large - log_small)
    inside = (frac >= 0) & (frac <= 1)
    return 2.0 * np.clip(frac, 0.0, 1.0) - 1.0, inside


@functools.lru_cache(maxsize=None)  # one function object per (mu, s): jit caches hit
def gaussian_eps_sigma(mu, s):
    """A learned-variance model for x0 ~ N(mu, s^2) (T = 1000 linear): model_fn(x_t, t) ->
    2C channels, the exact eps then the values that give the exact reverse variance."""
    v = jnp.asarray(learned_values(BETAS, s)[0], jnp.float32)

    def model_fn(x, t):
        vt = jnp.take(v, t).reshape(t.shape + (1,) * (x.ndim - 1))
        eps = gaussian_eps_at(x, t, mu, s)
        return jnp.concatenate([eps, jnp.broadcast_to(vt, x.shape)], axis=-1)

    return model_fn


# --------------------------------------------------------------------------- VLB references


def ref_tables(T_):
    """float64 (betas, alpha_bar, alpha_bar_prev, beta_tilde clipped at index 0) of the
    linear schedule with T_ steps, from Ho et al.'s endpoints scaled by 1000 / T_."""
    betas = (1000.0 / T_) * np.linspace(1e-4, 0.02, T_)
    ab = np.cumprod(1.0 - betas)
    abp = np.concatenate([[1.0], ab[:-1]])
    bt = betas * (1.0 - abp) / (1.0 - ab)
    bt[0] = bt[1]  # beta_tilde_1 = 0: index 1's value, as in the log-variance table
    return betas, ab, abp, bt


def phi(z):
    """Standard normal CDF in float64, through erfc (accurate in the lower tail)."""
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(z, np.float64) / math.sqrt(2.0))


def ref_vlb(T_, t, x0, x_t, x0_pred, v):
    """Per-element VLB term in nats, float64 (Ho et al. eq. 5-7, 13; improved DDPM eq. 15):
    KL(N(mu_tilde, bt) || N(mu_pred, sigma^2)) for t > 0, the 256-bin decoder NLL at 0."""
    betas, ab, abp, bt = (a[t] for a in ref_tables(T_))
    c1, c2 = betas * np.sqrt(abp) / (1 - ab), (1 - abp) * np.sqrt(1 - betas) / (1 - ab)
    mean_true, mean = c1 * x0 + c2 * x_t, c1 * x0_pred + c2 * x_t
    frac = (v + 1) / 2
    var = np.exp(frac * np.log(betas) + (1 - frac) * np.log(bt))
    kl = 0.5 * (np.log(var / bt) + bt / var + (mean_true - mean) ** 2 / var - 1)
    sd, h = np.sqrt(var), 1.0 / 255
    hi = np.where(x0 > 0.999, 1.0, phi((x0 + h - mean) / sd))
    lo = np.where(x0 < -0.999, 0.0, phi((x0 - h - mean) / sd))
    # above the mean use upper tails: 1 - Phi(z) = Phi(-z) keeps precision there
    hi_up = np.where(x0 < -0.999, 1.0, phi(-(x0 - h - mean) / sd))
    lo_up = np.where(x0 > 0.999, 0.0, phi(-(x0 + h - mean) / sd))
    prob = np.where(x0 > mean, hi_up - lo_up, hi - lo)
    return np.where(t == 0, -np.log(prob), kl)
