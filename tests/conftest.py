import os
import sys
from pathlib import Path

# Two cores are shared by every test process: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Data reads Parquet footers on 32 actors a listing: 32 process starts on two cores add seconds
# to every job of the suite (whose inputs are a few files). Inherited by the clusters tests start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jobs.common import FOOTER_ACTORS_VAR  # noqa: E402  (light: no torch, no ray at import)

os.environ.setdefault(FOOTER_ACTORS_VAR, "1")
