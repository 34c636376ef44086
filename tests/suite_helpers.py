"""Compose run_suite's Hydra config in-process, as `python run_suite.py ...` would; kill a suite mid-run; replay
a method's token draws."""
import signal
import subprocess
import time
from pathlib import Path

import torch

from hydra import compose, initialize_config_dir

import run_suite
import tread_bench.engine
from diffusion import build_objective
from tread_bench.methods import build_network

SUITES = str(Path(run_suite.__file__).resolve().parent / "suites")


def compose_suite(overrides):
    """The composed config, with scale=auto resolved as run_suite.py resolves it."""
    with initialize_config_dir(config_dir=SUITES, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
        return tread_bench.engine.apply_auto_scale(cfg, list(overrides), compose)


def run(overrides):
    """What run_suite.py does, in-process: ConfigErrors are raised (run_suite prints them and exits 2)."""
    cfg = compose_suite(overrides)
    tread_bench.engine.validate_suite(cfg)
    suite = tread_bench.engine.resolve_suite(cfg)
    return tread_bench.engine.run_suite_kind(cfg, suite)


def kill_once_logged(cmd, cwd, env, stats: Path, lines: int = 3, timeout: float = 600.0) -> None:
    """Start ``cmd`` and kill -9 it as soon as ``stats`` (a run's stats.jsonl) has ``lines`` lines: mid-run,
    after a checkpoint or two, never between runs."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if stats.exists() and len(stats.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def rng_state_replays(net, x, t, y):
    """(masks of the first call, net.rng_state() before it): a second call draws other tokens, and restoring the
    saved state replays the first call's tokens and output exactly. ``net`` in train mode."""
    state = net.rng_state()
    with torch.no_grad():
        first, (mask,) = net(x, t, y, return_token_masks=True)
        _, (other,) = net(x, t, y, return_token_masks=True)
        net.set_rng_state(state)
        again, (mask_again,) = net(x, t, y, return_token_masks=True)
    assert not torch.equal(mask, other)  # the draws move on ...
    assert torch.equal(mask, mask_again) and torch.equal(first, again)  # ... and the saved state replays them
    return mask, state


def build_denoiser(backbone: str, size: str, data_shape, num_classes: int, routes=(), selection="auto",
                   fp32_after_route=True, seed=0, **backbone_overrides):
    """TREAD ``routes`` on ``backbone`` (methods.build_network), wrapped by EDM: the model most tests train."""
    net = build_network(backbone, size, data_shape, num_classes, "tread", seed=seed, fp32_after_route=fp32_after_route,
                        overrides=backbone_overrides, routes=routes, selection=selection)
    return build_objective("edm").wrap(net)


def descendants(pid: int) -> set:
    """The pids of every live process below ``pid`` (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids) -> set:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited; only its parent's wait is missing
            out.add(pid)
    return out
