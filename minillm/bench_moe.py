"""Benchmark of chapter 04's MoE dispatch: `python -m minillm.bench moe`.

Forward + backward tokens/s of one mixture-of-experts layer (no shared experts, same sizes everywhere):

- minillm's sorted dispatch (`minillm.moe.MoE`, dispatch="auto": on a CPU "fused", a hand-written backward
  around grouped matmuls over the experts' contiguous slices, or one batched matmul over rows padded per
  expert when the load is nearly even; on a GPU one padded batched GEMM);
- the same sorted dispatch left to autograd (dispatch="slices"), to show what the hand-written backward buys;
- on a CUDA GPU with Triton, the same dispatch with minillm's Triton grouped-GEMM kernels (dispatch="triton");
- the naive per-expert loop (`minillm.moe.per_expert_mask_loop`: every expert searches all pairs for its
  tokens), with the same router and weights;
- Hugging Face transformers' Mixtral sparse MoE block (softmax router, same expert sizes, its default
  expert implementation: a loop over the experts that were hit).

The default sizes follow DeepSeek-V3's fine-grained proportions scaled down: top-8 routing and experts a
quarter as wide as the model (V3: 2048 of 7168). `--top-k 4 --expert-hidden 128` gives coarser experts at
the same FLOPs per token. All are timed in the same run on the same device, in alternating rounds and
under the same memory allocator setting, so the printed ratios hold for this machine. Beside them the
bench times the experts' matmuls alone (the same per-expert products of the forward and backward passes
on pre-sorted rows, batched or one per expert as the fused dispatch would do them, no routing, gathering
or scattering): the floor for that dispatch, so naive loop / floor is about the most it could gain over the
naive loop at that size. On a CPU on which MKL skips its AVX-512 code, `minillm.moe.cpu_gemm` times oneDNN
against torch.bmm once (`cpu_gemm_trial`, printed in the header) and multiplies the big padded products with the
faster; the bench then also times the dispatch and its matmuls with the other library, so the printed ratios
separate what the matrix library gives from what the dispatch gives.
"""
from __future__ import annotations

import datetime as _dt
import json
import statistics
import sys
import time

import torch

from minillm.cost import (Meter, benchmark_path, best_seconds_interleaved, format_hardware, hardware_id,
                          keep_freed_memory, probe_hardware, resolve_device)
from minillm import kernels, moe
from minillm.paths import atomic_write_text
from minillm.moe import (ONEDNN_MIN_GAIN, ONEDNN_MIN_WORK, ONEDNN_TRIAL_SHAPE, MoE, MoEConfig, _pair_layout,
                         _row_granule, _six_products, _with_cpu_gemm, cpu_gemm, cpu_gemm_trial, per_expert_mask_loop,
                         route, using_cpu_gemm)

LIBRARY_NAMES = {"blas": "torch.bmm", "onednn": "oneDNN"}   # minillm.moe.cpu_gemm's choices, as printed
TRANSFORMERS_HINT = "pip install transformers   (into this environment: .venv/bin/pip install transformers)"


def _mixtral_block(layer: MoE, implementation: str | None = "eager"):
    """transformers' MixtralSparseMoeBlock with `layer`'s router and expert weights, or None if unavailable."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = layer.config
    hf_config = MixtralConfig(hidden_size=layer.n_embd, intermediate_size=config.expert_hidden,
                              num_local_experts=config.n_routed, num_experts_per_tok=config.top_k,
                              hidden_act="silu", router_jitter_noise=0.0)
    if implementation is not None:
        hf_config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(hf_config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.w_gate_up.transpose(1, 2))   # (E, 2h, d): [gate; up] rows
        block.experts.down_proj.copy_(layer.w_down.transpose(1, 2))         # (E, d, h)
    return block


def _training_step(forward, x: torch.Tensor, parameters):
    """One forward+backward through `forward`, gradients cleared first."""
    def step():
        for p in parameters:
            p.grad = None
        x.grad = None
        forward(x).float().square().mean().backward()
    return step


def _routing_layout(layer: MoE, x: torch.Tensor):
    """The rows layout the fused dispatch picks for this layer's routing of x (padded or grouped), with the
    matrix library it would use now (`minillm.moe.cpu_gemm`: oneDNN rounds the padded rows up)."""
    config = layer.config
    with torch.no_grad():
        routing = route(layer.router(x.reshape(-1, layer.n_embd)), None, config.top_k)
        granule = _row_granule(layer.w_gate_up.dtype, x.device, layer.n_embd, 2 * config.expert_hidden,
                               config.n_routed, routing.expert_index.numel())
        return _pair_layout(routing.expert_index, config.n_routed, pad=True, granule=granule)


def _matmul_floor(layer: MoE, layout, device):
    """Only the expert matmuls of one forward+backward, on this routing's per-expert row counts, done by the
    fused dispatch's own products (`_six_products`: batched over padded rows when the load is nearly
    even, else grouped), with the CPU matrix library it would use now (`minillm.moe.cpu_gemm`)."""
    config = layer.config
    hidden = config.expert_hidden
    with torch.no_grad():
        w1, w2 = layer.w_gate_up.detach(), layer.w_down.detach()
        rows = layout.token_of_row.numel()
        xs = torch.randn(rows, layer.n_embd, device=device)
        grad_y = torch.randn(rows, layer.n_embd, device=device)
        grad_h = torch.randn(rows, 2 * hidden, device=device)
        a = torch.randn(rows, hidden, device=device)

    def products():
        _six_products(xs, a, grad_y, grad_h, w1, w2, layout)

    return products


FRESH_STEPS = 12


def _fresh_routing_ms(layer: MoE, tokens: int, device, blocks: int, steps: int = FRESH_STEPS) -> dict[str, float]:
    """Milliseconds per forward+backward when every step brings new tokens, as training does: a new routing and
    so a new busiest-expert count each step. The median of `blocks` blocks of `steps` steps, for oneDNN with
    the padded rows rounded up to a granule (what the layer does), oneDNN with the exact busiest count, and the
    BLAS of torch.bmm, in rotating order. The best-of-N timings above cannot show this: after its first call
    each shape is cached, and the fastest run is one that built nothing."""
    variants = {"onednn_rounded": ("onednn", moe.ONEDNN_ROWS_PER_GRANULE),
                "onednn_exact": ("onednn", sys.maxsize),   # a granule of 1: no rounding
                "blas": ("blas", moe.ONEDNN_ROWS_PER_GRANULE)}
    names, times = list(variants), {name: [] for name in variants}
    params, kept = list(layer.parameters()), moe.ONEDNN_ROWS_PER_GRANULE
    for block in range(blocks):
        for name in names[block % 3:] + names[:block % 3]:
            choice, rows_per_granule = variants[name]
            inputs = [torch.randn(1, tokens, layer.n_embd, device=device, requires_grad=True) for _ in range(steps)]
            moe.ONEDNN_ROWS_PER_GRANULE = rows_per_granule
            try:
                with using_cpu_gemm(choice):
                    start = time.perf_counter()
                    for x in inputs:
                        for p in params:
                            p.grad = None
                        layer(x).float().square().mean().backward()
                    times[name].append((time.perf_counter() - start) / steps * 1e3)
            finally:
                moe.ONEDNN_ROWS_PER_GRANULE = kept
    return {name: statistics.median(values) for name, values in times.items()}


def bench_moe(experts: str = "8,16,32,64,128", top_k: int = 8, d_model: int = 256, expert_hidden: int = 64,
              tokens: int = 2048, repeats: int = 5, device: str | None = None, threads: int | None = None,
              out_dir: str | None = None, default_malloc: bool = False) -> dict:
    """Tokens/s of forward+backward through one MoE layer: sorted dispatch vs the naive loop vs transformers."""
    for name, value in (("--top-k", top_k), ("--d-model", d_model), ("--expert-hidden", expert_hidden),
                        ("--tokens", tokens), ("--repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bench moe: {name}={value!r} must be a whole number >= 1")
    try:
        expert_counts = [int(e) for e in str(experts).split(",") if e.strip()]
    except ValueError:
        raise ValueError(f"bench moe: --experts={experts!r} must be comma-separated whole numbers of experts, "
                         f"e.g. 8,16,32") from None
    if not expert_counts or min(expert_counts) < top_k:
        raise ValueError(f"bench moe: --experts={experts!r} must list expert counts >= top_k={top_k}, e.g. 8,16,32")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"bench moe: --threads={threads} must be >= 1")
        # On a busy machine, CPU threads that wait for each other at every small op can dominate the time.
        torch.set_num_threads(threads)
    device = resolve_device(device, "bench moe")
    # Every contender runs under the same allocator; by default freed memory is kept for reuse, so no
    # contender pays a page fault per 4 kB of its temporaries on every step (see cost.keep_freed_memory).
    kept = False if default_malloc else keep_freed_memory()
    torch.manual_seed(0)
    probe = MoE(8, MoEConfig(n_routed=2, top_k=1, n_shared=0, expert_hidden=4))
    has_transformers = _mixtral_block(probe, None) is not None
    if not has_transformers:
        print(f"bench moe: transformers is not installed, so its Mixtral block is skipped; {TRANSFORMERS_HINT}")
    gemm = cpu_gemm() if device.type == "cpu" else "blas"
    trial = cpu_gemm_trial() if device.type == "cpu" else None
    multiplier = (f"oneDNN where an expert's product has >= 2**{ONEDNN_MIN_WORK.bit_length() - 1} multiply-adds"
                  if gemm == "onednn" else "torch.bmm")
    if trial is not None:   # MKL would skip this CPU's AVX-512: "auto" timed both libraries
        experts, capacity, width, hidden = ONEDNN_TRIAL_SHAPE
        multiplier += (f" (MKL skips this CPU's AVX-512, so minillm.moe.cpu_gemm timed the dispatch's six expert "
                       f"products, {experts} experts x {capacity} rows, width {width}, hidden {hidden}: oneDNN "
                       f"{trial['onednn']:.1f} ms, torch.bmm {trial['blas']:.1f} ms; \"auto\" takes oneDNN from "
                       f"{ONEDNN_MIN_GAIN:.1f}x faster)")
    print(f"bench moe on {device}: {tokens} tokens, d_model {d_model}, SwiGLU experts of width {expert_hidden}, "
          f"top_k {top_k}, forward+backward, best of {repeats} alternating rounds, "
          f"{torch.get_num_threads()} CPU thread(s); padded expert rows multiplied by {multiplier}; allocator: "
          f"{'freed memory kept for reuse (--default-malloc to measure without)' if kept else 'as the system set it'}")
    rows = []
    with Meter("bench moe", chapter="04", device=device) as total:
        for n_experts in expert_counts:
            layer = MoE(d_model, MoEConfig(n_routed=n_experts, n_shared=0, top_k=top_k, expert_hidden=expert_hidden,
                                           bias_update_rate=0.0)).to(device)
            x = torch.randn(1, tokens, d_model, device=device, requires_grad=True)
            params = list(layer.parameters())

            def naive(inputs, layer=layer):
                flat = inputs.reshape(-1, layer.n_embd)
                routing = route(layer.router(flat), None, layer.config.top_k)
                return per_expert_mask_loop(flat, routing.expert_index, routing.gate_weight, layer.w_gate_up,
                                            layer.w_down)

            def with_dispatch(kind, layer=layer):
                def forward(inputs):
                    layer.config.dispatch = kind
                    try:
                        return layer(inputs)
                    finally:
                        layer.config.dispatch = "auto"
                return forward

            contenders = {"sorted": _training_step(layer, x, params),
                          "autograd_slices": _training_step(with_dispatch("slices"), x, params),
                          "naive_loop": _training_step(naive, x, params)}
            block = _mixtral_block(layer, "eager") if has_transformers else None
            if block is not None:
                block = block.to(device)
                contenders["transformers"] = _training_step(block, x, list(block.parameters()))
            if device.type == "cuda" and kernels.triton_available():   # minillm's Triton grouped GEMM
                contenders["triton_grouped"] = _training_step(with_dispatch("triton"), x, params)
            layout = _routing_layout(layer, x)
            contenders["matmul_floor"] = _matmul_floor(layer, layout, device)
            # The library of the dispatch's biggest product, [gate, up] = rows @ W_gate_up, at this size.
            row_gemm, other = "blas", None
            if device.type == "cpu" and layout.capacity is not None:
                work = layout.capacity * d_model * 2 * expert_hidden
                row_gemm = cpu_gemm(work)
                if row_gemm == "onednn":
                    other = "blas"
                elif trial is not None and work >= ONEDNN_MIN_WORK:   # "auto" timed oneDNN and kept torch.bmm
                    other = "onednn"
            if other is not None:
                # The same dispatch and floor with the other library too: how much of the speed is the matrix
                # library's and how much the dispatch's. Each with its own layout (oneDNN rounds the rows up).
                contenders[f"sorted_{other}"] = _with_cpu_gemm(contenders["sorted"], other)
                with using_cpu_gemm(other):
                    other_layout = _routing_layout(layer, x)
                contenders[f"matmul_floor_{other}"] = _with_cpu_gemm(_matmul_floor(layer, other_layout, device),
                                                                     other)
            # Alternating rounds, so a burst of load from elsewhere cannot favour one contender.
            seconds = best_seconds_interleaved(contenders, device=device, repeats=repeats, warmup=1)
            row = {"experts": n_experts, "layout": "padded" if layout.capacity is not None else "grouped",
                   "padding_fraction": layout.padding,
                   "cpu_gemm": row_gemm}
            row.update({f"{name}_tokens_per_second": tokens / s for name, s in seconds.items()})
            if other is not None:
                row["fresh_routing_ms_per_step"] = _fresh_routing_ms(layer, tokens, device, blocks=repeats)
            row["vs_naive_loop"] = row["sorted_tokens_per_second"] / row["naive_loop_tokens_per_second"]
            row["floor_vs_naive_loop"] = row["matmul_floor_tokens_per_second"] / row["naive_loop_tokens_per_second"]
            # How close the whole dispatch comes to its own matmuls: 1 would be no routing, gathering or summing cost.
            row["vs_matmul_floor"] = row["sorted_tokens_per_second"] / row["matmul_floor_tokens_per_second"]
            row["vs_autograd_slices"] = row["sorted_tokens_per_second"] / row["autograd_slices_tokens_per_second"]
            if "transformers_tokens_per_second" in row:
                row["vs_transformers"] = row["sorted_tokens_per_second"] / row["transformers_tokens_per_second"]
            rows.append(row)
            parts = [f"sorted {row['sorted_tokens_per_second']:,.0f} tok/s",
                     f"naive loop {row['naive_loop_tokens_per_second']:,.0f} ({row['vs_naive_loop']:.2f}x)",
                     f"autograd slices {row['autograd_slices_tokens_per_second']:,.0f} "
                     f"({row['vs_autograd_slices']:.2f}x)"]
            if "triton_grouped_tokens_per_second" in row:
                row["vs_triton_grouped"] = row["sorted_tokens_per_second"] / row["triton_grouped_tokens_per_second"]
                parts.append(f"Triton grouped GEMM {row['triton_grouped_tokens_per_second']:,.0f} "
                             f"({row['vs_triton_grouped']:.2f}x)")
            if "vs_transformers" in row:
                parts.append(f"transformers Mixtral {row['transformers_tokens_per_second']:,.0f} "
                             f"({row['vs_transformers']:.2f}x)")
            parts.append(f"matmuls alone {row['matmul_floor_tokens_per_second']:,.0f} "
                         f"(naive loop / these: {row['floor_vs_naive_loop']:.2f}x, about the most the dispatch "
                         f"could gain; sorted reaches {row['vs_matmul_floor']:.2f} of their speed)")
            if other is not None:
                row[f"{other}_vs_naive_loop"] = (row[f"sorted_{other}_tokens_per_second"]
                                                 / row["naive_loop_tokens_per_second"])
                row[f"{other}_floor_vs_naive_loop"] = (row[f"matmul_floor_{other}_tokens_per_second"]
                                                       / row["naive_loop_tokens_per_second"])
                parts.append(f"with {LIBRARY_NAMES[other]} instead of {LIBRARY_NAMES[row_gemm]}: sorted "
                             f"{row[f'sorted_{other}_tokens_per_second']:,.0f} ({row[f'{other}_vs_naive_loop']:.2f}x "
                             f"the naive loop), matmuls alone {row[f'matmul_floor_{other}_tokens_per_second']:,.0f} "
                             f"({row[f'{other}_floor_vs_naive_loop']:.2f}x)")
            parts.append(f"rows {row['layout']} (padding: +{layout.padding:.0%} rows)")
            if "fresh_routing_ms_per_step" in row:
                fresh = row["fresh_routing_ms_per_step"]
                parts.append(f"new tokens every step as in training (median ms per step of {repeats} blocks of "
                             f"{FRESH_STEPS}): oneDNN, rows rounded up {fresh['onednn_rounded']:.1f}, oneDNN, "
                             f"exact busiest count {fresh['onednn_exact']:.1f}, torch.bmm {fresh['blas']:.1f}")
            print(f"  {n_experts:>3} experts: " + ", ".join(parts))
    print(f"bench moe: ratios are minillm's sorted dispatch over each baseline (>1: minillm faster); "
          f"{total.seconds:.1f} s in all")
    many = [row for row in rows if row["experts"] >= 16]
    targets = {}
    if many:
        targets["sorted >= 2x the naive loop at 16+ experts"] = {
            str(row["experts"]): row["vs_naive_loop"] >= 2.0 for row in many}
        if has_transformers:
            targets["sorted >= 1x transformers' Mixtral block"] = {
                str(row["experts"]): row["vs_transformers"] >= 1.0 for row in rows}
    for name, by_experts in targets.items():
        missed = [e for e, met in by_experts.items() if not met]
        print(f"target {name}: " + ("met at every size" if not missed else
                                     f"NOT met at {', '.join(missed)} experts (met at "
                                     f"{', '.join(e for e, met in by_experts.items() if met) or 'none'})"))
    hardware = probe_hardware()
    result = {"device": str(device), "hardware": format_hardware(hardware), "hardware_id": hardware_id(hardware),
              "torch": torch.__version__, "measured_at": _dt.datetime.now().isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "tokens": tokens, "d_model": d_model,
              "expert_hidden": expert_hidden, "top_k": top_k, "repeats": repeats, "transformers": has_transformers,
              "freed_memory_kept": kept, "cpu_gemm": gemm, "cpu_gemm_trial_ms": trial,
              "rows": rows, "targets": targets}
    if out_dir is not None:
        path = benchmark_path(out_dir, f"moe-{hardware_id(hardware)}-top{top_k}-h{expert_hidden}",
                              result["hardware"])
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
        result["path"] = str(path)
    return result


# For minillm/bench.py's registry: option name -> argparse keyword arguments.
BENCH_MOE_OPTIONS = {
    "--experts": dict(default="8,16,32,64,128", help="comma-separated routed expert counts (default 8,16,32,64,128)"),
    "--top-k": dict(type=int, default=8, help="experts per token (default 8, as DeepSeek-V3)"),
    "--d-model": dict(type=int, default=256, help="model width (default 256)"),
    "--expert-hidden": dict(type=int, default=64, help="hidden width of each expert (default 64 = d_model / 4: "
                                                       "fine-grained experts in DeepSeek-V3's proportion)"),
    "--tokens": dict(type=int, default=2048, help="tokens per forward+backward (default 2048)"),
    "--repeats": dict(type=int, default=5, help="timed repeats, the fastest counts (default 5)"),
    "--device": dict(default=None, help="cpu, cuda, mps (default: the fastest available)"),
    "--threads": dict(type=int, default=None, help="CPU threads for torch (default: torch's own choice)"),
    "--out-dir": dict(default=None, help="also write the figures as JSON into this folder (e.g. benchmarks)"),
    "--default-malloc": dict(action="store_true", help="leave the memory allocator as the system set it (by "
                                                        "default freed memory is kept for reuse: no page faults)"),
}

