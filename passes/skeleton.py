"""Recognise the Llama skeleton in Dynamo's graph of `model(input_ids) -> logits`.

Looks for: the token input and its embedding; per layer the attention call (SDPA) with its
query, key and value, the q/k/v/o projections, the rotary cos/sin, the SwiGLU MLP and the
layer's residual output; the position source that feeds the rotary tables; the LM head and the
hidden state that enters it. Works on the graphs of HF `LlamaForCausalLM` and of specc's own
reference Llama, unchanged (the two spell GQA, masks and rotary differently).

Changes nothing. Invariant on success: one attention per layer, each with exactly one q, k and
v projection, one output projection and one MLP in order; every weight a graph input. Anything
else raises RecognitionError naming the node, and the backend falls back to the plain forward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from specc.passes.graph_utils import (
    EMBEDDING,
    LINEAR,
    SDPA,
    RecognitionError,
    ancestors_until,
    arg,
    calls,
    example_value,
    shape_of,
    users_until,
)


@dataclass
class LayerNodes:
    attention: fx.Node
    query: fx.Node  # rotated q [B, Hq, T, D]
    key: fx.Node  # rotated k [B, Hkv, T, D], before any GQA repeat
    value: fx.Node  # v [B, Hkv, T, D], before any GQA repeat
    q_proj: fx.Node
    k_proj: fx.Node
    v_proj: fx.Node
    o_proj: fx.Node
    gate_proj: fx.Node
    up_proj: fx.Node
    down_proj: fx.Node
    output: fx.Node  # residual stream after the MLP
    scale: float


@dataclass
class LlamaSkeleton:
    input_ids: fx.Node
    embedding: fx.Node
    layers: list[LayerNodes]
    positions: list[fx.Node]  # nodes holding positions [1, T] that feed the rotary tables
    logits: fx.Node
    final_hidden: fx.Node  # the input of the LM head
    sym_inputs: dict[fx.Node, int] = field(default_factory=dict)  # SymInt placeholder -> input dim
    weights: dict[fx.Node, torch.Tensor] = field(default_factory=dict)  # placeholder -> tensor
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0

    def summary(self) -> str:
        return (
            f"Llama skeleton: {len(self.layers)} layers, {self.n_heads} query / {self.n_kv_heads} KV heads, "
            f"head dim {self.head_dim}, hidden {self.hidden_size}, vocab {self.vocab_size}; "
            f"{len(self.positions)} position source(s), {len(self.weights)} weight inputs"
        )


def _is_linear(node: fx.Node) -> bool:
    return calls(node, LINEAR)


def _strip_gqa_repeat(node: fx.Node) -> fx.Node:
    """HF's repeat_kv is x[:, :, None].expand(...).reshape(...): return x, the per-KV-head tensor."""
    if node.op == "call_method" and node.target == "reshape":
        expanded = node.args[0]
        if isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand":
            indexed = expanded.args[0]
            if isinstance(indexed, fx.Node) and indexed.op == "call_function" and indexed.target is operator.getitem:
                index = indexed.args[1]
                if isinstance(index, tuple) and None in index:
                    return indexed.args[0]
    return node


def _single_linear_source(node: fx.Node, what: str) -> fx.Node:
    _, linears = ancestors_until(node, _is_linear)
    if len(linears) != 1:
        raise RecognitionError(node, f"expected the {what} to come from exactly one linear projection, found {len(linears)}")
    return linears.pop()


def _rotary_nodes(query: fx.Node) -> list[fx.Node]:
    visited, _ = ancestors_until(query, _is_linear)
    return [n for n in visited if calls(n, (torch.cos, torch.sin)) or calls(n, "cos") or calls(n, "sin")]


def _position_sources(rotary: list[fx.Node], seq_len) -> list[fx.Node]:
    """Follow each `arange` feeding the rotary tables forward to its [1, T] form."""
    sources: set[fx.Node] = set()
    for table in rotary:
        visited, _ = ancestors_until(table, lambda n: n.op == "placeholder")
        for node in visited:
            if not calls(node, (torch.arange,)):
                continue
            current = node
            while True:
                shape = shape_of(current)
                if shape is not None and len(shape) == 2 and shape[0] == 1 and str(shape[1]) == str(seq_len):
                    sources.add(current)
                    break
                next_users = [u for u in current.users if shape_of(u) is not None]
                # positions flow through `+ 0`, `unsqueeze(0)` and friends: one tensor user each
                if len(next_users) != 1 and not (
                    shape is not None and len(shape) == 1 and any(len(shape_of(u) or ()) == 2 for u in next_users)
                ):
                    break
                candidates = [u for u in next_users if len(shape_of(u) or ()) in (1, 2)]
                if not candidates:
                    break
                current = candidates[0]
    if not sources:
        raise RecognitionError(
            rotary[0] if rotary else None,
            "could not find the positions [1, T] (an arange) that the rotary cos/sin are computed from",
        )
    return sorted(sources, key=lambda n: n.name)


def _mlp_of(down: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """down_proj(silu(gate_proj(x)) * up_proj(x)) -> (gate, up), else None."""
    product = down.args[0]
    if not (isinstance(product, fx.Node) and (calls(product, "mul") or calls(product, (operator.mul, torch.mul)))):
        return None
    a, b = product.args[0], product.args[1]
    for activated, other in ((a, b), (b, a)):
        if (
            isinstance(activated, fx.Node)
            and (calls(activated, (torch.nn.functional.silu,)) or calls(activated, "silu"))
            and isinstance(activated.args[0], fx.Node)
            and _is_linear(activated.args[0])
            and isinstance(other, fx.Node)
            and _is_linear(other)
        ):
            return activated.args[0], other
    return None


def _residual_add(node: fx.Node) -> fx.Node:
    adds = [u for u in node.users if calls(u, (operator.add, torch.add)) or calls(u, "add")]
    if len(adds) != 1:
        raise RecognitionError(node, f"expected its output to be added to the residual stream once, found {len(adds)} adds")
    return adds[0]


def recognise_llama(gm: fx.GraphModule, example_inputs: list) -> LlamaSkeleton:
    """Find the Llama skeleton in `gm`; raises RecognitionError naming the node when it cannot."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise RecognitionError(None, f"{len(placeholders)} placeholders but {len(example_inputs)} example inputs")

    weights: dict[fx.Node, torch.Tensor] = {}
    token_inputs: list[fx.Node] = []
    sym_placeholders: list[fx.Node] = []
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.SymInt) or isinstance(example_value(node), torch.SymInt):
            sym_placeholders.append(node)
        elif isinstance(value, torch.nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name:
            weights[node] = value
        elif isinstance(value, torch.Tensor):
            token_inputs.append(node)
        else:
            raise RecognitionError(node, f"graph input of type {type(value).__name__} is not a tensor or size")
    if len(token_inputs) != 1:
        raise RecognitionError(
            token_inputs[1] if len(token_inputs) > 1 else None,
            f"expected one token input (input_ids), found {len(token_inputs)}: "
            f"{[n.name for n in token_inputs]}; call the model with input_ids only",
        )
    input_ids = token_inputs[0]
    ids_value = example_value(input_ids)
    if ids_value is None or ids_value.dtype not in (torch.int32, torch.int64) or ids_value.dim() != 2:
        raise RecognitionError(input_ids, "the token input must be an integer tensor [batch, seq_len]")
    batch_sym, seq_sym = ids_value.shape

    sym_inputs: dict[fx.Node, int] = {}
    for node in sym_placeholders:
        value = str(example_value(node))
        if value == str(batch_sym):
            sym_inputs[node] = 0
        elif value == str(seq_sym):
            sym_inputs[node] = 1
        else:
            raise RecognitionError(node, f"size input {value} is neither the batch nor the sequence length")

    embeddings = [n for n in graph.nodes if calls(n, EMBEDDING) and n.args[0] is input_ids]
    if len(embeddings) != 1:
        raise RecognitionError(input_ids, f"expected one embedding lookup of the tokens, found {len(embeddings)}")

    attentions = [n for n in graph.nodes if calls(n, SDPA)]
    if not attentions:
        raise RecognitionError(None, "no scaled_dot_product_attention call: not a Llama (or eager attention, which specc does not parse)")

    output_node = next(iter(graph.find_nodes(op="output")))
    outputs = output_node.args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != 1:
        raise RecognitionError(output_node, f"graph returns {len(outputs)} values; expected the logits alone (pass use_cache=False to HF models)")
    logits = outputs[0]
    if not _is_linear(logits):
        raise RecognitionError(logits, "the graph's output is not produced by a linear LM head")
    final_hidden = logits.args[0]

    downs = [n for n in graph.nodes if _is_linear(n) and _mlp_of(n) is not None]
    if len(downs) != len(attentions):
        culprit = attentions[len(downs)] if len(downs) < len(attentions) else downs[len(attentions)]
        raise RecognitionError(
            culprit,
            f"{len(attentions)} attention calls but {len(downs)} SwiGLU MLPs (down_proj(silu(gate_proj(x)) * up_proj(x))); "
            "every Llama layer has one of each",
        )

    layers: list[LayerNodes] = []
    rotary: list[fx.Node] = []
    for attention, down in zip(attentions, downs):
        if arg(attention, 3, "attn_mask") is None and not arg(attention, 5, "is_causal", False):
            raise RecognitionError(attention, "attention has neither a mask nor is_causal=True: not a causal LM")
        if arg(attention, 4, "dropout_p", 0.0) not in (0.0, 0):
            raise RecognitionError(attention, "attention dropout is on; put the model in eval mode")
        query = arg(attention, 0, "query")
        key = _strip_gqa_repeat(arg(attention, 1, "key"))
        value = _strip_gqa_repeat(arg(attention, 2, "value"))
        q_shape, k_shape = shape_of(query), shape_of(key)
        if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
            raise RecognitionError(attention, "query/key are not [batch, heads, seq, head_dim]")
        head_dim = int(q_shape[-1])
        scale = arg(attention, 6, "scale")
        scale = float(scale) if scale is not None else head_dim**-0.5
        _, o_projs = users_until(attention, _is_linear)
        if len(o_projs) != 1:
            raise RecognitionError(attention, f"attention output feeds {len(o_projs)} linears; expected one output projection")
        gate_up = _mlp_of(down)
        layers.append(
            LayerNodes(
                attention=attention,
                query=query,
                key=key,
                value=value,
                q_proj=_single_linear_source(query, "query"),
                k_proj=_single_linear_source(key, "key"),
                v_proj=_single_linear_source(value, "value"),
                o_proj=o_projs.pop(),
                gate_proj=gate_up[0],
                up_proj=gate_up[1],
                down_proj=down,
                output=_residual_add(down),
                scale=scale,
            )
        )
        tables = _rotary_nodes(query)
        if not tables:
            raise RecognitionError(query, "no rotary cos/sin found on the query's path")
        rotary.extend(tables)

    first = layers[0]
    n_heads, n_kv = int(shape_of(first.query)[1]), int(shape_of(first.key)[1])
    for index, layer in enumerate(layers):
        if (int(shape_of(layer.query)[1]), int(shape_of(layer.key)[1])) != (n_heads, n_kv):
            raise RecognitionError(layer.attention, f"layer {index} has a different head count from layer 0")
        if n_heads % n_kv:
            raise RecognitionError(layer.attention, f"{n_heads} query heads are not a multiple of {n_kv} KV heads")
    hidden_value = example_value(final_hidden)
    logits_value = example_value(logits)

    return LlamaSkeleton(
        input_ids=input_ids,
        embedding=embeddings[0],
        layers=layers,
        positions=_position_sources(rotary, seq_sym),
        logits=logits,
        final_hidden=final_hidden,
        sym_inputs=sym_inputs,
        weights=weights,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(shape_of(first.query)[-1]),
        hidden_size=int(hidden_value.shape[-1]),
        vocab_size=int(logits_value.shape[-1]),
    )
