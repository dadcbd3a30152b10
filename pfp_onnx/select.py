"""Which channels of a group survive, and how the kept ones are reweighted (docs/method.md §4).

The allocation fixes how many channels a group keeps; this module picks them from the sensitivities:
deterministically (the paper's tables), by importance sampling (the variant the error bound is proved for),
or by a hybrid of the two. Sampling reweights each kept channel so that the pruned layer is an unbiased
estimate of the original one; the rewrite multiplies the consumers' input slices by `scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfp_onnx.allocate import expected_distinct
from pfp_onnx.errors import OptionError
from pfp_onnx.options import MODES

__all__ = ["MODES", "Selection", "sample_count_for", "select_channels"]

# Largest number of draws tried when matching an expected distinct count: exact in float64 and in int64.
MAX_SAMPLES = 2**53
# Up to this many draws are made one by one (so sampling can stop at the allocated count).
SEQUENTIAL_LIMIT = 10**7


@dataclass(frozen=True)
class Selection:
    """The kept channels (sorted int64 indices) and the factor for each one's consumer weights (float32)."""

    kept: np.ndarray
    scale: np.ndarray


def select_channels(sensitivity: np.ndarray, count: int, mode: str, rng: np.random.Generator) -> Selection:
    """Pick about `count` channels of a group by `mode`; at least one channel is always kept.

    - "deterministic": the `count` largest sensitivities (ties to the lower index), scale 1.
    - "randomized": m = the fewest draws whose expected distinct count reaches `count`; draw up to m times
      with replacement from p = s/Σs, stopping before a (count+1)-th distinct channel would be kept (the
      budget is a hard limit), and keep the distinct channels with scale count_c/(m'·p_c), m' the draws
      made. Without the stop E[scale_c·1[kept_c]] = 1 exactly; the stop biases it slightly.
    - "hybrid" (the reference's PFPNetTop split): with m as for randomized, the set D of channels with
      p_c ≥ 1/m — those the sampler would almost surely draw — is kept with scale 1 (if |D| ≥ `count`, just
      the `count` largest). The remaining `count` − |D| channels are sampled like "randomized" from
      p' = the rest renormalised: m' draws, m' the fewest whose expected distinct count reaches
      `count` − |D|, scale count_c/(m'·p'_c), so the rest's contribution stays unbiased. (Spending the
      leftover m − |D| draws instead would overshoot `count`: the heavy channels' repeat draws are freed.)

    count ≥ C keeps everything. When sampling could never reach `count` distinct channels (count is at least
    the number with s_c > 0) or Σs = 0, the choice falls back to deterministic: keeping every channel that
    matters is the limit of sampling as m grows.
    """
    if mode not in MODES:
        raise OptionError(f"Unknown selection mode {mode!r}; choose one of {', '.join(MODES)}.")
    sensitivity = np.asarray(sensitivity, dtype=np.float64).reshape(-1)
    channels = sensitivity.size
    if channels == 0:
        raise ValueError("cannot select channels from an empty group")
    count = max(1, min(int(count), channels))
    if count == channels:
        return _full(channels)
    total = float(sensitivity.sum())
    if mode == "deterministic" or total <= 0 or count >= np.count_nonzero(sensitivity):
        return _top(sensitivity, count)

    probabilities = sensitivity / total
    samples = sample_count_for(probabilities, count)
    if mode == "randomized":
        draws, samples = _draw_at_most(probabilities, samples, count, rng)
        kept = np.flatnonzero(draws)
        scale = draws[kept] / (samples * probabilities[kept])
        return Selection(kept.astype(np.int64), scale.astype(np.float32))

    heavy = np.flatnonzero(probabilities >= 1.0 / samples)
    if heavy.size >= count:
        return _top(sensitivity, count)
    rest = np.setdiff1d(np.arange(channels), heavy)
    rest_probabilities = probabilities[rest] / float(probabilities[rest].sum())
    rest_samples = sample_count_for(rest_probabilities, count - heavy.size)
    draws, rest_samples = _draw_at_most(rest_probabilities, rest_samples, count - heavy.size, rng)
    drawn = np.flatnonzero(draws)
    drawn_scale = draws[drawn] / (rest_samples * rest_probabilities[drawn])
    kept = np.concatenate([heavy, rest[drawn]])
    scale = np.concatenate([np.ones(heavy.size), drawn_scale])
    order = np.argsort(kept)
    return Selection(kept[order].astype(np.int64), scale[order].astype(np.float32))


def _draw_at_most(probabilities: np.ndarray, samples: int, count: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Draw `samples` times with replacement, but stop before a (count+1)-th distinct channel appears.

    The budget is a hard limit for users, so the sampler never keeps more than the allocation's count;
    the reweighting then uses the number of draws actually made.
    """
    if samples > SEQUENTIAL_LIMIT:  # extremely skewed p: draw at once, drop the least drawn extras
        draws = rng.multinomial(samples, probabilities)
        extra = np.flatnonzero(draws)[np.argsort(draws[np.flatnonzero(draws)], kind="stable")]
        draws[extra[:max(0, len(extra) - count)]] = 0
        return draws, samples
    sequence = rng.choice(probabilities.size, size=samples, p=probabilities)
    channels, first_seen = np.unique(sequence, return_index=True)
    if channels.size > count:
        sequence = sequence[:np.sort(first_seen)[count]]
    return np.bincount(sequence, minlength=probabilities.size), len(sequence)


def sample_count_for(probabilities: np.ndarray, count: int) -> int:
    """The smallest m ≥ 1 with expected_distinct(p, m) ≥ count (at most 2**53, where p is too skewed)."""
    if expected_distinct(probabilities, 1) >= count:
        return 1
    low, high = 1, 2
    while expected_distinct(probabilities, high) < count:
        if high >= MAX_SAMPLES:
            return MAX_SAMPLES
        low, high = high, min(2 * high, MAX_SAMPLES)
    # Invariant: expected(low) < count <= expected(high).
    while high - low > 1:
        middle = (low + high) // 2
        if expected_distinct(probabilities, middle) >= count:
            high = middle
        else:
            low = middle
    return high


def _full(channels: int) -> Selection:
    return Selection(np.arange(channels, dtype=np.int64), np.ones(channels, np.float32))


def _top(sensitivity: np.ndarray, count: int) -> Selection:
    """The `count` largest sensitivities; a stable sort of −s breaks ties towards the lower index."""
    kept = np.sort(np.argsort(-sensitivity, kind="stable")[:count]).astype(np.int64)
    return Selection(kept, np.ones(count, np.float32))
