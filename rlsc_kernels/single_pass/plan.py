"""Planning the single pass: the sequence weighting as a pure function, and the chunks.

Nothing here touches a tensor bigger than [S]: the plan is made on the host from the tokens per
sequence (one sync), then handed to the driver (driver.py) as plain Python ints.

Chunks. The tokens are laid out sequence after sequence (seq sorted). A chunk is a range of
tokens [t0, t1) whose logits block [t1 - t0, V] is held at a time. Two layouts:
- whole: every chunk holds whole sequences (the greedy packing of `plan_chunks`). Every
  sequence's weight is known when its chunk's statistics are done, so its gradient goes straight
  into the two gradient GEMMs. No memory beyond the logits block.
- split: chunks of `rows` tokens that may cut a sequence longer than `rows` (shorter sequences
  are still kept whole). The per-token gradient of an open sequence s is g_s u_t with
  u_t = ([v = y_t] - p_t) / T independent of g_s, so its rows go through the GEMMs with g = 1:
  dhidden rows are scaled by g_s in place when s closes (no memory), and its share of dweight is
  summed in an "open accumulator" [V, D] (float32) that is added to dweight, times g_s, when s
  closes (or, when s is the first thing dweight sees, dweight itself is the accumulator and is
  scaled in place).

Cost model (GEMM-equivalents = 2 N V D flops; B = buffer_bytes; r = B / (4 V) rows; L = longest
sequence): both layouts do 3 GEMM-equivalents. Memory beyond the outputs and the float32 dweight:
- L <= r: whole chunks of r rows, 4 r V bytes;
- L > r, dweight not needed: split chunks, 4 r V bytes (dhidden rows are scaled in place);
- L > r, dweight needed: the long sequence needs either a logits block of L rows or the open
  accumulator (4 V D bytes). The plan allows B + 4 V D in all and takes whole chunks of L rows
  when 4 L V <= B + 4 V D (fewer, larger GEMMs and no fold), else split chunks of r rows plus
  the accumulator. Memory-bound extra work of the split: per sequence that spans chunks, one
  pass over its dhidden rows and 3 passes over [V, D] (zero the accumulator, read it, update
  dweight); none when the whole layout is taken.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..dtypes import output_dtype
from ..weighting import rlsc_weights

#: Default budget for the logits block of one chunk (bytes), used when neither the caller
#: (buffer_bytes) nor the backend (its BUFFER_BYTES) sets one: 128 MB, the size of the torch
#: backend's two-sweep logits block.
DEFAULT_BUFFER_BYTES = 1 << 27


class Chunk(NamedTuple):
    """One chunk of the plan, all Python ints.

    t0, t1: its tokens [t0, t1). s0, s1: the sequences weighed once this chunk's statistics are
    done (those whose last token is in it, and empty sequences lying in it). carry_start: where
    sequence s0 began if that is before t0 (it was open over earlier chunks and closes here),
    else t0. open_start: where the sequence that continues past t1 began, else t1 (so its rows
    in this chunk are [max(t0, open_start), t1)).
    """

    t0: int
    t1: int
    s0: int
    s1: int
    carry_start: int
    open_start: int


@dataclass(frozen=True, eq=False)
class Weigh:
    """weigh(seq_logp [k], n_tokens [k], s0) -> (seq_weight [k] fp32 detached, coef [k]): a pure
    function of the k sequences [s0, s0 + k).

    coef = dLoss/dL_s for grad_output = 1: -w_s, divided by max(S, 1) for reduction "mean", in
    seq_logp's dtype (fp32; fp64 for the fp64 oracle). External weights (a tensor [S]) are
    sliced at [s0, s0 + k).
    """

    weighting: Union[str, torch.Tensor]
    alpha: float
    reduction: str
    n_seqs: int

    @property
    def scale(self) -> float:
        return 1.0 / max(self.n_seqs, 1) if self.reduction == "mean" else 1.0

    def __call__(self, seq_logp: torch.Tensor, n_tokens: torch.Tensor, s0: int):
        k = seq_logp.shape[0]
        s0 = int(s0)
        if s0 < 0 or s0 + k > self.n_seqs:
            raise RuntimeError(f"weigh called for sequences [{s0}, {s0 + k}) outside [0, {self.n_seqs})")
        weighting = self.weighting
        if isinstance(weighting, torch.Tensor):
            weighting = weighting[s0:s0 + k]
        seq_weight = rlsc_weights(seq_logp, n_tokens, weighting, self.alpha)
        return seq_weight, seq_weight.to(seq_logp.dtype) * (-self.scale)

    def coef_bound(self) -> Optional[float]:
        """A bound on |coef| known before any L_s, or None (entropy weights 1 + L and external
        weights are unbounded): exp(L) <= 1, so |w| <= 1 + |alpha|."""
        if isinstance(self.weighting, torch.Tensor) or self.weighting not in ("rlsc", "rlsc-l1", "length"):
            return None
        return (1.0 if self.weighting == "rlsc-l1" else 1.0 + abs(self.alpha)) * self.scale

    def loss(self, seq_logp: torch.Tensor, seq_weight: torch.Tensor) -> torch.Tensor:
        return -(seq_weight.to(seq_logp.dtype) * seq_logp).sum() * self.scale


def budget_rows(V: int, dtype: torch.dtype, buffer_bytes: int) -> int:
    """Tokens whose [tokens x V] logits (fp32, fp64 for fp64 inputs) fit in buffer_bytes."""
    return max(1, buffer_bytes // (V * _itemsize(dtype)))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=output_dtype(dtype)).element_size()


def plan_chunks(counts: List[int], max_rows: int) -> Optional[List[Tuple[int, int, int, int]]]:
    """Chunks (t0, t1, s0, s1) of whole consecutive sequences, each of at most max_rows tokens,
    for sequences of `counts` tokens laid out in order; None if one sequence alone is longer.
    Sequences of 0 tokens join whichever chunk they fall in."""
    chunks = []
    t0 = s0 = t = 0
    for s, n in enumerate(counts):
        if n > max_rows:
            return None
        if t + n - t0 > max_rows:
            chunks.append((t0, t, s0, s))
            t0, s0 = t, s
        t += n
    chunks.append((t0, t, s0, len(counts)))
    return chunks


def split_bounds(counts: Sequence[int], rows: int) -> List[int]:
    """Chunk boundaries (token offsets, first 0, last N) for chunks of at most `rows` tokens that
    keep every sequence of at most `rows` tokens whole and cut longer ones: a long sequence starts
    in the current chunk's free rows and runs on over full chunks."""
    bounds = [0]
    t0 = t = 0
    for n in counts:
        if n <= rows:
            if t + n - t0 > rows:
                bounds.append(t)
                t0 = t
        else:
            while t + n - t0 > rows:
                t0 += rows
                bounds.append(t0)
        t += n
    if bounds[-1] != t or t == 0:
        bounds.append(t)
    return bounds


def chunks_from_bounds(counts: Sequence[int], bounds: Sequence[int]) -> List[Chunk]:
    """The Chunk list for token boundaries `bounds` (bounds[0] = 0, bounds[-1] = N)."""
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    N = starts[-1]
    n_chunks = len(bounds) - 1

    def chunk_of(t: int) -> int:
        return min(max(bisect.bisect_right(bounds, t) - 1, 0), n_chunks - 1)

    # sequence s is weighed in the chunk holding its last token (empty ones: where they lie)
    owner = [chunk_of(starts[s] + n - 1 if n > 0 else min(starts[s], max(N - 1, 0))) for s, n in enumerate(counts)]
    chunks = []
    s = 0
    for c in range(n_chunks):
        t0, t1 = bounds[c], bounds[c + 1]
        s0 = s
        while s < len(counts) and owner[s] == c:
            s += 1
        carry = starts[s0] if s0 < s and counts[s0] > 0 and starts[s0] < t0 else t0
        # the sequence holding token t1 - 1, if it runs past t1
        open_start = t1
        if t1 < N and t1 > t0:
            k = bisect.bisect_right(starts, t1 - 1) - 1
            while k < len(counts) and counts[k] == 0:
                k += 1
            if k < len(counts) and starts[k] < t1 < starts[k] + counts[k]:
                open_start = starts[k]
        chunks.append(Chunk(t0, t1, s0, s, carry, open_start))
    return chunks


def as_chunks(chunks) -> List[Chunk]:
    """Chunk objects from Chunks or from plan_chunks' (t0, t1, s0, s1) tuples of whole sequences."""
    return [c if isinstance(c, Chunk) else Chunk(c[0], c[1], c[2], c[3], c[0], c[1]) for c in chunks]


@dataclass(frozen=True)
class Plan:
    """layout: "whole" or "split"; rows: the logits block's rows; chunks; open_bytes: the bound on
    the open accumulator (0 for whole chunks or when dweight is not needed)."""

    layout: str
    rows: int
    chunks: List[Chunk]
    open_bytes: int


def plan(counts: List[int], V: int, D: int, dtype: torch.dtype, buffer_bytes: int, need_dweight: bool) -> Plan:
    """The cheapest layout within the memory the cost model above allows (B + 4 V D at most)."""
    item = _itemsize(dtype)
    rows = budget_rows(V, dtype, buffer_bytes)
    longest = max(counts, default=0)
    if longest <= rows:
        return Plan("whole", rows, as_chunks(plan_chunks(counts, rows)), 0)
    if need_dweight and longest * V * item <= buffer_bytes + V * D * item:
        return Plan("whole", longest, as_chunks(plan_chunks(counts, longest)), 0)
    chunks = chunks_from_bounds(counts, split_bounds(counts, rows))
    return Plan("split", rows, chunks, V * D * item if need_dweight else 0)
