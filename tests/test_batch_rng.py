"""The counter-based generator behind batched masking and span corruption (lmlab.data.collate) and
the per-example keys it is drawn with (lmlab.data.base.example_keys)."""

from __future__ import annotations

import math

import numpy as np

from lmlab.data.base import Example, example_keys
from lmlab.data.collate import GOLDEN_GAMMA, random_bits, random_uniform, smallest

MASK64 = 2**64 - 1


def splitmix64(seed: int, n: int) -> list[int]:
    """Reference splitmix64 (Steele et al., 2014; Vigna's splitmix64.c) in Python integers."""
    out, state = [], seed
    for _ in range(n):
        state = (state + GOLDEN_GAMMA) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def test_random_bits_are_splitmix64_outputs():
    assert splitmix64(0, 1) == [0xE220A8397B1DCDAF]  # the published first output for seed 0
    for key in (0, 1, 2**63 + 12345, MASK64):
        ref = splitmix64(key, 70)
        keys = np.array([key], dtype=np.uint64)
        # stream s, element i is output s * 2**32 + i: stream 0 is the sequence itself
        assert random_bits(keys, 0, np.arange(70)).tolist() == ref
    far = random_bits(np.array([7], dtype=np.uint64), 1, np.array([0]))
    state = (7 + (2**32 + 1) * GOLDEN_GAMMA) & MASK64  # output 2**32 of the sequence
    assert far.tolist() == splitmix64((state - GOLDEN_GAMMA) & MASK64, 1)


def test_random_bits_broadcast_and_are_distinct_within_a_draw():
    keys = np.array([3, 99, 2**40], dtype=np.uint64)
    grid = random_bits(keys[:, None], 2, np.arange(50))
    assert grid.shape == (3, 50) and grid.dtype == np.uint64
    rows, cols = np.array([2, 0, 1, 2]), np.array([49, 0, 7, 7])
    assert random_bits(keys[rows], 2, cols).tolist() == grid[rows, cols].tolist()
    # one key's draw is a bijection of distinct counters: never a tie, whatever its length
    big = random_bits(np.array([5], dtype=np.uint64)[:, None], 0, np.arange(200_000))
    assert len(np.unique(big)) == 200_000


def test_random_uniform_is_uniform_and_streams_are_independent():
    # 10 equal bins over 10^6 draws: each count Binomial(10^6, 0.1), sd 300; 6 sd bound each.
    n = 10**6
    keys = np.arange(1000, dtype=np.uint64)[:, None]
    u = random_uniform(keys, 0, np.arange(1000)).ravel()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.abs(np.bincount((u * 10).astype(int), minlength=10) - n / 10).max() <= 6 * 300
    # Correlation of two streams, and of neighbouring positions and keys: for independent uniforms
    # the sample correlation has sd 1/sqrt(n) = 0.001; 6 sd bound each.
    v = random_uniform(keys, 1, np.arange(1000)).ravel()
    grid = u.reshape(1000, 1000)
    for a, b in ((u, v), (grid[:, 1:].ravel(), grid[:, :-1].ravel()), (grid[1:], grid[:-1])):
        assert abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]) <= 6 / math.sqrt(n)


def test_example_keys_depend_only_on_seed_epoch_and_start():
    exs = [Example(s, np.arange(s % 7), epoch=s % 3) for s in range(0, 50_000, 5)]
    keys = example_keys(11, exs)
    assert keys.dtype == np.uint64 and keys.shape == (len(exs),)
    assert len(np.unique(keys)) == len(exs)
    # the same (seed, epoch, start) gives the same key in any list, at any place, any tokens
    again = example_keys(11, [Example(ex.start, np.zeros(3), ex.epoch) for ex in exs[::-1]])
    assert np.array_equal(again[::-1], keys)
    one = exs[123]
    assert example_keys(11, [one]).tolist() == [keys[123]]
    for other in (
        Example(one.start, one.tokens, one.epoch + 1),
        Example(one.start + 1, one.tokens),
    ):
        assert example_keys(11, [other])[0] != keys[123]
    assert example_keys(12, [one])[0] != keys[123]
    assert example_keys(-1, [one])[0] == example_keys(2**64 - 1, [one])[0]  # seeds mod 2**64


def brute_smallest(bits: np.ndarray, k: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    out = np.zeros(bits.shape, dtype=bool)
    for b in range(len(bits)):
        pos = np.flatnonzero(eligible[b])
        out[b, pos[np.argsort(bits[b, pos])[: k[b]]]] = True
    return out


def test_smallest_selects_exactly_the_k_smallest_eligible():
    rng = np.random.default_rng(0)
    B, L = 64, 300
    bits = random_bits(np.arange(B, dtype=np.uint64)[:, None], 0, np.arange(L))
    eligible = rng.random((B, L)) < rng.random((B, 1))  # from nearly none to nearly all
    eligible[0] = False
    n = eligible.sum(axis=1)
    k = np.minimum(n, rng.integers(0, 120, size=B))
    got = smallest(bits, k, eligible)
    assert got.sum(axis=1).tolist() == k.tolist()
    assert np.array_equal(got, brute_smallest(bits, k, eligible))
    all_in = np.ones((B, L), dtype=bool)
    assert np.array_equal(smallest(bits, k), brute_smallest(bits, k, all_in))
    assert not smallest(bits, np.zeros(B, dtype=int), eligible).any()


def test_smallest_is_exact_when_the_candidate_cut_fails():
    # The quantile cut assumes uniform bits; with every value in the top half (not uniform), rows
    # with a small k get fewer candidates than k, and all positions are used instead: still exactly
    # the k smallest.
    bits = random_bits(np.arange(8, dtype=np.uint64)[:, None], 0, np.arange(100)) | np.uint64(2**63)
    k = np.arange(8) * 3
    eligible = np.ones((8, 100), dtype=bool)
    eligible[:, ::3] = False
    assert np.array_equal(smallest(bits, k, eligible), brute_smallest(bits, k, eligible))
    assert np.array_equal(smallest(bits, k), brute_smallest(bits, k, np.ones_like(eligible)))
