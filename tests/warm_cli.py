"""Many runs of `python -m MODULE ARGS...` from one warm interpreter: it imports the package once, then
forks one child per run, which starts the module as `python -m` does (runpy._run_module_as_main, with
stdin, stdout and stderr files of its own). A hundred runs pay one start-up, not a hundred (1-3 s of
imports each). For what a run does with its arguments and input; a fresh process is still the way to
test start-up itself, terminals, signals and closed or full streams. test_broken_folders and test_cli
hold a few runs equal to fresh processes."""

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

def children(runs, timeout, workers):
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
module, args, stdin, out, err = children(spec["runs"], spec["timeout"], spec["workers"])
os.dup2(os.open(stdin or os.devnull, os.O_RDONLY), 0)
os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
sys.argv = ["-m", *args]  # as Python sets it while it looks for the module
runpy._run_module_as_main(module)  # what `python -m` calls; an uncaught exception ends us as it ends it
"""


def run_many(runs: list, folder: Path, pythonpath: Path, timeout: float = 60,
             workers: int = 2) -> list:
    """runs: [(module, args, stdin text or bytes or None)] -> [CompletedProcess with stdout and stderr as
    bytes; returncode None where the run was killed after `timeout` s]. Arguments may be bytes, as a shell
    passes them. `folder` receives each run's files."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = []
    for i, (module, args, stdin) in enumerate(runs):
        if stdin is not None:
            (folder / f"{i}.in").write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
        spec.append((module, [os.fsdecode(a) for a in args], str(folder / f"{i}.in") if stdin is not None else None,
                     str(folder / f"{i}.out"), str(folder / f"{i}.err")))
    (folder / "runs.json").write_text(json.dumps({"runs": spec, "timeout": timeout, "workers": workers}))
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(folder / "runs.json")], capture_output=True, text=True,
                          env=env, cwd=pythonpath, stdin=subprocess.DEVNULL, timeout=timeout * len(runs) + 120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, Path(out).read_bytes(),
                                        Path(err).read_bytes())
            for code, (module, args, _, out, err) in zip(json.loads(done.stdout), spec)]
