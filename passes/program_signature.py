"""The program's interface: weights become attributes, sizes are read off the tokens.

Looks for the graph inputs Dynamo made: one per weight (parameters and buffers), one per
symbolic size, the tokens, and the inputs the earlier passes added. In their place: weights
are `get_attr` nodes of the program module (the user's own tensors, not copies), sizes are
`input_ids.size(d)`, and the inputs are exactly
    (input_ids, positions, cache_len, tree_mask, k_cache, v_cache)
The outputs become (logits, final_hidden, layer_0_output, ..., layer_{L-1}_output): the
hidden states a draft head reads (EAGLE: final_hidden; EAGLE-3: three layer outputs).
Invariant: those six inputs in that order, and no other placeholder.
"""

from __future__ import annotations

import torch
from torch import fx

from specc.passes.graph_utils import RecognitionError
from specc.passes.skeleton import LlamaSkeleton

PROGRAM_INPUTS = ("input_ids", "positions", "cache_len", "tree_mask", "k_cache", "v_cache")


def set_program_signature(gm: fx.GraphModule, skeleton: LlamaSkeleton) -> str:
    graph = gm.graph
    first_compute = next(n for n in graph.nodes if n.op != "placeholder")
    for index, (node, tensor) in enumerate(skeleton.weights.items()):
        attr = f"weight_{index}"
        if isinstance(tensor, torch.nn.Parameter):
            gm.register_parameter(attr, tensor)
        else:
            gm.register_buffer(attr, tensor, persistent=False)
        with graph.inserting_before(first_compute):
            fetched = graph.get_attr(attr)
        fetched.meta.update(node.meta)
        node.replace_all_uses_with(fetched)
        graph.erase_node(node)
    for node, dim in skeleton.sym_inputs.items():
        with graph.inserting_before(first_compute):
            size = graph.call_method("size", (skeleton.input_ids, dim))
        node.replace_all_uses_with(size)
        graph.erase_node(node)

    # keyed by target: the name a pass asked for (node names get deduplicated suffixes)
    placeholders = {n.target: n for n in graph.find_nodes(op="placeholder") if n is not skeleton.input_ids}
    placeholders["input_ids"] = skeleton.input_ids
    if set(placeholders) != set(PROGRAM_INPUTS):
        raise RecognitionError(None, f"unexpected program inputs {sorted(placeholders)}; expected {PROGRAM_INPUTS}")
    # Re-create the placeholders in the canonical order (FX orders inputs by node order).
    anchor = next(iter(graph.nodes))
    fresh = {}
    for name in PROGRAM_INPUTS:
        with graph.inserting_before(anchor):
            fresh[name] = graph.placeholder(name)
    for name in PROGRAM_INPUTS:
        old = placeholders[name]
        fresh[name].meta.update(old.meta)
        old.replace_all_uses_with(fresh[name])
        graph.erase_node(old)
    skeleton.input_ids = fresh["input_ids"]

    output_node = next(iter(graph.find_nodes(op="output")))
    layer_outputs = tuple(layer.output for layer in skeleton.layers)
    output_node.args = ((skeleton.logits, skeleton.final_hidden, *layer_outputs),)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return (
        f"bound {len(skeleton.weights)} weights as attributes, {len(skeleton.sym_inputs)} sizes read off input_ids; "
        f"inputs {PROGRAM_INPUTS}; outputs logits, final_hidden and {len(layer_outputs)} layer outputs"
    )
