"""specc::advance_state — the state the next speculative step starts from, in one launch.

The last act of the speculative step (passes/speculative_step.py). For every sequence b, with
a = accept_len[b] (the nodes accepted past the root) and out_tokens[b, :a + 1] the tokens the
step emitted:

    tokens[b, 0]         = out_tokens[b, a]          the last token emitted: the next root
    cache_len[b]        += a + 1                     the emitted tokens' K/V are now in the cache
    pending_tokens[b, j] = max(out_tokens[b, j], 0)  j < P (entries past a are -1 padding)
    pending_count[b]     = a + 1
    pending_feats[b]     = features[b]               the target's features on the accepted path

Why an op: these are small writes into five static buffers of different shapes, and the step's
n_out (a + 1, which is pending_count, so the step returns that buffer). Inductor emitted them as
six kernels at the end of every step, 0.96-1.38 µs each and 8.6 µs with their launch gaps on an
H100 (results/2026-12-06b_h100). The kernel (advance_state_triton.py) does them in one launch,
one program per sequence.

Requirements: tokens [B, 1]; cache_len, accept_len, pending_count [B]; out_tokens and
pending_tokens [B, P]; pending_feats and features [B, P, H]; 0 <= a < P (what verify_greedy and
verify_sampling return; the kernel does not check it, the reference raises). cache_len must be
read by nothing after this op in the step (commit_kv reads it first).

Every argument is required. An earlier form with the pending buffers optional (for plain
decode) failed on the GPU machine's torch 2.11: its fake-tensor call of the op, with them None,
raised IndexError inside torch (results/2026-12-06b_h100); torch 2.13 ran it.
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled

_INTEGER = (torch.int32, torch.int64)


def advance_state_reference(tokens: torch.Tensor, cache_len: torch.Tensor, out_tokens: torch.Tensor,
                            accept_len: torch.Tensor, pending_tokens: torch.Tensor, pending_count: torch.Tensor,
                            pending_feats: torch.Tensor, features: torch.Tensor) -> None:
    """The definition, in PyTorch (in place)."""
    accept = accept_len.long()
    rows = torch.arange(out_tokens.shape[0], device=out_tokens.device)
    tokens[:, 0] = out_tokens[rows, accept].to(tokens.dtype)
    cache_len.add_((accept + 1).to(cache_len.dtype))
    pending_tokens.copy_(out_tokens.clamp_min(0))
    pending_count.copy_(accept + 1)
    pending_feats.copy_(features)


def check_arguments(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats,
                    features) -> None:
    """Shapes, dtypes and devices as the module docstring says; raises ValueError naming the wrong one."""
    if out_tokens.dim() != 2:
        raise ValueError(f"advance_state: out_tokens must be [B, P]; got {tuple(out_tokens.shape)}")
    batch, slots = out_tokens.shape
    if features.dim() != 3 or tuple(features.shape[:2]) != (batch, slots):
        raise ValueError(f"advance_state: features must be [{batch}, {slots}, H]; got {tuple(features.shape)}")
    wanted = {"tokens": (tokens, (batch, 1)), "cache_len": (cache_len, (batch,)), "accept_len": (accept_len, (batch,)),
              "pending_tokens": (pending_tokens, (batch, slots)), "pending_count": (pending_count, (batch,)),
              "pending_feats": (pending_feats, tuple(features.shape))}
    for name, (value, shape) in wanted.items():
        if tuple(value.shape) != shape:
            raise ValueError(f"advance_state: {name} must be {list(shape)} for out_tokens {list(out_tokens.shape)}; "
                             f"got {list(value.shape)}")
        if value.device != out_tokens.device:
            raise ValueError(f"advance_state: {name} is on {value.device}, out_tokens on {out_tokens.device}")
    for name, value in (("out_tokens", out_tokens), ("tokens", tokens), ("cache_len", cache_len),
                        ("accept_len", accept_len), ("pending_tokens", pending_tokens), ("pending_count", pending_count)):
        if value.dtype not in _INTEGER:
            raise ValueError(f"advance_state: {name} must be int32 or int64; got {value.dtype}")
    if not (features.is_floating_point() and pending_feats.is_floating_point()):
        raise ValueError(f"advance_state: features and pending_feats must be floating; got {features.dtype}, "
                         f"{pending_feats.dtype}")


@torch.library.custom_op("specc::advance_state",
                         mutates_args=("tokens", "cache_len", "pending_tokens", "pending_count", "pending_feats"))
def advance_state(tokens: torch.Tensor, cache_len: torch.Tensor, out_tokens: torch.Tensor, accept_len: torch.Tensor,
                  pending_tokens: torch.Tensor, pending_count: torch.Tensor, pending_feats: torch.Tensor,
                  features: torch.Tensor) -> None:
    check_arguments(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats, features)
    if out_tokens.is_cuda and kernel_enabled():
        from specc.lowering.advance_state_triton import advance_state_triton

        advance_state_triton(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats,
                             features)
        return
    advance_state_reference(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats,
                            features)


@advance_state.register_fake
def _(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats, features) -> None:
    check_arguments(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats, features)
    return None
