"""What things cost on this machine: hardware probe, measured peaks, the Meter, prices, the Ledger.

Taught in chapter 00 (setup) and used by every chapter: each measurement is a `Meter` run whose figures
go into the `Ledger` (JSON lines under runs/), which `minillm report` turns into tables and a plot.

Units: GB means 10**9 bytes everywhere (as on datasheets), FLOP/s counts a multiply-add as two FLOPs,
prices are dollars per device-hour.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import math
import numbers
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .paths import PACKAGE_DIR, _expand_user, atomic_write_bytes, atomic_write_text, fast_mode, runs_dir

__all__ = [
    "synchronize", "Meter", "best_seconds", "best_seconds_interleaved", "keep_freed_memory", "freed_memory_kept",
    "probe_hardware", "hardware_id", "format_hardware", "benchmark_path", "default_device", "resolve_device",
    "measure_peaks", "DATASHEET", "datasheet_peaks", "load_prices", "price_per_hour", "set_price_per_hour",
    "Ledger", "savings_table", "report", "format_quantity",
]


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work, so wall-clock time measures the work and not just its launch.

    device=None waits for every GPU this process has started using (and starts none that it has not).
    """
    device = torch.device(device) if device is not None else None
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # no CUDA context: no queued work
            torch.cuda.synchronize()
        if _mps_available() and hasattr(torch, "mps"):
            torch.mps.synchronize()
    elif device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


class Meter:
    """Measure one piece of work: wall time (GPU synchronised), tokens, FLOPs, peak memory, dollars.

        with Meter("bigram training", chapter="01") as m:
            ...
            m.add(tokens=batch_tokens, flops=batch_flops)
        m.tokens_per_second, m.dollars

    Entering the same meter again adds to its time, so one meter can cover several separate stretches.
    When the work inside `with` raises, the time up to the exception still counts and the exception goes on
    (a Meter never writes to the ledger itself: `Ledger.record` it after the `with` block).
    Peak memory is the GPU's allocated peak during the stretch on CUDA; on a CPU (or mps) it is the process's
    peak resident memory so far, which includes whatever ran before the meter started. Without `device`, the
    meter counts as a CPU one for memory but still waits for any GPU work the process has started.
    """

    def __init__(self, label: str, chapter: str | None = None, device: str | torch.device | None = None,
                 tokens: int = 0, flops: float = 0.0, price_per_hour: float | None = None):
        # bool is an int to Python, but price_per_hour=True is a mistake, not a price of $1 per hour
        if price_per_hour is not None and not (_finite_number(price_per_hour) and price_per_hour >= 0):
            raise ValueError(f"Meter: price_per_hour={price_per_hour!r} must be a finite number >= 0 "
                             f"(dollars per hour{', not a bool' if isinstance(price_per_hour, bool) else ''}); "
                             "leave it None to use the price table")
        # checked now, not when Ledger.record refuses the label after the work is done
        if not isinstance(label, str) or not label:
            raise ValueError(f"Meter: label={label!r} must be a non-empty string naming the measurement")
        if chapter is not None:
            _chapter_name(chapter, f"Meter {label!r}")
        self.label = label
        self.chapter = chapter
        # a device this machine lacks fails here, clearly, not inside torch when the meter starts
        self.device = resolve_device(device, f"Meter {label!r}") if device is not None else torch.device("cpu")
        # without a device, GPU work in the `with` block is still waited for (else only its launch is timed)
        self._sync_all = device is None
        self.tokens = _count(tokens, "tokens", f"Meter {label!r}", whole=True)
        self.flops = _count(flops, "flops", f"Meter {label!r}")
        self._price_per_hour = price_per_hour
        self._price_source = None if price_per_hour is None else "given to this Meter"
        self.seconds = 0.0
        self.peak_memory_bytes: int | None = None
        self._start: float | None = None
        self._cuda_peak = 0  # this meter's CUDA peak before another meter reset torch's peak counter

    def add(self, tokens: int = 0, flops: float = 0.0) -> None:
        self.tokens += _count(tokens, "tokens", f"Meter {self.label!r}: add", whole=True)
        self.flops += _count(flops, "flops", f"Meter {self.label!r}: add")

    def __enter__(self) -> "Meter":
        if self._start is not None:
            raise RuntimeError(f"Meter {self.label!r} is already running; nest two different meters instead")
        synchronize(None if self._sync_all else self.device)
        if self.device.type == "cuda":
            # torch keeps one peak counter per GPU: before resetting it, save the peak so far of every meter
            # running around this one (nested meters), so that each still reports its own true peak
            current = int(torch.cuda.max_memory_allocated(self.device))
            for meter in _RUNNING_CUDA_METERS:
                if _cuda_index(meter.device) == _cuda_index(self.device):
                    meter._cuda_peak = max(meter._cuda_peak, current)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_peak = 0
            _RUNNING_CUDA_METERS.append(self)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self._start is None:
            raise RuntimeError(f"Meter {self.label!r} is not running: __exit__ without __enter__; "
                               "use it as `with Meter(...) as m:`")
        try:  # a GPU error surfaces here: the meter still stops, so it can be used again
            synchronize(None if self._sync_all else self.device)
        finally:
            self.seconds += time.perf_counter() - self._start
            self._start = None
            if self in _RUNNING_CUDA_METERS:
                _RUNNING_CUDA_METERS.remove(self)
        if self.device.type == "cuda":
            peak = max(self._cuda_peak, int(torch.cuda.max_memory_allocated(self.device)))
            # a meter entered again keeps the highest peak of all its stretches, as it adds up their time
            self.peak_memory_bytes = max(peak, self.peak_memory_bytes or 0)
        else:
            self.peak_memory_bytes = _process_peak_rss_bytes()
        return False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def flops_per_second(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else float("nan")

    @property
    def price_per_hour(self) -> float:
        if self._price_per_hour is None:
            self._price_per_hour, self._price_source = price_per_hour()
        return self._price_per_hour

    @property
    def price_source(self) -> str:
        """Where price_per_hour came from: a price table's entry (assumed unless you set it) or the caller."""
        _ = self.price_per_hour   # the first lookup in the price table sets the source too
        return self._price_source

    @property
    def dollars(self) -> float:
        return self.seconds / 3600.0 * self.price_per_hour

    @property
    def dollars_per_million_tokens(self) -> float:
        return self.dollars / self.tokens * 1e6 if self.tokens else float("nan")

    def to_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "tokens": self.tokens,
            "flops": self.flops,
            "tokens_per_second": self.tokens_per_second if self.tokens else None,
            "flops_per_second": self.flops_per_second if self.flops else None,
            "peak_memory_bytes": self.peak_memory_bytes,
            "price_per_hour": self.price_per_hour,
            "price_source": self.price_source,
            "dollars": self.dollars,
        }

    def __repr__(self) -> str:
        return (f"Meter({self.label!r}: {self.seconds:.3f} s, {self.tokens} tokens, "
                f"{self.flops:.3g} FLOPs, ${self.dollars:.6f})")


_RUNNING_CUDA_METERS: list[Meter] = []


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _process_peak_rss_bytes() -> int | None:
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:  # Windows has no resource module
        return None


def best_seconds(fn: Callable[[], object], device: str | torch.device | None = None, repeats: int = 5,
                 warmup: int = 1, budget_seconds: float | None = None) -> float:
    """Fastest of `repeats` timed calls of `fn` after `warmup` untimed ones, each timed with a Meter.

    The minimum, not the mean: anything that slows a run (another process, a cold cache) only adds time,
    so the fastest run is the closest to what the hardware can do. With `budget_seconds`, the number of
    repeats shrinks so that slow work (bf16 on an old CPU) stays within roughly that budget.
    """
    _check_whole(repeats, "repeats", "best_seconds", minimum=1)
    _check_whole(warmup, "warmup", "best_seconds", minimum=None)
    if not callable(fn):
        raise TypeError(f"best_seconds: fn must be a function to call with no arguments (e.g. lambda: model(x)), "
                        f"got {type(fn).__name__}")
    for _ in range(max(warmup, 0)):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        with Meter("best_seconds", device=device, price_per_hour=0.0) as meter:
            fn()
        times.append(meter.seconds)
        if budget_seconds is not None and sum(times) >= budget_seconds:
            break
    return min(times)


def best_seconds_interleaved(fns: dict[str, Callable[[], object]], device: str | torch.device | None = None,
                             repeats: int = 5, warmup: int = 1, warmup_each_round: int = 0) -> dict[str, float]:
    """`best_seconds` of several contenders, timed in alternating rounds (a, b, c, a, b, c, ...).

    For comparisons: a burst of load from another process then slows every contender a little rather
    than one of them a lot, so the ratios of the fastest runs stay honest on a shared machine.
    `warmup_each_round` untimed calls precede each timed one: for contenders that switch a process-wide
    setting (the memory allocator, say), whose first call after the switch pays for it.
    """
    _check_whole(repeats, "repeats", "best_seconds_interleaved", minimum=1)
    _check_whole(warmup, "warmup", "best_seconds_interleaved", minimum=None)
    _check_whole(warmup_each_round, "warmup_each_round", "best_seconds_interleaved", minimum=0)
    if not isinstance(fns, dict) or not all(callable(fn) for fn in fns.values()):
        raise TypeError("best_seconds_interleaved: fns must be a dict of name -> function to call with no "
                        f"arguments, e.g. {{'naive': lambda: slow(x), 'fused': lambda: fast(x)}}; got {fns!r:.80}")
    for fn in fns.values():
        for _ in range(max(warmup, 0)):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], best_seconds(fn, device=device, repeats=1, warmup=warmup_each_round))
    return best


def _check_whole(value, name: str, who: str, minimum: int | None) -> None:
    """A count of calls: a whole number (not a bool), at least `minimum` when one is given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (minimum is not None and value < minimum):
        bound = "" if minimum is None else "at least 1, " if minimum == 1 else f">= {minimum}, "
        raise ValueError(f"{who}: {name}={value!r} must be {bound}a whole number (it counts calls)")


# glibc's mallopt parameters (malloc.h) and the defaults they had before keep_freed_memory() changed them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_KEPT_FREED_MEMORY = False


def keep_freed_memory(enable: bool = True, up_to_bytes: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the operating system.

    Every fresh page of memory costs a page fault the first time it is written (the kernel must find and
    zero it): milliseconds per 16 MB on a small VM. PyTorch's CPU tensors come straight from malloc,
    which by default maps big blocks fresh from the OS and returns them on free, so a layer that allocates
    tens of MB of temporaries can pay those faults on every step (glibc raises its threshold for "big"
    by itself after such a free, up to 32 MB, so how many remain depends on the allocation pattern).
    This sets glibc's mmap and trim thresholds high (`mallopt`), so freed blocks stay in the heap and are
    reused warm: the in-process equivalent of running with jemalloc or tcmalloc, which PyTorch's CPU
    performance guide recommends. The cost is that
    the process keeps its peak memory instead of giving it back.

    It changes the whole process, so it is a call you make, never something importing minillm does.
    `enable=False` puts glibc's default thresholds back (without their automatic growth). Returns True when
    applied: Linux with glibc; elsewhere (macOS, Windows, musl) there is nothing to change and it returns False.
    """
    global _KEPT_FREED_MEMORY
    if isinstance(up_to_bytes, bool) or not isinstance(up_to_bytes, int) or up_to_bytes < _GLIBC_DEFAULT_THRESHOLD:
        raise ValueError(f"keep_freed_memory: up_to_bytes={up_to_bytes!r} must be an integer >= "
                         f"{_GLIBC_DEFAULT_THRESHOLD} (glibc's default)")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mmap_threshold = min(up_to_bytes, 1 << 30) if enable else _GLIBC_DEFAULT_THRESHOLD
        trim_threshold = up_to_bytes if enable else _GLIBC_DEFAULT_THRESHOLD
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
    _KEPT_FREED_MEMORY = applied and enable
    return applied


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory() is in effect in this process."""
    return _KEPT_FREED_MEMORY


# ----------------------------------------------------------------------------------------------------
# What machine is this?
# ----------------------------------------------------------------------------------------------------

_HARDWARE: dict | None = None


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _sysctl(name: str) -> str | None:
    try:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    value = result.stdout.strip()
    return value if result.returncode == 0 and value else None


def _cpu_model() -> str:
    cpuinfo = _read_text("/proc/cpuinfo")
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_generation(cpuinfo: str | None = None) -> str | None:
    """"family F, model M" from an x86 Linux /proc/cpuinfo, else None. A cloud VM often names its CPU only
    "AMD EPYC" or "Intel Xeon"; the family and model tell its core generation apart (AMD family 25 is Zen 3
    and Zen 4, 26 is Zen 5), and with it how fast its wide vector instructions run."""
    cpuinfo = _read_text("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    family = re.search(r"^cpu family\s*:\s*(\d+)\s*$", cpuinfo, re.MULTILINE)
    model = re.search(r"^model\s*:\s*(\d+)\s*$", cpuinfo, re.MULTILINE)
    return f"family {family.group(1)}, model {model.group(1)}" if family and model else None


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):
        pass
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read_text("/proc/meminfo"), re.MULTILINE)
    if match:
        return int(match.group(1)) * 1024 / 1e9
    if sys.platform == "darwin":
        size = _sysctl("hw.memsize")
        if size and size.isdigit():
            return int(size) / 1e9
    return None


def _cpu_has_fast_bf16() -> bool:
    # bf16 matmul is only fast on a CPU with bf16 instructions (AVX512-BF16/AMX on x86, FEAT_BF16 on ARM);
    # elsewhere torch converts to fp32 and bf16 is slower than plain fp32.
    flags = set()
    for line in _read_text("/proc/cpuinfo").splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[-1].split())
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    if sys.platform == "darwin":
        return _sysctl("hw.optional.arm.FEAT_BF16") == "1"
    return False


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def probe_hardware(refresh: bool = False) -> dict:
    """Describe this machine: CPU, memory, the accelerator torch will use, and what precisions it runs fast.

    The answer is cached for the life of the process (the hardware does not change under us); pass
    refresh=True to probe again. Returns a fresh copy, so callers may modify it.
    """
    global _HARDWARE
    if _HARDWARE is None or refresh:
        memory_gb = _memory_gb()
        hw: dict = {
            "cpu": _cpu_model(),
            "cpu_generation": _cpu_generation(),
            "cores": os.cpu_count(),
            "memory_gb": round(memory_gb, 1) if memory_gb is not None else None,
            "device": "cpu",
            "gpu": None,
            "compute_capability": None,
            "gpu_memory_gb": None,
            "gpu_count": 0,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "bf16": _cpu_has_fast_bf16(),
            "fp8": False,
        }
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            props = torch.cuda.get_device_properties(0)
            hw.update(device="cuda", gpu=torch.cuda.get_device_name(0), compute_capability=f"{major}.{minor}",
                      gpu_memory_gb=round(props.total_memory / 1e9, 1), gpu_count=torch.cuda.device_count(),
                      # bf16 tensor cores arrive with Ampere (8.0), fp8 ones with Ada/Hopper (8.9);
                      # older GPUs emulate bf16, which runs but is slow.
                      bf16=(major, minor) >= (8, 0), fp8=(major, minor) >= (8, 9))
        elif _mps_available():
            hw.update(device="mps", gpu=hw["cpu"], gpu_count=1)  # the GPU is part of the Apple chip
            try:
                probe = torch.ones(4, 4, dtype=torch.bfloat16, device="mps")
                (probe @ probe).cpu()
                hw["bf16"] = True
            except Exception:  # older macOS builds reject bf16 on MPS
                hw["bf16"] = False
        _HARDWARE = hw
    return dict(_HARDWARE)


def _slug(text: str) -> str:
    text = text.lower()
    text = re.sub(r"\((r|tm|c)\)|®|™", " ", text)
    text = re.sub(r"@.*$", " ", text)  # clock speed: the same chip is sold at several
    text = re.sub(r"\b(cpu|processor|with radeon graphics|\d+-core)\b", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def hardware_id(hw: dict | None = None) -> str:
    """A short stable name for this machine, used in cache file names and the ledger.

    "cpu-intel-xeon-2c" for a CPU (model and logical cores), "cuda-nvidia-h100-80gb-hbm3" for a GPU
    (peaks and prices are per GPU, so the count of GPUs is not part of it).
    """
    hw = probe_hardware() if hw is None else hw
    device = hw.get("device") or "cpu"
    if device != "cpu" and hw.get("gpu"):
        name = _slug(str(hw["gpu"]))
        return f"{device}-{name}"[:80]
    cores = hw.get("cores")
    name = _slug(str(hw.get("cpu") or "unknown"))[:60].strip("-") or "unknown"
    return f"cpu-{name}-{cores}c" if cores else f"cpu-{name}"


def benchmark_path(folder: str | os.PathLike, stem: str, hardware: str) -> Path:
    """folder/<stem>-<today>.json for a benchmark's figures, measured on the machine `hardware` describes
    (format_hardware's text, which the JSON stores under "hardware").

    Two machines can share a hardware_id (two AMD EPYC VMs of different generations, both "cpu-amd-epyc-2c"):
    a file of today's from another machine is kept, and this run's figures go to <stem>-<today>-2.json (or the
    next free number). A rerun on the same machine replaces its own file of the day.
    """
    folder = Path(folder)
    base = f"{stem}-{_dt.date.today().isoformat()}"
    for number in range(1, 1000):
        path = folder / (f"{base}.json" if number == 1 else f"{base}-{number}.json")
        if not path.exists():
            return path
        try:
            same_machine = json.loads(path.read_text(encoding="utf-8")).get("hardware") == hardware
        except (OSError, ValueError, AttributeError):   # unreadable, not JSON, or not an object: keep it
            same_machine = False
        if same_machine:
            return path
    raise FileExistsError(f"benchmark_path: {folder} already holds 999 files named {base}*.json; move some away")


def format_hardware(hw: dict | None = None) -> str:
    """One or two lines a human reads: the CPU side, then the accelerator (if any)."""
    hw = probe_hardware() if hw is None else hw
    memory = f", {hw['memory_gb']:.1f} GB RAM" if hw.get("memory_gb") else ""
    generation = f" ({hw['cpu_generation']})" if hw.get("cpu_generation") else ""
    first = (f"CPU: {hw.get('cpu')}{generation}, {hw.get('cores')} cores{memory} | torch {hw.get('torch')}, "
             f"Python {hw.get('python')}, {hw.get('platform')}")
    device = hw.get("device", "cpu")
    if device == "cuda":
        count = f" x{hw['gpu_count']}" if (hw.get("gpu_count") or 0) > 1 else ""
        gpu_memory = f", {hw['gpu_memory_gb']:.1f} GB" if hw.get("gpu_memory_gb") else ""
        second = (f"GPU: {hw.get('gpu')}{count} (compute capability {hw.get('compute_capability')}"
                  f"{gpu_memory}) | fast bf16: {_yes(hw.get('bf16'))}, fp8: {_yes(hw.get('fp8'))}")
    elif device == "mps":
        second = f"GPU: {hw.get('gpu')} via MPS | bf16: {_yes(hw.get('bf16'))}"
    else:
        second = f"No GPU: torch runs on the CPU | fast bf16: {_yes(hw.get('bf16'))}"
    return f"{first}\n{second}"


def _yes(flag) -> str:
    return "yes" if flag else "no"


def default_device() -> torch.device:
    """The fastest device torch can use here: cuda, then Apple's mps, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None = None, who: str = "minillm") -> torch.device:
    """None or "auto": default_device(); otherwise that device, if this machine has it (else a clear error)."""
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{who}: device={name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{who}: device={name!r} but no CUDA GPU is available; use device='auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{who}: device={name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"{who}: device={name!r} but Apple's mps is not available; use device='auto' or 'cpu'")
    return device


# ----------------------------------------------------------------------------------------------------
# The machine's ceilings: measured and from the datasheet
# ----------------------------------------------------------------------------------------------------

# Matmul sizes and memory-copy bytes: large enough to reach the hardware's steady state, small enough to
# finish in seconds (fast: < 5 s on 2 CPU cores; full: < 30 s on a CPU).
_MATMUL_SIZE = {("cpu", True): 1024, ("cpu", False): 2048, ("gpu", True): 4096, ("gpu", False): 8192}
_COPY_BYTES = {("cpu", True): 128 * 2**20, ("cpu", False): 512 * 2**20,
               ("gpu", True): 512 * 2**20, ("gpu", False): 2 * 2**30}
_BUDGET_SECONDS = {True: 0.6, False: 5.0}  # per dtype, timed part only


def _matmul_dtypes(device: torch.device, hw: dict) -> list[torch.dtype]:
    if device.type == "cpu":
        # CPUs always run bf16 (slowly without bf16 instructions: worth seeing); fp16 is not a CPU format.
        return [torch.float32, torch.bfloat16]
    if device.type == "cuda":
        dtypes = [torch.float32, torch.float16]
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            dtypes.append(torch.bfloat16)
        return dtypes
    return [torch.float32, torch.float16] + ([torch.bfloat16] if hw.get("bf16") else [])


def _measure_matmul(n: int, dtype: torch.dtype, device: torch.device, budget: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = best_seconds(lambda: torch.matmul(a, b, out=out), device=device, repeats=10, warmup=2,
                           budget_seconds=budget)
    return 2 * n**3 / seconds


def _measure_copy(num_bytes: int, device: torch.device, budget: float) -> float:
    source = torch.ones(num_bytes // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = best_seconds(lambda: target.copy_(source), device=device, repeats=10, warmup=2,
                           budget_seconds=budget)
    return 2 * source.numel() * source.element_size() / seconds  # every byte is read once and written once


def _peaks_cache_path(hw_id: str) -> Path:
    return runs_dir() / f"peaks-{hw_id}.json"


def _usable_peaks(cached) -> bool:
    flops = cached.get("matmul_flops_per_second") if isinstance(cached, dict) else None
    return (isinstance(flops, dict) and bool(flops)
            and all(_finite_number(value) and value > 0
                    for value in [*flops.values(), cached.get("memory_bytes_per_second")]))


def measure_peaks(device: str | torch.device | None = None, fast: bool | None = None, refresh: bool = False,
                  cache: bool = True) -> dict:
    """Measure this machine's ceilings: matmul FLOP/s per dtype and memory-copy GB/s (best of a few runs).

    The answer is cached in runs/peaks-<hardware_id>.json and reused unless refresh=True (a full-size
    measurement also replaces a cached fast one). `fast` defaults to MINILLM_FAST=1 from the environment.
    """
    fast = fast_mode(fast)
    # a device this machine lacks ("cuda" on a laptop) or a typo ("gpu") fails here, clearly, not inside torch
    device = resolve_device(device, "measure_peaks")
    hw = probe_hardware()
    if device.type != hw["device"]:
        hw = dict(hw, device=device.type)
    hw_id = hardware_id(hw)
    path = _peaks_cache_path(hw_id)
    if cache and not refresh and path.exists():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            warnings.warn(f"measure_peaks: {path} is unreadable; measuring again and replacing it")
        else:
            if not _usable_peaks(cached):  # edited by hand, or another tool's file: measure rather than mislead
                warnings.warn(f"measure_peaks: {path} does not hold positive measured figures; measuring again "
                              "and replacing it")
            elif fast or not cached.get("fast"):
                return cached

    kind = "cpu" if device.type == "cpu" else "gpu"
    n = _MATMUL_SIZE[(kind, fast)]
    budget = _BUDGET_SECONDS[fast]
    flops = {}
    for dtype in _matmul_dtypes(device, hw):
        flops[str(dtype).removeprefix("torch.")] = _measure_matmul(n, dtype, device, budget)
    copy_bytes = _COPY_BYTES[(kind, fast)]
    result = {
        "hardware_id": hw_id,
        "device": device.type,
        "measured_at": _now_iso(),
        "matmul_flops_per_second": flops,
        "memory_bytes_per_second": _measure_copy(copy_bytes, device, budget),
        "matmul_size": n,
        "copy_bytes": copy_bytes,
        "fast": fast,
        "torch": torch.__version__,
    }
    if device.type == "cuda":  # with TF32 allowed, "float32" matmuls run on tensor cores at lower precision
        result["float32_uses_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    if cache:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


# Vendor datasheet peaks for the GPUs learners meet, per GPU, dense (no 2:4 sparsity), in FLOP/s; fp16 and
# bf16 are tensor-core figures with fp32 accumulation, fp32 is the plain (non-TF32) rate. None: no such
# tensor cores. Measured matmuls fall short of these; chapter 02 shows by how much on your GPU.
DATASHEET: dict[str, dict] = {
    "T4": {"fp32": 8.1e12, "fp16": 65e12, "bf16": None, "fp8": None,
           "memory_gb_per_s": 320, "memory_gb": 16,
           "source": "NVIDIA T4 Tensor Core GPU datasheet (Turing, 70 W)"},
    "L4": {"fp32": 30.3e12, "fp16": 121e12, "bf16": 121e12, "fp8": 242.5e12,
           "memory_gb_per_s": 300, "memory_gb": 24,
           "source": "NVIDIA L4 Tensor Core GPU datasheet (Ada; dense = half the sparsity figures)"},
    "A100": {"fp32": 19.5e12, "fp16": 312e12, "bf16": 312e12, "fp8": None,
             "memory_gb_per_s": 2039, "memory_gb": 80,
             "source": "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"},
    "H100": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12, "fp8": 1979e12,
             "memory_gb_per_s": 3350, "memory_gb": 80,
             "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5; dense = half the sparsity figures)"},
    "H800": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12, "fp8": 1979e12,
             "memory_gb_per_s": 3350, "memory_gb": 80,
             "source": "NVIDIA H800 SXM5: H100 compute with NVLink cut to 400 GB/s (export variant)"},
    "H200": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12, "fp8": 1979e12,
             "memory_gb_per_s": 4800, "memory_gb": 141,
             "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM; H100 compute, HBM3e)"},
}

# Variants whose figures differ from the table's main entry: (model, words that must all be in the name).
_DATASHEET_VARIANTS: list[tuple[str, tuple[str, ...], dict]] = [
    ("H100", ("PCIE",), {"fp32": 51e12, "fp16": 756e12, "bf16": 756e12, "fp8": 1513e12,
                         "memory_gb_per_s": 2000, "memory_gb": 80,
                         "source": "NVIDIA H100 Tensor Core GPU datasheet (PCIe 80GB)"}),
    ("A100", ("40GB",), {"memory_gb_per_s": 1555, "memory_gb": 40,
                         "source": "NVIDIA A100 Tensor Core GPU datasheet (40GB HBM2)"}),
]


def _gpu_model_in(name: str, model: str) -> bool:
    # Whole-word match on letters and digits: "A100" must not match "A10", "L4" must not match "L40S",
    # "H100" must not match "GH100"; dashes and spaces count as word breaks ("A100-SXM4-80GB").
    return re.search(rf"(?<![A-Z0-9]){re.escape(model.upper())}(?![A-Z0-9])", name.upper()) is not None


def datasheet_peaks(gpu_name: str | None) -> dict | None:
    """The datasheet entry for a GPU name as torch reports it ("Tesla T4", "NVIDIA H100 80GB HBM3").

    Returns a copy with "model" added, or None for a CPU, Apple GPU or a GPU not in `DATASHEET`.
    """
    if not gpu_name:
        return None
    for model in sorted(DATASHEET, key=len, reverse=True):
        if _gpu_model_in(gpu_name, model):
            entry = dict(DATASHEET[model], model=model)
            for variant_model, words, changes in _DATASHEET_VARIANTS:
                if variant_model == model and all(word in gpu_name.upper() for word in words):
                    entry.update(changes)
            return entry
    return None


# ----------------------------------------------------------------------------------------------------
# Prices
# ----------------------------------------------------------------------------------------------------

PRICES_FILE = PACKAGE_DIR / "prices.json"


def _user_prices_path() -> Path:
    env = os.environ.get("MINILLM_PRICES", "").strip()
    return _expand_user(env) if env else runs_dir() / "prices.json"


def _read_prices_file(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: Notepad's byte-order mark
    except (ValueError, RecursionError) as error:  # RecursionError: nested thousands of levels deep
        raise ValueError(f"prices file {path} is not valid JSON ({error}); fix it or delete it to use "
                         "the shipped prices") from None
    if not isinstance(data, dict) or not isinstance(data.get("prices", {}), dict):
        raise ValueError(f"prices file {path} must hold an object like "
                         '{"date": "...", "prices": {"NVIDIA T4": {"per_hour": 0.35}}}; fix it or delete it')
    return {**data, "prices": _checked_prices(data.get("prices", {}), f"prices file {path}")}


def _checked_prices(prices: dict, where: str) -> dict:
    """Price entries as {key: {"per_hour": dollars, ...}}, each price a number >= 0 (a bare number is one)."""
    entries = {}
    for key, entry in prices.items():
        if isinstance(entry, numbers.Real) and not isinstance(entry, bool):
            entry = {"per_hour": entry}  # a bare number is the price per hour
        per_hour = entry.get("per_hour") if isinstance(entry, dict) else None
        if not (_finite_number(per_hour) and per_hour >= 0):
            raise ValueError(f"{where}: {key!r} needs \"per_hour\": a number of dollars >= 0, got {entry!r}")
        entries[key] = dict(entry)
    return entries


def load_prices(path: str | os.PathLike | None = None) -> dict:
    """The shipped price table merged with the user's override file, the override winning.

    `path` is the override file; by default $MINILLM_PRICES or runs/prices.json, used when it exists. Each
    entry gets a "from" field saying which file (and date) its price came from.
    """
    shipped = _read_prices_file(PRICES_FILE)
    merged = {key: value for key, value in shipped.items() if key != "prices"}
    origin = f"prices.json {shipped.get('date', 'undated')}"
    prices = {key: dict(entry, **{"from": origin}) for key, entry in shipped["prices"].items()}
    override_path = Path(path) if path is not None else _user_prices_path()
    if override_path.exists():
        override = _read_prices_file(override_path)
        origin = f"{override_path} {override.get('date', 'undated')}"
        for key, entry in override["prices"].items():
            prices[key] = {**prices.get(key, {}), **entry, "from": origin}
        merged["override"] = str(override_path)
    merged["prices"] = prices
    return merged


def _price_key(hw: dict, prices: dict) -> str:
    hw_id = hardware_id(hw)
    if hw_id in prices:  # an exact price the learner set for this machine
        return hw_id
    device = hw.get("device", "cpu")
    if device == "cuda":
        gpu = str(hw.get("gpu") or "")
        for key in sorted(prices, key=len, reverse=True):
            model = key.removeprefix("NVIDIA ").strip()
            if model and model not in ("cpu", "mps", "other GPU") and _gpu_model_in(gpu, model):
                return key
        return "other GPU"
    return "mps" if device == "mps" and "mps" in prices else "cpu"


def price_per_hour(hw: dict | None = None, prices: dict | None = None) -> tuple[float, str]:
    """Dollars per hour for this machine (one GPU, or the CPU) and where that figure came from.

        price_per_hour() -> (0.35, "prices.json 2026-11-28: NVIDIA T4 (Colab/cloud on-demand ...)")
    """
    hw = probe_hardware() if hw is None else hw
    if prices is None:
        table = load_prices()["prices"]
    elif isinstance(prices, dict) and isinstance(prices.get("prices"), dict):
        table = _checked_prices(prices["prices"], "price_per_hour: prices")
    else:
        raise ValueError("price_per_hour: prices must be a table like load_prices() returns, "
                         '{"prices": {"cpu": {"per_hour": 0.05}, ...}}, or None for the shipped one')
    key = _price_key(hw, table)
    if key not in table:
        raise KeyError(f"price table has no {key!r} entry; add one with set_price_per_hour(dollars) or "
                       "restore minillm/prices.json")
    entry = table[key]
    what = f" ({entry['what']})" if entry.get("what") else ""
    return float(entry["per_hour"]), f"{entry.get('from', 'prices')}: {key}{what}"


def set_price_per_hour(dollars: float, hw: dict | None = None) -> Path:
    """Record what this machine really costs you per hour; every later price lookup uses it.

    Writes (atomically) the user override file, $MINILLM_PRICES or runs/prices.json, under this
    machine's hardware_id, keeping any other prices already in it. Returns the file's path.
    """
    if not (_finite_number(dollars) and dollars >= 0):
        raise ValueError(f"set_price_per_hour: dollars={dollars!r} must be a finite number >= 0 "
                         "(dollars per hour of this machine)")
    hw = probe_hardware() if hw is None else hw
    path = _user_prices_path()
    data = _read_prices_file(path) if path.exists() else {"prices": {}}
    today = _dt.date.today().isoformat()
    data["date"] = today
    data.setdefault("note", "Your own prices; they override minillm/prices.json. Edit freely.")
    data["prices"][hardware_id(hw)] = {"per_hour": float(dollars), "what": f"set by you on {today}"}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# The ledger
# ----------------------------------------------------------------------------------------------------

def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None  # JSON has no NaN or infinity
    if isinstance(value, dict):
        return {str(key): _jsonable(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
        return _jsonable(value.item(), where)
    raise TypeError(f"Ledger: {where} is a {type(value).__name__} ({str(value)[:40]!r}), which the "
                    "ledger cannot store; pass a number, string, bool or None, or a list/dict of those "
                    "(e.g. float(x) or tensor.item())")


_RESERVED_KEYS = ("time", "chapter", "label", "hardware_id", "hardware", "values")
# Values the report computes with: in an entry each is a number or None (JSON null), never text or a bool.
_NUMERIC_VALUE_KEYS = ("seconds", "tokens", "flops", "tokens_per_second", "flops_per_second", "peak_memory_bytes",
                       "price_per_hour", "dollars", "baseline", "improved", "ratio", "saving_percent")


def _chapter_name(chapter, who: str) -> str:
    """The chapter as the ledger stores it: 3 -> "03", strings as they are."""
    if isinstance(chapter, int) and not isinstance(chapter, bool):
        chapter = f"{chapter:02d}"
    if not isinstance(chapter, str) or not chapter:
        raise ValueError(f"{who}: chapter={chapter!r} must be a non-empty string such as '03'")
    return chapter


def _count(value, name: str, where: str, whole: bool = False) -> float:
    """A count of tokens (whole=True: a whole number) or FLOPs: a finite number >= 0, numpy and one-element
    tensors included."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if _finite_number(value) and value >= 0 and (not whole or float(value) == int(value)):
        return int(value) if whole else float(value)
    raise ValueError(f"{where}: {name}={value!r} must be a "
                     f"{'whole number >= 0 (how many tokens were processed)' if whole else 'finite number >= 0'}")


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def _unusable_value(values: dict) -> str | None:
    """The first value the report could not compute with, as "'key' = value", or None when all are fine."""
    for key in _NUMERIC_VALUE_KEYS:
        if values.get(key) is not None and not _finite_number(values[key]):
            return f"{key!r} = {values[key]!r}"
    if not isinstance(values.get("unit", ""), str):
        return f"'unit' = {values['unit']!r}"
    return None


def _usable_entry(entry) -> bool:
    """Whether a parsed ledger line is an entry the report can show (anything else counts as corrupt)."""
    return (isinstance(entry, dict) and isinstance(entry.get("values"), dict)
            and isinstance(entry.get("chapter"), str) and bool(entry["chapter"])
            and isinstance(entry.get("label"), str) and bool(entry["label"])
            and _unusable_value(entry["values"]) is None)


_CORRUPT_LINES_NAMED = 10  # line numbers a corrupt-ledger warning lists before "and N more"


class Ledger:
    """Every measurement of the course, one JSON object per line in runs/ledger.jsonl.

        ledger = Ledger()
        ledger.record(meter, chapter="01")
        ledger.latest(chapter="01", label="bigram training")["values"]["tokens_per_second"]
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else runs_dir() / "ledger.jsonl"
        self._corrupt_lines_reported = 0

    def append(self, chapter: str, label: str, values: dict, hardware: dict | None = None, **tags) -> dict:
        """Add one entry and make sure it is on disk before returning it."""
        chapter = _chapter_name(chapter, "Ledger.append")
        if not isinstance(label, str) or not label:
            raise ValueError(f"Ledger.append: label={label!r} must be a non-empty string naming the measurement")
        if not isinstance(values, dict):
            raise TypeError(f"Ledger.append: values must be a dict of name -> number, got {type(values).__name__}")
        clashes = [key for key in tags if key in _RESERVED_KEYS]
        if clashes:
            raise ValueError(f"Ledger.append: tag(s) {clashes} clash with the entry's own fields "
                             f"{list(_RESERVED_KEYS)}; rename them")
        hw = probe_hardware() if hardware is None else hardware
        entry = {
            "time": _now_iso(),
            "chapter": chapter,
            "label": label,
            "hardware_id": hardware_id(hw),
            "hardware": {"cpu": hw.get("cpu"), "gpu": hw.get("gpu"), "device": hw.get("device")},
            "values": {str(key): _jsonable(value, f"values[{key!r}]") for key, value in values.items()},
        }
        entry.update({key: _jsonable(value, f"tag {key!r}") for key, value in tags.items()})
        unusable = _unusable_value(entry["values"])
        if unusable is not None:  # entries() would skip such a line as corrupt: refuse it now instead
            raise TypeError(f"Ledger.append: values {unusable} must be a number or None, since the report "
                            f"computes with it; keys {list(_NUMERIC_VALUE_KEYS)} hold numbers (put text elsewhere)")
        line = (json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write in append mode, then fsync: a crash loses at most the line being written. If an earlier
        # crash left a torn last line (no newline), start on a fresh line so this entry is not glued onto it.
        # Another process appending at the same moment can at worst add a blank line, which entries() skips.
        with open(self.path, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)  # append mode: lands at the end of the file whatever the read position
            f.flush()
            os.fsync(f.fileno())
        return entry

    def record(self, meter: Meter, chapter: str | None = None, **extra_values) -> dict:
        """Append a Meter's figures (time, tokens/s, FLOP/s, peak memory, dollars) plus any extra values."""
        if not isinstance(meter, Meter):
            raise TypeError(f"Ledger.record: expected a Meter, got {type(meter).__name__}; for other figures use "
                            "Ledger.append(chapter, label, values)")
        # inside its `with` block the running stretch is not in meter.seconds yet: the entry would be short
        if getattr(meter, "_start", None) is not None:
            raise RuntimeError(f"Ledger.record: meter {meter.label!r} is still running; record it after its "
                               "`with` block ends")
        chapter = chapter if chapter is not None else meter.chapter
        if chapter is None:
            raise ValueError(f"Ledger.record: meter {meter.label!r} has no chapter; pass chapter='NN' "
                             "here or to Meter(...)")
        return self.append(chapter, meter.label, {**meter.to_dict(), **extra_values})

    def entries(self, chapter: str | int | None = None, label: str | None = None) -> list[dict]:
        """All entries, oldest first, optionally only one chapter's (3 means "03", as in append) and/or one label's.

        Lines that are not entries the report can use (torn by a crash, edited by hand into text where a
        number belongs) are skipped with a warning.
        """
        if chapter is not None:
            chapter = _chapter_name(chapter, "Ledger.entries")
        if not self.path.exists():
            return []
        found, corrupt = [], []
        # utf-8-sig: a byte-order mark (a ledger saved by Notepad) is not part of the first entry
        with open(self.path, encoding="utf-8-sig", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
                    entry = None
                if not _usable_entry(entry):
                    corrupt.append(number)
                    continue
                if chapter is not None and entry["chapter"] != chapter:
                    continue
                if label is not None and entry["label"] != label:
                    continue
                found.append(entry)
        if len(corrupt) > self._corrupt_lines_reported:
            self._corrupt_lines_reported = len(corrupt)
            shown = ", ".join(str(number) for number in corrupt[:_CORRUPT_LINES_NAMED])
            more = f" and {len(corrupt) - _CORRUPT_LINES_NAMED} more" if len(corrupt) > _CORRUPT_LINES_NAMED else ""
            warnings.warn(f"Ledger {self.path}: skipped {len(corrupt)} corrupt line(s) "
                          f"(line {shown}{more}): torn by a crash, or not an entry (chapter "
                          "and label must be text, measured values numbers); the other entries are fine. "
                          "Delete or fix those lines to silence this.", stacklevel=2)
        return found

    def latest(self, chapter: str | int | None = None, label: str | None = None) -> dict | None:
        matches = self.entries(chapter, label)
        return matches[-1] if matches else None


# ----------------------------------------------------------------------------------------------------
# Tables, the report, the plot
# ----------------------------------------------------------------------------------------------------

_PREFIXES = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")]
_SYMBOL_UNITS = {"FLOP", "FLOPs", "B", "tok", "param", "Hz", "W", "J"}  # an SI prefix attaches directly


# Whole numbers print in full below this ("8049 years", "×12345"); beyond it digits stop being readable and
# scientific notation takes over ("×1e+300", not 301 digits).
_PLAIN_LIMIT = 1e9


def _significant(value, digits: int) -> str:
    try:
        value = float(value)
    except OverflowError:  # an int (or Fraction) beyond float's range, e.g. 10**400
        return _huge_number(value, digits)
    text = f"{value:.{digits}g}"
    if "e+" in text and abs(value) < _PLAIN_LIMIT:  # 999.7 rounds to "1e+03"; print "1000" instead
        text = f"{value:.0f}"
    return text


def _huge_number(value: numbers.Real, digits: int) -> str:
    """Scientific notation for a number too big for a float: 10**400 -> "1e+400" (no float overflow)."""
    sign, whole = ("-" if value < 0 else ""), abs(int(value))
    exponent = int(math.log10(whole))  # math.log10 takes ints of any size
    mantissa = whole / 10**exponent    # int / int rounds correctly even for huge ints
    if mantissa >= 10:  # log10 rounded up or down by one: put the mantissa back in [1, 10)
        mantissa, exponent = mantissa / 10, exponent + 1
    elif mantissa < 1:
        mantissa, exponent = mantissa * 10, exponent - 1
    text = f"{mantissa:.{digits}g}"
    if text == "10":  # 9.9996 rounded up
        text, exponent = "1", exponent + 1
    return f"{sign}{text}e+{exponent}"


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m×k) @ (k×n): m·n dot products of length k, a multiply and an add each (chapter 00)."""
    return 2 * m * k * n


def matmul_arithmetic_intensity(m: int, k: int, n: int, bytes_per_element: int) -> float:
    """FLOPs per byte of (m×k) @ (k×n) when A and B are read once and C written once (chapter 02)."""
    return matmul_flops(m, k, n) / ((m * k + k * n + m * n) * bytes_per_element)


def copy_bytes(n_elements: int, bytes_per_element: int) -> int:
    """Bytes that cross the memory bus when a tensor is copied: each element read once, written once."""
    return 2 * n_elements * bytes_per_element


def format_quantity(value, unit: str = "", digits: int = 3) -> str:
    """A number with a readable unit: (1.23e9, "FLOP/s") -> "1.23 GFLOP/s", (0.012, "s") -> "12 ms".

    Knows seconds ("s"), dollars ("$", "$/h"), percent ("%"), ratios ("x"/"×"), and puts SI prefixes on
    everything else (bytes are decimal: 1 GB = 1e9 B). None and NaN print as "n/a".
    """
    if isinstance(digits, bool) or not isinstance(digits, numbers.Integral) or digits < 0:
        raise ValueError(f"format_quantity: digits={digits!r} must be a whole number of significant digits >= 0")
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{value} {unit}".strip()
    try:
        value = float(value)  # also numpy scalars, whose NaN is no Python float
    except OverflowError:  # an int beyond float's range: no unit ladder reaches it
        number = _huge_number(value, digits)
        if unit in ("$", "$/h"):
            return f"{'-' if value < 0 else ''}${number.lstrip('-')}{'/h' if unit == '$/h' else ''}"
        if unit in ("x", "×"):
            return f"×{number}"
        return f"{number}%" if unit == "%" else f"{number} {unit}".strip()
    if math.isnan(value):
        return "n/a"
    value += 0.0  # -0.0 becomes 0.0: no "-0.0%" or "×-0"
    sign, magnitude = ("-" if value < 0 else ""), abs(value)
    if math.isinf(value):  # in each unit's own style: "-$inf", "inf%", "×inf", "inf s"
        if unit in ("$", "$/h"):
            return f"{sign}$inf{'/h' if unit == '$/h' else ''}"
        if unit in ("x", "×"):
            return f"×{sign}inf"
        return f"{sign}inf%" if unit == "%" else f"{sign}inf {unit}".strip()
    if unit in ("$", "$/h"):
        suffix = "/h" if unit == "$/h" else ""
        rounded = float(f"{magnitude:.{digits}g}")   # the step by the printed value: 9.9996e11 is "$1e+12"
        if rounded >= 1e12:  # past the ladder's last step, "$1000000M": scientific notation
            return f"{sign}${magnitude:.{digits}g}{suffix}"
        if rounded >= 1e6:
            return f"{sign}${_significant(magnitude / 1e6, digits)}M{suffix}"
        if rounded >= 1000:
            return f"{sign}${magnitude:,.0f}{suffix}"
        return f"{sign}${_significant(magnitude, digits)}{suffix}"
    if unit == "%":
        return f"{value:.1f}%" if magnitude < _PLAIN_LIMIT else f"{sign}{magnitude:.{digits}g}%"
    if unit in ("x", "×"):
        return f"×{_significant(value, digits)}"
    if unit == "s":
        years = magnitude / (365.25 * 86400)
        rounded = float(f"{years:.{digits}g}")   # the step by the printed value: 999.6 million is "1 billion"
        if rounded >= 1e12:  # past "999 billion years", the ladder's last step: "3.17e+32 years"
            return f"{sign}{years:.{digits}g} years"
        if rounded >= 1e6:   # DeepSeek-V3's pretraining on a laptop: "8.05 million years", not "70539681331 h"
            scale, word = (1e9, "billion") if rounded >= 1e9 else (1e6, "million")
            return f"{sign}{_significant(years / scale, digits)} {word} years"
        if years >= 2:
            return f"{sign}{_significant(years, digits)} years"
        if magnitude >= 2 * 3600:
            return f"{sign}{_significant(magnitude / 3600, digits)} h"
        if magnitude >= 120:
            return f"{sign}{_significant(magnitude / 60, digits)} min"
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if magnitude == 0 or float(f"{magnitude / scale:.{digits}g}") >= 1:
                break
        return f"{sign}{_significant(magnitude / scale, digits)} {name}"
    if magnitude == 0:
        return f"0 {unit}".strip()
    if magnitude >= 1e18:  # beyond peta, prefixes stop helping readers: 3.3e+24 FLOP
        return f"{sign}{magnitude:.{digits}g} {unit}".strip()
    scale, prefix = 1.0, ""
    for candidate_scale, candidate_prefix in _PREFIXES:
        # choose by the rounded value so 999.7e6 becomes "1 G", not "1e+03 M"
        if float(f"{magnitude / candidate_scale:.{digits}g}") >= 1:
            scale, prefix = candidate_scale, candidate_prefix
            break
    number = f"{sign}{_significant(magnitude / scale, digits)}"
    if not unit:
        return f"{number}{prefix}"
    if unit.split("/")[0] in _SYMBOL_UNITS:
        return f"{number} {prefix}{unit}"
    return f"{number}{prefix} {unit}"  # word units: "1.2M tokens"


def _positive_number(value, row: int, what: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"savings_table row {row} ({what!r}): {field} value {value!r} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        number = math.inf if value > 0 else -math.inf
    if math.isinf(number):
        raise ValueError(f"savings_table row {row} ({what!r}): {field} value {_significant(value, 3)} is infinite "
                         "or too large to form a ratio; pass the finite figure you measured (or NaN for one not "
                         "measured)")
    value = number
    if not math.isnan(value) and value <= 0:
        raise ValueError(f"savings_table row {row} ({what!r}): {field} value {value} must be > 0 to form a "
                         "ratio; measure something positive (time, bytes, tokens/s)")
    return value


def _named_value(spec, default_name: str, row: int, what: str, field: str) -> tuple[str, float]:
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return str(spec[0]), _positive_number(spec[1], row, what, field)
    if isinstance(spec, numbers.Real):
        return default_name, _positive_number(spec, row, what, field)
    raise TypeError(f"savings_table row {row} ({what!r}): {field} must be (name, value), e.g. "
                    f"('chars', 1.2e5); got {spec!r}")


def _savings_row(row: dict, index: int) -> dict:
    if not isinstance(row, dict):
        raise TypeError(f"savings_table row {index} must be a dict, got {type(row).__name__}")
    missing = [key for key in ("what", "baseline", "improved", "better") if key not in row]
    if missing:
        raise ValueError(f"savings_table row {index} misses {missing}; a row looks like "
                         '{"what": "tokens per second", "baseline": ("chars", 1.2e5), '
                         '"improved": ("BPE", 3.4e5), "unit": "tok/s", "better": "higher"}')
    what, better = str(row["what"]), row["better"]
    if better not in ("higher", "lower"):
        raise ValueError(f"savings_table row {index} ({what!r}): better={better!r} must be 'higher' "
                         "(speed, accuracy) or 'lower' (time, bytes, dollars)")
    baseline_name, baseline = _named_value(row["baseline"], "baseline", index, what, "baseline")
    improved_name, improved = _named_value(row["improved"], "improved", index, what, "improved")
    # ratio > 1 means the improvement won; the saving is the share of resources no longer needed for the
    # same work, which is 1 - 1/ratio for both directions (twice the speed saves half the time).
    ratio = improved / baseline if better == "higher" else baseline / improved
    if ratio == 0 or math.isinf(ratio):  # 1e300 / 1e-300: each value is fine, their ratio overflows
        raise ValueError(f"savings_table row {index} ({what!r}): baseline {baseline} and improved {improved} "
                         "are too far apart to form a ratio; check their units (both seconds, both bytes, ...)")
    return {"what": what, "baseline_name": baseline_name, "baseline": baseline, "improved_name": improved_name,
            "improved": improved, "ratio": ratio, "saving_percent": (1 - 1 / ratio) * 100,
            "unit": str(row.get("unit", "")), "better": better}


def _table(header: list[str], rows: list[list[str]], right_align_from: int) -> list[str]:
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if i >= right_align_from else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), "  ".join("-" * width for width in widths)] + [line(row) for row in rows]


def savings_table(chapter: str, rows: list[dict], ledger: Ledger | None = None, title: str | None = None) -> str:
    """The table every chapter ends with: baseline vs improved, measured in this run, saved to the ledger.

        print(savings_table("01", [{"what": "tokens per second", "baseline": ("chars", 1.2e5),
                                    "improved": ("BPE", 3.4e5), "unit": "tok/s", "better": "higher"}]))

    Ratio > 1 means the improvement won (for "lower" rows: baseline / improved). Saving is the share of
    time, bytes or dollars no longer needed for the same work, 1 - 1/ratio; negative when it lost.
    Appends one ledger entry per row, labelled "savings: <what>". Returns the text; prints nothing.
    `minillm report` shows each chapter's newest table on each machine, whole: a chapter's rows go in one table.
    """
    if not rows:
        raise ValueError("savings_table: no rows; pass at least one baseline-vs-improved measurement")
    parsed = [_savings_row(row, i) for i, row in enumerate(rows)]
    names = [row["what"] for row in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        # The ledger (and `minillm report`) keeps the latest entry per chapter and label: one would vanish.
        raise ValueError(f"savings_table: rows {repeated} appear more than once; give each row its own 'what' "
                         "(e.g. add what was compared), since the report keeps one entry per name")
    ledger = Ledger() if ledger is None else ledger
    hw = probe_hardware()
    table = f"{_now_iso()}-{os.getpid()}-{id(parsed):x}"   # the report shows one chapter's newest table whole
    for row in parsed:
        ledger.append(chapter, f"savings: {row['what']}", {key: row[key] for key in row if key != "what"},
                      hardware=hw, savings_table=table)
    body = [[row["what"], f"{row['baseline_name']}: {format_quantity(row['baseline'], row['unit'])}",
             f"{row['improved_name']}: {format_quantity(row['improved'], row['unit'])}",
             format_quantity(row["ratio"], "x"), format_quantity(row["saving_percent"], "%")]
            for row in parsed]
    heading = f"Chapter {chapter} savings" + (f": {title}" if title else "") + f" ({hardware_id(hw)})"
    lines = _table(["what", "baseline", "improved", "ratio", "saving"], body, right_align_from=3)
    return "\n".join([heading] + lines)


_KEY_UNITS = [  # (test on the value's key, unit), first match wins
    (lambda key: "tokens_per_second" in key, "tok/s"),
    (lambda key: "flops_per_second" in key, "FLOP/s"),
    (lambda key: "bytes_per_second" in key, "B/s"),
    (lambda key: key == "price_per_hour", "$/h"),
    (lambda key: key.startswith("dollars") or key.endswith("dollars"), "$"),
    (lambda key: key.endswith("bytes"), "B"),
    (lambda key: key == "seconds" or key.endswith("_seconds"), "s"),
    (lambda key: key == "flops" or key.endswith("_flops"), "FLOP"),
    (lambda key: key == "tokens" or key.endswith("_tokens"), "tok"),
    (lambda key: key.endswith("percent"), "%"),
    (lambda key: key == "ratio", "x"),
]
_NOT_REPORTED = ("tokens", "flops", "price_per_hour", "price_source")   # the other figures say what matters
_REPORT_KEYS = ["seconds", "tokens_per_second", "flops_per_second", "dollars", "peak_memory_bytes"]
_DISPLAY_NAMES = {"seconds": "time", "tokens_per_second": "speed", "flops_per_second": "compute",
                  "dollars": "cost", "peak_memory_bytes": "peak memory"}


def _unit_for_key(key: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    for test, unit in _KEY_UNITS:
        if test(key) or test(last):
            return unit
    return None


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe_values(values: dict, limit: int = 6) -> str:
    if "ratio" in values and "baseline" in values and "improved" in values:
        unit = values.get("unit", "")
        ratio = values.get("ratio")
        saving = format_quantity(values.get("saving_percent"), "%")
        verdict = ("not measured" if ratio is None else f"{saving} saved" if ratio >= 1
                   else f"{saving}: worse than baseline")
        return (f"{values.get('baseline_name', 'baseline')} {format_quantity(values['baseline'], unit)} -> "
                f"{values.get('improved_name', 'improved')} {format_quantity(values['improved'], unit)}: "
                f"{format_quantity(ratio, 'x')} ({verdict})")
    flat = {key: value for key, value in _flatten(values).items() if value is not None and not isinstance(value, list)}
    order = [key for key in _REPORT_KEYS if key in flat] + [key for key in flat if key not in _REPORT_KEYS
                                                            and key not in _NOT_REPORTED]
    parts = []
    for key in order[:limit]:
        value, unit = flat[key], _unit_for_key(key)
        # the unit already says "per second", so "matmul_flops_per_second.float32" reads "matmul float32"
        name = _DISPLAY_NAMES.get(key) or re.sub(r"_(flops|bytes|tokens)_per_second", "", key)
        name = name.replace(".", " ").replace("_", " ")
        if unit is not None or isinstance(value, str):
            text = format_quantity(value, unit or "")
        else:
            text = _significant(value, 4) if isinstance(value, numbers.Real) and not isinstance(value, bool) \
                else str(value)
        parts.append(f"{name} {text}")
    return ", ".join(parts) if parts else "(no values)"


def _machine(entry: dict) -> str:
    hw_id = entry.get("hardware_id")
    return str(hw_id) if hw_id not in (None, "") else "unknown machine"


def _without_older_savings_tables(entries: list[dict]) -> list[dict]:
    """The entries less the savings rows of a chapter's older tables on the same machine: a table whose row names
    name sizes (a fast run's "24^3", a full run's "256^3") would otherwise leave its rows beside the newer table's.
    A savings row without a table's tag (written by an older minillm, or by hand) stays unless a tagged table is
    newer than it."""
    def key(entry):
        return str(entry["chapter"]), _machine(entry)

    def is_savings(entry):
        return str(entry.get("label", "")).startswith("savings: ")

    newest: dict[tuple, tuple[int, object]] = {}   # (chapter, machine) -> (position, tag) of the newest table
    for position, entry in enumerate(entries):
        if is_savings(entry) and entry.get("savings_table") is not None:
            newest[key(entry)] = (position, entry["savings_table"])
    kept = []
    for position, entry in enumerate(entries):
        table_position, tag = newest.get(key(entry), (-1, None))
        if not is_savings(entry) or (entry.get("savings_table") == tag if entry.get("savings_table") is not None
                                     else position > table_position):
            kept.append(entry)
    return kept


def _latest_per_label(entries: list[dict], by_machine: bool = False) -> dict[str, dict[str, dict]]:
    """{chapter: {row name: latest entry}}; with by_machine, each machine keeps its own row ("label [machine]")."""
    by_chapter: dict[str, dict[str, dict]] = {}
    for entry in _without_older_savings_tables(entries):
        # one line per row: a newline or tab typed into a label must not break the table's columns
        name = re.sub(r"[\x00-\x1f\x7f]+", " ", str(entry["label"]))
        name += f" [{_machine(entry)}]" if by_machine else ""
        by_chapter.setdefault(str(entry["chapter"]), {})[name] = entry
    return {chapter: by_chapter[chapter] for chapter in sorted(by_chapter)}


def report(ledger: Ledger | str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
           show: bool = False) -> tuple[str, Path | None]:
    """The whole ledger in one table (latest entry per chapter and label) and one plot.

    A ledger with entries from several machines (a laptop and a Colab GPU) keeps the latest entry per chapter,
    label and machine, each row naming its machine ("label [hardware_id]"): one machine's figures never hide
    another's.

    The plot shows each savings row's improvement ratio on a log axis (or, with no savings rows yet, the
    wall time of each measurement) and is written to out_dir/report.png (default runs/report.png; a path
    ending in .png is used as is). Returns (text, png_path); png_path is None when there was nothing to plot.
    """
    ledger = Ledger() if ledger is None else Ledger(ledger) if isinstance(ledger, (str, os.PathLike)) else ledger
    entries = ledger.entries()
    if not entries:
        return (f"The ledger {ledger.path} is empty: run a chapter (each ends with savings_table) or "
                "Ledger().record(meter, chapter='NN') to add measurements.", None)
    machines = sorted({_machine(entry) for entry in entries})
    grouped = _latest_per_label(entries, by_machine=len(machines) > 1)
    lines = [f"minillm report: {len(entries)} ledger entries in {ledger.path}",
             f"machines: {', '.join(machines)}"]
    for chapter, labelled in grouped.items():
        lines.append("")
        lines.append(f"chapter {chapter}")
        width = max(len(label) for label in labelled)
        for label, entry in labelled.items():
            lines.append(f"  {label.ljust(width)}  {_describe_values(entry['values'])}")

    savings = [(chapter, name, entry) for chapter, labelled in grouped.items() for name, entry in labelled.items()
               if isinstance(entry["values"].get("ratio"), (int, float)) and entry["values"]["ratio"] > 0]
    timed = [(chapter, name, entry) for chapter, labelled in grouped.items() for name, entry in labelled.items()
             if isinstance(entry["values"].get("seconds"), (int, float)) and entry["values"]["seconds"] > 0]
    if not savings and not timed:
        lines += ["", "(nothing to plot: no savings rows and no timed measurements yet)"]
        return "\n".join(lines), None

    png_path = Path(out_dir) if out_dir is not None else runs_dir()
    if png_path.suffix.lower() != ".png":
        png_path = png_path / "report.png"
    with warnings.catch_warnings():  # numpy inside matplotlib's log ticker, for values near float's limits
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        _plot(savings, timed, png_path, show)
    lines += ["", f"plot: {png_path}"]
    return "\n".join(lines), png_path


_PLOT_LABEL_WIDTH = 80   # characters per line of a row name in the report plot


def _plot(savings: list[tuple[str, str, dict]], timed: list[tuple[str, str, dict]], png_path: Path,
          show: bool) -> None:
    """Rows are (chapter, row name as in the report's table, entry)."""
    if show:
        import matplotlib.pyplot as plt
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone
    from matplotlib.ticker import FuncFormatter, LogLocator

    if savings:
        labels = [f"ch{chapter} {name.removeprefix('savings: ')}\n"
                  f"({entry['values'].get('baseline_name', 'baseline')} -> "
                  f"{entry['values'].get('improved_name', 'improved')})" for chapter, name, entry in savings]
        values = [float(entry["values"]["ratio"]) for _, _, entry in savings]
        title = "Savings measured on this machine, per chapter"
        xlabel = "improved ÷ baseline (log scale; > ×1 is better)"
    else:
        labels = [f"ch{chapter} {name}" for chapter, name, _ in timed]
        values = [float(entry["values"]["seconds"]) for _, _, entry in timed]
        title = "Wall time of each measurement (no savings rows yet)"
        xlabel = "wall time (log scale)"

    # A long name is wrapped, so it cannot squeeze the bars into a sliver at the right of a wide image.
    labels = ["\n".join(textwrap.fill(line, _PLOT_LABEL_WIDTH, max_lines=2, placeholder=" ...")
                        for line in label.split("\n")) for label in labels]
    # a row name is text, not matplotlib mathtext: "$0.35 vs $3" must print its dollars, "$\frac{$" not crash
    labels = [label.replace("$", r"\$") for label in labels]
    lines_per_row = max(label.count("\n") + 1 for label in labels)
    height = 1.6 + max(0.6 if savings else 0.35, 0.28 * lines_per_row) * len(values)
    figure = plt.figure(figsize=(9, height)) if show else Figure(figsize=(9, height))
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(values)))[::-1]  # first row at the top, like the table
    colours = ["tab:green" if value >= 1 else "tab:red" for value in values] if savings else "tab:blue"
    if savings:
        # bars grow from 1 (break-even): right for a win, left for a loss, equal lengths for x2 and x0.5
        axes.barh(positions, [value - 1.0 for value in values], left=1.0, color=colours)
    else:
        axes.barh(positions, values, color=colours)
    axes.set_xscale("log")
    axes.set_yticks(positions)
    axes.set_yticklabels(labels, fontsize=8)
    for position, value in zip(positions, values):
        text = format_quantity(value, "x") if savings else format_quantity(value, "s")
        # A losing bar grows left from ×1; its label sits just right of the ×1 line, clear of the row names.
        anchor = 1.0 if savings and value < 1 else value
        axes.annotate(text, (anchor, position), xytext=(3, 0), textcoords="offset points",
                      va="center", ha="left", fontsize=8, color="tab:red" if savings and value < 1 else "black")
    unit = "x" if savings else "s"
    tick_text = FuncFormatter(lambda x, _: format_quantity(x, unit, digits=2))
    axes.xaxis.set_major_formatter(tick_text)
    low, high = min(values + [1.0] if savings else values), max(values + [1.0] if savings else values)
    if high / low < 100:  # a narrow range: label 2, 3 and 5 too; over decades they would overlap
        axes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        axes.xaxis.set_minor_formatter(tick_text)
        axes.tick_params(axis="x", which="minor", labelsize=7)
    if savings:
        axes.axvline(1.0, color="black", linewidth=0.8)
    # room for the annotations on both sides ("×11587" right of its bar), unless a value is so near float's
    # limits (a hand-edited ledger: 1e308 s) that the room would be infinite or zero
    left, right = (low / 2.5 if low / 2.5 > 0 else low), (high * 5 if math.isfinite(high * 5) else high)
    if left < right:
        axes.set_xlim(left, right)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(png_path, buffer.getvalue())
    if show:
        plt.show()
