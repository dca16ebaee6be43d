"""Checks of chapters 00-02 probed with honest mistakes: each wrong answer fails with a hint saying where to
look, each correct answer written differently passes."""
import linecache
import math
import os

import pytest
import torch

from minillm import grading


# --- ex01.1: counts kept in a small dtype overflow ------------------------------------------------------------

def _counts(ids, vocab_size, dtype=torch.long):
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.long), accumulate=True)
    return counts.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float16])
def test_bigram_counts_in_a_small_dtype_fail(dtype):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex01.1", lambda ids, vocab_size: _counts(ids, vocab_size, dtype))
    assert "repeated 3000 times" in str(failure.value) and "torch.long" in str(failure.value)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.float32, torch.float64])
def test_bigram_counts_in_a_wide_dtype_pass(dtype):
    grading.check("ex01.1", lambda ids, vocab_size: _counts(ids, vocab_size, dtype))


def test_bigram_counts_by_a_python_loop_pass():
    def loop(ids, vocab_size):
        counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
        for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()):
            counts[a, b] += 1
        return counts
    grading.check("ex01.1", loop)


# --- ex01.3: a merge on the text of the ids confuses 11, 2 with 1, 2 -------------------------------------------

def _merge_by_text(ids, pair, new_id):
    text = " ".join(map(str, ids)).replace(f"{pair[0]} {pair[1]}", str(new_id))
    return [int(part) for part in text.split()]


def _merge_by_delimited_text(ids, pair, new_id):   # right: delimiters on both sides, leftmost match first
    text = "," + ",".join(map(str, ids)) + ","
    while f",{pair[0]},{pair[1]}," in text:
        text = text.replace(f",{pair[0]},{pair[1]},", f",{new_id},", 1)
    return [int(part) for part in text.strip(",").split(",")] if text.strip(",") else []


def _merge_comparing_first_only(ids, pair, new_id):
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


@pytest.mark.parametrize("answer", [_merge_by_text, _merge_comparing_first_only])
def test_merge_pair_not_comparing_whole_ids_fails(answer):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex01.3", answer)
    assert "compare whole ids" in str(failure.value)


def test_merge_pair_on_delimited_text_passes():
    grading.check("ex01.3", _merge_by_delimited_text)


# --- ex01.5: exp without subtracting the max overflows on large logits ----------------------------------------

def _sample_unstable(logits, temperature, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    weights = torch.exp(logits / temperature)
    return torch.multinomial(weights / weights.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def _sample_unstable_double(logits, temperature, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    weights = torch.exp(logits.double() / temperature)
    return torch.multinomial(weights / weights.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("answer", [_sample_unstable, _sample_unstable_double])
def test_sampling_without_subtracting_the_max_fails(answer):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex01.5", answer)
    assert "logits in the thousands" in str(failure.value) and "max" in str(failure.value)


def _sample_stable_by_hand(logits, temperature, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    weights = torch.exp(scaled - scaled.max(dim=-1, keepdim=True).values)
    return torch.multinomial(weights / weights.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def _sample_gumbel(logits, temperature, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator).clamp_min(1e-20)
    return (logits / temperature - torch.log(-torch.log(uniform))).argmax(dim=-1)


def _sample_inverse_cdf(logits, temperature, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
    uniform = torch.rand(logits.shape[0], 1, generator=generator)
    return torch.searchsorted(cdf, uniform).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def _sample_power(logits, temperature, generator=None):   # softmax(l)^(1/T), renormalised by multinomial
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits, dim=-1) ** (1 / temperature)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("answer", [_sample_stable_by_hand, _sample_gumbel, _sample_inverse_cdf, _sample_power])
def test_sampling_written_differently_passes(answer):
    grading.check("ex01.5", answer)


# --- chapter 02 kernels ------------------------------------------------------------------------------------------

_SOFTMAX = '''
@triton.jit
def softmax_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_rows, n_cols, BLOCK_SIZE: tl.constexpr):
    first_row = tl.program_id(0)
    row_step = tl.num_programs(0)
    columns = tl.arange(0, BLOCK_SIZE)
    in_row = columns < n_cols
    row_max = tl.max(tl.load(in_ptr + first_row * in_row_stride + columns, mask=in_row,
                             other=-float("inf")).to(tl.float32), axis=0)
    for row in range(first_row, n_rows, row_step):
        x = tl.load(in_ptr + row * in_row_stride + columns, mask=in_row, other=-float("inf")).to(tl.float32)
        BODY
        result = numerator / tl.sum(numerator, axis=0)
        tl.store(out_ptr + row * out_row_stride + columns, result.to(out_ptr.dtype.element_ty), mask=in_row)
'''

_MATMUL = '''
@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    program = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_tile_m = (program // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (program % programs_per_group) % group_rows
    tile_n = (program % programs_per_group) // group_rows
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k_block * BLOCK_K
        LOADS
        accumulator = tl.dot(a, b, accumulator)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :] * stride_cn,
             accumulator.to(c_ptr.dtype.element_ty), mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))
'''


def _kernel(template: str, marker: str, code: str, name: str):
    """A kernel from a template, defined as a notebook cell defines it (its source findable by inspect)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    indent = template.split(marker)[0].rsplit("\n", 1)[1]
    source = template.replace(marker, code.replace("\n", "\n" + indent))
    filename = f"<probe-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {"triton": triton, "tl": tl}
    before = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():   # @triton.jit picks the interpreter when it decorates the kernel
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        exec(compile(source, filename, "exec"), namespace)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    return next(value for key, value in namespace.items() if key.endswith("_kernel"))


@pytest.mark.parametrize("body", [
    "numerator = tl.exp(x - row_max)",                                   # the max of the program's first row
])
def test_softmax_with_a_max_from_another_row_fails(body):
    kernel = _kernel(_SOFTMAX, "BODY", body, "stale-max")
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex02.3", kernel)
    assert "each row's own max" in str(failure.value)


@pytest.mark.parametrize("body", [
    "numerator = tl.exp(x - tl.max(x, axis=0))",
    "numerator = tl.exp2((x - tl.max(x, axis=0)) * 1.4426950408889634)",
    "numerator = tl.where(in_row, tl.exp(x - tl.max(x, axis=0)), 0.0)",
])
def test_softmax_written_differently_passes(body):
    grading.check("ex02.3", _kernel(_SOFTMAX, "BODY", body, "softmax-right"))


@pytest.mark.parametrize("loads", [
    "a = tl.load(a_ptrs, mask=ks[None, :] < k_left)\nb = tl.load(b_ptrs, mask=ks[:, None] < k_left)",
    "a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)\nb = tl.load(b_ptrs, ks[:, None] < k_left)",
    "a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=None)\nb = tl.load(b_ptrs, ks[:, None] < k_left, 0.0)",
])
def test_matmul_masked_loads_without_other_fail(loads):
    kernel = _kernel(_MATMUL, "LOADS", loads, "no-other")
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex02.4", kernel)
    assert "no other=" in str(failure.value)


@pytest.mark.parametrize("loads", [
    "a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)\nb = tl.load(b_ptrs, ks[:, None] < k_left, 0.0)",
    "a = tl.load(a_ptrs, mask=ks[None, :] < k_left)\na = tl.where(ks[None, :] < k_left, a, 0.0)\n"
    "b = tl.load(b_ptrs, mask=ks[:, None] < k_left)\nb = tl.where(ks[:, None] < k_left, b, 0.0)",
])
def test_matmul_loads_that_zero_the_lanes_past_k_pass(loads):
    grading.check("ex02.4", _kernel(_MATMUL, "LOADS", loads, "zeroed"))


def test_checks_stay_fast():
    import time
    start = time.perf_counter()
    grading.check("ex01.1", _counts)
    grading.check("ex01.5", _sample_stable_by_hand)
    assert time.perf_counter() - start < 4, "the chapter 01 checks should take well under 2 s each"
    assert math.isfinite(start)
