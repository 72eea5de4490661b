"""A reduced draft vocabulary: the draft's LM head over the K tokens the target writes most.

At batch 1 the draft's LM head is a GEMV over the whole [V, H] matrix at every tree level (for
SmolLM2, 49,152 x 576 bf16: 57 MB, about 17 us on an H200, the largest kernel of a draft level).
Its logits only choose which tokens to propose; the target verifies every proposal, so the
draft may propose from any subset S of the vocabulary and decoding stays lossless: greedy
verification accepts only the target's own tokens, and speculative sampling only needs q to be
the distribution the proposals were drawn from (q is zero outside S). A token outside S can
never be proposed, which costs acceptance only where the target writes it, so S is the top K
of the target's own response tokens (EAGLE-3 reduces Llama-3's 128k vocabulary to 32k the
same way).

    counts = response_token_counts(load_sequences(data_dir), vocab_size)      # on the head's data
    ids = draft_vocab_from_counts(counts, 8192)                               # int64 [K], ascending
    draft.set_draft_vocab(ids)                                                # EagleDraft

The ids are kept in ascending order, so the draft's top-k ties still break to the lower
token id, as over the full vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def response_token_counts(sequences, vocab_size: int) -> torch.Tensor:
    """How often the target wrote each token in the responses of `sequences` (data.Sequences):
    int64 [vocab_size]. Prompt tokens are not counted: the draft proposes response tokens."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for tokens, start in zip(sequences.tokens, sequences.response_start):
        response = torch.as_tensor(tokens[start:], dtype=torch.int64)
        if response.numel() and int(response.max()) >= vocab_size:
            raise ValueError(f"token {int(response.max())} is outside a vocabulary of {vocab_size}: "
                             "the sequences were written by another model")
        counts += torch.bincount(response, minlength=vocab_size)
    return counts


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent token ids (ties to the lower id), sorted ascending: int64 [size]."""
    vocab_size = counts.numel()
    if not 0 < size <= vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens does not fit a vocabulary of {vocab_size}")
    # a stable sort on -count keeps equal counts in id order
    order = torch.sort(-counts.to(torch.int64), stable=True).indices
    return torch.sort(order[:size]).values


def coverage(counts: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of the counted tokens that fall in `ids`: the most a draft over `ids` can accept
    at depth 1, relative to the full vocabulary."""
    total = int(counts.sum())
    return float(counts[ids].sum()) / total if total else 0.0


def check_draft_vocab(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`ids` as int64, checked: 1-D, strictly ascending, within [0, vocab_size)."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point:
        raise ValueError(f"a draft vocabulary is a non-empty 1-D tensor of token ids; got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size}); got {int(ids.min())}..{int(ids.max())}")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("draft vocabulary ids must be strictly ascending (sort them and drop duplicates)")
    return ids


def coverage_table(counts: torch.Tensor, sizes: Iterable[int]) -> list[tuple[int, float]]:
    """(K, coverage) for each K: what each draft vocabulary size would leave out."""
    return [(k, coverage(counts, draft_vocab_from_counts(counts, k))) for k in sizes]


# ----- `specc draft-vocab`: attach the counts (and a default K) to a head file -----------------
COVERAGE_SIZES = (2048, 4096, 8192, 12288, 16384, 24576, 32768)


def add_parser(subparsers):
    import argparse

    parser = subparsers.add_parser(
        "draft-vocab", help="give a draft head a reduced draft vocabulary (the tokens its data used most)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default=None, help="the head (default: the shipped one)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="the head's training data (seqs-*.pt): count its response tokens")
    source.add_argument("--counts", help="a saved int64 [V] tensor of response token counts (torch.save)")
    parser.add_argument("--size", type=int, default=0, help="the head's default K (0: the whole vocabulary)")
    parser.add_argument("--out", required=True, help="where to write the head with its counts")
    parser.set_defaults(func=cmd_draft_vocab)
    return parser


def cmd_draft_vocab(args) -> int:
    from safetensors import safe_open

    from specc.draft import default_draft_path
    from specc.draft.eagle import load_draft

    path = args.draft or default_draft_path()
    if path is None:
        raise SystemExit("no head given and this build ships none: pass --draft")
    with safe_open(str(path), framework="pt") as handle:
        # keep the training summary and any other metadata the head carried, and its dtype
        extra = {k: v for k, v in (handle.metadata() or {}).items() if k not in ("specc_draft_config", "specc_draft_vocab")}
        stored = {handle.get_tensor(k).dtype for k in handle.keys() if k != "token_counts"}
    draft = load_draft(path, draft_vocab=0, dtype=stored.pop() if len(stored) == 1 else None)
    if args.data_dir:
        from specc.draft.data import load_sequences

        counts = response_token_counts(load_sequences(args.data_dir), draft.config.vocab_size)
    else:
        counts = torch.load(args.counts, weights_only=True).to(torch.int64)
    if counts.shape != (draft.config.vocab_size,):
        raise SystemExit(f"the counts have shape {tuple(counts.shape)}; the head's vocabulary is {draft.config.vocab_size}")
    print(f"{int(counts.sum()):,} response tokens counted, {int((counts > 0).sum()):,} distinct")
    for size, share in coverage_table(counts, [k for k in COVERAGE_SIZES if k < counts.numel()]):
        print(f"  K={size:6d}: {100 * share:6.2f}% of the tokens")
    draft.token_counts = counts
    draft.use_draft_vocab(args.size)
    draft.save(args.out, extra_metadata=extra)
    print(f"wrote {args.out} (default draft vocabulary: {args.size or 'the whole vocabulary'})")
    return 0
