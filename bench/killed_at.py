"""Run train_student.py and SIGKILL this process, no clean-up, as optimizer step N+1 starts (just after the
checkpoint of step N when train.checkpoint_every divides N): bench/gpu_check.sh's resume row.

    accelerate launch [...] bench/killed_at.py N train_student.py --config ... [overrides]
"""

import os
import runpy
import signal
import sys

sys.path.insert(0, os.getcwd())
kill_at = int(sys.argv[1]) + 1
sys.argv = sys.argv[2:]

import kd.train.recipe  # noqa: E402

real, calls = kd.train.recipe.optimizer_step, [0]


def patched(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)


kd.train.recipe.optimizer_step = patched  # the recipe calls it through its module global
runpy.run_path(sys.argv[0], run_name="__main__")
