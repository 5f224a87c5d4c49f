"""Run a training module and SIGKILL it after optimizer step N: the crash that the resume tests recover from.

    python -m tests.kill_after_step N train.pretrain --set KEY=VALUE ...

It wraps train.pretrain's `end_of_step` (called after every optimizer step, before that step's checkpoint and
evaluation), so the shipped training code carries no fault injection of its own.
"""

import os
import signal
import sys

from train import pretrain


def main() -> None:
    kill_at, module, *arguments = sys.argv[1:]
    if module != pretrain.__name__:
        raise SystemExit(f"only {pretrain.__name__} has steps to kill after, not {module}")
    end_of_step = pretrain.end_of_step

    def killed_after_step(run):
        if run.progress.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return end_of_step(run)

    pretrain.end_of_step = killed_after_step
    sys.argv = [module, *arguments]
    pretrain.main()


if __name__ == "__main__":
    main()
