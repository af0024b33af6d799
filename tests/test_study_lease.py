"""benchmarks/study_lease.sh: the shell wrapper that runs the study across 10-minute device commands.

The study itself is replaced by a stub Python (PY=...) that logs its arguments: what is tested here is the wrapper's
own logic (a second start refused while one runs, later starts appending to the logs and keeping one set of monitors).
The real study under it is tested in test_small_scale_study.py.
"""

import os
import signal
import subprocess
import sys
import time

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "study_lease.sh")
STUB = """#!{python}
import os, sys, time
args = sys.argv[2:]
if "report" in args:
    print("stub report")
    sys.exit(0)
print("stub study", " ".join(args), flush=True)
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
"""


@pytest.fixture
def lease(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    study, out = tmp_path / "study", tmp_path / "out"
    env = dict(os.environ, PY=str(stub), STUDY=str(study), OUT=str(out), WHEELS="", DATA=str(tmp_path), PATH=os.environ["PATH"])

    def call(command, **settings):
        return subprocess.run(["bash", SCRIPT, command], env={**env, **settings}, capture_output=True, text=True, timeout=120)

    yield call, study
    for name in ("monitors.pid", "runner.pid"):  # never leave the background loggers running
        path = study / name
        if path.exists():
            for pid in path.read_text().split():
                try:
                    os.killpg(int(pid), signal.SIGTERM)
                except (ProcessLookupError, PermissionError, ValueError):
                    pass


def test_second_start_appends_and_keeps_one_set_of_monitors(lease):
    call, study = lease
    first = call("start", WAIT_S="0", STUB_SLEEP="3", ONLY="baseline/0")
    assert first.returncode == 0, first.stderr
    refused = call("start", WAIT_S="0", ONLY="ssreg/0")
    assert refused.returncode == 4 and "a study is already running" in refused.stderr
    waited = call("wait", WAIT_S="30")
    assert waited.returncode == 0 and "the study has ended" in waited.stdout
    monitors = (study / "monitors.pid").read_text()
    second = call("start", WAIT_S="30", ONLY="ssreg/0", SET="finetune_steps=3000", STAGES="finetune eval")
    assert second.returncode == 0, second.stderr
    assert (study / "monitors.pid").read_text() == monitors  # still alive: not started twice
    log = (study / "runner.log").read_text()
    assert "--only baseline/0 --stage all" in log
    assert "--- start at " in log and "ONLY=ssreg/0 SET=finetune_steps=3000 STAGES=finetune eval ---" in log
    assert "--only ssreg/0 --set finetune_steps=3000 --stage finetune eval" in log
    assert log.index("--only baseline/0") < log.index("--- start at ") < log.index("--only ssreg/0")


def test_wait_without_a_start_says_so(lease):
    call, _ = lease
    result = call("wait", WAIT_S="0")
    assert result.returncode == 3 and "no study was started on this machine" in result.stdout


def test_unknown_command_is_refused(lease):
    call, _ = lease
    result = call("begin")
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_dead_monitor_restarts_the_pair_without_doubling_the_survivor(lease, tmp_path):
    call, study = lease
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"  # a GPU logger that keeps running, as `nvidia-smi -l 15` does
    fake.write_text('#!/bin/sh\necho "fake, 0, 0"\ncase " $* " in *" -l "*) exec sleep 600;; esac\n')
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    assert call("start", WAIT_S="30", ONLY="baseline/0", PATH=path).returncode == 0
    gpu, cpu = map(int, (study / "monitors.pid").read_text().split())
    os.killpg(gpu, signal.SIGTERM)  # the GPU logger dies; the CPU loop lives on
    time.sleep(0.5)
    assert call("start", WAIT_S="30", ONLY="ssreg/0", PATH=path).returncode == 0
    new = list(map(int, (study / "monitors.pid").read_text().split()))
    assert len(new) == 2 and not {gpu, cpu} & set(new)
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(cpu, 0)  # the old CPU loop was stopped, not left running beside the new one
