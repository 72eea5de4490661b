"""specc::advance_state — the decode step's last act: the state the next step starts from.

For every sequence b, with a = accept_len[b] (the nodes accepted past the root; 0 for plain
decode) and out_tokens[b, :a + 1] the tokens the step emitted:

    tokens[b, 0]   = out_tokens[b, a]           the last token emitted: the next step's input
    cache_len[b]  += a + 1                      the emitted tokens' K/V are now in the cache
and, for a speculative step (the pending buffers given; passes/speculative_step.py):
    pending_tokens[b, j] = max(out_tokens[b, j], 0)    j < P (entries past a are -1 padding)
    pending_count[b]     = a + 1
    pending_feats[b]     = features[b]          the target's features at the accepted path

Why an op: these are five small writes into five static buffers of different shapes, which
Inductor emitted as five kernels (one per buffer, about 1 µs each plus a launch gap on an H100)
at the end of every step. The kernel (advance_state_triton.py) does them in one launch, one
program per sequence.

Requirements: tokens [B, 1]; cache_len, accept_len [B]; out_tokens [B, P]; 0 <= a < P (what
verify_greedy and verify_sampling return; the kernel does not check it, the reference raises);
pending_tokens [B, P], pending_count [B], pending_feats and features [B, P, H], all four or
none. cache_len must be read by nothing after this op in the step (commit_kv reads it first).
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled

_INTEGER = (torch.int32, torch.int64)


def advance_state_reference(tokens: torch.Tensor, cache_len: torch.Tensor, out_tokens: torch.Tensor,
                            accept_len: torch.Tensor, pending_tokens: torch.Tensor | None = None,
                            pending_count: torch.Tensor | None = None, pending_feats: torch.Tensor | None = None,
                            features: torch.Tensor | None = None) -> None:
    """The definition, in PyTorch (in place)."""
    accept = accept_len.long()
    rows = torch.arange(out_tokens.shape[0], device=out_tokens.device)
    tokens[:, 0] = out_tokens[rows, accept].to(tokens.dtype)
    cache_len.add_((accept + 1).to(cache_len.dtype))
    if pending_tokens is not None:
        pending_tokens.copy_(out_tokens.clamp_min(0))
        pending_count.copy_(accept + 1)
        pending_feats.copy_(features)


def check_arguments(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats,
                    features) -> None:
    """Shapes, dtypes and devices as the module docstring says; raises ValueError naming the one wrong."""
    if out_tokens.dim() != 2:
        raise ValueError(f"advance_state: out_tokens must be [B, P]; got {tuple(out_tokens.shape)}")
    batch, slots = out_tokens.shape
    wanted = {"tokens": (tokens, (batch, 1)), "cache_len": (cache_len, (batch,)), "accept_len": (accept_len, (batch,))}
    pending = {"pending_tokens": pending_tokens, "pending_count": pending_count, "pending_feats": pending_feats,
               "features": features}
    given = [name for name, value in pending.items() if value is not None]
    if given and len(given) != len(pending):
        missing = sorted(set(pending) - set(given))
        raise ValueError(f"advance_state: give all of {sorted(pending)} or none; {missing} missing")
    if given:
        if features.dim() != 3 or features.shape[:2] != (batch, slots):
            raise ValueError(f"advance_state: features must be [{batch}, {slots}, H]; got {tuple(features.shape)}")
        wanted.update({"pending_tokens": (pending_tokens, (batch, slots)), "pending_count": (pending_count, (batch,)),
                       "pending_feats": (pending_feats, tuple(features.shape))})
    for name, (value, shape) in wanted.items():
        if tuple(value.shape) != shape:
            raise ValueError(f"advance_state: {name} must be {list(shape)} for out_tokens {list(out_tokens.shape)}; "
                             f"got {list(value.shape)}")
        if value.device != out_tokens.device:
            raise ValueError(f"advance_state: {name} is on {value.device}, out_tokens on {out_tokens.device}")
    for name in ("tokens", "cache_len", "accept_len", "pending_tokens", "pending_count"):
        if name in wanted and wanted[name][0].dtype not in _INTEGER:
            raise ValueError(f"advance_state: {name} must be int32 or int64; got {wanted[name][0].dtype}")
    if out_tokens.dtype not in _INTEGER:
        raise ValueError(f"advance_state: out_tokens must be int32 or int64; got {out_tokens.dtype}")
    if given and not (features.is_floating_point() and pending_feats.is_floating_point()):
        raise ValueError(f"advance_state: features and pending_feats must be floating; got {features.dtype}, "
                         f"{pending_feats.dtype}")


@torch.library.custom_op("specc::advance_state",
                         mutates_args=("tokens", "cache_len", "pending_tokens", "pending_count", "pending_feats"))
def advance_state(tokens: torch.Tensor, cache_len: torch.Tensor, out_tokens: torch.Tensor, accept_len: torch.Tensor,
                  pending_tokens: torch.Tensor | None = None, pending_count: torch.Tensor | None = None,
                  pending_feats: torch.Tensor | None = None, features: torch.Tensor | None = None) -> None:
    check_arguments(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats, features)
    if out_tokens.is_cuda and kernel_enabled():
        from specc.lowering.advance_state_triton import advance_state_triton

        advance_state_triton(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats,
                             features)
        return
    advance_state_reference(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats,
                            features)


@advance_state.register_fake
def _(tokens, cache_len, out_tokens, accept_len, pending_tokens=None, pending_count=None, pending_feats=None,
      features=None) -> None:
    check_arguments(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats, features)
    return None
