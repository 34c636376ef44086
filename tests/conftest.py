import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
os.environ.setdefault("HYDRA_FULL_ERROR", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))
