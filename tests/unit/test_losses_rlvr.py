"""Entropy control (Clip-Cov, KL-Cov) and off-policy corrections (ratio reference, TIS, masking)
against numpy formulas written here from the papers' equations (Cui et al. 2025, eqs. for
Clip-Cov / KL-Cov; truncated importance sampling min(π_old/π_sampler, C))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax import losses

EPS = 0.2


def _batch(seed=0, B=5, T=8, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.8, (B, T))
    old_logp = logp + rng.normal(0.0, spread, (B, T))
    lengths = rng.integers(2, T + 1, B)
    lengths[1] = 0  # an all-padding row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(0.0, 1.0, B)
    return logp, old_logp, adv, mask


def np_cov(logp, adv_BxT, mask):
    on = mask > 0
    return (logp - logp[on].mean()) * (adv_BxT - adv_BxT[on].mean()) * mask


def np_would_clip(r, a, eps=EPS):
    return ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))


def np_dobj_dr(objective, r, a, eps=EPS):
    """d objective / d r per token (token level, one ε)."""
    if objective == "cfpo":
        return a - np.abs(a) / eps * (r - 1)
    return np.where(np_would_clip(r, a, eps), 0.0, a)


def np_objective(objective, r, a, eps=EPS):
    if objective == "cfpo":
        return r * a - np.abs(a) / (2 * eps) * (r - 1) ** 2
    return np.minimum(r * a, np.clip(r, 1 - eps, 1 + eps) * a)


def _grad(logp, old_logp, adv, mask, **kw):
    fn = lambda lp: losses.policy_loss(lp, old_logp, adv, mask, eps=EPS, **kw)[0]
    return np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(logp, jnp.float32)))


# ----------------------------------------------------------------------------- KL-Cov


@pytest.mark.parametrize("objective", ["cfpo", "ppo"])
def test_kl_cov_penalises_the_top_covariance_tokens(objective):
    logp, old_logp, adv, mask = _batch(seed=1)
    n = mask.sum()
    ratio, coef = 0.15, 0.7
    a = np.broadcast_to(adv[:, None], logp.shape)
    cov = np_cov(logp, a, mask)
    k = max(int(ratio * n), 1)
    top = np.argsort(-np.where(mask > 0, cov, -np.inf).ravel())[:k]
    sel = np.zeros(logp.size, bool)
    sel[top] = True
    sel = sel.reshape(logp.shape)
    lr = logp - old_logp
    r = np.exp(lr)
    per_token = np_objective(objective, r, a) - coef * np.abs(lr) * sel
    want_loss = -(per_token * mask).sum() / n
    want_grad = -(np_dobj_dr(objective, r, a) * r - coef * np.sign(lr) * sel) * mask / n

    kw = dict(objective=objective, entropy_control="kl_cov", kl_cov_ratio=ratio, kl_cov_coef=coef)
    loss, metrics = losses.policy_loss(logp, old_logp, adv, mask, eps=EPS, **kw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["entropy_control_frac"]), k / n, rtol=1e-6)
    np.testing.assert_allclose(_grad(logp, old_logp, adv, mask, **kw), want_grad, atol=1e-6)


# ----------------------------------------------------------------------------- Clip-Cov


def _clip_cov_band(objective, seed):
    """A batch and a band (lb, ub) holding exactly 3 eligible tokens (not would-clip)."""
    logp, old_logp, adv, mask = _batch(seed=seed)
    a = np.broadcast_to(adv[:, None], logp.shape)
    r = np.exp(logp - old_logp)
    cov = np_cov(logp, a, mask)
    candidates = np.sort(cov[(mask > 0) & ~np_would_clip(r, a)])[::-1]
    lb, ub = (candidates[3] + candidates[2]) / 2, candidates[0] + 1.0
    eligible = (mask > 0) & ~np_would_clip(r, a) & (cov > lb) & (cov < ub)
    assert eligible.sum() == 3
    return (logp, old_logp, adv, mask), (lb, ub), eligible


@pytest.mark.parametrize("objective", ["cfpo", "ppo"])
def test_clip_cov_detaches_every_in_band_token_when_fewer_than_k(objective):
    (logp, old_logp, adv, mask), (lb, ub), eligible = _clip_cov_band(objective, seed=2)
    n = mask.sum()
    ratio = 4.5 / n  # k = 4 > 3 eligible: all of them, whatever the draw
    a = np.broadcast_to(adv[:, None], logp.shape)
    r = np.exp(logp - old_logp)
    want_grad = -np_dobj_dr(objective, r, a) * r * mask * ~eligible / n
    want_loss = -(np_objective(objective, r, a) * mask).sum() / n  # the value is unchanged
    kw = dict(objective=objective, entropy_control="clip_cov", clip_cov_ratio=ratio,
              clip_cov_lb=lb, clip_cov_ub=ub, rng=jax.random.PRNGKey(3))
    loss, metrics = losses.policy_loss(logp, old_logp, adv, mask, eps=EPS, **kw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["entropy_control_frac"]), 3 / n, rtol=1e-6)
    np.testing.assert_allclose(_grad(logp, old_logp, adv, mask, **kw), want_grad, atol=1e-6)


def test_clip_cov_draws_k_of_the_band_uniformly():
    (logp, old_logp, adv, mask), (lb, ub), eligible = _clip_cov_band("cfpo", seed=2)
    n = mask.sum()
    kw = dict(objective="cfpo", entropy_control="clip_cov", clip_cov_ratio=1.5 / n,
              clip_cov_lb=lb, clip_cov_ub=ub)  # k = 1 of the 3
    draws = 300

    def grad(key):
        fn = lambda lp: losses.policy_loss(lp, old_logp, adv, mask, eps=EPS, rng=key, **kw)[0]
        return jax.grad(fn)(jnp.asarray(logp, jnp.float32))

    grads = np.asarray(jax.jit(jax.vmap(grad))(jax.random.split(jax.random.PRNGKey(0), draws)))
    frozen = (grads == 0) & (mask > 0)
    assert np.all(frozen.sum(axis=(1, 2)) == 1) and eligible[frozen.any(axis=0)].all()
    counts = frozen.sum(axis=0)
    # each of the 3 eligible tokens is chosen about a third of the time (±4 binomial σ)
    share = counts[eligible] / draws
    assert np.all(np.abs(share - 1 / 3) < 4 * np.sqrt(2 / 9 / draws)), share


def test_clip_cov_gives_cfpo_and_ppo_the_same_on_policy_update():
    logp, _, adv, mask = _batch(seed=4)
    grads = {}
    for objective in ("cfpo", "ppo"):
        fn = lambda lp: losses.policy_loss(
            lp, jax.lax.stop_gradient(lp), adv, mask, objective=objective, entropy_control="clip_cov",
            clip_cov_ratio=0.1, clip_cov_lb=-1.0, clip_cov_ub=10.0, rng=jax.random.PRNGKey(0))[0]
        grads[objective] = np.asarray(jax.grad(fn)(jnp.asarray(logp, jnp.float32)))
    frozen = (grads["cfpo"] == 0) & (mask > 0)
    assert frozen.sum() == max(int(0.1 * mask.sum()), 1)
    np.testing.assert_allclose(grads["cfpo"], grads["ppo"], atol=1e-7)


def test_entropy_control_needs_token_level_and_clip_cov_an_rng():
    logp, old_logp, adv, mask = _batch()
    with pytest.raises(ValueError, match="level='token'"):
        losses.policy_loss(logp, old_logp, adv, mask, level="sequence", entropy_control="kl_cov")
    with pytest.raises(ValueError, match="pass rng"):
        losses.policy_loss(logp, old_logp, adv, mask, entropy_control="clip_cov")
    with pytest.raises(ValueError, match="valid: \\['clip_cov', 'kl_cov', 'none'\\]"):
        losses.policy_loss(logp, old_logp, adv, mask, entropy_control="cov")


# ----------------------------------------------------------------------------- off-policy corrections


def _behaviour(old_logp, seed=5, spread=0.5):
    return old_logp + np.random.default_rng(seed).normal(0.0, spread, old_logp.shape)


@pytest.mark.parametrize("objective", ["cfpo", "ppo"])
@pytest.mark.parametrize("correction", ["tis", "mask"])
def test_rollout_correction_weighs_each_token(objective, correction):
    logp, old_logp, adv, mask = _batch(seed=6)
    behaviour = _behaviour(old_logp)
    cap = 1.5
    n = mask.sum()
    a = np.broadcast_to(adv[:, None], logp.shape)
    r = np.exp(logp - old_logp)
    w = np.exp(old_logp - behaviour)
    if correction == "tis":
        factor, corrected = np.minimum(w, cap), w > cap
    else:
        corrected = (w > cap) | (w < 1 / cap)
        factor = np.where(corrected, 0.0, 1.0)
    on = mask > 0
    assert 0 < corrected[on].sum() < on.sum()  # the case is not trivial
    want_loss = -(np_objective(objective, r, a) * factor * mask).sum() / n
    want_grad = -np_dobj_dr(objective, r, a) * r * factor * mask / n

    kw = dict(objective=objective, behaviour_logp=behaviour, rollout_correction=correction,
              rollout_correction_cap=cap)
    loss, metrics = losses.policy_loss(logp, old_logp, adv, mask, eps=EPS, **kw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rollout_is_weight_mean"]), w[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout_is_weight_max"]), w[on].max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout_corrected_frac"]), corrected[on].mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(_grad(logp, old_logp, adv, mask, **kw), want_grad, atol=1e-6)


def test_rollout_correction_accumulates_exactly_over_micro_batches():
    logp, old_logp, adv, mask = _batch(seed=7, B=6)
    behaviour = _behaviour(old_logp)
    kw = dict(behaviour_logp=behaviour, rollout_correction="tis", rollout_correction_cap=1.3,
              agg="seq-mean-token-mean")
    full_loss, full = losses.policy_loss(logp, old_logp, adv, mask, **kw)
    parts = [losses.policy_loss_terms(logp[s], old_logp[s], adv[s], mask[s],
                                      **dict(kw, behaviour_logp=behaviour[s]))
             for s in (slice(0, 2), slice(2, 6))]
    loss, metrics = losses.finalize_terms(losses.combine_terms(*parts))
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    for key in ("rollout_is_weight_mean", "rollout_is_weight_max", "rollout_corrected_frac"):
        np.testing.assert_allclose(float(metrics[key]), float(full[key]), rtol=1e-6)


@pytest.mark.parametrize("objective", ["cfpo", "ppo"])
def test_behaviour_ratio_reference_takes_the_ratio_against_the_sampler(objective):
    logp, old_logp, adv, mask = _batch(seed=8)
    behaviour = _behaviour(old_logp)
    a = np.broadcast_to(adv[:, None], logp.shape)
    r = np.exp(logp - behaviour)
    on = mask > 0
    want_loss = -(np_objective(objective, r, a) * mask).sum() / mask.sum()
    loss, metrics = losses.policy_loss(logp, old_logp + 5.0, adv, mask, objective=objective,
                                       eps=EPS, behaviour_logp=behaviour,
                                       ratio_reference="behaviour")
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_max"]), r[on].max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["clip_frac"]), np_would_clip(r, a)[on].mean())


def test_corrections_name_what_they_need():
    logp, old_logp, adv, mask = _batch()
    with pytest.raises(ValueError, match="need behaviour_logp"):
        losses.policy_loss(logp, old_logp, adv, mask, rollout_correction="tis")
    with pytest.raises(ValueError, match="ratio_reference='behaviour'"):
        losses.policy_loss(logp, old_logp, adv, mask, behaviour_logp=old_logp,
                           ratio_reference="behaviour", rollout_correction="mask")
    with pytest.raises(ValueError, match="must be > 1; got 0.5"):
        losses.policy_loss(logp, old_logp, adv, mask, behaviour_logp=old_logp,
                           rollout_correction="tis", rollout_correction_cap=0.5)
    with pytest.raises(ValueError, match="valid: \\['mask', 'none', 'tis'\\]"):
        losses.policy_loss(logp, old_logp, adv, mask, behaviour_logp=old_logp,
                           rollout_correction="icepop")
