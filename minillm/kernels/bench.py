"""Chapter 02 benchmark: each Triton kernel against its torch counterpart on this GPU.

`python -m minillm.bench kernels` (registered in minillm/bench.py) calls `bench_kernels()`. Each kernel
and its torch counterpart are timed with `triton.testing.do_bench` (median), checked for equal results
first, and reported as TFLOP/s (matmul) or GB/s (memory-bound kernels) with the ratio to torch. The
figures go to benchmarks/kernels-<gpu>-<date>.json. On a machine without a CUDA GPU it says so and
returns without timing anything (the interpreter proves correctness, not speed).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cost import benchmark_path, format_hardware, hardware_id, probe_hardware
from ..paths import atomic_write_text, repo_root


def _median_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, return_mode="median"))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, in float32; 0 when both are zero (an empty or all-zero result)."""
    difference, scale = (got.float() - expected.float()).norm(), expected.float().norm()
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return (difference / scale).item()


def _row(name, shape, dtype, triton_ms, torch_ms, flops=None, bytes_moved=None) -> dict:
    row = {"kernel": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
           "triton_ms": triton_ms, "torch_ms": torch_ms, "speed_vs_torch": torch_ms / triton_ms}
    if flops is not None:
        row["triton_tflops_per_second"] = flops / triton_ms / 1e9
        row["torch_tflops_per_second"] = flops / torch_ms / 1e9
    if bytes_moved is not None:
        row["triton_gb_per_second"] = bytes_moved / triton_ms / 1e6
        row["torch_gb_per_second"] = bytes_moved / torch_ms / 1e6
    return row


def _print_row(row: dict) -> None:
    rate = (f"{row['triton_tflops_per_second']:8.1f} TFLOP/s (torch {row['torch_tflops_per_second']:.1f})"
            if "triton_tflops_per_second" in row else
            f"{row['triton_gb_per_second']:8.0f} GB/s    (torch {row['torch_gb_per_second']:.0f})")
    print(f"{row['kernel']:<14}{'x'.join(map(str, row['shape'])):<18}{row['dtype']:<9}{row['triton_ms']:9.3f} ms  "
          f"{rate}  {row['speed_vs_torch']:.2f}x torch")


def grouped_problems(size: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple, torch.Tensor, dict]:
    """Chapter 04's grouped GEMM at an MoE-like shape: 64 experts with uneven counts (like a real router),
    8*size rows, inner size size, size/4 columns, random data in `dtype`.

    Returns ((experts, rows, inner, cols), ends, cases) with cases[name] = (minillm's kernel, the loop of torch
    matmuls, torch grouped_mm's arguments) for the forward, the input gradient (the same kernel on transposed
    weights) and the weight gradient. Used here and by benchmarks/grouped_configs.py.
    """
    from . import grouped, reference
    experts, rows, inner, cols = 64, 8 * size, size, size // 4
    generator = torch.Generator().manual_seed(0)
    share = torch.softmax(torch.randn(experts, generator=generator), 0)
    counts = torch.bincount(torch.multinomial(share, rows, replacement=True, generator=generator), minlength=experts)
    ends = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32)
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(experts, inner, cols, device=device, dtype=dtype) / inner ** 0.5
    grad_out = torch.randn(rows, cols, device=device, dtype=dtype)
    b_t = b.transpose(1, 2)
    cases = {
        "grouped_fwd": (lambda: grouped.grouped_matmul(a, b, ends), lambda: reference.grouped_matmul(a, b, ends),
                        (a, b)),
        "grouped_dgrad": (lambda: grouped.grouped_matmul(grad_out, b_t, ends),
                          lambda: reference.grouped_matmul(grad_out, b_t, ends), (grad_out, b_t)),
        "grouped_wgrad": (lambda: grouped.grouped_weight_grad(a, grad_out, ends),
                          lambda: reference.grouped_weight_grad(a, grad_out, ends), (a.t(), grad_out)),
    }
    return (experts, rows, inner, cols), ends, cases


def _grouped_rows(size: int, device: torch.device) -> list[dict]:
    """The grouped GEMM's cases against torch's own grouped_mm, fp16 (and bf16 on GPUs that have it).

    Where this torch has no grouped_mm (or it refuses the inputs), the baseline is the loop of matmuls.
    """
    grouped_mm = getattr(F, "grouped_mm", None)
    out = []
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    for dtype in [torch.float16] + ([torch.bfloat16] if bf16 else []):
        shape, ends, cases = grouped_problems(size, device, dtype)
        flops = 2 * shape[1] * shape[2] * shape[3]
        for name, (ours, loop, peer_args) in cases.items():
            baseline = loop
            if grouped_mm is not None:
                try:
                    grouped_mm(*peer_args, offs=ends)
                    baseline = lambda args=peer_args: grouped_mm(*args, offs=ends)  # noqa: E731
                except (RuntimeError, TypeError, ValueError):
                    pass
            error = relative_error(ours(), loop())
            if not error < 1e-2:
                raise AssertionError(f"{name} {dtype}: relative error {error:.2e} against the loop of matmuls")
            row = _row(name, shape, dtype, _median_ms(ours), _median_ms(baseline), flops=flops)
            row["baseline"] = "torch grouped_mm" if baseline is not loop else "loop of torch matmuls"
            row["loop_ms"] = _median_ms(loop)
            row["relative_error"] = error
            out.append(row)
    return out


def bench_kernels(size: int = 4096, out_dir: str | None = None, write: bool = True) -> dict:
    """Time every kernel against torch on the GPU; return (and save) the figures. No GPU: skip, say why."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 64:
        raise ValueError(f"bench kernels: --size={size!r} must be an integer of at least 64 (the matrices are "
                         "size x size; the grouped GEMM's have size/4 columns)")
    if not torch.cuda.is_available():
        message = ("kernels: this benchmark needs a CUDA GPU (none found). On a CPU the kernels run in Triton's "
                   "interpreter, which shows they are correct, not how fast they are; run it on a GPU (Colab T4).")
        print(message)
        return {"skipped": message}
    try:
        import triton  # noqa: F401
    except ImportError:
        message = "kernels: the triton package is not installed (pip install triton); nothing timed"
        print(message)
        return {"skipped": message}
    from . import elementwise, normalization, rowwise, tiled_matmul

    device = torch.device("cuda")
    hardware = probe_hardware()
    rows: list[dict] = []
    torch.manual_seed(0)

    n = 1 << 26
    source = torch.randn(n, device=device)
    target = torch.empty_like(source)
    copy_ms = _median_ms(lambda: target.copy_(source))
    copy_gb_per_second = 2 * n * 4 / copy_ms / 1e6
    print(f"{'copy (torch)':<14}{n:<18}{'float32':<9}{copy_ms:9.3f} ms  {copy_gb_per_second:8.0f} GB/s (ceiling)")

    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    torch.testing.assert_close(elementwise.add(x, y), x + y)
    rows.append(_row("add", (n,), torch.float32, _median_ms(lambda: elementwise.add(x, y)),
                     _median_ms(lambda: x + y), bytes_moved=3 * n * 4))

    softmax_shapes = [(16384, 1024), (8192, 4096), (4096, 16384)]
    for dtype in (torch.float16, torch.float32):
        for shape in softmax_shapes:
            logits = torch.randn(shape, device=device, dtype=dtype)
            torch.testing.assert_close(rowwise.softmax(logits), torch.softmax(logits, dim=-1), atol=1e-3, rtol=1e-2)
            bytes_moved = 2 * logits.numel() * logits.element_size()
            rows.append(_row("softmax", shape, dtype, _median_ms(lambda: rowwise.softmax(logits)),
                             _median_ms(lambda: torch.softmax(logits, dim=-1)), bytes_moved=bytes_moved))

    matmul_dtypes = [torch.float16, torch.float32] + ([torch.bfloat16] if hardware.get("bf16") else [])
    for dtype in matmul_dtypes:
        for m in sorted({size // 2, size}):
            a = torch.randn(m, m, device=device, dtype=dtype)
            b = torch.randn(m, m, device=device, dtype=dtype)
            tolerance = 2e-2 * m ** 0.5 if dtype != torch.float32 else 1e-1
            torch.testing.assert_close(tiled_matmul.matmul(a, b).float(), (a @ b).float(), atol=tolerance, rtol=5e-2)
            rows.append(_row("matmul", (m, m, m), dtype, _median_ms(lambda: tiled_matmul.matmul(a, b)),
                             _median_ms(lambda: a @ b), flops=2 * m ** 3))

    activations = torch.randn(16384, 4096, device=device, dtype=torch.float16)
    weight = torch.randn(4096, device=device, dtype=torch.float16)
    torch_rmsnorm = (lambda: F.rms_norm(activations, (4096,), weight, 1e-6)) if hasattr(F, "rms_norm") else \
        (lambda: activations * torch.rsqrt(activations.float().pow(2).mean(-1, keepdim=True) + 1e-6).half() * weight)
    rows.append(_row("rmsnorm", activations.shape, torch.float16,
                     _median_ms(lambda: normalization.rmsnorm(activations, weight)), _median_ms(torch_rmsnorm),
                     bytes_moved=2 * activations.numel() * 2))

    logits = torch.randn(8192, 32768, device=device, dtype=torch.float32)
    labels = torch.randint(0, 32768, (8192,), device=device)
    torch.testing.assert_close(rowwise.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    rows.append(_row("cross_entropy", logits.shape, torch.float32,
                     _median_ms(lambda: rowwise.cross_entropy(logits, labels)),
                     _median_ms(lambda: F.cross_entropy(logits, labels)), bytes_moved=2 * logits.numel() * 4))

    rows += _grouped_rows(size, device)

    for row in rows:
        _print_row(row)
        if "triton_gb_per_second" in row:
            row["share_of_copy_bandwidth"] = row["triton_gb_per_second"] / copy_gb_per_second

    def find(kernel, dtype, shape):
        return next((r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype and r["shape"] == list(shape)),
                    None)
    matmul_fp16 = find("matmul", "float16", (size, size, size))
    softmax_fits = [r for r in rows if r["kernel"] == "softmax" and r["shape"][1] <= 4096]
    targets = {
        f"matmul fp16 {size}^3 >= 0.8x torch": bool(matmul_fp16 and matmul_fp16["speed_vs_torch"] >= 0.8),
        "softmax (rows <= 4096 columns) >= 1.0x torch": all(r["speed_vs_torch"] >= 1.0 for r in softmax_fits),
        "softmax (rows <= 4096 columns) >= 80% of copy bandwidth":
            all(r["share_of_copy_bandwidth"] >= 0.8 for r in softmax_fits),
    }
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    result = {"gpu": hardware.get("gpu"), "hardware": format_hardware(hardware), "hardware_id": hardware_id(hardware),
              "torch": torch.__version__, "triton": triton.__version__,
              "measured_at": _dt.datetime.now().isoformat(timespec="seconds"),
              "copy_gb_per_second": copy_gb_per_second, "rows": rows, "targets": targets}
    if write:
        folder = Path(out_dir) if out_dir else (repo_root() or Path.cwd()) / "benchmarks"
        slug = hardware_id(hardware).removeprefix("cuda-")
        path = benchmark_path(folder, f"kernels-{slug}", result["hardware"])
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
        result["path"] = str(path)
    return result
