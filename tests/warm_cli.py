"""Many runs of `python -m MODULE ARGS...` from one warm interpreter: it imports the package once, then
forks one child per run, which starts the module as `python -m` does (runpy._run_module_as_main, with
stdin from /dev/null and stdout and stderr to files of its own). A hundred runs pay one start-up, not
a hundred (2-4 s of imports each); test_broken_folders holds a few runs equal to fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = r"""
import gc, json, os, signal, sys, time
import runpy
import mlx_qwen3.cli  # noqa: F401  what every command imports before it parses its arguments
gc.freeze()  # a child's collections and exit then leave the imported objects alone, not copying their pages

def children(module, runs, timeout, workers):
    '''Parent: runs each child, at most `workers` at once, and prints the exit statuses (None: killed
    after `timeout` s) as JSON. Child: returns its run.'''
    todo, running, codes = list(enumerate(runs)), {}, [None] * len(runs)
    while todo or running:
        while todo and len(running) < workers:
            i, run = todo.pop(0)
            pid = os.fork()
            if pid == 0:
                return run
            running[pid] = (i, time.monotonic())
        time.sleep(0.005)
        for pid, (i, start) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[i] = os.waitstatus_to_exitcode(status)
            elif time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            else:
                continue
            del running[pid]
    print(json.dumps(codes))
    sys.exit(0)

spec = json.loads(open(sys.argv[1]).read())
args, out, err = children(spec["module"], spec["runs"], spec["timeout"], spec["workers"])
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
sys.argv = ["-m", *args]  # as Python sets it while it looks for the module
runpy._run_module_as_main(spec["module"])  # what `python -m` calls; an uncaught exception ends us as it ends it
"""


def run_many(module: str, argvs: list, folder: Path, pythonpath: Path, timeout: float = 60,
             workers: int = 2) -> list:
    """`python -m module *argv` for each argv -> [(exit status or None if killed after `timeout` s, stderr)].
    `folder` receives each run's output files."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = [(list(argv), str(folder / f"{i}.out"), str(folder / f"{i}.err")) for i, argv in enumerate(argvs)]
    spec = folder / "runs.json"
    spec.write_text(json.dumps({"module": module, "runs": runs, "timeout": timeout, "workers": workers}))
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(spec)], capture_output=True, text=True, env=env,
                          cwd=pythonpath, stdin=subprocess.DEVNULL, timeout=timeout * len(argvs) + 120)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout)
    return [(code, Path(err).read_text(errors="replace")) for code, (_, _, err) in zip(codes, runs)]
