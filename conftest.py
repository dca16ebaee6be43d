"""Test-wide settings: the quick sizes, no widgets, and a throwaway runs folder (never the learner's ledger)."""
import os
import tempfile

os.environ.setdefault("MINILLM_FAST", "1")
os.environ["MINILLM_HEADLESS"] = "1"
if "MINILLM_RUNS" not in os.environ:
    os.environ["MINILLM_RUNS"] = tempfile.mkdtemp(prefix="minillm-test-runs-")
os.environ.setdefault("MPLBACKEND", "Agg")
