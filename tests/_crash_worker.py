"""Worker of tests/test_crash_resume.py: runs training attempts and kills them with SIGKILL.

``python tests/_crash_worker.py plan.json report.json`` imports torch and the pipeline once, then
forks one child process per attempt of the plan, in order (starting a fresh interpreter per
attempt would cost seconds each). A child trains ``plan["config"]`` in ``attempt["run_dir"]``
(resuming whatever the earlier attempts left there), its output in ``<logs>/attempt-<i>.log``.

``plan["timeline"]`` lists every training step of the run as ``[phase, epoch, step]`` in the
order they are taken (the ``step`` the loop's callbacks see, 1 … steps per epoch). Attempt kinds:

* ``step``: the child SIGKILLs itself after the first step at or past ``timeline[target]``;
* ``save``: at that step it sets ``checkpoint.KILL_ENV`` to ``"<point>:<nth>"``, so the
  ``nth`` checkpoint write from there on kills it at ``point``;
* ``clock``: at that step it starts a timer that SIGKILLs it ``delay`` seconds later, wherever it
  then is (forward, backward, evaluation, plotting, a checkpoint write, the next phase's setup);
* ``none``: the child runs to the end.

Every child gets ``plan["timeout"]`` seconds; one that outlives them is killed and reported as
timed out. The report lists per attempt how the child ended, the timeline index of the step
that set its kill off, and the checkpoint files it left.
"""
import json
import os
import signal
import sys
import threading
import time
import traceback


def child(plan, attempt, log_path, fired_path):
    from mhgd_fast.training import PipelineConfig, checkpoint, run_pipeline

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    position = {tuple(p): i for i, p in enumerate(plan["timeline"])}
    armed = []

    def on_step(phase, epoch, step):
        if attempt["kind"] == "none" or armed or position[(phase, epoch, step)] < attempt["target"]:
            return
        armed.append(True)
        with open(fired_path, "w") as f:  # where the kill was set off, for the report
            f.write(str(position[(phase, epoch, step)]))
        if attempt["kind"] == "step":
            os.kill(os.getpid(), signal.SIGKILL)
        elif attempt["kind"] == "save":
            os.environ[checkpoint.KILL_ENV] = f"{attempt['point']}:{attempt['nth']}"
        else:
            threading.Timer(attempt["delay"], os.kill, (os.getpid(), signal.SIGKILL)).start()

    try:
        run_pipeline(PipelineConfig(**{**plan["config"], "run_dir": attempt["run_dir"]}), callbacks=[on_step])
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_attempt(plan, i, attempt):
    log_path = os.path.join(plan["logs"], f"attempt-{i}.log")
    fired_path = os.path.join(plan["logs"], f"attempt-{i}.fired")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            child(plan, attempt, log_path, fired_path)
        finally:
            os._exit(3)  # never return into the parent's loop
    deadline = start + plan["timeout"]
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline and not timed_out:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(0.01)
    folder = os.path.join(attempt["run_dir"], "checkpoints")
    fired = None
    if os.path.exists(fired_path):
        with open(fired_path) as f:
            fired = int(f.read())
    return {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "timed_out": timed_out, "fired": fired, "seconds": time.monotonic() - start, "log": log_path,
            "files": sorted(os.listdir(folder)) if os.path.isdir(folder) else []}


def main(plan_path, report_path):
    with open(plan_path) as f:
        plan = json.load(f)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once here instead of in every child)
    import torch
    import torch._dynamo  # noqa: F401  (the optimisers import it on first use)
    import mhgd_fast.training  # noqa: F401
    torch.set_num_threads(1)
    # forking is safe only while this process runs no threads of its own (no OpenMP pool yet)
    assert threading.active_count() == 1, threading.enumerate()
    os.makedirs(plan["logs"], exist_ok=True)
    report = []
    for i, attempt in enumerate(plan["attempts"]):
        report.append(run_attempt(plan, i, attempt))
        if report[-1]["timed_out"]:
            break
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
