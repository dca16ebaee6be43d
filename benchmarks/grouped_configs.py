"""Which block sizes suit minillm's Triton grouped GEMM on this GPU? (a developer's sweep, one prepared run)

    python benchmarks/grouped_configs.py [--size 4096] [--out FILE.json]

At an MoE-like shape (64 experts with uneven counts, 8*size rows, inner size, size/4 columns) it times
grouped_matmul (forward and input gradient) and grouped_weight_grad under a few configurations, checks each
against the loop of torch matmuls first, and prints them next to torch's grouped_mm where this torch has it.
The winner goes into minillm/kernels/grouped.py's GPU_CONFIG / GPU_GRAD_CONFIG by hand, with the JSON
committed under benchmarks/ as its evidence.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from minillm.kernels import grouped
from minillm.kernels.bench import _median_ms as median_ms, grouped_problems, relative_error

FORWARD = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in [
    (64, 64, 32, 4, 3), (128, 128, 32, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 8, 4)]]
WEIGHT_GRAD = [dict(BLOCK_K=k, BLOCK_N=n, BLOCK_R=r, num_warps=w, num_stages=s) for k, n, r, w, s in [
    (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (128, 128, 32, 4, 4)]]


def interpreter_median_ms(fn) -> float:  # --device cpu: a smoke run in Triton's interpreter, not a timing
    import time
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        global median_ms
        median_ms = interpreter_median_ms
    grouped_mm = getattr(F, "grouped_mm", None)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (interpreter)"
    results = {"gpu": gpu, "torch": torch.__version__, "rows": []}
    default_forward, default_grad = dict(grouped.GPU_CONFIG), dict(grouped.GPU_GRAD_CONFIG)
    for dtype in (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16,):
        shape, ends, problems = grouped_problems(args.size, device, dtype)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        results.update(shape=list(shape), max_rows_per_expert=int(counts.max()), min_rows_per_expert=int(counts.min()))
        flops = 2 * shape[1] * shape[2] * shape[3]
        for problem, (ours, loop, peer_args) in problems.items():
            peer_ms = None
            if grouped_mm is not None:
                try:
                    peer_ms = median_ms(lambda: grouped_mm(*peer_args, offs=ends))
                except (RuntimeError, TypeError, ValueError) as error:
                    print(f"grouped_mm refuses {problem} {dtype}: {str(error).splitlines()[0]}")
            expected, loop_ms = loop(), median_ms(loop)
            configs = WEIGHT_GRAD if problem == "grouped_wgrad" else FORWARD
            for config in configs:
                if problem == "grouped_wgrad":
                    grouped.GPU_GRAD_CONFIG = config
                else:
                    grouped.GPU_CONFIG = config
                try:
                    got = ours()
                    error = relative_error(got, expected)
                    ms = median_ms(ours) if error < 1e-2 else None
                except Exception as failure:  # a configuration the compiler refuses (shared memory, say)
                    error, ms = None, None
                    print(f"{problem} {config}: {type(failure).__name__}: {str(failure).splitlines()[0][:120]}")
                row = {"problem": problem, "dtype": str(dtype).removeprefix("torch."), "config": config,
                       "ms": ms, "relative_error": error, "tflops": flops / ms / 1e9 if ms else None,
                       "grouped_mm_ms": peer_ms, "loop_ms": loop_ms}
                results["rows"].append(row)
                vs = f"{peer_ms / ms:.2f}x grouped_mm" if (ms and peer_ms) else ""
                print(f"{problem:<14}{row['dtype']:<9}{str(list(config.values())):<26}"
                      + (f"{ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s  {loop_ms / ms:5.2f}x loop  {vs}" if ms
                         else f"  failed (error {error})"))
            grouped.GPU_CONFIG, grouped.GPU_GRAD_CONFIG = dict(default_forward), dict(default_grad)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
