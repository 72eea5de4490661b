"""The specc:: custom ops.

Each op file holds the reference implementation (the definition of right), the fake
implementation (shapes for tracing) and the registration; its generated Triton kernel sits
beside it in `<op>_triton.py`. Importing this package registers every op with torch.library.
This package imports nothing else of specc.
"""

from specc.lowering import kv_write, tree_attention, kv_write_attention, fused_linear, verify_greedy, commit_kv, verify_sampling, select_tree, sampling_ops, topk, advance_state  # noqa: F401  (registers the ops)
