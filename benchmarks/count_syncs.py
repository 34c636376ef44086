"""Host syncs per training step of a checkout's trainer, counted on CPU as tests/test_gpu_path.py counts them:
reads of a tensor's value (item, tolist, cpu, numpy, bool, float, int) and device moves without non_blocking,
grouped by call site, over 5 steps of tiny DiT with TREAD r(1->3)@0.5, then at the log point.

    .venv/bin/python benchmarks/count_syncs.py [CHECKOUT]     # default: this checkout; another one to compare

A move between the same devices copies nothing; on CUDA a move from the host without non_blocking (from pageable
memory) makes the host wait, and so does every read. AdamW's step counters are host tensors on every device and
are not counted."""
import collections
import inspect
import sys
import tempfile
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
sys.path[:0] = [str(root), str(root / "tests")]

import torch  # noqa: E402

from suite_helpers import build_denoiser  # noqa: E402
from tread_bench.data import load_dataset  # noqa: E402
from tread_bench.training.trainer import Trainer, TrainConfig  # noqa: E402

data = load_dataset("synthetic", 32, limit=32)
torch.manual_seed(0)
den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=[{"start": 1, "end": 3, "rate": 0.5}])
trainer = Trainer(den, data, TrainConfig(steps=100, global_batch=4, log_every=5, lr=1e-3), tempfile.mkdtemp())
trainer.train_step()  # creates the optimizer state
calls = collections.Counter()


def site() -> str:
    frame = inspect.stack()[2]
    return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno}"


def count_reads(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def read(tensor, *args, **kwargs):
        if id(tensor) not in {id(s["step"]) for s in trainer.opt.state.values() if "step" in s}:
            calls[f"{name} at {site()}"] += 1
        return original(tensor, *args, **kwargs)

    setattr(torch.Tensor, name, read)


for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
    count_reads(name)
original_to = torch.Tensor.to


def to(tensor, *args, **kwargs):
    moves = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
    if moves and not kwargs.get("non_blocking", False):
        calls[f"to(device) at {site()}"] += 1
    return original_to(tensor, *args, **kwargs)


torch.Tensor.to = to
STEPS = 5
for _ in range(STEPS):
    loss = trainer.train_step()
    if hasattr(trainer, "unread"):
        trainer.unread.append(loss)
between = dict(calls)
calls.clear()
if hasattr(trainer, "read_losses"):
    trainer.read_losses()
print(f"{root}: {sum(between.values()) / STEPS:g} per step between log points")
for key, n in sorted(between.items()):
    print(f"  {n / STEPS:g} x {key}")
print(f"at the log point: {sum(calls.values())}")
for key, n in sorted(calls.items()):
    print(f"  {n} x {key}")
