"""A stop that always stops. The tiny 2-worker suite is stopped by SIGINT (sent to its process group, as Ctrl-C
is) or SIGTERM (to the suite), once or twice, at three moments held open on purpose: while the workers are still
starting up (a slow worker initializer, before a worker could report anything), while they train, and while they
evaluate (a slow held-out loss). Every process the suite started is gone within 10 s, the exit code is 130 or 143,
the resume line is printed once, nothing prints a traceback, and rerunning the command resumes to exactly the
losses of an uninterrupted run. Each test prints one line of the table in the issue's closing note (pytest -s)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite_helpers import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = ["suite=smoke", "scale=tiny", "+suite.jobs=2", "suite.train.steps=60", "suite.train.log_every=1",
          "suite.train.checkpoint_every=5", "suite.data.limit=64", "tracker=none", "suite.eval.every=20",
          "+suite.eval.loss_images=32", "+suite.eval.loss_batch=32", "+suite.eval.loss_levels=2"]
RUN_IDS = ("dit-tiny-baseline-seed0", "dit-tiny-tread-seed0")

# Imported by the suite's process (through LAUNCH) and, by pickle, by each worker: the initializer first marks
# and sleeps (start-up held open), or makes the worker's held-out loss mark and sleep (an evaluation held open).
SLOW_WORKERS = '''
import os
import time
from pathlib import Path

from tread_bench.engine import lifecycle

_start_worker = lifecycle._start_worker


def slow_start(parent_pid, *rest):
    marks, moment = Path(os.environ["STOP_TEST_MARKS"]), os.environ["STOP_TEST_MOMENT"]
    if moment == "startup":
        (marks / f"starting-{os.getpid()}").touch()
        time.sleep(120)
    _start_worker(parent_pid, *rest)
    if moment == "evaluation":
        from tread_bench.measure.eval_loss import HeldOutLoss

        held_out = HeldOutLoss.__call__

        def slow_evaluation(self, *args, **kwargs):
            (marks / f"evaluating-{os.getpid()}").touch()
            time.sleep(120)
            return held_out(self, *args, **kwargs)

        HeldOutLoss.__call__ = slow_evaluation
'''
LAUNCH = '''
import os
import runpy
import sys

sys.path.insert(0, os.getcwd())  # this checkout's packages, as python run_suite.py finds them
import slow_workers
from tread_bench.engine import lifecycle

lifecycle._start_worker = slow_workers.slow_start
sys.argv = ["run_suite.py", *sys.argv[1:]]
runpy.run_path("run_suite.py", run_name="__main__")
'''


def _env(tmp: Path, moment: str) -> dict:
    (tmp / "marks").mkdir(parents=True, exist_ok=True)
    (tmp / "slow_workers.py").write_text(SLOW_WORKERS)
    (tmp / "launch.py").write_text(LAUNCH)
    path = os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
            "STOP_TEST_MARKS": str(tmp / "marks"), "STOP_TEST_MOMENT": moment}


def _losses(tmp: Path, run_id: str) -> list:
    path = tmp / "runs" / "smoke" / "tiny" / run_id / "stats.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _suite(tmp: Path) -> list:
    return [f"results_dir={tmp}/results", f"runs_dir={tmp}/runs", *CONFIG]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    done = subprocess.run([PY, "run_suite.py", *_suite(tmp)], cwd=ROOT, env=_env(tmp, "none"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {run_id: _losses(tmp, run_id) for run_id in RUN_IDS}


def _held_open(tmp: Path, moment: str, proc) -> bool:
    marks = tmp / "marks"
    if moment == "startup":
        return len(list(marks.glob("starting-*"))) == 2
    if moment == "evaluation":
        return any(marks.glob("evaluating-*"))
    stats = [tmp / "runs" / "smoke" / "tiny" / r / "stats.jsonl" for r in RUN_IDS]
    return all(s.exists() and len(s.read_text().splitlines()) >= 8 for s in stats)


MOMENTS = ("startup", "training", "evaluation")
STOPS = [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 1), (signal.SIGTERM, 2)]
CASES = [pytest.param(moment, signum, count, id=f"{moment}-{signal.Signals(signum).name}x{count}",
                      marks=[] if (signum, count) in ((signal.SIGINT, 2), (signal.SIGTERM, 1)) else [pytest.mark.slow])
         for moment in MOMENTS for signum, count in STOPS]


@pytest.mark.parametrize("moment,signum,count", CASES)
def test_a_stop_at_any_moment_ends_every_process_and_resumes_exactly(tmp_path, uninterrupted, moment, signum, count):
    env = _env(tmp_path, moment)
    proc = subprocess.Popen([PY, str(tmp_path / "launch.py"), *_suite(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not _held_open(tmp_path, moment, proc):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else moment
        time.sleep(0.05)
    started = descendants(proc.pid)
    assert len(started) >= 2
    sent = time.time()
    for k in range(count):
        if k:
            time.sleep(0.5)  # the second signal comes while the first stop is under way
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches every process of the terminal's group
        else:
            proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    while alive(started) and time.time() - sent < 10:
        time.sleep(0.05)
    took, left = time.time() - sent, alive(started)
    resume = subprocess.run([PY, "run_suite.py", *_suite(tmp_path)], cwd=ROOT, env=_env(tmp_path, "none"),
                            capture_output=True, text=True, timeout=600)
    equal = resume.returncode == 0 and all(_losses(tmp_path, r) == uninterrupted[r] for r in RUN_IDS)
    name = signal.Signals(signum).name
    print(f"\nSTOP | {moment} | {name} x{count} | {took:.1f} s | {len(left)} left | exit {proc.returncode} | "
          f"resume equal: {equal}")
    assert not left, f"processes left: {left}"
    assert proc.returncode == 128 + signum and took < 10, (proc.returncode, took)
    assert err.count("stopped by") == 1 and f"stopped by {name}: finished runs and checkpoints are kept" in err
    assert "Traceback" not in err, err[-3000:]
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert equal
