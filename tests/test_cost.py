"""Tests of minillm.cost: the Meter, prices, the ledger, savings tables, measured peaks, the report."""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from minillm import cost

CPU_BOX = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "device": "cpu", "gpu": None}
T4_BOX = {"cpu": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cores": 2, "device": "cuda", "gpu": "Tesla T4",
          "compute_capability": "7.5", "gpu_count": 1}
H800_BOX = dict(T4_BOX, gpu="NVIDIA H800", compute_capability="9.0")


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    """Every test gets its own runs/ folder and no user price override from the environment."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("MINILLM_RUNS", str(runs))
    monkeypatch.delenv("MINILLM_PRICES", raising=False)
    monkeypatch.delenv("MINILLM_FAST", raising=False)
    return runs


# --- Meter -----------------------------------------------------------------------------------------

def test_meter_times_a_sleep_and_counts_tokens_and_flops():
    with cost.Meter("nap", chapter="00", price_per_hour=3.6) as meter:
        time.sleep(0.05)
        meter.add(tokens=1000, flops=2e6)
        meter.add(tokens=500)
    assert 0.045 <= meter.seconds < 0.5
    assert meter.tokens == 1500 and meter.flops == 2e6
    assert meter.tokens_per_second == pytest.approx(1500 / meter.seconds)
    assert meter.dollars == pytest.approx(meter.seconds / 3600 * 3.6)
    assert meter.to_dict()["dollars"] == pytest.approx(meter.dollars)


def test_meter_dollars_use_the_price_table(monkeypatch):
    monkeypatch.setattr(cost, "probe_hardware", lambda refresh=False: dict(T4_BOX))
    meter = cost.Meter("t4 work")
    meter.seconds = 7200.0
    assert meter.dollars == pytest.approx(2 * cost.price_per_hour(T4_BOX)[0])
    # the ledger keeps where the price came from: an assumed table entry is not a measured bill
    assert meter.to_dict()["price_source"] == cost.price_per_hour(T4_BOX)[1]
    assert "NVIDIA T4" in meter.price_source and "assumed" in meter.price_source
    assert cost.Meter("given", price_per_hour=1.0).to_dict()["price_source"] == "given to this Meter"
    with pytest.raises(ValueError, match="price_per_hour"):
        cost.Meter("bad", price_per_hour=-1)



def test_meter_refuses_a_bool_price():
    # True is an int to Python, but as a price per hour it is a mistake (price_per_hour=True for "look it up"?)
    for flag in (True, False):
        with pytest.raises(ValueError, match="price_per_hour=" + repr(flag)):
            cost.Meter("flag", price_per_hour=flag)
    assert cost.Meter("free", price_per_hour=0).dollars == 0

# --- hardware -------------------------------------------------------------------------------------

def test_probe_and_ids_describe_this_machine():
    hw = cost.probe_hardware()
    assert hw["cores"] >= 1 and hw["device"] in ("cpu", "cuda", "mps")
    assert hw["torch"] == torch.__version__
    assert cost.default_device().type == hw["device"]
    assert cost.hardware_id(CPU_BOX) == "cpu-intel-xeon-2c"
    assert cost.hardware_id(T4_BOX) == "cuda-tesla-t4"
    assert cost.hardware_id(dict(T4_BOX, gpu="NVIDIA H100 80GB HBM3")) == "cuda-nvidia-h100-80gb-hbm3"
    assert "Tesla T4" in cost.format_hardware(T4_BOX)
    assert len(cost.format_hardware().splitlines()) == 2


def test_the_cpu_generation_tells_two_vms_named_alike_apart():
    # a cloud VM names its CPU "AMD EPYC" whether its cores are Zen 4 or Zen 5; the family and model differ
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    zen5 = zen4.replace(": 25", ": 26").replace(": 17", ": 2")
    assert cost._cpu_generation(zen4) == "family 25, model 17"
    assert cost._cpu_generation(zen5) == "family 26, model 2"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert cost._cpu_generation(arm) is None and cost._cpu_generation("") is None
    box = dict(CPU_BOX, cpu="AMD EPYC", cpu_generation="family 25, model 17")
    assert cost.format_hardware(box).startswith("CPU: AMD EPYC (family 25, model 17), 2 cores")
    assert cost.hardware_id(box) == cost.hardware_id(dict(box, cpu_generation=None)) == "cpu-amd-epyc-2c"
    assert cost.format_hardware(CPU_BOX).startswith("CPU: Intel(R) Xeon(R) Processor, 2 cores")   # none known


@pytest.mark.parametrize("name, model", [
    ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H800", "H800"), ("NVIDIA H200", "H200"),
    ("NVIDIA L40S", None), ("NVIDIA A10", None), ("NVIDIA GH200 480GB", None), (None, None), ("", None),
])
def test_datasheet_matches_whole_model_names(name, model):
    entry = cost.datasheet_peaks(name)
    assert (entry["model"] if entry else None) == model


def test_datasheet_variants_and_figures():
    assert cost.datasheet_peaks("NVIDIA H800")["memory_gb_per_s"] == 3350
    assert cost.datasheet_peaks("Tesla T4")["bf16"] is None
    assert cost.datasheet_peaks("NVIDIA H100 PCIe")["bf16"] < cost.datasheet_peaks("NVIDIA H100 80GB HBM3")["bf16"]
    assert cost.datasheet_peaks("NVIDIA A100-SXM4-40GB")["memory_gb"] == 40
    cost.datasheet_peaks("Tesla T4")["fp32"] = 0  # a copy: the table itself must not change
    assert cost.DATASHEET["T4"]["fp32"] == 8.1e12


# --- prices ---------------------------------------------------------------------------------------

def test_prices_per_device_and_labelled():
    dollars, source = cost.price_per_hour(T4_BOX)
    assert dollars == cost.load_prices()["prices"]["NVIDIA T4"]["per_hour"] > 0
    assert source.startswith("prices.json 2026-11-28: NVIDIA T4")
    assert cost.price_per_hour(H800_BOX)[0] == 2.0  # DeepSeek-V3's assumption, not H100's price
    assert cost.price_per_hour(CPU_BOX)[1].startswith("prices.json 2026-11-28: cpu")
    assert cost.price_per_hour(dict(T4_BOX, gpu="NVIDIA RTX 9999"))[1].split(": ")[1].startswith("other GPU")


def test_price_override_file_wins(isolated_runs, tmp_path, monkeypatch):
    shipped = cost.price_per_hour(T4_BOX)[0]
    path = cost.set_price_per_hour(0.123, hw=T4_BOX)
    assert path == isolated_runs / "prices.json"
    dollars, source = cost.price_per_hour(T4_BOX)
    assert dollars == 0.123 != shipped and str(path) in source
    assert cost.price_per_hour(H800_BOX)[0] == 2.0  # other machines keep the shipped price

    override = tmp_path / "my_prices.json"
    override.write_text(json.dumps({"date": "2027-01-01", "prices": {"NVIDIA H800": {"per_hour": 1.5}}}))
    monkeypatch.setenv("MINILLM_PRICES", str(override))
    assert cost.price_per_hour(H800_BOX) == (1.5, f"{override} 2027-01-01: NVIDIA H800 (DeepSeek-V3 technical "
                                                  "report's own assumption: $2 per H800 GPU-hour rental)")
    override.write_text('{"prices": {"NVIDIA T4": {"per_hour": "cheap"}}}')
    with pytest.raises(ValueError, match="per_hour"):
        cost.load_prices()
    with pytest.raises(ValueError, match="dollars"):
        cost.set_price_per_hour(float("nan"), hw=T4_BOX)


# --- ledger ---------------------------------------------------------------------------------------

def test_ledger_round_trip_nan_and_filters(isolated_runs):
    ledger = cost.Ledger()
    assert ledger.path == isolated_runs / "ledger.jsonl"
    first = ledger.append("01", "bigram", {"loss": 2.5, "steps": 10, "broken": float("nan"),
                                           "tensor": torch.tensor(1.5), "note": "ok", "none": None},
                          hardware=CPU_BOX, seed=3)
    ledger.append("01", "bigram", {"loss": 2.0}, hardware=CPU_BOX)
    ledger.append("03", "gpt", {"loss": 4.0}, hardware=CPU_BOX)
    again = cost.Ledger().entries(chapter="01")
    assert [entry["values"]["loss"] for entry in again] == [2.5, 2.0]
    assert again[0] == first and first["seed"] == 3 and first["hardware_id"] == "cpu-intel-xeon-2c"
    assert first["values"]["broken"] is None and first["values"]["tensor"] == 1.5
    assert "NaN" not in ledger.path.read_text()
    assert ledger.latest(chapter="01", label="bigram")["values"]["loss"] == 2.0
    assert ledger.latest(label="gpt")["chapter"] == "03" and ledger.latest(chapter="09") is None


def test_ledger_rejects_what_json_cannot_hold():
    ledger = cost.Ledger()
    with pytest.raises(TypeError, match="'weights'"):
        ledger.append("01", "x", {"weights": torch.ones(3)}, hardware=CPU_BOX)
    with pytest.raises(TypeError, match="'when'"):
        ledger.append("01", "x", {"when": object()}, hardware=CPU_BOX)
    with pytest.raises(ValueError, match="clash"):
        ledger.append("01", "x", {}, hardware=CPU_BOX, time=1)
    assert ledger.entries() == []  # nothing half-written


def test_ledger_skips_corrupt_lines(isolated_runs):
    ledger = cost.Ledger()
    ledger.append("02", "a", {"v": 1}, hardware=CPU_BOX)
    with open(ledger.path, "a") as f:
        f.write('{"time": "2026-11-28", "chapter": "02", "lab\n')  # a crash mid-line
        f.write("[1, 2]\n")
    ledger.append("02", "b", {"v": 2}, hardware=CPU_BOX)
    with pytest.warns(UserWarning, match="2 corrupt"):
        assert [entry["label"] for entry in ledger.entries()] == ["a", "b"]


def test_ledger_records_a_meter():
    with cost.Meter("sleep", chapter="00", price_per_hour=1.0) as meter:
        meter.add(tokens=10)
    entry = cost.Ledger().record(meter, batch_size=4)
    assert entry["chapter"] == "00" and entry["label"] == "sleep"
    assert entry["values"]["tokens"] == 10 and entry["values"]["batch_size"] == 4
    with pytest.raises(ValueError, match="chapter"):
        cost.Ledger().record(cost.Meter("orphan", price_per_hour=1.0))



def test_ledger_append_after_a_torn_line_keeps_the_new_entry():
    ledger = cost.Ledger()
    ledger.append("02", "a", {"v": 1}, hardware=CPU_BOX)
    with open(ledger.path, "a") as f:
        f.write('{"time": "2026-11-28", "chapter": "02", "lab')  # a crash mid-line: no newline at the end
    ledger.append("02", "b", {"v": 2}, hardware=CPU_BOX)
    ledger.append("02", "c", {"v": 3}, hardware=CPU_BOX)
    with pytest.warns(UserWarning, match="1 corrupt"):
        assert [entry["label"] for entry in ledger.entries()] == ["a", "b", "c"]
    assert ledger.path.read_bytes().endswith(b"\n")


LEDGER_APPENDER = r"""
import sys
from minillm.cost import Ledger
ledger = Ledger(sys.argv[1])
for i in range(40):
    ledger.append("05", f"{sys.argv[2]}-{i}", {"i": i}, hardware={"cpu": "test", "cores": 1, "device": "cpu"})
"""


def test_ledger_appends_from_three_processes_lose_nothing(tmp_path):
    path = tmp_path / "shared.jsonl"
    path.write_text('{"chapter": "05", "lab')  # start from a torn line, the case that needs the extra newline
    workers = [subprocess.Popen([sys.executable, "-c", LEDGER_APPENDER, str(path), name]) for name in "abc"]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0, 0]
    with pytest.warns(UserWarning, match="1 corrupt"):
        labels = [entry["label"] for entry in cost.Ledger(path).entries()]
    assert sorted(labels) == sorted(f"{name}-{i}" for name in "abc" for i in range(40))


def test_ledger_filters_take_an_int_chapter_like_append():
    ledger = cost.Ledger()
    ledger.append(3, "gpt", {"loss": 4.0}, hardware=CPU_BOX)
    ledger.append("04", "moe", {"loss": 3.0}, hardware=CPU_BOX)
    assert [entry["label"] for entry in ledger.entries(chapter=3)] == ["gpt"]
    assert ledger.latest(chapter=3, label="gpt")["chapter"] == "03"
    assert ledger.latest(chapter=4)["label"] == "moe" and ledger.latest(chapter=5) is None


def test_ledger_skips_entries_the_report_cannot_use(isolated_runs):
    ledger = cost.Ledger()
    ledger.append("01", "good", {"seconds": 2.0}, hardware=CPU_BOX)
    good = json.loads(ledger.path.read_text())
    bad = [dict(good, label=7), dict(good, chapter=["01"]),
           dict(good, label="savings: x", values={"ratio": "fast", "baseline": 1, "improved": 2}),
           dict(good, label="slow", values={"seconds": "a while"}), dict(good, label="b", values={"seconds": True})]
    with open(ledger.path, "a") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in bad))
        f.write('{"chapter": "01", "label": "huge", "values": {"seconds": 1e999}}\n')  # JSON's Infinity
    with pytest.warns(UserWarning, match="6 corrupt"):
        assert [entry["label"] for entry in ledger.entries()] == ["good"]
    with pytest.warns(UserWarning, match="6 corrupt"):
        text, png = cost.report(cost.Ledger(ledger.path))
    assert "1 ledger entries" in text and png.exists()
    with pytest.raises(TypeError, match="'ratio'"):  # what entries() would skip is refused on the way in
        ledger.append("01", "savings: y", {"ratio": "fast"}, hardware=CPU_BOX)

# --- savings table and formatting -----------------------------------------------------------------

def test_savings_table_ratios_both_directions():
    ledger = cost.Ledger()
    text = cost.savings_table("01", [
        {"what": "tokens per second", "baseline": ("chars", 1.0e5), "improved": ("BPE", 4.0e5),
         "unit": "tok/s", "better": "higher"},
        {"what": "seconds to target loss", "baseline": ("fp32", 30.0), "improved": ("bf16", 10.0),
         "unit": "s", "better": "lower"},
        {"what": "tokens per second (MoE)", "baseline": ("dense", 2.0e5), "improved": ("MoE", 1.0e5),
         "unit": "tok/s", "better": "higher"},
    ], ledger=ledger, title="tokenization")
    speed = ledger.latest(label="savings: tokens per second")["values"]
    assert speed["ratio"] == pytest.approx(4.0) and speed["saving_percent"] == pytest.approx(75.0)
    time_row = ledger.latest(label="savings: seconds to target loss")["values"]
    assert time_row["ratio"] == pytest.approx(3.0) and time_row["saving_percent"] == pytest.approx(200 / 3)
    moe = ledger.latest(label="savings: tokens per second (MoE)")["values"]
    assert moe["ratio"] == pytest.approx(0.5) and moe["saving_percent"] == pytest.approx(-100.0)
    assert len(ledger.entries(chapter="01")) == 3
    assert "tokenization" in text and "×4" in text and "75.0%" in text and "-100.0%" in text
    assert "400 ktok/s" in text and "10 s" in text


def test_savings_table_rejects_bad_rows():
    with pytest.raises(ValueError, match="better"):
        cost.savings_table("01", [{"what": "x", "baseline": ("a", 1), "improved": ("b", 2), "better": "more"}])
    with pytest.raises(ValueError, match="misses"):
        cost.savings_table("01", [{"what": "x", "baseline": ("a", 1)}])
    with pytest.raises(ValueError, match="> 0"):
        cost.savings_table("01", [{"what": "x", "baseline": ("a", 0), "improved": ("b", 2), "better": "lower"}])
    twice = {"what": "tok/s", "baseline": ("a", 1), "improved": ("b", 2), "better": "higher"}
    with pytest.raises(ValueError, match="more than once"):   # the report would keep only one of them
        cost.savings_table("04", [twice, dict(twice, baseline=("c", 1.5))])
    assert cost.Ledger().entries() == []



def _short_id(value):
    return "-10**400" if value == -10**400 else "10**400" if value == 10**400 else None  # else pytest's own id


@pytest.mark.parametrize("baseline, improved", [(float("inf"), 2.0), (1.0, float("inf")), (1.0, -float("inf")),
                                                (1e-300, 1e300), (10**400, 1.0)], ids=_short_id)
def test_savings_table_rejects_values_too_big_for_a_ratio(baseline, improved):
    row = {"what": "speed", "baseline": ("a", baseline), "improved": ("b", improved), "better": "lower"}
    with pytest.raises(ValueError, match=r"row 0 \('speed'\)"):
        cost.savings_table("01", [row])
    assert cost.Ledger().entries() == []

@pytest.mark.parametrize("value, unit, text", [
    (1.23e9, "FLOP/s", "1.23 GFLOP/s"), (9.997e11, "FLOP/s", "1 TFLOP/s"), (312e12, "FLOP/s", "312 TFLOP/s"),
    (45.6, "FLOP/s", "45.6 FLOP/s"), (2.5e9, "B/s", "2.5 GB/s"), (1.5e6, "B", "1.5 MB"),
    (3.4e5, "tok/s", "340 ktok/s"), (1.2e6, "tokens", "1.2M tokens"), (0.0123, "s", "12.3 ms"),
    (90, "s", "90 s"), (600, "s", "10 min"), (5 * 3600, "s", "5 h"), (2.54e11, "s", "8049 years"),
    (2.54e14, "s", "8.05 million years"), (3e7 * 2e9, "s", "1.9 billion years"), (1e8, "s", "3.17 years"),
    (0.00123, "$", "$0.00123"), (2.0, "$/h", "$2/h"),
    (5.576e6, "$", "$5.58M"), (2.834, "x", "×2.83"), (64.66, "%", "64.7%"), (None, "s", "n/a"),
    (float("nan"), "B", "n/a"), (0, "FLOP/s", "0 FLOP/s"), (-2e3, "B", "-2 kB"), (3.3e24, "FLOP", "3.3e+24 FLOP"),
])
def test_format_quantity(value, unit, text):
    assert cost.format_quantity(value, unit) == text



@pytest.mark.parametrize("value, unit, text", [
    (1e300, "x", "×1e+300"), (1e40, "s", "3.17e+32 years"), (10**400, "B", "1e+400 B"), (-10**400, "x", "×-1e+400"),
    (10**400, "$", "$1e+400"), (10**400, "%", "1e+400%"), (1e300, "%", "1e+300%"), (-3e15, "$", "-$3e+15"),
    (12345.0, "x", "×12345"), (999.7, "x", "×1000"), (4e9, "s", "127 years"), (2e19, "s", "634 billion years"),
    (2e25, "s", "6.34e+17 years"),
], ids=_short_id)
def test_format_quantity_beyond_the_unit_ladder(value, unit, text):
    assert cost.format_quantity(value, unit) == text


def test_format_quantity_numpy_nan_and_inf():
    import numpy as np

    assert cost.format_quantity(np.float32("nan"), "s") == "n/a" == cost.format_quantity(np.float64("nan"), "B")
    assert cost.format_quantity(np.float32("inf"), "s") == "inf s"
    assert cost.format_quantity(np.float32(0.0123), "s") == "12.3 ms"

# --- measured peaks -------------------------------------------------------------------------------

@pytest.mark.slow
def test_measure_peaks_measures_once_then_uses_the_cache(isolated_runs, monkeypatch):
    peaks = cost.measure_peaks(device="cpu", fast=True)
    assert peaks["fast"] is True and peaks["device"] == "cpu"
    assert set(peaks["matmul_flops_per_second"]) == {"float32", "bfloat16"}
    assert all(value > 0 and math.isfinite(value) for value in peaks["matmul_flops_per_second"].values())
    assert peaks["memory_bytes_per_second"] > 0
    cache_file = isolated_runs / f"peaks-{peaks['hardware_id']}.json"
    assert json.loads(cache_file.read_text()) == peaks

    def no_timing_allowed(*args, **kwargs):
        raise AssertionError("measure_peaks timed something although the cache was there")
    monkeypatch.setattr(cost, "best_seconds", no_timing_allowed)
    assert cost.measure_peaks(device="cpu", fast=True) == peaks

    monkeypatch.setattr(cost, "best_seconds", lambda fn, **kwargs: 0.5)  # refresh must time again
    refreshed = cost.measure_peaks(device="cpu", fast=True, refresh=True)
    n = refreshed["matmul_size"]
    assert refreshed["matmul_flops_per_second"]["float32"] == pytest.approx(2 * n**3 / 0.5)
    assert json.loads(cache_file.read_text()) == refreshed


def test_best_seconds_takes_the_fastest_run(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(cost, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    durations = iter([5.0, 0.3, 0.1, 0.2])  # the first call is the untimed warm-up

    def work():
        clock["now"] += next(durations)
    assert cost.best_seconds(work, repeats=3, warmup=1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="repeats"):
        cost.best_seconds(work, repeats=0)


# --- report ---------------------------------------------------------------------------------------

def test_report_on_an_empty_ledger(isolated_runs):
    text, png = cost.report()
    assert png is None and "empty" in text
    assert not (isolated_runs / "report.png").exists()


def test_report_table_and_png(isolated_runs, tmp_path):
    ledger = cost.Ledger()
    with cost.Meter("bigram training", chapter="01", price_per_hour=0.35) as meter:
        meter.add(tokens=20_000, flops=4e9)
    ledger.record(meter)
    ledger.append("00", "peaks", {"matmul_flops_per_second": {"float32": 3.3e11}, "memory_bytes_per_second": 1.2e10},
                  hardware=CPU_BOX)
    cost.savings_table("01", [{"what": "tokens per text", "baseline": ("chars", 1000), "improved": ("BPE", 400),
                               "unit": "tok", "better": "lower"},
                              {"what": "loss per dollar", "baseline": ("dense", 2.0), "improved": ("MoE", 1.6),
                               "unit": "", "better": "higher"}], ledger=ledger)
    text, png = cost.report(ledger)
    assert png == isolated_runs / "report.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 5000
    for expected in ("chapter 00", "chapter 01", "bigram training", "savings: tokens per text", "×2.5",
                     "matmul float32 330 GFLOP/s", "memory 12 GB/s", "tok/s", "$", "worse than baseline"):
        assert expected in text, expected
    assert text.index("chapter 00") < text.index("chapter 01")

    elsewhere = tmp_path / "plots" / "mine.png"
    assert cost.report(ledger, out_dir=elsewhere)[1] == elsewhere and elsewhere.exists()


def test_best_seconds_interleaved_alternates_and_keeps_each_fastest():
    import time

    from minillm.cost import best_seconds_interleaved

    order = []
    sleeps = {"slow": iter([0.02, 0.005, 0.03]), "fast": iter([0.001, 0.001, 0.001])}

    def contender(name):
        def run():
            order.append(name)
            time.sleep(next(sleeps[name]))
        return run

    best = best_seconds_interleaved({"slow": contender("slow"), "fast": contender("fast")}, repeats=3, warmup=0)
    assert order == ["slow", "fast"] * 3
    assert 0.005 <= best["slow"] < 0.02 and best["fast"] < best["slow"]
    with pytest.raises(ValueError, match="repeats"):
        best_seconds_interleaved({"x": lambda: None}, repeats=0)


def test_best_seconds_interleaved_can_warm_up_before_every_timed_call():
    # A contender that switches a process-wide setting pays for the switch in its first call after it:
    # with warmup_each_round=1 that call is untimed in every round.
    import time

    from minillm.cost import best_seconds_interleaved

    state = {"current": None}
    calls = []

    def switching(name):
        def run():
            calls.append(name)
            if state["current"] != name:   # the switch costs 20 ms
                state["current"] = name
                time.sleep(0.02)
        return run

    plain = best_seconds_interleaved({"a": switching("a"), "b": switching("b")}, repeats=2, warmup=0)
    assert min(plain.values()) >= 0.02             # every timed call followed a switch
    calls.clear()
    settled = best_seconds_interleaved({"a": switching("a"), "b": switching("b")}, repeats=2, warmup=0,
                                       warmup_each_round=1)
    assert calls == ["a", "a", "b", "b"] * 2
    assert max(settled.values()) < 0.01
    with pytest.raises(ValueError, match="warmup_each_round"):
        best_seconds_interleaved({"x": lambda: None}, warmup_each_round=-1)


MOE_STEP_FAULTS_PROBE = r"""
import resource, sys, torch
from minillm.cost import freed_memory_kept, keep_freed_memory
from minillm.moe import MoE, MoEConfig

# "off" sets glibc's default thresholds explicitly, which also stops their automatic growth: left alone,
# glibc raises the mmap threshold after the first big free, so the default's faults come and go from
# machine to machine. Set, every block over 128 kB is mapped fresh from the OS and faulted in each step.
applied = keep_freed_memory(enable=sys.argv[1] == "kept")
# One thread: with more, OpenMP workers' allocations land in other malloc arenas, and a few hundred of their
# faults per step come and go from run to run; the main thread's tens of MB are what this is about.
torch.set_num_threads(1)
torch.manual_seed(0)
layer = MoE(256, MoEConfig(n_routed=16, n_shared=0, top_k=8, expert_hidden=64))
x = torch.randn(1, 2048, 256, requires_grad=True)

def step():
    layer.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()

for _ in range(3):
    step()
per_step = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: with freed memory kept the heap still grows now and then (a few thousand faults in one step
# while fragmentation settles), which is not the per-step tax this is about.
print(applied, freed_memory_kept(), sorted(per_step)[len(per_step) // 2])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory acts on glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_an_moe_training_step():
    # In subprocesses: the setting changes the whole process. The MoE layer's ~40 MB of temporaries per
    # step are faulted in fresh from the OS with glibc's fixed default thresholds, and reused warm once
    # freed memory is kept.
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", MOE_STEP_FAULTS_PROBE, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", out[1] == "True", float(out[2])

    applied_off, kept_off, off_faults = faults("off")
    applied, kept, kept_faults = faults("kept")
    assert applied_off and not kept_off and applied and kept
    assert off_faults > 1000                     # thousands of 4 kB pages in a typical step
    assert kept_faults < off_faults / 20


def test_keep_freed_memory_rejects_a_bad_limit():
    from minillm.cost import keep_freed_memory

    with pytest.raises(ValueError, match="up_to_bytes"):
        keep_freed_memory(up_to_bytes=1000)


def test_resolve_device_names_what_is_missing():
    assert cost.resolve_device(None) == cost.default_device() == cost.resolve_device("auto")
    assert cost.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="bench moe: device='gpu' is not a device"):
        cost.resolve_device("gpu", "bench moe")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            cost.resolve_device("cuda", "bench moe")
    else:
        with pytest.raises(ValueError, match="CUDA GPU"):
            cost.resolve_device(f"cuda:{torch.cuda.device_count()}")



# --- atomic writes --------------------------------------------------------------------------------

def test_atomic_write_from_threads_of_one_process(tmp_path):
    import threading

    from minillm.paths import atomic_write_bytes

    target = tmp_path / "shared.bin"
    payloads = [bytes([65 + i]) * 2_000_000 for i in range(4)]  # big, so the writes overlap
    errors = []

    def writer(data):
        try:
            for _ in range(5):
                atomic_write_bytes(target, data)
        except Exception as error:  # noqa: BLE001 - any failure is what this test is looking for
            errors.append(error)
    threads = [threading.Thread(target=writer, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in payloads  # one whole payload, never a mix or a half
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]  # no temp files left behind


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_atomic_write_keeps_normal_permissions_and_cleans_up_on_failure(tmp_path, monkeypatch):
    import os

    from minillm import paths

    umask = os.umask(0o027)
    try:
        paths.atomic_write_text(tmp_path / "a.txt", "hello")
        with open(tmp_path / "b.txt", "w") as f:  # what a plain open() makes under the same umask
            f.write("hello")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode
    assert (tmp_path / "a.txt").read_text() == "hello"

    def broken_replace(source, target):
        raise OSError("disk on fire")
    monkeypatch.setattr(paths.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        paths.atomic_write_text(tmp_path / "a.txt", "goodbye")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_atomic_write_error_names_the_target_not_the_temp_file(tmp_path, monkeypatch):
    from minillm import paths

    def refused(path, flags, mode=0o777):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(paths.os, "open", refused)
    target = tmp_path / "report.png"
    with pytest.raises(PermissionError, match="cannot write .*report.png .*Permission denied.*folder you can write"
                       ) as info:
        paths.atomic_write_text(target, "x")
    assert ".tmp" not in str(info.value)


# --- minillm report on the command line -----------------------------------------------------------

def _timed_ledger(path):
    ledger = cost.Ledger(path)
    ledger.append("01", "training", {"seconds": 3.0}, hardware=CPU_BOX)
    return ledger


def test_cli_report_works_and_the_untouched_default_ledger_is_just_empty(isolated_runs, capsys):
    from minillm.cli import main

    assert main(["report"]) == 0
    assert "empty" in capsys.readouterr().out
    _timed_ledger(isolated_runs / "ledger.jsonl")
    assert main(["report"]) == 0
    assert "training" in capsys.readouterr().out and (isolated_runs / "report.png").exists()


def test_cli_report_explains_bad_paths_without_a_traceback(tmp_path, capsys):
    from minillm.cli import main

    ledger = _timed_ledger(tmp_path / "ledger.jsonl")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    (tmp_path / "taken.png").mkdir()
    cases = [(["--ledger", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--ledger", str(tmp_path)], "is a folder"),
             (["--ledger", str(ledger.path), "--out", str(notes)], "not a folder"),
             (["--ledger", str(ledger.path), "--out", str(tmp_path / "taken.png")], "is a folder")]
    for extra, message in cases:
        assert main(["report", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("minillm report: ") and message in err, (extra, err)
        assert "Traceback" not in err
    assert notes.read_text() == "not a folder"


def test_cli_turns_other_os_errors_into_a_message(tmp_path, capsys):
    from minillm.cli import main

    ledger = _timed_ledger(tmp_path / "ledger.jsonl")
    (tmp_path / "notes.txt").write_text("a file, in the way of a folder")
    assert main(["report", "--ledger", str(ledger.path), "--out", str(tmp_path / "notes.txt" / "plot.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm report: ") and "notes.txt" in err and "Traceback" not in err


def test_cli_report_skips_ledger_lines_it_cannot_show(tmp_path, capsys):
    from minillm.cli import main

    ledger = _timed_ledger(tmp_path / "ledger.jsonl")
    good = json.loads(ledger.path.read_text())
    with open(ledger.path, "a") as f:
        savings = dict(good, label="savings: x", values={"ratio": "2", "baseline": 1, "improved": 2})
        f.write(json.dumps(savings) + "\n")
        f.write(json.dumps(dict(good, label=42)) + "\n")
    with pytest.warns(UserWarning, match="2 corrupt"):
        assert main(["report", "--ledger", str(ledger.path), "--out", str(tmp_path)]) == 0
    assert "training" in capsys.readouterr().out and (tmp_path / "report.png").exists()


# --- adversarial inputs (review) ------------------------------------------------------------------

def test_ledger_skips_a_line_nested_too_deep_and_reads_past_a_byte_order_mark(isolated_runs):
    ledger = cost.Ledger()
    ledger.append("02", "a", {"seconds": 1.0}, hardware=CPU_BOX)
    text = ledger.path.read_text(encoding="utf-8")
    # a byte-order mark (Notepad) before the first entry, then brackets nested beyond Python's recursion limit
    ledger.path.write_text("\ufeff" + text + "[" * 100_000 + "\n" + '{"values":' * 5000 + "\n", encoding="utf-8")
    ledger.append("02", "b", {"seconds": 2.0}, hardware=CPU_BOX)
    with pytest.warns(UserWarning, match=r"2 corrupt line\(s\) \(line 2"):
        assert [entry["label"] for entry in ledger.entries()] == ["a", "b"]
    assert "chapter 02" in cost.report(ledger, out_dir=isolated_runs)[0]


def test_prices_refuse_ints_beyond_float_and_read_a_byte_order_mark(isolated_runs, tmp_path, monkeypatch):
    huge = 10**400
    with pytest.raises(ValueError, match="price_per_hour"):
        cost.Meter("x", price_per_hour=huge)
    with pytest.raises(ValueError, match="dollars"):
        cost.set_price_per_hour(huge, hw=CPU_BOX)
    override = tmp_path / "prices.json"
    monkeypatch.setenv("MINILLM_PRICES", str(override))
    for text in ['{"prices": {"cpu": %d}}' % huge, '{"prices": {"cpu": {"per_hour": %d}}}' % huge]:
        override.write_text(text)
        with pytest.raises(ValueError, match="per_hour"):
            cost.load_prices()
    override.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        cost.load_prices()
    override.write_text('\ufeff{"prices": {"cpu": 0.25}}', encoding="utf-8")
    assert cost.price_per_hour(CPU_BOX)[0] == 0.25


@pytest.mark.parametrize("values", [{"seconds": 1e308}, {"seconds": 5e-324},
                                    {"ratio": 1e308, "baseline": 1.0, "improved": 1e308},
                                    {"ratio": 5e-324, "baseline": 1.0, "improved": 2.0}])
def test_report_plots_values_at_the_edges_of_float(isolated_runs, values):
    ledger = cost.Ledger()
    ledger.append("01", "extreme", values, hardware=CPU_BOX)
    text, png = cost.report(ledger)
    assert png is not None and png.stat().st_size > 0 and "extreme" in text


def test_format_quantity_infinity_and_negative_zero_in_each_units_style():
    inf = float("inf")
    assert [cost.format_quantity(inf, unit) for unit in ("$", "$/h", "%", "x", "s", "")] == \
        ["$inf", "$inf/h", "inf%", "×inf", "inf s", "inf"]
    assert [cost.format_quantity(-inf, unit) for unit in ("$", "%", "x", "B")] == \
        ["-$inf", "-inf%", "×-inf", "-inf B"]
    assert [cost.format_quantity(-0.0, unit) for unit in ("%", "x", "$", "s", "B")] == \
        ["0.0%", "×0", "$0", "0 s", "0 B"]
    with pytest.raises(ValueError, match="digits"):
        cost.format_quantity(1.0, "s", digits=-1)


def test_format_quantity_takes_the_next_step_when_rounding_reaches_it():
    year = 365.25 * 86400
    assert cost.format_quantity(9.9996e11, "$") == "$1e+12"            # was "$999960M"
    assert cost.format_quantity(999_999.7, "$") == "$1M"
    assert cost.format_quantity(9.996e8 * year, "s") == "1 billion years"   # was "1000 million years"
    assert cost.format_quantity(9.9996e11 * year, "s") == "1e+12 years"
    assert cost.format_quantity(8.05e6 * year, "s") == "8.05 million years"


def test_meter_refuses_token_and_flop_counts_that_cannot_be_counts():
    np = pytest.importorskip("numpy")
    meter = cost.Meter("counts", tokens=np.int64(3), flops=torch.tensor(2.0))
    meter.add(tokens=torch.tensor(5), flops=1e9)
    meter.add(tokens=4.0)                                   # a whole float is a count
    assert (meter.tokens, meter.flops) == (12, 1e9 + 2)
    for bad in (float("nan"), -5, 1.9, True):
        with pytest.raises(ValueError, match="whole number >= 0"):
            cost.Meter("counts", tokens=bad)
        with pytest.raises(ValueError, match="whole number >= 0"):
            meter.add(tokens=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            meter.add(flops=bad)
    assert (meter.tokens, meter.flops) == (12, 1e9 + 2)     # a refused add changes nothing
    with pytest.raises(RuntimeError, match="not running"):
        cost.Meter("never entered").__exit__(None, None, None)


def test_price_per_hour_checks_a_table_passed_in_as_load_prices_checks_a_file():
    hw = {"device": "cpu", "cpu": "test CPU", "cores": 2}
    assert cost.price_per_hour(hw, {"prices": {"cpu": 0.1}})[0] == 0.1
    for table in ({"prices": {"cpu": {"per_hour": -3}}}, {"prices": {"cpu": {}}}):
        with pytest.raises(ValueError, match="per_hour"):
            cost.price_per_hour(hw, table)
    with pytest.raises(ValueError, match="like load_prices"):
        cost.price_per_hour(hw, {"cpu": 0.1})


def test_meter_for_a_device_this_machine_lacks_says_so_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        cost.Meter("gpu work", device="cuda")
    assert cost.Meter("auto", device="auto").device.type in ("cpu", "mps")


class _FakeCudaAllocator:
    """torch.cuda's one peak counter per GPU, without a GPU."""

    def __init__(self, monkeypatch):
        self.current = self.peak = 0
        monkeypatch.setattr(cost, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                            lambda device=None: setattr(self, "peak", self.current))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def use(self, num_bytes):  # allocate, then free again
        self.peak = max(self.peak, self.current + num_bytes)


def _cuda_meter(label):
    meter = cost.Meter(label, price_per_hour=0.0)
    meter.device = torch.device("cuda:0")  # as if this machine had the GPU
    return meter


def test_nested_cuda_meters_each_keep_their_own_peak(monkeypatch):
    gpu = _FakeCudaAllocator(monkeypatch)
    outer, inner = _cuda_meter("outer"), _cuda_meter("inner")
    with outer:
        gpu.use(1000)
        with inner:  # resets torch's peak counter, which must not erase the outer meter's 1000
            gpu.use(10)
        gpu.use(100)
    assert (outer.peak_memory_bytes, inner.peak_memory_bytes) == (1000, 10)
    again = _cuda_meter("two stretches")
    with again:
        gpu.use(500)
    with again:
        gpu.use(5)
    assert again.peak_memory_bytes == 500  # the peak over both stretches, as the time is their sum


def test_measure_peaks_does_not_trust_a_cache_without_positive_figures(isolated_runs, monkeypatch):
    hw_id = cost.hardware_id(dict(cost.probe_hardware(), device="cpu"))
    cache = isolated_runs / f"peaks-{hw_id}.json"
    isolated_runs.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(cost, "best_seconds", lambda fn, **kwargs: 0.5)
    for bad in [{"matmul_flops_per_second": "fast"}, {"matmul_flops_per_second": {}},
                {"matmul_flops_per_second": {"float32": -1.0}, "memory_bytes_per_second": 1e9},
                {"matmul_flops_per_second": {"float32": 1e9}, "memory_bytes_per_second": None}]:
        cache.write_text(json.dumps(bad))
        with pytest.warns(UserWarning, match="positive"):
            peaks = cost.measure_peaks(device="cpu", fast=True)
        assert peaks["matmul_flops_per_second"]["float32"] > 0 and peaks["memory_bytes_per_second"] > 0


def test_path_overrides_expand_a_tilde_and_ignore_blanks(tmp_path, monkeypatch):
    from minillm import paths

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MINILLM_RUNS", "~/my runs")
    monkeypatch.setenv("MINILLM_DATA", "~/my data ")
    monkeypatch.setenv("MINILLM_PRICES", "~/prices.json")
    assert paths.runs_dir() == tmp_path / "my runs" and paths.data_dir() == tmp_path / "my data"
    assert cost.set_price_per_hour(0.5, hw=CPU_BOX) == tmp_path / "prices.json"
    monkeypatch.setenv("MINILLM_RUNS", "  ")
    assert paths.runs_dir().name == "runs"


def test_report_plot_wraps_a_long_row_name_instead_of_widening_the_image(isolated_runs):
    def png_width(path):
        return int.from_bytes(path.read_bytes()[16:20], "big")   # the PNG header's IHDR width

    ledger = cost.Ledger()
    cost.savings_table("03", [{"what": "tokens/s: short", "baseline": ("a", 1.0), "improved": ("b", 2.0),
                               "unit": "tok/s", "better": "higher"}], ledger=ledger)
    narrow = png_width(cost.report(ledger)[1])
    long_name = "torch.compile" + " (failed: ran uncompiled)" * 14
    cost.savings_table("03", [{"what": f"tokens/s: {long_name}", "baseline": ("a", 1.0), "improved": ("b", 2.0),
                               "unit": "tok/s", "better": "higher"}], ledger=ledger)
    text, png = cost.report(ledger)
    assert long_name in text   # the table keeps the whole name
    assert png_width(png) < 1.3 * narrow


# --- defects found by probing (each test failed before its fix) ------------------------------------

def test_ledger_record_refuses_a_meter_still_running():
    # inside its `with` block the running stretch is not in meter.seconds yet: the entry would say 0 s
    with cost.Meter("still running", chapter="01", price_per_hour=0.0) as meter:
        with pytest.raises(RuntimeError, match="Ledger.record: meter 'still running' is still running"):
            cost.Ledger().record(meter)
    assert cost.Ledger().entries() == []
    assert cost.Ledger().record(meter)["values"]["seconds"] == meter.seconds > 0


def test_meter_stops_even_when_the_device_fails_to_synchronize(monkeypatch):
    meter = cost.Meter("gpu error", price_per_hour=0.0)
    with meter:
        def failing(device=None):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        monkeypatch.setattr(cost, "synchronize", failing)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            meter.__exit__(None, None, None)
        monkeypatch.setattr(cost, "synchronize", lambda device=None: None)
        meter.__enter__()  # not "already running": the failed exit stopped it
    assert meter._start is None and meter.seconds > 0


def test_report_keeps_the_latest_entry_of_each_machine(isolated_runs, tmp_path):
    ledger = cost.Ledger()
    ledger.append("03", "pretraining", {"seconds": 30.0}, hardware=T4_BOX)
    ledger.append("03", "pretraining", {"seconds": 20.0}, hardware=T4_BOX)   # newer, same machine: replaces
    ledger.append("03", "pretraining", {"seconds": 600.0}, hardware=CPU_BOX)  # another machine: its own row
    text, png = cost.report(ledger.path, out_dir=tmp_path)   # a path is taken as the ledger file
    t4, cpu = cost.hardware_id(T4_BOX), cost.hardware_id(CPU_BOX)
    rows = {line.split("]")[0].strip(): line.split("]")[1].strip() for line in text.splitlines() if "]  " in line}
    assert rows == {f"pretraining [{t4}": "time 20 s", f"pretraining [{cpu}": "time 10 min"}, text
    assert "30 s" not in text and png == tmp_path / "report.png" and png.exists()
    one_machine = cost.Ledger(tmp_path / "one.jsonl")
    one_machine.append("03", "pretraining", {"seconds": 20.0}, hardware=T4_BOX)
    assert "  pretraining  time 20 s" in cost.report(one_machine, out_dir=tmp_path)[0]  # no machine suffix


def test_ledger_warning_names_each_corrupt_line(isolated_runs):
    ledger = cost.Ledger()
    ledger.append("02", "a", {"v": 1}, hardware=CPU_BOX)
    with open(ledger.path, "a") as f:
        f.write("[1]\n" * 3 + '{"chapter": "02", "label": "b", "values": {}}\n' + "[2]\n" * 12)
    with pytest.warns(UserWarning, match=r"15 corrupt line\(s\) \(line 2, 3, 4, 6, 7, 8, 9, 10, 11, 12 and 5 more\)"):
        assert [entry["label"] for entry in ledger.entries()] == ["a", "b"]
    single = cost.Ledger(isolated_runs / "single.jsonl")
    single.path.write_text('{"chapter": "02", "label": "b", "values": {}}\n{"torn\n')
    with pytest.warns(UserWarning, match=r"1 corrupt line\(s\) \(line 2\)"):
        single.entries()


def test_measure_peaks_names_a_device_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(cost, "best_seconds", lambda fn, **kwargs: pytest.fail("measured on a missing device"))
    with pytest.raises(ValueError, match="measure_peaks: device='gpu' is not a device"):
        cost.measure_peaks(device="gpu", fast=True, cache=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="measure_peaks: device='cuda' but no CUDA GPU"):
        cost.measure_peaks(device="cuda", fast=True, cache=False)


@pytest.mark.parametrize("call, message", [
    (lambda: cost.best_seconds(lambda: None, repeats=2.5), r"best_seconds: repeats=2.5 must be at least 1"),
    (lambda: cost.best_seconds(lambda: None, repeats="3"), r"best_seconds: repeats='3' must be at least 1"),
    (lambda: cost.best_seconds(lambda: None, warmup=None), r"best_seconds: warmup=None must be a whole number"),
    (lambda: cost.best_seconds_interleaved({"a": lambda: None}, repeats=True), r"repeats=True must be at least 1"),
    (lambda: cost.best_seconds_interleaved({"a": lambda: None}, warmup_each_round=0.5), r"warmup_each_round=0.5"),
])
def test_timing_helpers_refuse_call_counts_that_are_not_whole_numbers(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_timing_helpers_say_what_they_time():
    with pytest.raises(TypeError, match="best_seconds: fn must be a function"):
        cost.best_seconds(3.0)
    with pytest.raises(TypeError, match="best_seconds_interleaved: fns must be a dict of name -> function"):
        cost.best_seconds_interleaved([lambda: None, lambda: None])
    with pytest.raises(TypeError, match="best_seconds_interleaved: fns must be a dict"):
        cost.best_seconds_interleaved({"a": "not callable"})


# --- python -m minillm.bench on bad options ---------------------------------------------------------

@pytest.fixture
def bench_that_must_not_run(monkeypatch):
    from minillm import bench

    def refuse(**options):
        raise AssertionError(f"the benchmark ran with bad options {options}")
    for benchmark in bench.BENCHMARKS.values():
        monkeypatch.setattr(benchmark, "run", refuse)
    return bench.main


@pytest.mark.parametrize("argv, usage, message", [
    (["moe", "--experts", "abc"], "usage: python -m minillm.bench moe", "argument --experts: 'abc' must be"),
    (["moe", "--experts", "8,,x"], "usage: python -m minillm.bench moe", "argument --experts"),
    (["moe", "--top-k", "0"], "usage: python -m minillm.bench moe", "argument --top-k: 0 must be >= 1"),
    (["moe", "--tokens", "-5"], "usage: python -m minillm.bench moe", "argument --tokens: -5 must be >= 1"),
    (["moe", "--repeats", "1.5"], "usage: python -m minillm.bench moe", "argument --repeats: '1.5' is not a whole"),
    (["bpe", "--baseline-merges", "-1"], "usage: python -m minillm.bench bpe", "--baseline-merges: -1 must be >= 0"),
    (["train", "--layers", "0"], "usage: python -m minillm.bench train", "argument --layers: 0 must be >= 1"),
    (["train", "--steps", "x"], "usage: python -m minillm.bench train", "argument --steps: 'x' is not a whole"),
])
def test_bench_refuses_bad_options_before_running(bench_that_must_not_run, capsys, argv, usage, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_that_must_not_run(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(usage) and message in err, err


def test_bench_errors_show_the_subcommands_usage_and_an_out_dir_that_is_a_file(bench_that_must_not_run, tmp_path,
                                                                             capsys):
    from minillm import bench

    a_file = tmp_path / "figures.json"
    a_file.write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        bench_that_must_not_run(["moe", "--out-dir", str(a_file)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: python -m minillm.bench moe")
    assert f"--out-dir {a_file}: {a_file} is a file, not a folder" in err
    with pytest.raises(SystemExit) as exit_info:   # a file further up the path is in the way as well
        bench_that_must_not_run(["moe", "--out-dir", str(a_file / "sub")])
    assert exit_info.value.code == 2 and f"{a_file} is a file, not a folder" in capsys.readouterr().err
    def bad_size(**options):
        raise ValueError("BPETokenizer.train: vocab_size=200 is too small")
    bench.BENCHMARKS["bpe"].run = bad_size   # undone by the fixture's monkeypatch
    with pytest.raises(SystemExit) as exit_info:   # a ValueError from inside the benchmark: its own usage too
        bench.main(["bpe", "--vocab-size", "200"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: python -m minillm.bench bpe")
    assert "python -m minillm.bench bpe: error: BPETokenizer.train: vocab_size=200" in err


def test_bench_bpe_refuses_negative_baseline_merges_when_called_directly():
    from minillm.bench import bench_bpe
    with pytest.raises(ValueError, match="bench bpe: --baseline-merges=-1 must be a whole number >= 0"):
        bench_bpe(baseline_merges=-1)


def test_bench_turns_os_errors_and_interrupts_into_one_line(monkeypatch, tmp_path, capsys):
    from minillm import bench

    def unwritable(**options):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "moe.json"))
    monkeypatch.setattr(bench.BENCHMARKS["moe"], "run", unwritable)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["moe", "--out-dir", str(tmp_path / "ro")])
    assert exit_info.value.code == f"python -m minillm.bench moe: Permission denied ({tmp_path / 'ro' / 'moe.json'})"

    def interrupted(**options):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench.BENCHMARKS["moe"], "run", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["moe"])
    assert exit_info.value.code == 130 and "python -m minillm.bench moe: interrupted" in capsys.readouterr().err


def test_report_prints_row_names_as_text_in_the_table_and_the_plot(isolated_runs):
    ledger = cost.Ledger()
    # matplotlib reads "$...$" as mathtext: this name made the report crash, "$0.35 vs $3" lost its dollars
    cost.savings_table("02", [{"what": r"cost $\frac{ per hour vs $3", "baseline": ("$0.35/h", 2.0),
                               "improved": ("$3/h", 1.0), "unit": "s", "better": "lower"}], ledger=ledger)
    # this machine's hardware, as savings_table records: one machine, so no row carries a machine tag
    ledger.append("02", "two\nlines\tand a tab", {"seconds": 1.0}, hardware=cost.probe_hardware())
    text, png = cost.report(ledger)
    assert png.exists() and r"savings: cost $\frac{ per hour vs $3" in text
    assert "\n  two lines and a tab  " in text   # one row, in the table's columns


def test_meter_without_a_device_still_waits_for_gpu_work(monkeypatch):
    waits = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)   # this process has run CUDA work
    with cost.Meter("matmul on the GPU", price_per_hour=0.0):   # device left out: only the launch was timed
        pass
    assert len(waits) == 2   # on entry and on exit
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # CPU work only: CUDA is not started for it
    with cost.Meter("CPU work", price_per_hour=0.0) as meter:
        pass
    assert len(waits) == 2 and meter.device.type == "cpu"


def test_benchmark_path_keeps_another_machines_file_of_the_day_and_replaces_its_own(tmp_path):
    import datetime as dt

    today = dt.date.today().isoformat()
    first = cost.benchmark_path(tmp_path / "new-folder", "moe-cpu-amd-epyc-2c", "CPU: AMD EPYC (family 25, model 1)")
    assert first == tmp_path / "new-folder" / f"moe-cpu-amd-epyc-2c-{today}.json"   # a folder not there yet is fine
    first = cost.benchmark_path(tmp_path, "moe-x", "machine A")
    first.write_text(json.dumps({"hardware": "machine A", "rows": [1]}))
    assert cost.benchmark_path(tmp_path, "moe-x", "machine A") == first                # a rerun replaces its own
    second = cost.benchmark_path(tmp_path, "moe-x", "machine B")                       # the same id, another machine
    assert second == tmp_path / f"moe-x-{today}-2.json"
    second.write_text(json.dumps({"hardware": "machine B"}))
    assert cost.benchmark_path(tmp_path, "moe-x", "machine B") == second
    assert cost.benchmark_path(tmp_path, "moe-x", "machine C") == tmp_path / f"moe-x-{today}-3.json"
    # A file that is not a benchmark's JSON (half-written by hand, a list) is never overwritten.
    (tmp_path / f"odd-{today}.json").write_text("[1, 2]")
    (tmp_path / f"odd-{today}-2.json").write_text("{not json")
    assert cost.benchmark_path(tmp_path, "odd", "machine A") == tmp_path / f"odd-{today}-3.json"


def test_report_shows_a_chapters_newest_savings_table_not_rows_left_from_older_ones(isolated_runs):
    # before: a fast run's "python 24^3" row stayed beside a full run's "python 256^3" row, in the text and the plot
    ledger = cost.Ledger(isolated_runs / "ledger.jsonl")
    ledger.append("02", "savings: matmul (python 8^3)", {"baseline": 1.0, "improved": 5.0, "ratio": 5.0})  # untagged
    row = {"baseline": ("python", 1.0), "improved": ("torch", 9.0), "unit": "FLOP/s", "better": "higher"}
    cost.savings_table("02", [dict(row, what="matmul (python 24^3)")], ledger=ledger)
    cost.savings_table("01", [dict(row, what="bigram speed")], ledger=ledger)
    cost.savings_table("02", [dict(row, what="matmul (python 256^3)"), dict(row, what="softmax time")], ledger=ledger)
    ledger.append("02", "torch add", {"seconds": 0.5})   # not a savings row: stays whatever the tables
    text, _ = cost.report(ledger, out_dir=isolated_runs)
    assert "matmul (python 256^3)" in text and "softmax time" in text and "bigram speed" in text
    assert "24^3" not in text and "8^3" not in text and "torch add" in text
    tags = {e.get("savings_table") for e in ledger.entries() if e["label"].startswith("savings: ")}
    assert len(tags) == 4 and None in tags   # one tag per table (three), and the untagged old row
    # A row appended by hand after the newest table stays, and brings no older table back.
    ledger.append("02", "savings: by hand", {"baseline": 1.0, "improved": 2.0, "ratio": 2.0})
    text, _ = cost.report(ledger, out_dir=isolated_runs)
    assert "by hand" in text and "matmul (python 256^3)" in text and "24^3" not in text and "8^3" not in text
