import os
import sys
from pathlib import Path

# Two cores are shared by every test process: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Data reads Parquet footers on 32 actors a listing: 32 process starts on two cores add seconds
# to every job of the suite (whose inputs are a few files). Inherited by the clusters tests start.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
