"""The packer (`cfpo_jax.packing`) on hand-made lengths: every real token placed exactly once,
capacities never exceeded, row counts from a bounded set; the device gathers against numpy."""

import numpy as np
import pytest

from cfpo_jax import packing

P, N = 4, 8
W = P + N


def unpacked_rows(prompt_lengths, completion_lengths):
    """Token ids that name their own place: row b, column l holds 1000·b + l on real tokens, -1 on
    padding (left-padded prompt, right-padded completion)."""
    tokens = np.full((len(prompt_lengths), W), -1)
    for b, (p, n) in enumerate(zip(prompt_lengths, completion_lengths)):
        tokens[b, P - p:P + n] = 1000 * b + np.arange(P - p, P + n)
    return tokens


CASES = [
    # (prompt lengths, completion lengths, rows to pack)
    ([4, 4, 4, 4], [8, 8, 8, 8], [0, 1, 2, 3]),  # all full: one sequence a row
    ([2, 3, 1, 4, 4, 2, 1, 3], [1, 2, 8, 3, 1, 7, 2, 5], [5, 0, 7, 3, 1, 6, 2, 4]),
    ([1] * 16, [1, 2, 3, 4] * 4, list(range(16))),  # short: many sequences a row
    ([4, 2, 3, 1], [0, 5, 0, 8], [3, 2, 1, 0]),  # empty completions are left out
]


@pytest.mark.parametrize("prompt_lengths, completion_lengths, rows", CASES)
def test_every_token_placed_once_within_capacity(prompt_lengths, completion_lengths, rows):
    plan = packing.plan(prompt_lengths, completion_lengths, rows, prompt_width=P,
                        completion_width=N, granule=2, max_rows=len(rows))
    tokens = unpacked_rows(prompt_lengths, completion_lengths)
    R = plan.segment_RxW.shape[0]
    assert plan.shape == (R, W, N) and R % 2 == 0 and R <= len(rows)
    packed = tokens.reshape(-1)[plan.token_src_RxW]
    real = plan.segment_RxW > 0
    expected = sorted(t for b in rows if completion_lengths[b] > 0 for t in tokens[b] if t >= 0)
    assert sorted(packed[real]) == expected  # every real token of a kept sequence exactly once
    for r in range(R):
        # Each segment is one sequence, contiguous, in its order, positions from 0.
        for k in set(plan.segment_RxW[r][real[r]]):
            cols = np.flatnonzero(plan.segment_RxW[r] == k)
            assert np.all(np.diff(cols) == 1)
            b = packed[r, cols[0]] // 1000
            assert np.all(packed[r, cols] // 1000 == b)
            np.testing.assert_array_equal(plan.positions_RxW[r, cols], np.arange(len(cols)))
            assert len(cols) == prompt_lengths[b] + completion_lengths[b]
        # The completion layout: in-capacity, pointing at the completion tokens of the row.
        used = plan.comp_mask_RxN[r] == 1
        assert np.all(used[:used.sum()])  # a prefix
        cols = plan.comp_col_RxN[r, used]
        seqs = plan.comp_seq_RxN[r, used]
        owners = np.asarray(rows)[seqs]
        np.testing.assert_array_equal(packed[r, cols] // 1000, owners)
        np.testing.assert_array_equal(packed[r, cols] % 1000,
                                      P + plan.comp_src_RxN[r, used] % N)
        np.testing.assert_array_equal(plan.comp_src_RxN[r, used] // N, owners)
        # The predicting token (one column left) is in the same sequence.
        np.testing.assert_array_equal(plan.segment_RxW[r, cols - 1], plan.segment_RxW[r, cols])
    # Unpacking inverts the completion layout.
    for s, b in enumerate(rows):
        n = completion_lengths[b]
        flat = plan.unpack_SxN[s, :n]
        np.testing.assert_array_equal(plan.comp_src_RxN.reshape(-1)[flat], b * N + np.arange(n))


def test_first_fit_decreasing_respects_both_capacities():
    lengths = [9, 7, 5, 5, 4, 3, 3, 2, 1]
    completion = [1, 6, 4, 1, 4, 3, 1, 2, 1]
    bins = packing.first_fit_decreasing(lengths, completion, 10, 6)
    assert sorted(i for b in bins for i in b) == list(range(9))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 10 and sum(completion[i] for i in b) <= 6
    # Worked by hand: 7 fills its row's completion capacity (6), so no sequence with a
    # completion token joins it although 3 tokens are free; the last 1 goes back to 9's row.
    assert bins == [[0, 8], [1], [2, 3], [4, 6], [5, 7]]


def test_row_counts_come_from_a_bounded_ladder():
    assert packing.row_ladder(64, 4) == [4, 8, 12, 16, 24, 32, 48, 64]
    assert packing.row_ladder(8, 8) == [8]
    shapes = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        completion = rng.integers(0, N + 1, 64)
        prompt = rng.integers(1, P + 1, 64)
        plan = packing.plan(prompt, completion, np.arange(64), prompt_width=P,
                            completion_width=N, granule=4, max_rows=64)
        shapes.add(plan.shape)
        needed = len(packing.first_fit_decreasing(
            (prompt + completion)[completion > 0], completion[completion > 0], W, N))
        assert plan.shape[0] == min(r for r in packing.row_ladder(64, 4) if r >= needed)
    assert {s[0] for s in shapes} <= set(packing.row_ladder(64, 4))


def test_bad_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="prompt"):
        packing.plan([0, 2], [3, 3], [0, 1], prompt_width=P, completion_width=N, granule=1,
                     max_rows=2)
    with pytest.raises(ValueError, match="completion"):
        packing.plan([2, 2], [9, 3], [0, 1], prompt_width=P, completion_width=N, granule=1,
                     max_rows=2)
    with pytest.raises(ValueError, match="multiple"):
        packing.row_ladder(6, 4)


def test_device_gathers_match_numpy():
    import jax.numpy as jnp

    prompt, completion, rows = CASES[1]
    plan = packing.plan(prompt, completion, rows, prompt_width=P, completion_width=N, granule=2,
                        max_rows=8)
    tokens = unpacked_rows(prompt, completion)
    values_BxN = np.arange(8 * N, dtype=np.float32).reshape(8, N) + 1
    np.testing.assert_array_equal(packing.pack_rows(jnp.asarray(tokens), plan.token_src_RxW),
                                  tokens.reshape(-1)[plan.token_src_RxW])
    packed = packing.pack_completion(jnp.asarray(values_BxN), plan.comp_src_RxN, plan.comp_mask_RxN)
    np.testing.assert_array_equal(packed, np.where(plan.comp_mask_RxN, values_BxN.reshape(-1)[plan.comp_src_RxN], 0))
    mask_SxN = (np.arange(N)[None] < np.asarray(completion)[rows][:, None])
    unpacked = packing.unpack_completion(packed, plan.unpack_SxN, mask_SxN)
    np.testing.assert_array_equal(unpacked, np.where(mask_SxN, values_BxN[rows], 0))
