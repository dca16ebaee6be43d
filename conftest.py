"""Test-wide settings: the quick sizes, no widgets, and a throwaway runs folder (never the learner's ledger)."""
import os
import tempfile

os.environ.setdefault("MINILLM_FAST", "1")
os.environ["MINILLM_HEADLESS"] = "1"
if "MINILLM_RUNS" not in os.environ:
    os.environ["MINILLM_RUNS"] = tempfile.mkdtemp(prefix="minillm-test-runs-")
os.environ.setdefault("MPLBACKEND", "Agg")

# Triton decides once, when it is first imported, whether it interprets kernels on the CPU. torch can
# import it indirectly (e.g. FlopCounterMode), so without a GPU set the interpreter here, before any test
# module imports anything: then the kernel tests see the same Triton in whatever order modules load.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
