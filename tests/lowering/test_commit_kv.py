"""specc::commit_kv: the reference against a plain Python loop, and the Triton kernel against the
reference (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.commit_kv import commit_kv_reference
from tests.lowering.interpreter import interpreted
from tests.strategies import tree_parents


def commit_loop(k_cache, v_cache, cache_len, path, accept_len):
    """The definition, one row at a time: read the accepted rows, then write them in order."""
    for cache in (k_cache, v_cache):
        for layer in range(cache.shape[0]):
            for b in range(cache.shape[1]):
                start, a = int(cache_len[b]), int(accept_len[b])
                rows = [cache[layer, b, :, start + int(path[b, j])].clone() for j in range(a + 1)]
                for j, row in enumerate(rows):
                    cache[layer, b, :, start + j] = row


@st.composite
def commit_cases(draw, max_layers: int = 3, max_batch: int = 3, max_nodes: int = 10):
    """Caches, cache lengths and accepted paths as verify_greedy makes them: for each sequence a
    random tree and a root-to-node path in it; the path's entries after accept_len are garbage
    the op must ignore (ints far out of range)."""
    layers, batch = draw(st.integers(1, max_layers)), draw(st.integers(1, max_batch))
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 4, 8, 16]))
    n = draw(st.integers(1, max_nodes))
    steps = draw(st.integers(1, n))  # P = max_depth + 1 <= N
    cache_len = draw(st.lists(st.integers(0, 12), min_size=batch, max_size=batch))
    paths, accept = [], []
    for _ in range(batch):
        parents = draw(tree_parents(min_nodes=n, max_nodes=n))
        end = draw(st.integers(0, n - 1))
        chain = [end]
        while parents[chain[-1]] >= 0:
            chain.append(parents[chain[-1]])
        chain = chain[::-1][:steps]
        garbage = draw(st.lists(st.sampled_from([0, -7, 10**6]), min_size=steps - len(chain), max_size=steps - len(chain)))
        paths.append(chain + garbage)
        accept.append(len(chain) - 1)
    size = max(cache_len) + n + draw(st.integers(0, 3))
    return (layers, batch, heads, size, head_dim), cache_len, paths, accept


def make_inputs(case, device="cpu", dtype=torch.float32, index_dtype=torch.int64, seed=0):
    shape, cache_len, paths, accept = case
    gen = torch.Generator().manual_seed(seed)
    # Random rows: a row left unwritten, or written from the wrong source, shows.
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return (k_cache, v_cache, torch.tensor(cache_len, dtype=index_dtype, device=device),
            torch.tensor(paths, device=device), torch.tensor(accept, device=device))


@settings(max_examples=80, deadline=None)
@given(case=commit_cases(), index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_reference_equals_row_by_row_loop(case, index_dtype):
    k_cache, v_cache, cache_len, path, accept = make_inputs(case, index_dtype=index_dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    commit_loop(want_k, want_v, cache_len, path, accept)
    commit_kv_reference(k_cache, v_cache, cache_len, path, accept)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_commit_moves_rows_and_leaves_the_rest():
    k_cache = torch.arange(16.0).reshape(1, 1, 1, 16, 1).repeat(2, 2, 1, 1, 1)
    v_cache = -k_cache
    cache_len, path, accept = torch.tensor([3, 5]), torch.tensor([[0, 2, 4, 0], [0, 1, 3, 6]]), torch.tensor([2, 3])
    torch.ops.specc.commit_kv(k_cache, v_cache, cache_len, path, accept)
    assert k_cache[0, 0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 7, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert k_cache[1, 1, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 11, 9, 10, 11, 12, 13, 14, 15]
    assert torch.equal(v_cache, -k_cache)


def test_op_checks_shapes_and_passes_opcheck():
    k_cache, v_cache = torch.randn(2, 2, 1, 8, 4), torch.randn(2, 2, 1, 8, 4)
    cache_len, path, accept = torch.tensor([1, 2]), torch.tensor([[0, 2, 3], [0, 1, 0]]), torch.tensor([2, 1])
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.specc.commit_kv(k_cache, v_cache[:1], cache_len, path, accept)
    with pytest.raises(ValueError, match="batch of 2"):
        torch.ops.specc.commit_kv(k_cache, v_cache, cache_len[:1], path, accept)
    torch.library.opcheck(torch.ops.specc.commit_kv.default, (k_cache, v_cache, cache_len, path, accept))


def check_kernel_against_reference(case, device: str, dtype, index_dtype) -> None:
    from specc.lowering.commit_kv_triton import commit_kv_triton

    k_cache, v_cache, cache_len, path, accept = make_inputs(case, device, dtype, index_dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    commit_kv_reference(want_k, want_v, cache_len, path, accept)
    commit_kv_triton(k_cache, v_cache, cache_len, path, accept)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), case


@settings(max_examples=30, deadline=None)
@given(case=commit_cases(), dtype=st.sampled_from([torch.float32, torch.float16]),
       index_dtype=st.sampled_from([torch.int32, torch.int64]))
def _kernel_property_in_interpreter(case, dtype, index_dtype):
    check_kernel_against_reference(case, "cpu", dtype, index_dtype)


@interpreted
def test_kernel_equals_reference_in_interpreter():
    _kernel_property_in_interpreter()
    # SmolLM2's cache layout (3 KV heads of 64), a depth-5 path with every row moving.
    case = ((2, 2, 3, 40, 64), [4, 9], [[0, 2, 7, 12, 19, 24], [0, 1, 3, 0, 0, 0]], [5, 2])
    check_kernel_against_reference(case, "cpu", torch.float16, torch.int32)
    from specc.lowering.commit_kv_triton import generated_sources

    assert any("STEPS = tl.constexpr(6)" in s and "HEAD_DIM = tl.constexpr(64)" in s for s in generated_sources().values())


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(case=commit_cases(max_nodes=26), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_kernel_equals_reference_on_gpu(case, dtype, index_dtype):
    check_kernel_against_reference(case, "cuda", dtype, index_dtype)


@pytest.mark.gpu
def test_kernel_moves_full_size_caches_on_gpu():
    # 30 layers x 8 sequences x 3 heads x 64 dims, 6-step paths: many warps per program, the
    # barrier between reads and writes is what keeps overlapping rows right.
    batch = 8
    paths = [[0] + sorted(torch.randperm(25)[:5].add(1).tolist()) for _ in range(batch)]
    case = ((30, batch, 3, 512, 64), [100 + 37 * b for b in range(batch)], paths, [5, 4, 3, 2, 1, 0, 5, 5])
    check_kernel_against_reference(case, "cuda", torch.bfloat16, torch.int64)
