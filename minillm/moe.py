"""A DeepSeekMoE layer: shared + fine-grained routed experts, a sigmoid router, balancing without a loss.

Taught in chapter 04 (mixture of experts). The layer replaces a GPT block's MLP
(`GPTConfig(moe=MoEConfig(...), n_dense_layers=...)`):

    output = shared_experts(x) + sum over the top_k chosen experts e of  gate_e(x) * expert_e(x)

- Router: affinity s_e = sigmoid(x . w_e). The top_k experts are chosen on s_e + bias_e, but the gate
  weights come from the *unbiased* s_e of the chosen experts, normalised to sum to 1, times route_scale.
  Optional group-limited routing first keeps the `top_groups` best of `n_groups` groups of experts.
- Auxiliary-loss-free balancing: after each optimizer step, `after_optimizer_step()` moves each expert's
  bias by -gamma if it got more than the mean load in that step, +gamma if less. An optional small
  sequence-wise balance loss (`aux_loss_weight`) is the classic alternative; both can be switched off.
- Dispatch: token-expert pairs are sorted by expert, the tokens gathered once, every expert runs on its
  contiguous slice (or all experts at once as one padded batched GEMM), and the weighted results are
  added back onto their tokens. `fused_dispatch` (the CPU default) does the same as one op with a
  hand-written backward and grouped matmuls (batched matmuls over rows padded per expert when the load is
  nearly even; on an AMD CPU with AVX-512 those padded products go to oneDNN where a timed trial found it
  faster, see `cpu_gemm`). `reference_moe_loop` (one token at a time) and `per_expert_mask_loop` (the loop
  most libraries start with) are the references it is tested and benchmarked against.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import os
import platform
import re
import threading
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import kernels

__all__ = ["MoEConfig", "MoE", "Routing", "route", "update_bias", "sort_by_expert", "sorted_dispatch",
           "run_experts_on_slices", "run_experts_grouped", "fused_dispatch", "reference_moe_loop",
           "per_expert_mask_loop",
           "sequence_balance_loss", "load_imbalance", "DISPATCH_KINDS", "PAD_LIMIT", "cpu_gemm",
           "using_cpu_gemm"]

DISPATCH_KINDS = ("auto", "fused", "triton", "grouped", "slices")


@dataclass
class MoEConfig:
    n_routed: int = 16             # fine-grained routed experts
    n_shared: int = 1              # always-on experts (run as one MLP n_shared times wider)
    top_k: int = 2                 # routed experts per token (with 1, the normalised gate weight is always
                                   # route_scale: the loss gives the router no gradient, as in DeepSeek-V3 and
                                   # transformers; only aux_loss_weight > 0 trains it then)
    expert_hidden: int = 64        # hidden width of each expert (SwiGLU)
    route_scale: float = 1.0       # gate weights sum to this (DeepSeek-V3: 2.5)
    n_groups: int = 1              # group-limited routing: experts split into n_groups groups ...
    top_groups: int = 1            # ... of which each token may use the best top_groups (1, 1 = off)
    bias_update_rate: float = 0.001  # gamma of the auxiliary-loss-free bias update; 0 turns it off
    aux_loss_weight: float = 0.0   # alpha of the sequence-wise balance loss; 0 turns it off
    dispatch: str = "auto"         # "fused" (grouped matmuls, hand-written backward), "triton" (the same
                                   # with minillm's Triton grouped-GEMM kernels: a GPU, or the interpreter),
                                   # "grouped" (one padded batched GEMM), "slices" (a loop over experts,
                                   # autograd), "auto" (fused on a CPU, grouped on a GPU unless the load is
                                   # very uneven)

    def __post_init__(self) -> None:
        from minillm.model import plain_number   # here, not at the top: minillm.model imports this module
        for field_ in dataclasses.fields(self):   # numpy numbers (a sweep over np.arange) become Python's
            setattr(self, field_.name, plain_number(getattr(self, field_.name)))
        for name in ("n_routed", "top_k", "expert_hidden", "n_groups", "top_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig: {name}={value!r} must be a positive integer")
        if isinstance(self.n_shared, bool) or not isinstance(self.n_shared, int) or self.n_shared < 0:
            raise ValueError(f"MoEConfig: n_shared={self.n_shared!r} must be an integer >= 0")
        if self.top_k > self.n_routed:
            raise ValueError(f"MoEConfig: top_k={self.top_k} exceeds n_routed={self.n_routed}; "
                             "a token cannot use more experts than exist")
        if self.n_routed % self.n_groups != 0:
            raise ValueError(f"MoEConfig: n_routed={self.n_routed} is not divisible by n_groups={self.n_groups}; "
                             "groups must have equal sizes")
        if self.top_groups > self.n_groups:
            raise ValueError(f"MoEConfig: top_groups={self.top_groups} exceeds n_groups={self.n_groups}")
        if self.top_k > self.top_groups * (self.n_routed // self.n_groups):
            raise ValueError(f"MoEConfig: top_k={self.top_k} experts do not fit in top_groups={self.top_groups} "
                             f"groups of {self.n_routed // self.n_groups}; raise top_groups or lower top_k")
        for name in ("route_scale", "bias_update_rate", "aux_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "route_scale" and value == 0):
                raise ValueError(f"MoEConfig: {name}={value!r} must be a finite number "
                                 f"{'> 0' if name == 'route_scale' else '>= 0 (0 turns it off)'}")
        if self.dispatch not in DISPATCH_KINDS:
            raise ValueError(f"MoEConfig: dispatch={self.dispatch!r} is unknown; choose one of "
                             f"{', '.join(map(repr, DISPATCH_KINDS))}")

    @property
    def active_experts(self) -> int:
        return self.n_shared + self.top_k


# ---- routing ---------------------------------------------------------------------------------------

class Routing(NamedTuple):
    expert_index: torch.Tensor   # (tokens, top_k) chosen experts
    gate_weight: torch.Tensor    # (tokens, top_k) their weights: normalised unbiased affinities * route_scale
    affinity: torch.Tensor       # (tokens, n_routed) sigmoid affinities, without the bias


def route(router_logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, route_scale: float = 1.0,
          n_groups: int = 1, top_groups: int = 1) -> Routing:
    """Choose top_k experts per token on sigmoid(logits) + bias; weigh them by the unbiased affinities."""
    if router_logits.dim() != 2:
        raise ValueError(f"route: router_logits must have shape (tokens, n_routed), got {tuple(router_logits.shape)}")
    for name, value in (("top_k", top_k), ("n_groups", n_groups), ("top_groups", top_groups)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):   # True would mean 1, 2.0 fail in topk
            raise TypeError(f"route: {name}={value!r} must be an integer (a number of experts or groups)")
    top_k, n_groups, top_groups = int(top_k), int(n_groups), int(top_groups)
    if not isinstance(route_scale, torch.Tensor) and (isinstance(route_scale, bool)
                                                       or not isinstance(route_scale, numbers.Real)
                                                       or not math.isfinite(route_scale) or route_scale <= 0):
        raise ValueError(f"route: route_scale={route_scale!r} must be a finite number > 0 (the gate weights' sum; "
                         f"1.0, or DeepSeek-V3's 2.5); a negative or NaN one would flip or erase the experts' outputs")
    n_routed = router_logits.shape[-1]
    if not 1 <= n_groups <= n_routed or n_routed % n_groups or not 1 <= top_groups <= n_groups:
        raise ValueError(f"route: n_groups={n_groups} must divide the {n_routed} experts and top_groups={top_groups} "
                         f"must be between 1 and n_groups")
    if not 1 <= top_k <= top_groups * (n_routed // n_groups):
        raise ValueError(f"route: top_k={top_k} must be between 1 and the {top_groups * (n_routed // n_groups)} "
                         f"experts a token may use ({n_routed} experts, top_groups={top_groups} of "
                         f"n_groups={n_groups})")
    if bias is not None and bias.numel() != n_routed:
        raise ValueError(f"route: bias has shape {tuple(bias.shape)}; pass one bias per expert ({n_routed})")
    # At least float32 (as DeepSeek does), float64 kept: a float64 router must stay exact (gradcheck).
    affinity = torch.sigmoid(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)))
    # The bias only steers the choice: it never enters the weights, so balancing does not distort outputs.
    choice = affinity.detach() if bias is None else affinity.detach() + bias.reshape(n_routed).to(affinity.dtype)
    if n_groups > 1:
        grouped = choice.view(-1, n_groups, n_routed // n_groups)
        # A group's score is the sum of its two best experts (one when groups hold a single expert).
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept_groups = group_score.topk(top_groups, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept_groups, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, n_routed)
    expert_index = choice.topk(top_k, dim=-1).indices
    chosen = affinity.gather(1, expert_index)
    # + 1e-20 (as transformers' DeepSeek-V3 does): a token whose chosen affinities all underflow to zero
    # (router logits below about -88) gets zero weights, so no routed output, rather than 0 / 0 = NaN.
    gate_weight = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * route_scale
    # Back to the logits' float dtype; integer logits keep the float weights (cast to int they would all be 0).
    if router_logits.is_floating_point():
        gate_weight = gate_weight.type_as(router_logits)
    return Routing(expert_index, gate_weight, affinity)


@torch.no_grad()
def update_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """The auxiliary-loss-free update: overloaded experts (above the mean load) -rate, underloaded +rate."""
    if isinstance(rate, torch.Tensor) and rate.numel() == 1:
        rate = rate.item()
    if isinstance(rate, torch.Tensor):   # one rate per expert
        bad = rate.is_complex() or not bool((torch.isfinite(rate) & (rate >= 0)).all())
    else:
        bad = isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or rate < 0
    if bad:
        raise ValueError(f"update_bias: rate={rate!r} must be a finite number >= 0 (gamma, e.g. 0.001); a negative "
                         f"rate would push load towards the busiest experts, a NaN one would erase the bias")
    if isinstance(rate, torch.Tensor) and rate.shape != bias.shape:
        raise ValueError(f"update_bias: rate has shape {tuple(rate.shape)} but bias has {tuple(bias.shape)}; pass one "
                         f"number, or one rate per expert shaped like the bias")
    tokens_per_expert = torch.as_tensor(tokens_per_expert, device=bias.device)   # a list of counts works too
    if tokens_per_expert.shape != bias.shape:
        raise ValueError(f"update_bias: tokens_per_expert has shape {tuple(tokens_per_expert.shape)} but bias has "
                         f"{tuple(bias.shape)}; pass one count per expert")
    load = tokens_per_expert.float()
    if load.numel() and not bool((load >= 0).all()):   # NaN fails too
        raise ValueError(f"update_bias: tokens_per_expert={tokens_per_expert.tolist()} holds a negative or NaN "
                         f"count; pass how many tokens each expert received")
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)


def load_imbalance(tokens_per_expert: torch.Tensor) -> float:
    """max / mean tokens per expert: 1.0 is perfectly balanced, n_routed/top_k means total collapse."""
    load = torch.as_tensor(tokens_per_expert).float()
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else float("nan")


def sequence_balance_loss(affinity: torch.Tensor, expert_index: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, alpha * sum_e f_e * P_e averaged over sequences.

    f_e = n_routed / (top_k * T) * (tokens of the sequence routed to e); P_e = mean over the sequence of the
    affinities normalised per token. Perfect balance gives alpha * 1 (with uniform affinities).
    """
    if affinity.dim() != 2:
        raise ValueError(f"sequence_balance_loss: affinity must be (tokens, n_routed), got {tuple(affinity.shape)}")
    tokens, n_routed = affinity.shape
    if expert_index.dim() != 2 or expert_index.shape[0] != tokens:
        raise ValueError(f"sequence_balance_loss: expert_index must be (tokens, top_k) with tokens={tokens}, got "
                         f"{tuple(expert_index.shape)}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1 or tokens % batch:
        raise ValueError(f"sequence_balance_loss: batch={batch!r} must be a positive integer dividing the {tokens} "
                         f"tokens (the rows of affinity are batch sequences of equal length, one after another)")
    if not isinstance(alpha, torch.Tensor) and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                                                 or not math.isfinite(alpha) or alpha < 0):
        raise ValueError(f"sequence_balance_loss: alpha={alpha!r} must be a finite number >= 0 (e.g. 0.0001); a "
                         f"negative one would reward imbalance")
    top_k, batch = expert_index.shape[-1], int(batch)
    length = tokens // batch
    if length == 0:   # empty sequences: nothing to balance (and no 0 / 0)
        return affinity.sum() * 0.0
    chosen = torch.zeros_like(affinity).scatter_(1, expert_index.long(), 1.0).view(batch, length, n_routed)
    fraction = chosen.sum(dim=1) * n_routed / (top_k * length)
    normalised = affinity / (affinity.sum(dim=-1, keepdim=True) + 1e-20)   # as in route: no 0 / 0
    probability = normalised.view(batch, length, n_routed).mean(dim=1)
    return alpha * (fraction * probability).sum(dim=-1).mean()


# ---- dispatch ---------------------------------------------------------------------------------------

def sort_by_expert(expert_index: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order of the flattened (token, slot) pairs sorted by expert, each pair's token, tokens per expert."""
    if expert_index.dim() != 2:   # (tokens,) would make every pair token 0's: pair // top_k needs the top_k
        raise ValueError(f"sort_by_expert: expert_index must have shape (tokens, top_k), got "
                         f"{tuple(expert_index.shape)}; for one expert per token use expert_index.unsqueeze(1)")
    flat = expert_index.reshape(-1)
    order = flat.argsort(stable=True)
    token_of_pair = order // expert_index.shape[-1]
    try:
        counts = torch.bincount(flat, minlength=n_experts)
    except RuntimeError as error:   # a negative or non-integer id
        raise ValueError(f"sort_by_expert: expert_index must hold integer expert ids 0 to {n_experts - 1} "
                         f"({error})") from error
    if counts.numel() != n_experts:
        raise ValueError(f"sort_by_expert: expert_index holds ids up to {counts.numel() - 1}, but there are "
                         f"{n_experts} experts (ids 0 to {n_experts - 1})")
    return order, token_of_pair, counts


def sorted_dispatch(x: torch.Tensor, expert_index: torch.Tensor, gate_weight: torch.Tensor,
                    run_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_experts: int) -> torch.Tensor:
    """Sum over chosen experts of gate * expert(x), for x (tokens, d), without a loop over tokens.

    run_experts(x_sorted, counts) gets the tokens sorted by expert (counts[e] rows for expert e, in
    order) and returns each row's expert output in the same order.
    """
    if x.dim() != 2 or expert_index.dim() != 2 or gate_weight.shape != expert_index.shape \
            or x.shape[0] != expert_index.shape[0]:
        raise ValueError(f"sorted_dispatch: expected x (tokens, d), expert_index and gate_weight (tokens, top_k); "
                         f"got {tuple(x.shape)}, {tuple(expert_index.shape)}, {tuple(gate_weight.shape)}")
    order, token_of_pair, counts = sort_by_expert(expert_index, n_experts)
    outputs = run_experts(x.index_select(0, token_of_pair), counts)
    weighted = outputs * gate_weight.reshape(-1).index_select(0, order).unsqueeze(-1).to(outputs.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, weighted.to(x.dtype))


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def run_experts_on_slices(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor,
                          w_down: torch.Tensor) -> torch.Tensor:
    """Each expert on its contiguous slice of the sorted tokens: one loop over experts, none over tokens."""
    sizes = counts.tolist()
    # unbind, not w[e] per expert: the backward of w[e] writes a zero gradient the size of all experts.
    gate_ups, downs = w_gate_up.unbind(0), w_down.unbind(0)
    parts = [_swiglu(part, gate_ups[e], downs[e])
             for e, part in enumerate(x_sorted.split(sizes)) if sizes[e] > 0]
    if not parts and gate_ups:   # no tokens: an expert on zero rows, so the weights get zero gradients, not None
        parts = [_swiglu(x_sorted[:0], gate_ups[0], downs[0])]
    return torch.cat(parts) if parts else x_sorted.new_zeros(0, w_down.shape[-1])


def run_experts_grouped(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor,
                        w_down: torch.Tensor) -> torch.Tensor:
    """All experts in two batched matmuls: each expert's slice is padded to the busiest expert's count.

    A fixed number of operations whatever the number of experts (what a grouped GEMM kernel does on a
    GPU, here with zero padding); the padding is wasted work when the load is uneven.
    """
    n_experts, width = counts.numel(), x_sorted.shape[-1]
    capacity = int(counts.max()) if x_sorted.shape[0] else 0
    # index_copy and index_select (rather than advanced indexing) keep the backward pass to cheap index ops.
    slot = _padded_slots(counts, capacity, x_sorted.shape[0])
    padded = x_sorted.new_zeros(n_experts * capacity, width).index_copy(0, slot, x_sorted)
    gate, up = torch.bmm(padded.view(n_experts, capacity, width), w_gate_up).chunk(2, dim=-1)
    output = torch.bmm(F.silu(gate) * up, w_down)
    return output.reshape(n_experts * capacity, w_down.shape[-1]).index_select(0, slot)


# torch.nn.functional.grouped_mm (torch >= 2.8 or so; older releases have it as torch._grouped_mm): one call
# multiplies each expert's slice of rows by that expert's matrix, looping over the experts in C++.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_fits(*tensors: torch.Tensor) -> bool:
    """grouped_mm takes float32/bf16/fp16 with every non-unit stride and the start a multiple of 16 bytes."""
    if _GROUPED_MM is None:
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.data_ptr() % 16:
            return False
        if any(stride != 1 and (stride * t.element_size()) % 16 for stride in t.stride()):
            return False
    return True


def _padded_slots(counts: torch.Tensor, capacity: int, rows: int) -> torch.Tensor:
    """For rows sorted by expert (counts[e] of expert e), each row's slot when every expert's group is padded
    to `capacity` rows: row r of expert e goes to e * capacity + r."""
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                            output_size=rows)
    starts = torch.cumsum(counts, 0) - counts
    return expert_of_row * capacity + torch.arange(rows, device=counts.device) - starts[expert_of_row]


def _rows_aligned_like(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped, typed and placed like the 2-D `like`, its row stride a multiple of 16
    bytes (grouped_mm's rule)."""
    per_16_bytes = max(16 // like.element_size(), 1)
    rows, cols = like.shape
    stride = -(-cols // per_16_bytes) * per_16_bytes
    return like.new_empty(rows, stride)[:, :cols]


def _expert_slices(sizes: list[int]):
    """(expert, its rows) for every expert with rows, in the sorted order of sort_by_expert."""
    start = 0
    for e, size in enumerate(sizes):
        if size:
            yield e, slice(start, start + size)
        start += size


# Padding every expert's rows to the busiest expert's count turns each grouped matmul into one torch.bmm. On a
# CPU that gives each thread whole experts to multiply, where the loop of grouped_mm splits every small matmul
# over the threads and waits for them at each one; with an even load (what the bias balancing brings about)
# the batched form is the faster one (`python -m minillm.bench moe` measures the layer). The padded rows are
# wasted work, so the layout pads only while they stay under this fraction of the real rows.
PAD_LIMIT = 1 / 8


class _Layout(NamedTuple):
    """Where the N (token, slot) pairs sit as matmul rows: grouped by expert, optionally padded per expert."""
    token_of_row: torch.Tensor          # (rows,) the token whose input each row holds (pad rows: token 0, zeroed)
    row_of_pair: torch.Tensor           # (N,) the row of each (token, slot) pair, in (token, slot) order
    pad_rows: torch.Tensor | None       # the padded rows, or None when there are none
    sizes: list[int]                    # pairs per expert
    offs: torch.Tensor                  # int32 end row of each expert's group (grouped_mm's offsets)
    capacity: int | None                # rows per expert when padded (then rows = n_experts * capacity)
    padding: float                      # rows the padding adds, as a fraction of N (0 if N = 0)


def _pair_layout(expert_index: torch.Tensor, n_experts: int, pad: bool, granule: int = 1) -> _Layout:
    """The pairs sorted by expert; padded to the busiest expert's count when `pad` and the padding is small,
    that count rounded up to a multiple of `granule` rows where the rounding keeps within PAD_LIMIT."""
    order, token_of_pair, counts = sort_by_expert(expert_index, n_experts)
    sizes = counts.tolist()
    pairs, busiest = order.numel(), max(sizes, default=0)
    capacity = -(-busiest // granule) * granule
    if pairs and (n_experts * capacity - pairs) / pairs > PAD_LIMIT:
        capacity = busiest
    sorted_row = torch.arange(pairs, device=order.device)
    padding = (n_experts * capacity - pairs) / pairs if pairs else 0.0
    padded = pad and pairs > 0 and padding <= PAD_LIMIT
    token_of_row, pad_rows = token_of_pair, None
    if padded:
        sorted_row = _padded_slots(counts, capacity, pairs)
        rows = n_experts * capacity
        token_of_row = token_of_pair.new_zeros(rows).scatter_(0, sorted_row, token_of_pair)
        if rows > pairs:
            is_pad = torch.ones(rows, dtype=torch.bool, device=order.device).index_fill_(0, sorted_row, False)
            pad_rows = is_pad.nonzero().squeeze(1)
    # The inverse permutation, (token, slot) -> row. scatter_ and index_select rather than indexing with a tensor
    # (x[order]): on a CPU those are several times faster for the same result.
    row_of_pair = torch.empty_like(order).scatter_(0, order, sorted_row)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return _Layout(token_of_row, row_of_pair, pad_rows, sizes, offs, capacity if padded else None, padding)


# Which library multiplies float32 matrices on a CPU. PyTorch's x86 wheels do it with Intel's MKL, which takes
# its AVX-512 code only on Intel CPUs: on an AMD CPU with AVX-512 (Zen 4 and later) it runs narrower code, which
# may be below what the chip can reach. oneDNN, the other matrix library inside the same wheels, picks its
# code from the CPU's features, whoever made it. Which is faster there is measured, not assumed (see
# ONEDNN_TRIAL_SHAPE); `python -m minillm.bench moe` prints the experts' matmuls done both ways.
CPU_GEMM_ENV = "MINILLM_CPU_GEMM"
CPU_GEMM_CHOICES = ("auto", "onednn", "blas")


def _onednn_linear():
    """oneDNN's float32 inner product as PyTorch exposes it to its compiler (x @ w^T), or None without it.
    The overload itself (.default), not the packet: a packet call first picks its overload from the arguments,
    a fixed cost on top of oneDNN's own, and the dispatch calls it once per expert per product."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def _mkl_skips_avx512(machine: str, capability: str, build_config: str, vendor: str) -> bool:
    """True for an x86 CPU with AVX-512 that Intel did not make, when torch multiplies float32 with MKL."""
    # "AMD(?!64)": Windows' platform.processor() falls back to the machine name "AMD64" on Intel CPUs too.
    return (machine.lower() in ("x86_64", "amd64") and capability.upper().startswith("AVX512")
            and "BLAS_INFO=mkl" in build_config and bool(vendor) and "GenuineIntel" not in vendor
            and re.search(r"AMD(?!64)|Hygon", vendor) is not None)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            match = re.search(r"^vendor_id\s*:\s*(\S+)", file.read(), re.MULTILINE)
        if match:
            return match.group(1)
    except (OSError, ValueError):
        pass
    try:
        return platform.processor() or ""   # Windows: "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD"
    except Exception:   # an odd platform: no vendor, so no oneDNN by default
        return ""


@functools.lru_cache(maxsize=None)
def _blas_skips_avx512() -> bool:
    """This machine and torch build: see _mkl_skips_avx512 (False where torch has no oneDNN)."""
    try:
        return _onednn_linear() is not None and _mkl_skips_avx512(
            platform.machine(), torch.backends.cpu.get_cpu_capability(), torch.__config__.show(), _cpu_vendor())
    except Exception:   # a torch or platform without one of these: the BLAS of torch.bmm, as before
        return False


# Under "auto", an expert's product smaller than this many multiply-adds stays on torch.bmm: oneDNN is called
# once per expert, and below about this size that per-call cost outweighs its faster kernel (a model with many
# small experts ran 5 to 50 times slower with oneDNN than with one torch.bmm).
ONEDNN_MIN_WORK = 1 << 23
_CPU_GEMM_BLOCKS = threading.local()   # .chosen: the choices of this thread's `using_cpu_gemm` blocks, innermost last


def _cpu_gemm_chosen() -> list[str]:
    if not hasattr(_CPU_GEMM_BLOCKS, "chosen"):
        _CPU_GEMM_BLOCKS.chosen = []
    return _CPU_GEMM_BLOCKS.chosen


def _cpu_gemm_setting() -> str:
    """What this thread asks for: its innermost `using_cpu_gemm` block's choice, else MINILLM_CPU_GEMM, else
    "auto"."""
    chosen = _cpu_gemm_chosen()
    if chosen:
        return chosen[-1]
    choice = os.environ.get(CPU_GEMM_ENV, "auto").strip().lower() or "auto"
    if choice not in CPU_GEMM_CHOICES:
        raise ValueError(f"{CPU_GEMM_ENV}={os.environ[CPU_GEMM_ENV]!r} is not one of "
                         f"{', '.join(CPU_GEMM_CHOICES)}; unset it (auto) or choose onednn or blas")
    return choice


def cpu_gemm(work: int | None = None) -> str:
    """The library the MoE's fused dispatch multiplies float32 expert rows with on a CPU: "onednn" or "blas".

    Inside `with using_cpu_gemm(...)` (in this thread) that block's choice; else MINILLM_CPU_GEMM=onednn or =blas
    if set; else "auto": oneDNN only where MKL would skip the CPU's AVX-512 (an AMD CPU) and oneDNN is enabled
    (torch.backends.mkldnn.enabled), the BLAS of torch.bmm elsewhere; and, given `work` (the multiply-adds of
    one expert's product), only from ONEDNN_MIN_WORK up, and only if oneDNN did the dispatch's products at least
    ONEDNN_MIN_GAIN times as fast as torch.bmm when this process timed both (`cpu_gemm_trial`). A chosen "onednn"
    takes every size.
    """
    choice = _cpu_gemm_setting()
    if choice == "auto":
        if work is not None and work < ONEDNN_MIN_WORK or not _blas_skips_avx512() \
                or not torch.backends.mkldnn.enabled:
            return "blas"
        trial = cpu_gemm_trial()
        return "onednn" if trial is not None and trial["onednn"] * ONEDNN_MIN_GAIN <= trial["blas"] else "blas"
    if choice == "onednn" and _onednn_linear() is None:
        raise ValueError(f"{CPU_GEMM_ENV}=onednn, but this torch build has no oneDNN (torch.backends.mkldnn); "
                         "unset it or choose blas")
    return choice


# Under "auto" the CPU's maker only says that oneDNN *may* be faster: on a core that runs AVX-512 at full width
# it is, but where the core splits each 512-bit instruction into two 256-bit halves, MKL's AVX2 code keeps up,
# and oneDNN's cost per call (one call per expert) and the copies its weight gradient needs tip it the other way.
# So the first time "auto" would pick oneDNN, the process times the fused dispatch's six expert products at
# this size both ways (experts, rows per expert, model width, expert hidden width: the bench's proportions)
# and keeps oneDNN only if it was at least ONEDNN_MIN_GAIN times as fast: a timing on a busy machine wobbles,
# and torch's own BLAS is the default everywhere else.
ONEDNN_TRIAL_SHAPE = (8, 1024, 256, 64)
ONEDNN_MIN_GAIN = 1.1
ONEDNN_TRIAL_ROUNDS = 3


def _six_products(xs: torch.Tensor, a: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                  w1: torch.Tensor, w2: torch.Tensor, layout: _Layout) -> None:
    """The expert matmuls of one fused forward+backward on rows already in `layout` (what _FusedExperts does
    besides routing, gathering and summing): gate/up and down forward, then each one's input and weight
    gradients. xs (rows, d), a (rows, hidden), grad_y (rows, d), grad_h (rows, 2 * hidden)."""
    with torch.no_grad():
        _rows_mm(xs, w1, layout)
        _rows_mm(a, w2, layout)
        _rows_mm(grad_y, w2.transpose(1, 2), layout)
        _weight_mm(a, grad_y, layout)
        _rows_mm(grad_h, w1.transpose(1, 2), layout)
        _weight_mm(xs, grad_h, layout)


def _even_layout(n_experts: int, capacity: int) -> _Layout:
    """Rows already grouped by expert, `capacity` real rows each: a padded layout with no padding."""
    pairs = n_experts * capacity
    rows = torch.arange(pairs)
    offs = torch.arange(1, n_experts + 1, dtype=torch.int32) * capacity
    return _Layout(rows, rows, None, [capacity] * n_experts, offs, capacity, 0.0)


@functools.lru_cache(maxsize=None)
def _timed_trial(threads: int) -> dict[str, float] | None:
    from minillm.cost import best_seconds_interleaved   # minillm.cost is the course's one meter

    def trial():
        n_experts, capacity, width, hidden = ONEDNN_TRIAL_SHAPE
        generator = torch.Generator().manual_seed(0)
        rows = n_experts * capacity
        xs, a, grad_y, grad_h = (torch.randn(rows, size, generator=generator, device="cpu", dtype=torch.float32)
                                 for size in (width, hidden, width, 2 * hidden))
        w1, w2 = (torch.randn(*shape, generator=generator, device="cpu", dtype=torch.float32) * 0.05
                  for shape in ((n_experts, width, 2 * hidden), (n_experts, hidden, width)))
        layout = _even_layout(n_experts, capacity)
        products = functools.partial(_six_products, xs, a, grad_y, grad_h, w1, w2, layout)
        return best_seconds_interleaved({choice: _with_cpu_gemm(products, choice) for choice in ("onednn", "blas")},
                                        device="cpu", repeats=ONEDNN_TRIAL_ROUNDS)

    # Outside any dispatch mode the caller is in (a FlopCounterMode around the first forward, say), so the trial's
    # products are counted nowhere. A private helper of torch's, so without it the trial runs where it is.
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:
        _disable_current_modes = contextlib.nullcontext
    try:
        with _disable_current_modes(), torch.inference_mode():
            seconds = trial()
    except (RuntimeError, ValueError):   # oneDNN refused a product: torch.bmm, as without it
        return None
    return {name: value * 1e3 for name, value in seconds.items()}


def cpu_gemm_trial() -> dict[str, float] | None:
    """The timing behind "auto" on a CPU where MKL skips AVX-512: {"onednn": ms, "blas": ms}, the best of
    ONEDNN_TRIAL_ROUNDS alternating runs of the fused dispatch's six expert products at ONEDNN_TRIAL_SHAPE with
    each library, taken once per process and torch thread count when first needed. None on any other machine
    (there "auto" is torch.bmm's BLAS without a trial) or where oneDNN refused the trial."""
    if not _blas_skips_avx512():
        return None
    trial = _timed_trial(torch.get_num_threads())
    return None if trial is None else dict(trial)   # a copy: the kept timing is not the caller's to change


@contextlib.contextmanager
def using_cpu_gemm(choice: str):
    """Within the block, the fused dispatch multiplies with `choice` on a CPU: "onednn", "blas" or "auto".

    For comparing the two on one machine: `with using_cpu_gemm("blas"): layer(x).sum().backward()`. The block
    holds for its own thread, like torch.no_grad, and a forward run inside it keeps its choice for its backward.
    """
    if not isinstance(choice, str) or choice.strip().lower() not in CPU_GEMM_CHOICES:
        raise ValueError(f"using_cpu_gemm: {choice!r} is not one of {', '.join(CPU_GEMM_CHOICES)}")
    chosen = _cpu_gemm_chosen()
    chosen.append(choice.strip().lower())
    try:
        if chosen[-1] == "onednn":
            cpu_gemm()   # on a torch without oneDNN: the clear error now, not a silent fallback later (no trial)
        yield
    finally:
        chosen.pop()


def _with_cpu_gemm(step: Callable[[], object], choice: str) -> Callable[[], None]:
    """`step` as a function that runs it inside `using_cpu_gemm(choice)`: for timing one library against another."""
    def run():
        with using_cpu_gemm(choice):
            step()
    return run


# oneDNN builds a primitive for each matrix shape it meets and keeps it for reuse; building one can cost as
# much as an expert's product at the sizes where the dispatch uses oneDNN. In training the routing changes
# every step, and with it the busiest expert's count: padding to exactly that count, the six products would
# meet new shapes step after step. Rounded up to a multiple of a granule, a few shapes recur.
# The granule is a power of two at most an expert's average rows / ONEDNN_ROWS_PER_GRANULE, so the rounding
# adds under 1/ONEDNN_ROWS_PER_GRANULE of the rows (16 rows at 16 experts of the bench's 2048 tokens x top-8).
# `python -m minillm.bench moe` times training-like steps (new tokens each) with and without the rounding.
ONEDNN_ROWS_PER_GRANULE = 64


def _row_granule(dtype: torch.dtype, device: torch.device, inner: int, width: int, n_experts: int,
                 pairs: int) -> int:
    """The multiple the padded rows per expert are rounded up to: where oneDNN would multiply them (float32 on a
    CPU, an expert's average rows times (inner, width) from ONEDNN_MIN_WORK up, `cpu_gemm`) the largest power of
    two up to the average rows / ONEDNN_ROWS_PER_GRANULE, else 1 (the busiest expert's exact count)."""
    if device.type != "cpu" or dtype != torch.float32 or not n_experts or not pairs:
        return 1
    average = -(-pairs // n_experts)
    if cpu_gemm(average * inner * width) != "onednn":
        return 1
    return 1 << max((average // ONEDNN_ROWS_PER_GRANULE).bit_length() - 1, 0)


def _onednn_takes(rows: int, inner: int, width: int, *operands: torch.Tensor, share: int = 1) -> bool:
    """Whether oneDNN multiplies these float32 CPU operands, (rows, inner) by (inner, width) per expert, inside the
    fused dispatch's forward or backward (no autograd graph to build); `share`: count 1/share of the work."""
    work = rows * inner * width
    return (work > 0 and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in operands)
            and not torch.is_grad_enabled() and cpu_gemm(work // share) == "onednn")


def _onednn_rows_mm(a: torch.Tensor, b: torch.Tensor, capacity: int) -> torch.Tensor | None:
    """The padded rows product with oneDNN, one inner product per expert; None where it does not apply."""
    n_experts, inner, width = b.shape
    if not _onednn_takes(capacity, inner, width, a, b):
        return None
    linear = _onednn_linear()
    weights = b.transpose(1, 2)                # an inner product takes w as (out, in): x @ w^T
    if not weights[0].is_contiguous():
        weights = weights.contiguous()         # one copy of the small weight stack, not one per expert
    out = a.new_empty(a.shape[0], width)
    try:
        for e in range(n_experts):
            rows = slice(e * capacity, (e + 1) * capacity)
            out[rows] = linear(a[rows], weights[e], None, "none", [], "")
    except RuntimeError:   # a shape or layout this oneDNN refuses: torch.bmm does it
        return None
    return out


def _onednn_weight_mm(a: torch.Tensor, c: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor | None:
    """The padded weight gradients a[rows of e]^T c[rows of e] with oneDNN's inner-product backward-weights
    primitive, which reads both operands row by row (an inner product on the transposes would copy them)."""
    inner, width = a.shape[1], c.shape[1]
    # half the work counted: two to_mkldnn copies and a to_dense per expert on top of the product
    if not _onednn_takes(capacity, inner, width, a, c, share=2):
        return None
    try:
        backward_weights = torch.ops.aten.mkldnn_linear_backward_weights.default   # the overload: see _onednn_linear
        # Only its size and type are read: the result's (K, M). A plain tensor, so the result comes back plain.
        shape = a.new_empty(inner, width)
        out = []
        for e in range(n_experts):
            rows = slice(e * capacity, (e + 1) * capacity)
            # As if a were a layer's output gradient and c its input: grad_weight = a^T c, already (K, M).
            grad = backward_weights(a[rows].to_mkldnn(), c[rows].to_mkldnn(), shape, False)[0]
            out.append(grad.to_dense() if grad.is_mkldnn else grad)
        return torch.stack(out)
    except (AttributeError, RuntimeError, NotImplementedError):   # a torch without this op: torch.bmm does it
        return None


def _rows_mm(a: torch.Tensor, b: torch.Tensor, layout: _Layout, kernels_backend: str | None = None) -> torch.Tensor:
    """Rows of a (N, K) grouped by expert, times that expert's b[e] (K, M): (N, M)."""
    if layout.capacity is not None:
        if kernels_backend is None:
            out = _onednn_rows_mm(a, b, layout.capacity)
            if out is not None:
                return out
        return torch.bmm(a.unflatten(0, (b.shape[0], layout.capacity)), b).flatten(0, 1)
    if kernels_backend is not None:   # minillm's Triton grouped GEMM (chapter 02's kernel dispatch)
        return kernels.grouped_matmul(a, b, layout.offs, backend=kernels_backend)
    if a.shape[0] and _grouped_mm_fits(a, b):
        try:
            return _GROUPED_MM(a, b, offs=layout.offs)
        except (RuntimeError, TypeError, ValueError):   # a layout, dtype or GPU this build refuses: the loop works
            pass
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, rows in _expert_slices(layout.sizes):
        torch.mm(a[rows], b[e], out=out[rows])
    return out


def _weight_mm(a: torch.Tensor, c: torch.Tensor, layout: _Layout, kernels_backend: str | None = None) -> torch.Tensor:
    """Per expert e, a[rows of e]^T @ c[rows of e]: the (n_experts, K, M) weight gradient; zero for idle experts."""
    n_experts = len(layout.sizes)
    if layout.capacity is not None:   # padded rows are zero in both a and c, so they add nothing
        out = _onednn_weight_mm(a, c, n_experts, layout.capacity) if kernels_backend is None else None
        if out is None:
            a, c = a.unflatten(0, (n_experts, layout.capacity)), c.unflatten(0, (n_experts, layout.capacity))
            # Straight into the weight's layout: (c^T a)^T would need a copy to make it contiguous (autograd
            # stores .grad in the weight's strides), and measured slower at every size of the moe bench.
            out = torch.bmm(a.transpose(1, 2), c)
        idle = [e for e, size in enumerate(layout.sizes) if size == 0]
        if idle:   # all padding: zero, even where the expert's weights hold an inf or NaN (0 * inf is NaN)
            out.index_fill_(0, torch.tensor(idle, device=out.device), 0)
        return out
    if kernels_backend is not None:
        return kernels.grouped_weight_grad(a, c, layout.offs, backend=kernels_backend)
    if a.shape[0] and _grouped_mm_fits(a, c):
        try:
            return _GROUPED_MM(a.t(), c, offs=layout.offs)
        except (RuntimeError, TypeError, ValueError):
            pass
    out = a.new_zeros(n_experts, a.shape[1], c.shape[1])
    for e, rows in _expert_slices(layout.sizes):
        torch.mm(a[rows].t(), c[rows], out=out[e])
    return out


def _sum_over_pairs(rows: torch.Tensor, pair_of_slot: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """out[t] = sum over s of rows[pair_of_slot[t, s]]: every token's top_k rows summed by one gather-sum
    (embedding_bag), where index_add_ would scatter."""
    if tokens == 0:
        return rows.new_zeros(0, rows.shape[-1])
    try:
        return F.embedding_bag(pair_of_slot.view(tokens, top_k), rows, mode="sum")
    except (RuntimeError, NotImplementedError):   # a device without embedding_bag (Apple's mps, say)
        return rows.index_select(0, pair_of_slot.reshape(-1)).view(tokens, top_k, rows.shape[-1]).sum(dim=1)


class _FusedExperts(torch.autograd.Function):
    """Sorted dispatch as one op with a hand-written backward: a fixed number of whole-tensor operations.

    With the N = tokens * top_k (token, slot) pairs sorted by expert and w their gate weights:
      xs = x[token of each pair]                       one gather                              (N, d)
      [gate, up] = xs @ W_gate_up[expert of the row]    one grouped matmul                      (N, 2h)
      a = silu(gate) * up,   y = (w * a) @ W_down[e]    weighting the h-wide a, not the d-wide y
      out[t] = sum of y over the t's top_k pairs        one embedding_bag: a gather-sum, no scatter
    Backward, with g = dout[token of each pair]:
      u = g @ W_down[e]^T     d(w) = <a, u>     da = w * u     dW_down[e] = (w * a)[rows of e]^T g[rows of e]
      dh = [silu'(gate) * up * da, silu(gate) * da]
      dW_gate_up[e] = xs^T dh (rows of e)          dx[t] = sum over t's pairs of dh @ W_gate_up[e]^T
    Compared with leaving it to autograd (`run_experts_on_slices`): no graph of ~10 nodes per expert, no
    concatenation, no stack of per-expert weight gradients, no index_add_ scatter (the per-token sums are
    embedding_bag gathers, with the inverse permutation), and the loop over experts runs inside one
    grouped matmul (`torch.nn.functional.grouped_mm`) where the installed torch has it for these shapes,
    or else as a short loop of matmuls writing into one buffer. When the load is nearly even (padding every
    expert to the busiest one's count adds at most PAD_LIMIT of the rows) and no Triton backend is asked
    for, the rows are laid out padded and each grouped matmul is one batched matmul (torch.bmm); the padded
    rows hold zeros and a zero gate weight, so they change nothing.
    """

    @staticmethod
    def forward(ctx, x, expert_index, gate_weight, w_gate_up, w_down, kernels_backend):
        tokens, top_k = expert_index.shape
        n_experts, hidden = w_gate_up.shape[0], w_down.shape[1]
        device_type = x.device.type
        dtype = torch.promote_types(x.dtype, w_gate_up.dtype)
        if torch.is_autocast_enabled(device_type) and dtype != torch.float64:   # autocast leaves float64 alone
            dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            granule = 1 if kernels_backend is not None else _row_granule(
                dtype, x.device, x.shape[1], 2 * hidden, n_experts, expert_index.numel())
            layout = _pair_layout(expert_index, n_experts, pad=kernels_backend is None, granule=granule)
            w1, w2 = w_gate_up.to(dtype), w_down.to(dtype)
            # Each row's gate weight (zero on padded rows, so they add nothing to any gradient).
            weight = w1.new_zeros(layout.token_of_row.numel()).scatter_(
                0, layout.row_of_pair, gate_weight.reshape(-1).to(dtype)).unsqueeze(1)
            xs = x.to(dtype).index_select(0, layout.token_of_row)
            if layout.pad_rows is not None:   # token 0's input: zeroed, so an inf there stays in token 0's rows
                xs.index_fill_(0, layout.pad_rows, 0)
            h = _rows_mm(xs, w1, layout, kernels_backend)
            silu_gate = F.silu(h[:, :hidden])
            a = silu_gate * h[:, hidden:]
            # Rows padded to 16 bytes, so that grouped_mm takes this (N, hidden) operand and its transpose
            # whatever the hidden width (66 floats a row would send two of the six products to a Python loop).
            weighted_a = torch.mul(a, weight, out=_rows_aligned_like(a))
            y = _rows_mm(weighted_a, w2, layout, kernels_backend)
            out = _sum_over_pairs(y, layout.row_of_pair, tokens, top_k)
        ctx.save_for_backward(weight, xs, h, silu_gate, a, weighted_a, w1, w2)
        ctx.layout, ctx.top_k, ctx.kernels_backend = layout, top_k, kernels_backend
        # A forward inside using_cpu_gemm(...): its backward multiplies alike, wherever backward() is called.
        ctx.cpu_gemm = _cpu_gemm_setting() if x.device.type == "cpu" else None
        ctx.dtypes = (x.dtype, gate_weight.dtype, w_gate_up.dtype, w_down.dtype)
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weight, xs, h, silu_gate, a, weighted_a, w1, w2 = ctx.saved_tensors
        x_dtype, gate_dtype, w1_dtype, w2_dtype = ctx.dtypes
        layout, hidden, backend = ctx.layout, w2.shape[1], ctx.kernels_backend
        tokens, top_k = grad_out.shape[0], ctx.top_k
        need_x, _, need_gate, need_w1, need_w2, _ = ctx.needs_input_grad
        grad_x = grad_gate = grad_w1 = grad_w2 = None
        same_gemm = using_cpu_gemm(ctx.cpu_gemm) if ctx.cpu_gemm is not None else contextlib.nullcontext()
        with torch.autocast(grad_out.device.type, enabled=False), same_gemm:
            g = grad_out.to(xs.dtype).index_select(0, layout.token_of_row)
            if layout.pad_rows is not None:
                g.index_fill_(0, layout.pad_rows, 0)
            u = _rows_mm(g, w2.transpose(1, 2), layout, backend)
            if need_gate:   # back from expert order to (token, slot) order
                grad_gate = torch.linalg.vecdot(a, u).index_select(0, layout.row_of_pair).view(tokens, top_k)
                grad_gate = grad_gate.to(gate_dtype)
            if need_w2:
                grad_w2 = _weight_mm(weighted_a, g, layout, backend).to(w2_dtype)
            if need_x or need_w1:
                grad_a = u.mul_(weight)
                grad_h = torch.empty_like(h)
                torch.ops.aten.silu_backward.grad_input(grad_a * h[:, hidden:], h[:, :hidden],
                                                        grad_input=grad_h[:, :hidden])
                torch.mul(grad_a, silu_gate, out=grad_h[:, hidden:])
                if need_w1:
                    grad_w1 = _weight_mm(xs, grad_h, layout, backend).to(w1_dtype)
                if need_x:
                    grad_xs = _rows_mm(grad_h, w1.transpose(1, 2), layout, backend)
                    grad_x = _sum_over_pairs(grad_xs, layout.row_of_pair, tokens, top_k).to(x_dtype)
        return grad_x, None, grad_gate, grad_w1, grad_w2, None


def fused_dispatch(x: torch.Tensor, expert_index: torch.Tensor, gate_weight: torch.Tensor,
                   w_gate_up: torch.Tensor, w_down: torch.Tensor, kernels_backend: str | None = None) -> torch.Tensor:
    """The sorted dispatch of `sorted_dispatch` + `run_experts_on_slices` as one op with a hand-written backward.

    x (tokens, d); expert_index and gate_weight (tokens, top_k); w_gate_up (n_experts, d, 2 * hidden) with
    the gate columns first; w_down (n_experts, hidden, d). Same result and gradients (x, gate_weight, both
    weight stacks) as the autograd version, in a fixed number of whole-tensor operations (see _FusedExperts).
    kernels_backend=None multiplies with torch (grouped_mm, or a loop of matmuls); "auto", "triton" or
    "torch" hands the experts' matmuls to minillm.kernels.grouped_matmul / grouped_weight_grad instead.
    """
    if kernels_backend is not None and kernels_backend not in kernels.BACKENDS:
        raise ValueError(f"fused_dispatch: kernels_backend={kernels_backend!r}; choose None or one of "
                         f"{', '.join(kernels.BACKENDS)}")
    if expert_index.dim() != 2 or gate_weight.shape != expert_index.shape or x.dim() != 2 \
            or x.shape[0] != expert_index.shape[0]:
        raise ValueError(f"fused_dispatch: expected x (tokens, d), expert_index and gate_weight (tokens, top_k); got "
                         f"{tuple(x.shape)}, {tuple(expert_index.shape)}, {tuple(gate_weight.shape)}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3 or w_gate_up.shape[0] != w_down.shape[0] \
            or w_gate_up.shape[1] != x.shape[1] or w_gate_up.shape[2] != 2 * w_down.shape[1] \
            or w_down.shape[2] != x.shape[1]:
        raise ValueError(f"fused_dispatch: expected w_gate_up (n_experts, d, 2 * hidden) and w_down "
                         f"(n_experts, hidden, d) with d = {x.shape[1]}; got {tuple(w_gate_up.shape)} and "
                         f"{tuple(w_down.shape)}")
    if expert_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"fused_dispatch: expert_index must hold integer expert ids, got {expert_index.dtype}")
    n_experts = w_gate_up.shape[0]
    if expert_index.numel():
        lowest, highest = int(expert_index.min()), int(expert_index.max())
        if lowest < 0 or highest >= n_experts:
            raise ValueError(f"fused_dispatch: expert_index holds ids from {lowest} to {highest}, but there are "
                             f"{n_experts} experts (ids 0 to {n_experts - 1})")
    return _FusedExperts.apply(x, expert_index.long(), gate_weight, w_gate_up, w_down, kernels_backend)


def reference_moe_loop(x: torch.Tensor, expert_index: torch.Tensor, gate_weight: torch.Tensor,
                       experts: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time (slow; for tests and checks)."""
    rows = []
    for token in range(x.shape[0]):
        row = torch.zeros_like(x[token])
        for slot in range(expert_index.shape[1]):
            expert = experts[int(expert_index[token, slot])]
            row = row + gate_weight[token, slot].to(x.dtype) * expert(x[token:token + 1])[0]
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros_like(x)


def per_expert_mask_loop(x: torch.Tensor, expert_index: torch.Tensor, gate_weight: torch.Tensor,
                         w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The usual first implementation: for every expert, search all pairs for its tokens (the baseline)."""
    output = torch.zeros_like(x)
    gate_ups, downs = w_gate_up.unbind(0), w_down.unbind(0)
    for expert in range(w_gate_up.shape[0]):
        token, slot = torch.where(expert_index == expert)
        if token.numel() == 0:
            continue
        result = _swiglu(x[token], gate_ups[expert], downs[expert])
        weighted = result * gate_weight[token, slot].unsqueeze(-1).to(result.dtype)
        output = output.index_add(0, token, weighted.to(x.dtype))
    return output


# ---- the layer ----------------------------------------------------------------------------------------

class MoE(nn.Module):
    """DeepSeekMoE layer for inputs (batch, time, n_embd); a drop-in replacement for the GPT's MLP."""

    def __init__(self, n_embd: int, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoE: expected a MoEConfig, got {type(config).__name__}")
        if isinstance(n_embd, bool) or not isinstance(n_embd, numbers.Integral) or n_embd < 1:
            raise ValueError(f"MoE: n_embd={n_embd!r} must be a positive integer (the model width)")
        n_embd = int(n_embd)
        self.config, self.n_embd = config, n_embd
        hidden, experts = config.expert_hidden, config.n_routed
        self.router = nn.Linear(n_embd, experts, bias=False)
        # Routed experts stored stacked, so all of them can run in one batched matmul.
        self.w_gate_up = nn.Parameter(torch.randn(experts, n_embd, 2 * hidden) * 0.02)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, n_embd) * 0.02)
        if config.n_shared:
            # n_shared always-on experts side by side are one SwiGLU MLP n_shared times as wide.
            self.shared_gate_up = nn.Linear(n_embd, 2 * config.n_shared * hidden, bias=False)
            self.shared_down = nn.Linear(config.n_shared * hidden, n_embd, bias=False)
        # Persistent: the bias is learned state (checkpointed); the load counters are per step only.
        self.register_buffer("expert_bias", torch.zeros(experts))
        self.register_buffer("step_load", torch.zeros(experts, dtype=torch.long), persistent=False)
        # Tokens per expert, one list per optimizer step. Not in the state dict (that stays tensors of fixed shape):
        # minillm.train's save_checkpoint/load_checkpoint carry it, so a resumed run's history is whole.
        self.load_history: list[list[int]] = []
        self.last_routing: Routing | None = None
        self.aux_loss: torch.Tensor | None = None

    def __getstate__(self):
        # aux_loss belongs to the last forward's autograd graph: copy.deepcopy refuses such tensors, and a copy
        # (or a pickled layer) has no use for it.
        state = super().__getstate__()
        state["aux_loss"] = None
        return state

    def _apply(self, fn, recurse=True):
        # layer.to(torch.bfloat16) casts every floating buffer; the balancing bias stays float32: in bf16 a
        # step of 0.001 vanishes once the bias nears 0.5 (its spacing there is 0.002), and balancing stalls.
        # It keeps its float32 value too: cast to bf16 and back, a trained bias would be rounded to that spacing.
        bias, was_meta = self.expert_bias, self.step_load.is_meta
        super()._apply(fn, recurse)
        if was_meta and not self.step_load.is_meta:
            # built on the meta device, then given memory by to_empty(device=...): the counters (not in the state
            # dict, so no load_state_dict fills them) hold garbage that would steer the first bias update
            self.step_load.zero_()
        if self.expert_bias.dtype != torch.float32:   # a cast (a move or to_empty keeps the dtype)
            kept = bias if bias.dtype == torch.float32 else self.expert_bias
            self.expert_bias = kept.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def reset_output_projections(self, std: float) -> None:
        nn.init.normal_(self.w_down, mean=0.0, std=std)
        if self.config.n_shared:
            nn.init.normal_(self.shared_down.weight, mean=0.0, std=std)

    def expert(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Routed expert `index` as a function of (tokens, n_embd)."""
        return lambda tokens: _swiglu(tokens, self.w_gate_up[index], self.w_down[index])

    # Left out of torch.compile's graphs: the layout of the pairs depends on how many tokens each expert got,
    # a new set of sizes each step, on which a compiled graph would split and recompile again and again (up to
    # dynamo's limit, minutes on a CPU). The dispatch is a few whole-tensor ops; the rest of the model compiles.
    @torch.compiler.disable
    def routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        kind = self.config.dispatch
        if kind == "auto":
            # On a CPU an operation costs microseconds, so zero padding is the bigger waste: loop over the
            # experts' slices, with the hand-written backward. On a GPU each small matmul of that loop is a
            # kernel launch, so one padded batched GEMM wins, unless padding would more than double the rows.
            kind = "fused"
            if x.device.type != "cpu":
                counts = torch.bincount(routing.expert_index.reshape(-1), minlength=self.config.n_routed)
                padded_rows = int(counts.max()) * self.config.n_routed
                kind = "grouped" if padded_rows <= 2 * routing.expert_index.numel() else "fused"
        elif kind not in DISPATCH_KINDS:   # config.dispatch changed after the config checked it
            raise ValueError(f"MoE: dispatch={kind!r} is unknown; choose one of {', '.join(map(repr, DISPATCH_KINDS))}")
        if kind in ("fused", "triton"):
            return fused_dispatch(x, routing.expert_index, routing.gate_weight, self.w_gate_up, self.w_down,
                                  "triton" if kind == "triton" else None)
        runner = run_experts_grouped if kind == "grouped" else run_experts_on_slices
        return sorted_dispatch(x, routing.expert_index, routing.gate_weight,
                               lambda xs, counts: runner(xs, counts, self.w_gate_up, self.w_down),
                               self.config.n_routed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE: expected a tensor (batch, time, n_embd), got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"MoE: input is a 0-d tensor; expected (batch, time, n_embd={self.n_embd})")
        if x.shape[-1] != self.n_embd:
            raise ValueError(f"MoE: input has {x.shape[-1]} channels, the layer was built for n_embd={self.n_embd}")
        weights = self.router.weight
        if x.device != weights.device:
            raise ValueError(f"MoE: input is on {x.device} but the layer's weights are on {weights.device}; "
                             f"move one with .to(...)")
        if x.device.type == "meta":
            raise ValueError("MoE: cannot run on the meta device: choosing experts needs the router's values, and "
                             "meta tensors have none; move the layer and input to a real device (cpu, cuda)")
        if x.dtype != weights.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"MoE: input is {str(x.dtype).removeprefix('torch.')} but the layer's weights are "
                            f"{str(weights.dtype).removeprefix('torch.')}; convert one (layer.to(dtype) or "
                            f"x.to(dtype)) or run under torch.autocast")
        self._check_built_shapes()
        shape = x.shape
        # Sequences for the balance loss: (batch, time, d) holds batch of them, (..., time, d) all leading dims;
        # one (a single empty one when there are no tokens) for (time, d) or (d,).
        batch = max(math.prod(shape[:-2]), 1)
        tokens = x.reshape(-1, self.n_embd)
        config = self.config
        # The bias always steers (a loaded or hand-set bias counts even with the update switched off).
        routing = route(self.router(tokens), self.expert_bias, config.top_k, config.route_scale, config.n_groups,
                        config.top_groups)
        self.last_routing = Routing(routing.expert_index.detach(), routing.gate_weight.detach(),
                                    routing.affinity.detach())
        output = self.routed(tokens, routing)
        if config.n_shared:
            gate, up = self.shared_gate_up(tokens).chunk(2, dim=-1)
            output = output + self.shared_down(F.silu(gate) * up)
        self.aux_loss = None
        if self.training:
            # The loss first: a weight it refuses (negative, set after the config's check) leaves no tokens counted.
            if config.aux_loss_weight != 0:   # != 0, not > 0: a negative one must be refused, not skipped
                self.aux_loss = sequence_balance_loss(routing.affinity, routing.expert_index, batch,
                                                      config.aux_loss_weight)
            if self.step_load.is_meta:   # built on meta, loaded with assign=True: counters are no weights
                self.step_load = torch.zeros(config.n_routed, dtype=torch.long, device=x.device)
            # Only a forward that can be trained on counts toward the bias update (as Megatron-LM does): a look
            # at the model under torch.no_grad() without model.eval() must not steer the next step's balancing.
            if torch.is_grad_enabled():
                self.step_load += torch.bincount(routing.expert_index.reshape(-1), minlength=config.n_routed)
        return output.view(shape)

    def _check_built_shapes(self) -> None:
        """Refuse a config whose expert counts or widths were changed after the weights were built from it."""
        config, shared, hidden = self.config, self._modules.get("shared_down"), self.w_down.shape[1]
        built = (self.w_gate_up.shape[0], hidden, 0 if shared is None else shared.in_features // hidden)
        if (config.n_routed, config.expert_hidden, config.n_shared) == built:
            return
        for name, value in zip(("n_routed", "expert_hidden", "n_shared"), built):
            if getattr(config, name) != value:
                raise ValueError(f"MoE: config.{name}={getattr(config, name)!r} but the layer's weights were built "
                                 f"for {name}={value}; changing it later resizes no weights: build a new "
                                 f"MoE(n_embd, config) instead")

    def after_optimizer_step(self) -> None:
        """Record this step's load and, when enabled, nudge the biases towards balance; reset the counters."""
        if int(self.step_load.sum()) == 0:
            return
        rate = self.config.bias_update_rate
        # != 0, not > 0: update_bias refuses a negative or NaN rate set after the config checked it. The new bias
        # comes first, so that a refused rate leaves this step's load and history as they were.
        new_bias = update_bias(self.expert_bias, self.step_load, rate) if rate != 0 else None
        self.load_history.append(self.step_load.tolist())
        if new_bias is not None:
            self.expert_bias.copy_(new_bias)
        self.step_load.zero_()

    def reset_load(self) -> None:
        """Forget tokens counted since the last optimizer step (e.g. by a train-mode forward before training)."""
        self.step_load.zero_()

    def load_stats(self) -> dict:
        """Tokens per expert in the last recorded step and its max/mean imbalance."""
        if not self.load_history:
            return {"tokens_per_expert": [], "max_over_mean": float("nan")}
        last = list(self.load_history[-1])   # a copy: editing the result must not rewrite the history
        return {"tokens_per_expert": last, "max_over_mean": load_imbalance(torch.tensor(last))}

    def num_active_parameters(self) -> int:
        """Parameters a token uses: router, shared experts and top_k of the routed experts."""
        per_expert = self.w_gate_up[0].numel() + self.w_down[0].numel()
        return sum(p.numel() for p in self.parameters()) - (self.config.n_routed - self.config.top_k) * per_expert

    def matmul_parameters_per_token(self) -> int:
        """Weights multiplied per token in the forward pass (all of num_active_parameters here)."""
        return self.num_active_parameters()
