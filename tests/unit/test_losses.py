"""Policy objectives, aggregations, KL and entropy against numpy references written here."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax import losses

OBJECTIVES = ("cfpo", "ppo")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LEVELS = ("token", "sequence")


def _batch(seed=0, B=6, T=7, spread=0.4):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.5, (B, T))
    old_logp = logp + rng.normal(0.0, spread, (B, T))
    lengths = rng.integers(1, T + 1, B)
    lengths[2] = 0  # an all-padding row counts nowhere
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(0.0, 1.0, B)
    return logp, old_logp, adv, mask


# ----------------------------------------------------------------------------- numpy reference


def np_objective(name, r, a, eps_low, eps_high, dual_clip=None):
    if name == "cfpo":
        eps = np.where(a > 0, eps_high, eps_low)
        return r * a - np.abs(a) / (2 * eps) * (r - 1) ** 2
    unclipped = r * a
    clipped = np.clip(r, 1 - eps_low, 1 + eps_high) * a
    out = np.minimum(unclipped, clipped)
    if dual_clip is not None:
        out = np.where(a < 0, np.maximum(out, dual_clip * a), out)
    return out


def np_loss(logp, old_logp, adv, mask, objective, level, agg, eps=0.2, eps_high=None,
            dual_clip=None, max_len=None):
    eps_high = eps if eps_high is None else eps_high
    B, T = logp.shape
    max_len = T if max_len is None else max_len
    per_token = np.zeros((B, T))  # objective assigned to each token
    for i in range(B):
        idx = np.nonzero(mask[i])[0]
        if len(idx) == 0:
            continue
        lr = np.clip(logp[i, idx] - old_logp[i, idx], -20, 20)
        if level == "token":
            per_token[i, idx] = np_objective(objective, np.exp(lr), adv[i], eps, eps_high, dual_clip)
        else:
            r_seq = np.exp(lr.mean())
            per_token[i, idx] = np_objective(objective, r_seq, adv[i], eps, eps_high, dual_clip)
    rows = [i for i in range(B) if mask[i].sum() > 0]
    if agg == "token-mean":
        value = sum(per_token[i][mask[i] > 0].sum() for i in rows) / mask.sum()
    elif agg == "seq-mean-token-mean":
        value = np.mean([per_token[i][mask[i] > 0].mean() for i in rows])
    elif agg == "seq-mean-token-sum":
        value = np.mean([per_token[i][mask[i] > 0].sum() for i in rows])
    else:
        value = np.mean([per_token[i][mask[i] > 0].sum() / max_len for i in rows])
    return -value


def np_ratio_metrics(logp, old_logp, adv, mask, level, eps, eps_high):
    ratios, advs = [], []
    for i in range(logp.shape[0]):
        idx = np.nonzero(mask[i])[0]
        if len(idx) == 0:
            continue
        lr = logp[i, idx] - old_logp[i, idx]
        if level == "token":
            ratios += list(np.exp(lr))
            advs += [adv[i]] * len(idx)
        else:
            ratios.append(np.exp(lr.mean()))
            advs.append(adv[i])
    r, a = np.array(ratios), np.array(advs)
    clipped = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps))
    return {"clip_frac": clipped.mean(), "ratio_dev": np.abs(r - 1).mean(),
            "ratio_max": r.max(), "ratio_min": r.min()}


def _jit_loss(**kwargs):
    return jax.jit(functools.partial(losses.policy_loss, **kwargs))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("objective,level,agg", list(itertools.product(OBJECTIVES, LEVELS, AGGS)))
def test_values_match_numpy(objective, level, agg):
    logp, old_logp, adv, mask = _batch(seed=sum(map(ord, objective + level + agg)))
    loss, metrics = _jit_loss(objective=objective, level=level, agg=agg)(logp, old_logp, adv, mask)
    np.testing.assert_allclose(loss, np_loss(logp, old_logp, adv, mask, objective, level, agg),
                               rtol=1e-5, atol=1e-6)
    ref = np_ratio_metrics(logp, old_logp, adv, mask, level, 0.2, 0.2)
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    tokens = mask > 0
    np.testing.assert_allclose(metrics["ppo_kl"], (old_logp - logp)[tokens].mean(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_clip_higher_dual_clip_and_max_len_match_numpy(level):
    logp, old_logp, adv, mask = _batch(seed=3, spread=0.8)
    kw = dict(eps=0.2, eps_high=0.28)
    for objective, extra in (("ppo", {"dual_clip": 3.0}), ("cfpo", {})):
        loss, metrics = _jit_loss(objective=objective, agg="seq-mean-token-sum-norm", max_len=16,
                                  level=level, **kw, **extra)(logp, old_logp, adv, mask)
        ref = np_loss(logp, old_logp, adv, mask, objective, level, "seq-mean-token-sum-norm",
                      max_len=16, **kw, **extra)
        np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
        ref_metrics = np_ratio_metrics(logp, old_logp, adv, mask, level, 0.2, 0.28)
        np.testing.assert_allclose(metrics["clip_frac"], ref_metrics["clip_frac"], rtol=1e-6)


def test_dual_clip_floors_negative_advantage_objective():
    # A < 0, r = e^2 ≈ 7.39: clipped PPO gives r·A = -7.39; dual clip c = 3 floors it at 3·A = -3.
    logp, old_logp = jnp.array([[2.0]]), jnp.array([[0.0]])
    adv, mask = jnp.array([-1.0]), jnp.ones((1, 1))
    plain, _ = losses.policy_loss(logp, old_logp, adv, mask, objective="ppo")
    dual, _ = losses.policy_loss(logp, old_logp, adv, mask, objective="ppo", dual_clip=3.0)
    np.testing.assert_allclose(plain, np.exp(2.0), rtol=1e-6)
    np.testing.assert_allclose(dual, 3.0, rtol=1e-6)


def test_log_ratio_is_clamped_before_exp():
    logp, old_logp = jnp.array([[0.0]]), jnp.array([[-500.0]])
    loss, metrics = losses.policy_loss(logp, old_logp, jnp.array([1.0]), jnp.ones((1, 1)))
    assert np.isfinite(loss)
    np.testing.assert_allclose(metrics["ratio_max"], np.exp(20.0), rtol=1e-5)


# ----------------------------------------------------------------------------- gradients


def _expected_onpolicy_grad(adv, mask, agg, max_len=None):
    """d loss / d logp of the REINFORCE loss −A·logp under `agg`, worked by hand."""
    B, T = mask.shape
    max_len = T if max_len is None else max_len
    n = mask.sum(1)
    n_seqs = (n > 0).sum()
    weight = {
        "token-mean": np.full(B, 1.0 / mask.sum()),
        "seq-mean-token-mean": np.where(n > 0, 1.0 / np.maximum(n, 1) / n_seqs, 0.0),
        "seq-mean-token-sum": np.full(B, 1.0 / n_seqs),
        "seq-mean-token-sum-norm": np.full(B, 1.0 / n_seqs / max_len),
    }[agg]
    return -(adv * weight)[:, None] * mask


@pytest.mark.parametrize("agg,level", list(itertools.product(AGGS, LEVELS)))
def test_on_policy_gradient_identity(agg, level):
    logp, _, adv, mask = _batch(seed=11)
    grads = {}
    for objective in OBJECTIVES:
        def loss_fn(lp, objective=objective):
            return losses.policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask,
                                      objective=objective, level=level, agg=agg)[0]
        grads[objective] = jax.jit(jax.grad(loss_fn))(jnp.asarray(logp, jnp.float32))
    expected = _expected_onpolicy_grad(adv, mask, agg)
    np.testing.assert_allclose(grads["cfpo"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["ppo"], expected, rtol=1e-5, atol=1e-7)


def _objective_grad_in_ratio(objective, r, a, **kw):
    """d objective / d r for one token with ratio r, through policy_loss (d/dlogp = r · d/dr)."""
    def neg_loss(lp):
        return -losses.policy_loss(lp, jnp.zeros((1, 1)), jnp.array([a]), jnp.ones((1, 1)),
                                   objective=objective, **kw)[0]
    return float(jax.grad(neg_loss)(jnp.full((1, 1), np.log(r)))[0, 0]) / r


@pytest.mark.parametrize("adv,eps_high", [(1.0, None), (-1.0, None), (2.0, 0.28), (-0.5, 0.28)])
def test_cfpo_gradient_restores_ratio_toward_fixed_point(adv, eps_high):
    eps = 0.2
    target = 1 + (eps_high or eps) if adv > 0 else 1 - eps
    assert abs(_objective_grad_in_ratio("cfpo", target, adv, eps=eps, eps_high=eps_high)) < 1e-5
    for delta in (0.03, 0.1, 0.5):
        assert _objective_grad_in_ratio("cfpo", target - delta, adv, eps=eps, eps_high=eps_high) > 0
        assert _objective_grad_in_ratio("cfpo", target + delta, adv, eps=eps, eps_high=eps_high) < 0
    # At r = 1 both objectives have gradient A.
    for objective in OBJECTIVES:
        np.testing.assert_allclose(_objective_grad_in_ratio(objective, 1.0, adv, eps=eps), adv,
                                   rtol=1e-5)


@pytest.mark.parametrize("adv,r", [(1.0, 1.35), (1.0, 2.0), (-1.0, 0.7), (-1.0, 0.3)])
def test_ppo_gradient_vanishes_beyond_clip_while_cfpo_does_not(adv, r):
    assert _objective_grad_in_ratio("ppo", r, adv) == 0.0
    cfpo = _objective_grad_in_ratio("cfpo", r, adv)
    # CFPO's gradient A − (|A|/ε)(r − 1), written out independently.
    np.testing.assert_allclose(cfpo, adv - abs(adv) / 0.2 * (r - 1), rtol=1e-5)
    assert cfpo * adv < 0  # pulls back toward the trust region


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("objective,level,agg", list(itertools.product(OBJECTIVES, LEVELS, AGGS)))
def test_micro_batch_accumulation_is_exact(objective, level, agg):
    logp, old_logp, adv, mask = _batch(seed=5, B=7)
    kw = dict(objective=objective, level=level, agg=agg)
    logp = jnp.asarray(logp, jnp.float32)

    def full_loss(lp):
        return losses.policy_loss(lp, old_logp, adv, mask, **kw)[0]

    def sum_and_denom(lp, rows):
        t = losses.policy_loss_terms(lp[rows], old_logp[rows], adv[rows], mask[rows], **kw)
        return t["loss_sum"], t

    splits = [np.arange(0, 3), np.arange(3, 4), np.arange(4, 7)]  # uneven, one holds the empty row
    terms, grad_sum = None, jnp.zeros_like(logp)
    for rows in splits:
        grad, t = jax.grad(sum_and_denom, has_aux=True)(logp, rows)
        grad_sum = grad_sum + grad
        terms = t if terms is None else losses.combine_terms(terms, t)
    loss, metrics = losses.finalize_terms(terms)
    full, full_metrics = losses.policy_loss(logp, old_logp, adv, mask, **kw)
    # float32 sums in a different order: agreement to float32 rounding.
    np.testing.assert_allclose(loss, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_sum / terms["loss_denom"], jax.grad(full_loss)(logp),
                               rtol=1e-5, atol=1e-7)
    for name in full_metrics:
        np.testing.assert_allclose(metrics[name], full_metrics[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


# ----------------------------------------------------------------------------- errors


def test_unknown_names_list_valid_ones():
    lp = jnp.zeros((2, 3))
    args = (lp, lp, jnp.zeros(2), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"unknown objective 'grpo'.*'cfpo'.*'ppo'"):
        losses.policy_loss(*args, objective="grpo")
    with pytest.raises(ValueError, match=r"unknown agg 'mean'.*'seq-mean-token-mean'"):
        losses.policy_loss(*args, agg="mean")
    with pytest.raises(ValueError, match=r"unknown level 'seq'.*'sequence'"):
        losses.policy_loss(*args, level="seq")
    with pytest.raises(ValueError, match=r"unknown kl 'k4'.*'k1', 'k2', 'k3'"):
        losses.kl(lp, lp, "k4")


def test_mismatched_shapes_are_named():
    lp = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"old_logp \(2, 4\)"):
        losses.policy_loss(lp, jnp.zeros((2, 4)), jnp.zeros(2), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
        losses.policy_loss(lp, lp, jnp.zeros(3), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"level='sequence'"):
        losses.policy_loss(lp, lp, jnp.zeros((2, 3)), jnp.ones((2, 3)), level="sequence")
    with pytest.raises(ValueError, match=r"dual_clip=3.0 needs objective='ppo'"):
        losses.policy_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 3)), dual_clip=3.0)


def test_per_token_advantages_are_accepted():
    logp, old_logp, adv, mask = _batch(seed=8)
    adv_BxT = np.repeat(adv[:, None], logp.shape[1], axis=1)
    a, _ = losses.policy_loss(logp, old_logp, adv, mask)
    b, _ = losses.policy_loss(logp, old_logp, adv_BxT, mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------- KL, entropy


def test_k3_is_non_negative_and_matches_formula():
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(-2, 1.5, 1000), rng.normal(-2, 1.5, 1000)
    k3 = np.asarray(jax.jit(losses.kl, static_argnums=2)(logp, ref, "k3"))
    assert (k3 >= 0).all()
    x = ref - logp
    np.testing.assert_allclose(k3, np.minimum(np.exp(x) - x - 1, 10.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses.kl(logp, ref, "k2"), 0.5 * x**2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_recover_categorical_kl(estimator):
    rng = np.random.default_rng(1)
    # A policy and a reference a few hundred updates apart: probability ratios within about e^±2,
    # inside the k3 clamp (a clamped estimate is biased by design).
    p = rng.dirichlet(np.ones(6))
    q = np.exp(np.log(p) + rng.normal(0, 0.8, 6))
    q /= q.sum()
    true_kl = float(np.sum(p * np.log(p / q)))
    x = rng.choice(6, size=400_000, p=p)
    estimate = float(jnp.mean(losses.kl(np.log(p)[x], np.log(q)[x], estimator)))
    assert abs(estimate - true_kl) < 0.01 + 0.02 * true_kl, (estimate, true_kl)


def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 5))
    target_logit = np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    for temperature in (1.0, 0.7):
        z = logits.astype(np.float64) / temperature
        logq = z - z.max(-1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
        logp, entropy = losses.token_logprobs_and_entropy(logits, target_logit, temperature)
        np.testing.assert_allclose(logp, np.take_along_axis(logq, tokens[..., None], -1)[..., 0],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entropy, -(np.exp(logq) * logq).sum(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.token_logprobs_and_entropy(logits, target_logit, 0.0)


def test_token_logprobs_gradient_matches_numpy():
    """d log p(target) / d logits = onehot − softmax, reached through both arguments."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (3, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, 3)

    def total_logp(logits_xV):
        target = jnp.take_along_axis(logits_xV, jnp.asarray(tokens)[:, None], -1)[:, 0]
        return jnp.sum(losses.token_logprobs_and_entropy(logits_xV, target, 0.7)[0])

    z = logits.astype(np.float64) / 0.7
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = (np.eye(7)[tokens] - p) / 0.7
    np.testing.assert_allclose(jax.grad(total_logp)(logits), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- KL as loss / in reward


def np_kl(logp, ref_logp, estimator):
    x = np.clip(ref_logp - logp, -20, 20)  # log(π_ref / π)
    return {"k1": -x, "k2": 0.5 * x**2, "k3": np.minimum(np.exp(x) - x - 1, 10.0)}[estimator]


def np_agg(values, mask, agg, max_len):
    rows = [i for i in range(values.shape[0]) if mask[i].sum() > 0]
    if agg == "token-mean":
        return (values * mask).sum() / mask.sum()
    if agg == "seq-mean-token-mean":
        return np.mean([values[i][mask[i] > 0].mean() for i in rows])
    if agg == "seq-mean-token-sum":
        return np.mean([values[i][mask[i] > 0].sum() for i in rows])
    return np.mean([values[i][mask[i] > 0].sum() / max_len for i in rows])


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3"))
def test_kl_loss_term_is_aggregated_like_the_policy_loss(agg, estimator):
    logp, _, _, mask = _batch(seed=4)
    ref_logp = logp + np.random.default_rng(5).normal(0.0, 0.5, logp.shape)
    policy = losses.policy_loss_terms(logp, logp, np.ones(logp.shape[0]), mask, agg=agg, max_len=9)
    terms = losses.kl_terms(logp, ref_logp, mask, estimator=estimator, agg=agg, max_len=9)
    np.testing.assert_allclose(terms["kl_loss_sum"] / policy["loss_denom"],
                               np_agg(np_kl(logp, ref_logp, estimator), mask, agg, 9), rtol=1e-5)
    np.testing.assert_allclose(terms["kl_sum"] / mask.sum(),
                               (np_kl(logp, ref_logp, estimator) * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("estimator", ("k1", "k2", "k3"))
def test_kl_in_reward_shapes_rewards_before_rloo(estimator):
    """β·Σ_t KL_t is subtracted from each response's reward; RLOO then compares each shaped reward
    with the mean of the other shaped rewards of its group."""
    from cfpo_jax import advantages

    logp, _, _, mask = _batch(seed=6, B=8)
    ref_logp = logp + np.random.default_rng(7).normal(0.0, 0.5, logp.shape)
    reward = np.random.default_rng(8).normal(0.0, 1.0, 8)
    beta, group = 0.1, 4
    shaped = reward - beta * np.sum(np_kl(logp, ref_logp, estimator) * mask, axis=1)
    expected = np.array([shaped[i] - np.mean(np.delete(shaped[(i // group) * group:(i // group + 1) * group],
                                                       i % group)) for i in range(8)])
    ours_shaped = reward - beta * np.asarray(losses.sequence_kl(logp, ref_logp, mask, estimator))
    np.testing.assert_allclose(ours_shaped, shaped, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(advantages.compute(ours_shaped, group, "rloo"), expected, rtol=1e-5, atol=1e-5)
