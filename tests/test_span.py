from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from lmlab.data.base import Example
from lmlab.data.collate import IGNORE
from lmlab.data.span import (
    SpanCorruptionDataModule,
    compute_lengths,
    corrupt_spans,
    corrupt_spans_batch,
    corrupted_lengths,
    fill_sentinels,
    random_spans_noise_mask,
    span_counts,
)
from lmlab.data.store import build_store
from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.paths import CONF_DIR

from .conftest import make_text


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """Run-length encoding: [(value, length), ...]."""
    out: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(8)


@pytest.fixture(scope="module")
def stores(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("span")
    train = build_store(iter([make_text(400, 0), make_text(200, 2)]), tok, d, "train")
    val = build_store(iter([make_text(100, 1), "A short one."]), tok, d, "val")
    return train, val


def make_dm(tok, stores, **kw):
    train, val = stores
    args = {"seq_len": 64, "batch_size": 4, "seed": 7} | kw
    return SpanCorruptionDataModule(tok, train, val, **args)


# -- arithmetic -----------------------------------------------------------------------------------
def test_compute_lengths_matches_t5_and_is_tight():
    # T5's published numbers: inputs_length=512 at noise 0.15, span 3 -> 568 raw tokens, 114 targets.
    assert compute_lengths(512, 0.15, 3.0) == (568, 114)
    for d, mu in [(0.15, 3.0), (0.3, 2.0), (0.5, 3.0), (0.1, 8.0)]:
        for seq_len in range(2, 300):
            n, t = compute_lengths(seq_len, d, mu)
            # No padding waste: a full window corrupts to exactly seq_len tokens and one more raw
            # token would not fit; the target of a full window is exactly target_len.
            assert corrupted_lengths(n, d, mu) == (seq_len, t)
            assert corrupted_lengths(n + 1, d, mu)[0] == seq_len + 1
            num_noise, num_spans = span_counts(n, d, mu)
            assert t == num_noise + num_spans + 1


# -- noise mask -----------------------------------------------------------------------------------
def keys_for(n: int, seed: int = 0) -> np.ndarray:
    """n per-example keys of the counter-based generator (as example_keys makes them)."""
    return np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64)


def reference_noise_mask(
    length: int, density: float, mean_len: float, rng: np.random.Generator
) -> np.ndarray:
    """The per-example implementation that random_spans_noise_mask replaced (T5's algorithm with a
    numpy Generator): the reference its batched draws are compared with."""
    num_noise, num_spans = span_counts(length, density, mean_len)
    if num_spans == 0:
        return np.zeros(length, dtype=bool)

    def composition(total: int, parts: int) -> np.ndarray:
        cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise = composition(num_noise, num_spans)
    keep = composition(length - num_noise, num_spans)
    runs = np.stack([keep, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), runs)


@pytest.mark.parametrize(("density", "mean_len"), [(0.15, 3.0), (0.3, 5.0), (0.5, 2.0)])
def test_noise_mask_fraction_and_span_lengths(density, mean_len):
    rng = np.random.default_rng(0)
    for length in rng.integers(20, 600, size=60).tolist():
        masks = random_spans_noise_mask(length, density, mean_len, keys_for(5, length))
        num_noise, num_spans = span_counts(length, density, mean_len)
        assert masks.shape == (5, length) and masks.dtype == bool
        for mask in masks:
            # num_noise = round(length * density): the noise fraction is off by at most the
            # rounding, 0.5 / length (for length >= 20 the "at least one noise token" clamp never
            # binds).
            assert int(mask.sum()) == num_noise
            assert abs(mask.mean() - density) <= 0.5 / length + 1e-12  # ties round half to even
            r = runs(mask)
            noise_runs = [n for v, n in r if v]
            # Non-noise first, then strict alternation: num_spans runs of each kind, all non-empty.
            assert [v for v, _ in r] == [False, True] * num_spans
            assert len(noise_runs) == num_spans and min(n for _, n in r) >= 1
            # The mean span length is num_noise / num_spans by construction; since num_spans =
            # round(num_noise / mean_len) is within 0.5 of num_noise / mean_len,
            # |num_noise / num_spans - mean_len|
            #   = mean_len * |num_noise / mean_len - num_spans| / num_spans <= 0.5 * mean_len / num_spans.
            mean_span = np.mean(noise_runs)
            assert mean_span == pytest.approx(num_noise / num_spans)
            assert abs(mean_span - mean_len) <= 0.5 * mean_len / num_spans + 1e-12


def test_noise_mask_short_windows():
    assert random_spans_noise_mask(1, 0.15, 3.0, keys_for(3)).tolist() == [[False]] * 3
    for length in range(2, 20):
        num_noise, num_spans = span_counts(length, 0.15, 3.0)
        for mask in random_spans_noise_mask(length, 0.15, 3.0, keys_for(20, length)):
            # At least one token is noise and one is not (T5's clamp), in num_spans pairs of runs.
            assert 1 <= int(mask.sum()) == num_noise <= length - 1
            assert [v for v, _ in runs(mask)] == [False, True] * num_spans


def test_noise_mask_rows_depend_only_on_their_key():
    keys = keys_for(6)
    masks = random_spans_noise_mask(70, 0.15, 3.0, keys)
    for b in range(6):
        assert np.array_equal(random_spans_noise_mask(70, 0.15, 3.0, keys[b : b + 1])[0], masks[b])
    shuffled = random_spans_noise_mask(70, 0.15, 3.0, keys[::-1])
    assert np.array_equal(shuffled, masks[::-1])
    assert len({m.tobytes() for m in masks}) == 6  # and different keys draw different masks


def test_span_lengths_are_a_uniform_random_composition():
    # length 10, density 0.5, mean 2.5 -> 5 noise tokens in 2 spans: the noise spans are (1, 4),
    # (2, 3), (3, 2) or (4, 1), each with probability 1/4 (uniform composition, as T5's
    # _random_segmentation). Over N = 4000 draws each count is Binomial(N, 1/4): mean 1000, sd
    # sqrt(N / 4 * 3 / 4) = 27.4; 5 sd (137) bounds a fluke below 1e-6.
    counts: dict[tuple[int, ...], int] = {}
    for mask in random_spans_noise_mask(10, 0.5, 2.5, keys_for(4000, 2)):
        noise = tuple(n for v, n in runs(mask) if v)
        counts[noise] = counts.get(noise, 0) + 1
    assert set(counts) == {(1, 4), (2, 3), (3, 2), (4, 1)}
    assert all(abs(c - 1000) <= 137 for c in counts.values())


def test_noise_and_kept_runs_are_independent_uniform_compositions():
    # length 20, density 0.3, mean 2 -> 6 noise tokens in 3 spans and 14 kept tokens in 3 runs:
    # C(5, 2) = 10 noise compositions and C(13, 2) = 78 kept ones, all 780 pairs equally likely.
    # Over N = 78,000 draws a noise composition's count is Binomial(N, 1/10) (mean 7800, sd 84), a
    # kept one's Binomial(N, 1/78) (mean 1000, sd 31.4); 5 sd bounds each. A pair's count is
    # Binomial(N, 1/780) (mean 100, sd 10): the 780 counts' chi-square (779 degrees of freedom,
    # mean 779, sd 39.5) stays below 779 + 6 * 39.5 unless kept and noise runs depend on each other.
    assert span_counts(20, 0.3, 2.0) == (6, 3)
    masks = random_spans_noise_mask(20, 0.3, 2.0, keys_for(78_000, 3))
    # a row's runs: keep, noise, keep, noise, keep, noise, so 5 places where the value changes
    change = np.flatnonzero(masks[:, 1:] != masks[:, :-1]).reshape(len(masks), 5) % 19 + 1
    bounds = np.concatenate(
        [np.zeros((len(masks), 1), int), change, np.full((len(masks), 1), 20)], 1
    )
    lengths = np.diff(bounds, axis=1)
    keep, noise = lengths[:, 0::2], lengths[:, 1::2]
    assert (keep.sum(axis=1) == 14).all() and (noise.sum(axis=1) == 6).all() and lengths.min() >= 1
    noise_id = (noise[:, 0] - 1) * 6 + noise[:, 1] - 1  # 36 codes, 10 of them possible
    keep_id = (keep[:, 0] - 1) * 14 + keep[:, 1] - 1
    noise_counts = np.bincount(noise_id, minlength=36)
    keep_counts = np.bincount(keep_id, minlength=14 * 14)
    assert (noise_counts > 0).sum() == 10 and (keep_counts > 0).sum() == 78
    assert np.abs(noise_counts[noise_counts > 0] - 7800).max() <= 5 * 84.9
    assert np.abs(keep_counts[keep_counts > 0] - 1000).max() <= 5 * 31.4
    pairs = np.bincount(noise_id * 196 + keep_id, minlength=36 * 196)
    pairs = pairs[(noise_counts > 0).repeat(196) & np.tile(keep_counts > 0, 36)]
    assert len(pairs) == 780
    chi2 = ((pairs - 100) ** 2 / 100).sum()
    assert chi2 <= 779 + 6 * 39.5


def test_span_length_distribution_matches_the_per_example_reference():
    # T5's defaults on a full 512-token window: 568 raw tokens, 85 noise tokens in 28 spans. For
    # each run length l (1 .. 8, and > 8), the share of a row's 28 noise spans (and of its 28 kept
    # runs) of that length, averaged over R = 3000 rows of each implementation. Rows are independent,
    # so the difference of the two averages has standard error sqrt(var_a / R + var_b / R) with the
    # rows' sample variances; 6 standard errors bound it (fixed seeds: the outcome is fixed too).
    length, R = 568, 3000
    assert span_counts(length, 0.15, 3.0) == (85, 28)
    ours = random_spans_noise_mask(length, 0.15, 3.0, keys_for(R, 4))
    rng = np.random.default_rng(5)
    reference = np.stack([reference_noise_mask(length, 0.15, 3.0, rng) for _ in range(R)])

    def shares(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(R, 9) per row: share of noise spans, and of kept runs, of length 1 .. 8 and > 8."""
        out = []
        for kind in (True, False):
            lengths = np.array([[n for v, n in runs(m) if v == kind] for m in masks])
            out.append(
                np.stack([(lengths == n).mean(1) for n in range(1, 9)] + [(lengths > 8).mean(1)], 1)
            )
        return out[0], out[1]

    for a, b in zip(shares(ours), shares(reference), strict=True):
        se = np.sqrt(a.var(axis=0, ddof=1) / R + b.var(axis=0, ddof=1) / R)
        assert (np.abs(a.mean(axis=0) - b.mean(axis=0)) <= 6 * se + 1e-12).all()
        assert a.mean(axis=0)[0] > 0.05  # the test looks at a populated distribution


# -- corruption -----------------------------------------------------------------------------------
def test_corrupt_and_fill_roundtrip(tok):
    rng = np.random.default_rng(3)
    sentinels = tok.sentinel_ids
    is_sentinel = np.isin(np.arange(tok.vocab_size), sentinels)
    for i in range(200):
        length = int(rng.integers(1, 70))
        window = rng.integers(0, 256, size=length)
        window[rng.random(length) < 0.05] = tok.eos_id  # document boundaries inside a window
        mask = random_spans_noise_mask(length, 0.15, 3.0, keys_for(1, i))[0]
        _, num_spans = span_counts(length, 0.15, 3.0)
        inp, tgt = corrupt_spans(window, mask, sentinels, tok.eos_id)
        assert (len(inp), len(tgt)) == corrupted_lengths(length, 0.15, 3.0)
        assert inp[-1] == tgt[-1] == tok.eos_id
        # Sentinels appear in order <extra_id_0>, <extra_id_1>, ... in both, one per span.
        assert inp[is_sentinel[inp]].tolist() == sentinels[:num_spans]
        assert tgt[is_sentinel[tgt]].tolist() == sentinels[:num_spans]
        assert inp[~is_sentinel[inp]][:-1].tolist() == window[~mask].tolist()
        assert tgt[~is_sentinel[tgt]][:-1].tolist() == window[mask].tolist()
        assert fill_sentinels(inp, tgt, sentinels, tok.eos_id) == window.tolist()


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 70, 568])
def test_batched_corruption_equals_corrupt_spans_row_by_row(tok, length):
    sentinels = list(range(1000, 1040))  # a full 568-token window has 28 spans
    rng = np.random.default_rng(length)
    windows = rng.integers(0, 256, size=(16, length))
    windows[rng.random(windows.shape) < 0.05] = tok.eos_id
    masks = random_spans_noise_mask(length, 0.15, 3.0, keys_for(16, length))
    inputs, targets = corrupt_spans_batch(windows, masks, sentinels, tok.eos_id)
    assert (inputs.shape[1], targets.shape[1]) == corrupted_lengths(length, 0.15, 3.0)
    for b in range(16):
        inp, tgt = corrupt_spans(windows[b], masks[b], sentinels, tok.eos_id)
        assert inputs[b].tolist() == inp.tolist() and targets[b].tolist() == tgt.tolist()


def test_batched_corruption_of_any_masks_with_equal_counts(tok):
    # Not only T5's masks: noise first, noise last, noise at both ends (3 noise tokens in 2 spans).
    windows = np.arange(24).reshape(3, 8) + 10
    masks = np.array(
        [[1, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0, 1, 1]], dtype=bool
    )
    inputs, targets = corrupt_spans_batch(windows, masks, tok.sentinel_ids, tok.eos_id)
    for b in range(3):
        inp, tgt = corrupt_spans(windows[b], masks[b], tok.sentinel_ids, tok.eos_id)
        assert inputs[b].tolist() == inp.tolist() and targets[b].tolist() == tgt.tolist()
    with pytest.raises(ValueError, match="same noise and span counts"):
        corrupt_spans_batch(windows[:2], np.array([masks[0], ~masks[0]]), tok.sentinel_ids, 0)
    with pytest.raises(ValueError, match="only 2 sentinel ids"):
        corrupt_spans_batch(windows[:1], [[1, 0, 1, 0, 1, 0, 0, 0]], tok.sentinel_ids[:2], 0)


def test_fill_sentinels_on_imperfect_predictions():
    s0, s1, s2 = 100, 101, 102
    inp = [1, s0, 2, s1, 3, s2]
    # junk before the first sentinel is dropped; a repeated sentinel keeps its first span; a
    # sentinel the target never mentions stays visible
    tgt = [9, s0, 5, 6, s1, 7, s1, 8]
    assert fill_sentinels(inp, tgt, [s0, s1, s2]) == [1, 5, 6, 2, 7, 3, s2]
    assert fill_sentinels([1, s0, 0], [s0, 4, 0], [s0], eos_id=0) == [1, 4]


# -- DataModule -----------------------------------------------------------------------------------
def test_batches_shapes_no_padding_and_shifted_labels(tok, stores):
    dm = make_dm(tok, stores)
    assert dm.batch_kind == "seq2seq"
    assert (dm.window_len, dm.target_len) == compute_lengths(64, 0.15, 3.0)
    train, _ = stores
    exs = [Example(s, np.asarray(train.tokens[s : s + dm.window_len], np.int64)) for s in (0, 90)]
    b = dm.make_batch(exs)
    assert b["input_ids"].shape == b["attention_mask"].shape == (2, 64)
    assert b["labels"].shape == b["decoder_input_ids"].shape == (2, dm.target_len)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long
    assert b["attention_mask"].dtype == torch.bool
    # Full windows: inputs fill seq_len and targets fill target_len exactly (no padding at all).
    assert b["attention_mask"].all() and (b["labels"] != IGNORE).all()
    assert (b["input_ids"][:, -1] == tok.eos_id).all() and (b["labels"][:, -1] == tok.eos_id).all()
    assert (b["decoder_input_ids"][:, 0] == tok.bos_id).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    for row, ex in enumerate(exs):
        got = fill_sentinels(
            b["input_ids"][row].tolist(), b["labels"][row].tolist(), tok.sentinel_ids, tok.eos_id
        )
        assert got == ex.tokens.tolist()


def test_short_examples_are_padded(tok, stores):
    dm = make_dm(tok, stores)
    exs = [
        Example(3, np.array([65])),
        Example(5, np.array([65, 66])),
        Example(9, np.arange(70, 95)),
    ]
    b = dm.make_batch(exs)
    for row, ex in enumerate(exs):
        n_in, n_tgt = corrupted_lengths(len(ex.tokens), 0.15, 3.0)
        # Real tokens are exactly the corrupted lengths; -100 / False exactly on the padding after.
        assert b["attention_mask"][row].tolist() == [True] * n_in + [False] * (64 - n_in)
        assert (b["input_ids"][row, n_in:] == tok.pad_id).all()
        labels = b["labels"][row]
        assert (labels != IGNORE).tolist() == [True] * n_tgt + [False] * (dm.target_len - n_tgt)
        dec = b["decoder_input_ids"][row]
        assert dec[:n_tgt].tolist() == [tok.bos_id, *labels[: n_tgt - 1].tolist()]
        assert (dec[n_tgt:] == tok.pad_id).all()
        real = b["input_ids"][row, :n_in].tolist()
        assert fill_sentinels(real, labels[:n_tgt].tolist(), tok.sentinel_ids, tok.eos_id) == (
            ex.tokens.tolist()
        )
    assert b["input_ids"][0, :2].tolist() == [65, tok.eos_id]  # nothing to corrupt in one token
    assert b["labels"][0, 0] == tok.eos_id


def test_batches_are_reproducible(tok, stores):
    dm = make_dm(tok, stores)
    toks = np.arange(100, 100 + dm.window_len) % 256
    a = dm.make_batch([Example(40, toks, epoch=2)])
    b = make_dm(tok, stores).make_batch([Example(40, toks.copy(), epoch=2)])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another epoch, start or seed draws other spans
    for other in (Example(40, toks, 3), Example(41, toks, 2)):
        assert not torch.equal(dm.make_batch([other])["input_ids"], a["input_ids"])
    assert not torch.equal(
        make_dm(tok, stores, seed=8).make_batch([Example(40, toks, 2)])["input_ids"], a["input_ids"]
    )


def test_an_example_corrupts_the_same_in_any_batch(tok, stores):
    # Per-example randomness: a row depends only on (seed, epoch, start) and the tokens, never on
    # the batch it is in, its place there or the other rows' lengths (what makes resumed and
    # multi-process runs exact); corrupt() gives that same row without padding.
    dm = make_dm(tok, stores)
    train, _ = stores
    full = [
        Example(s, np.asarray(train.tokens[s : s + dm.window_len], np.int64), epoch=s % 3)
        for s in range(0, 8 * dm.window_len, dm.window_len)
    ]
    short = [Example(1000, np.arange(30, 55)), Example(2000, np.array([70, 71, 72]))]

    def rows(batch) -> list[tuple[list[int], list[int]]]:
        return [
            (
                batch["input_ids"][r][batch["attention_mask"][r]].tolist(),
                batch["labels"][r][batch["labels"][r] != IGNORE].tolist(),
            )
            for r in range(len(batch["input_ids"]))
        ]

    alone = {id(ex): rows(dm.make_batch([ex]))[0] for ex in full + short}
    for ex in full + short:
        inp, tgt = dm.corrupt(ex)
        assert (inp.tolist(), tgt.tolist()) == alone[id(ex)]
    for batch in ([*full[:4]], [*full[::-1]], [short[0], *full[2:6], short[1]], [*short, full[7]]):
        assert rows(dm.make_batch(batch)) == [alone[id(ex)] for ex in batch]
    assert len({str(r) for r in alone.values()}) == len(alone)


def test_too_few_sentinels_is_a_config_error(stores):
    tok2 = byte_tokenizer(2)
    # seq_len=64 -> 70 raw tokens, 10 noise tokens in round(10 / 3) = 3 spans: one sentinel short
    assert span_counts(compute_lengths(64, 0.15, 3.0)[0], 0.15, 3.0) == (10, 3)
    with pytest.raises(ConfigError, match=r"needs 3 sentinel.*tokenizer.num_sentinels>=3"):
        make_dm(tok2, stores)
    assert span_counts(compute_lengths(40, 0.15, 3.0)[0], 0.15, 3.0)[1] == 2
    make_dm(tok2, stores, seq_len=40)  # 2 spans fit


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"noise_density": 0.0}, "noise_density"),
        ({"noise_density": 1.0}, "noise_density"),
        ({"mean_span_length": 0.5}, "mean_span_length"),
        ({"mean_span_length": float("nan")}, "mean_span_length=nan must be >= 1"),
        ({"seq_len": 1}, "seq_len >= 2"),
    ],
)
def test_bad_settings_are_config_errors(tok, stores, kw, message):
    with pytest.raises(ConfigError, match=message):
        make_dm(tok, stores, **kw)


def test_loaders_shapes_and_validation_covers_every_token_once(tok, stores):
    _, val = stores
    cfg = OmegaConf.load(CONF_DIR / "objective" / "span.yaml")
    assert cfg.name == "span" and cfg.noise_density == 0.15 and cfg.mean_span_length == 3.0
    # as the trainer builds it: the YAML keys plus the runtime objects, passed as they are
    kwargs = OmegaConf.to_container(cfg)
    dm = get_class(kwargs.pop("_target_"))(
        **kwargs,
        tokenizer=tok,
        train=stores[0],
        val=val,
        seq_len=64,
        batch_size=4,
        num_workers=0,
        seed=0,
    )
    assert isinstance(dm, SpanCorruptionDataModule) and dm.stride == dm.window_len
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (4, 64) and b["labels"].shape == (4, dm.target_len)
    assert b["attention_mask"].all()  # training windows are always full: no padding
    # Validation: windows at 0, window_len, ... (the last one short) put back together are exactly
    # the validation split, and a second pass gives the same batches.
    assert len(val) % dm.window_len != 0
    passes = [list(dm.val_dataloader()) for _ in range(2)]
    rebuilt = []
    for vb in passes[0]:
        for row in range(len(vb["input_ids"])):
            inp = vb["input_ids"][row][vb["attention_mask"][row]].tolist()
            tgt = vb["labels"][row][vb["labels"][row] != IGNORE].tolist()
            rebuilt += fill_sentinels(inp, tgt, tok.sentinel_ids, tok.eos_id)
    assert rebuilt == val.tokens.tolist()
    for a, b2 in zip(*passes, strict=True):
        assert all(torch.equal(a[k], b2[k]) for k in a)
