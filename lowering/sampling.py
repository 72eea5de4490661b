"""Sampling primitives for the decode step: distribution shaping and counter-based random numbers.

Everything here is plain torch on fixed shapes, with no host sync and no data-dependent Python
control flow, so Dynamo traces it into the compiled decode step (where Inductor fuses it) and a
CUDA graph captures it.

  shape_logits(logits, temperature, top_k, top_p) -> probs
      temperature, then top-k, then top-p (the order of HF's logits warpers); the target's and
      the draft's logits must go through the same call so that both sides of the rejection test
      see distributions shaped alike (the verification's losslessness is relative to the shaped
      target distribution).
  uniform(seed, counter, index, stream, dtype) -> float32 or float64 in (0, 1)
      Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
      keyed by the request's seed, counting (counter, stream, index). A pure function of its
      arguments: the same seed gives the same numbers on every run, at every batch position, in
      every batch size, on CPU and GPU, in the reference and in the Triton kernels (which run
      the same integer arithmetic, see verify_sampling_triton.py).
  gumbel_top_k(logprobs, k, seed, counter, row_ids) -> (tokens, keys)
      k draws without replacement from softmax(logprobs), in draw order (Gumbel-top-k,
      Kool et al. 2019): how the draft samples a node's children.
  sample_from(probs, u) -> token
      inverse-CDF sampling of one token per row from possibly unnormalised probabilities.

Random-number streams. Within one decode step every random number is identified by
(seed[b], counter[b], stream, index). The runtime gives each request a seed and advances its
counter by one per decode step (and per prefill sample); the stream says which consumer draws
(so the draft's Gumbel noise and the verifier's coins are independent); the index says which
number of that consumer it is (a node, a vocabulary entry). Indices must be < 2**48.
"""

from __future__ import annotations

import torch

# Stream identifiers (< 2**16): which consumer of random numbers is drawing.
STREAM_SAMPLE = 0  # plain sampling of one token from the target (prefill, non-speculative steps)
STREAM_DRAFT = 1  # the draft's Gumbel noise for sampling children without replacement
STREAM_VERIFY = 2  # the verifier's coins: index j > 0 for node j's accept test, 0 for the final token

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Random123): the round multipliers and the Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * b, for a constant a and b < 2**32.

    int64 tensors hold the words; the product is split at 16 bits of b so that no intermediate
    exceeds 2**49 (signed int64 overflow is never relied upon, here or in the kernels).
    """
    b_low = b & 0xFFFF
    b_high = b >> 16
    low_part = a * b_low  # < 2**48
    high_part = a * b_high  # < 2**48;  a * b = low_part + high_part * 2**16
    low_sum = low_part + ((high_part & 0xFFFF) << 16)  # < 2**49
    low = low_sum & _MASK32
    high = ((high_part >> 16) + (low_sum >> 32)) & _MASK32
    return high, low


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1): 32-bit words in int64.

    Each round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2,
                c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);  then k += (W0, W1) mod 2**32.
    Checked against Random123's known-answer vectors in tests/lowering/test_sampling.py.
    """
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _per_row(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [B] tensor viewed as [B, 1, ..., 1] with `ndim` dimensions in all."""
    return value.reshape(value.shape[0], *([1] * (ndim - 1)))


def uniform(
    seed: torch.Tensor,
    counter: torch.Tensor,
    index: torch.Tensor,
    stream: int = STREAM_SAMPLE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Counter-based uniform numbers in (0, 1): u[b, ...] = f(seed[b], counter[b], stream, index[b, ...]).

    seed, counter: int64 [B] (any values; negative seeds are fine). index: int64 [B, ...] or
    broadcastable to it (e.g. [1, N]), each value in [0, 2**48). Returns `dtype` of index's
    broadcast shape. With Philox's first two output words w0, w1:
      float32: u = ((w0 >> 9) + 0.5) / 2**23, so 2**-24 <= u <= 1 - 2**-24 exactly;
      float64: u = ((w0 >> 12) * 2**32 + w1 + 0.5) / 2**52, so 2**-53 <= u <= 1 - 2**-53.
    Never 0 or 1, so -log(-log u) is finite. float64 is for inverse-CDF sampling over a large
    vocabulary, where 23 bits would quantise every token's probability to multiples of 2**-23.
    """
    if not 0 <= stream < 2**16:
        raise ValueError(f"stream={stream} must be in [0, 2**16)")
    index = torch.as_tensor(index, device=seed.device).long()
    ndim = max(index.dim(), 1)
    seed = _per_row(seed.long(), ndim)
    counter = _per_row(counter.long(), ndim)
    word0, word1, _, _ = philox4x32(
        counter & _MASK32,
        (counter >> 32) & _MASK32,
        index & _MASK32,
        ((index >> 32) & 0xFFFF) | (stream << 16),
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )
    if dtype == torch.float64:
        return (((word0 >> 12) << 32) + word1).double().add(0.5).mul(2.0**-52)
    if dtype != torch.float32:
        raise ValueError(f"uniform: dtype must be torch.float32 or torch.float64, not {dtype}")
    return ((word0 >> 9).float() + 0.5) * (1.0 / 2**23)


def gumbel_top_k(
    logprobs: torch.Tensor,
    k: int,
    seed: torch.Tensor,
    counter: torch.Tensor,
    row_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k tokens drawn without replacement from softmax(logprobs[b, ..., :]), in draw order.

    logprobs: [B, ..., V] log-probabilities (unnormalised is fine; -inf = impossible token).
    Each entry gets Gumbel noise g = -log(-log u) and the k largest keys logprobs + g are taken:
    the first is a sample of softmax(logprobs), the second a sample of it with the first removed
    and renormalised, and so on (Gumbel-top-k, Kool et al. 2019, "Stochastic beams and where to
    find them"). The noise of (b, row, v) is uniform(seed[b], counter[b], row_id * V + v,
    STREAM_DRAFT), where row_ids [B or 1, ...] names each distribution row within the step (e.g.
    the tree node whose children are drawn) so that no two rows of one step share noise;
    default: the row's position in the flattened middle dimensions.

    Returns tokens int64 [B, ..., k] and their keys float32 [B, ..., k], keys descending. A key
    of -inf marks a draw past the row's support (k larger than the number of possible tokens):
    that token was not drawn from the distribution, and the verifier never accepts it under the
    recursive rule (its q is 0). Requires k <= V.
    """
    vocab = logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"gumbel_top_k: k={k} must be in [1, V={vocab}]")
    batch = logprobs.shape[0]
    middle = logprobs.shape[1:-1]
    if row_ids is None:
        n_rows = 1
        for size in middle:
            n_rows *= size
        row_ids = torch.arange(n_rows, device=logprobs.device).reshape(1, *middle)
    row_ids = torch.as_tensor(row_ids, device=logprobs.device).long()
    index = row_ids[..., None] * vocab + torch.arange(vocab, device=logprobs.device)
    index = index.expand(batch, *middle, vocab) if index.shape[0] == 1 else index
    u = uniform(seed, counter, index, STREAM_DRAFT)
    keys = logprobs.float() - torch.log(-torch.log(u))
    top_keys, tokens = torch.topk(keys, k, dim=-1, largest=True, sorted=True)
    return tokens, top_keys


def sample_from(probs: torch.Tensor, u: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF sample: the first token v with cumsum(probs)[v] > u * mass, per row.

    probs: [..., V] non-negative weights, not necessarily normalised (each row needs positive
    mass); u: [...] in (0, 1), best float64 (uniform(..., dtype=torch.float64)); mass [...]: the
    rows' total when the caller tracks it (verify_sampling does), else their sum. The cumulative
    sum is taken in float64, so that a vocabulary of 10**5 tokens keeps every token's
    probability to ~1e-16 rather than float32's ~1e-7 steps. Returns int64 [...]. Rounding can
    put u * mass at or past the last cumulative value; the result is then the last token of
    positive probability, so a token of zero probability is never returned.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:] if mass is None else mass[..., None].double()
    threshold = u[..., None].double() * total
    token = (cdf <= threshold).sum(-1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_positive = torch.where(probs > 0, positions, -1).amax(-1)
    return torch.minimum(token, last_positive)


def shape_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Sampling distribution from logits: temperature, then top-k, then top-p. Float32 [B, ..., V].

    Each parameter is a Python number (one setting for all rows; a disabled filter then costs
    nothing) or a tensor [B] (one per request, broadcast over the middle dimensions, always
    applied). Conventions:
      temperature t > 0: softmax(logits / t); t <= 0: one-hot at the argmax (greedy; the
        verifier then reduces to greedy verification, a rejected child's residual being the
        target's argmax).
      top_k k > 0: keep the logits >= the k-th largest (ties with it are all kept); k <= 0 or
        k >= V: keep all.
      top_p p < 1: keep the smallest set of most likely tokens (of the temperature- and
        top-k-shaped distribution) whose mass reaches p, i.e. the tokens whose preceding mass
        in descending order is < p (the most likely token is always kept; order among equal
        probabilities by token id); p >= 1: keep all.
    The kept probabilities are renormalised. Apply the same call to the target's and the draft's
    logits.
    """
    scores = logits.float()
    ndim = scores.dim()
    vocab = scores.shape[-1]
    greedy = None
    if isinstance(temperature, torch.Tensor):
        temperature = _per_row(temperature.float(), ndim)
        greedy = temperature <= 0
        scores = scores / torch.where(greedy, torch.ones_like(temperature), temperature)
    elif temperature <= 0:
        return torch.nn.functional.one_hot(scores.argmax(-1), vocab).float()
    elif temperature != 1.0:
        scores = scores / temperature

    if isinstance(top_k, torch.Tensor) or 0 < top_k < vocab:
        if isinstance(top_k, torch.Tensor):
            k = _per_row(top_k.long(), ndim)
            k = torch.where((k <= 0) | (k > vocab), vocab, k)
        else:
            k = torch.full((1,) * ndim, top_k, dtype=torch.long, device=scores.device)
        descending = scores.sort(-1, descending=True).values
        kth = descending.gather(-1, (k - 1).expand(*scores.shape[:-1], 1))
        scores = scores.masked_fill(scores < kth, float("-inf"))

    probs = scores.softmax(-1)
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        p = _per_row(top_p.float(), ndim) if isinstance(top_p, torch.Tensor) else top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        keep_sorted = mass_before < p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)

    if greedy is not None:
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
        probs = torch.where(greedy, one_hot, probs)
    return probs
