"""Testing hook: kill the process at a named point of a named step, to test resume after a crash.

``MTPRL_FAULT=<phase>:<step>`` makes :func:`fault_point` send SIGKILL to this process (no cleanup, no
``finally``: what a killed job or a lost node leaves) when the run reaches ``phase`` during ``step``
(the step being computed, 1-based). Phases:

    gen       rl_step: after the step's generation and scoring, before the update
    update    rl_step: after the optimizer steps, before the LR scheduler step
    save      checkpoint write: the actor weights are in ``global_step_<k>.tmp``, the optimizer state is not
    renamed   checkpoint commit: ``global_step_<k>`` renamed into place, latest-step file not yet written
    log       after the checkpoint of step k is saved, before step k's metrics row is logged

``MTPRL_FAULT=<phase>:<step>@<rank>`` kills only that rank of a multi-rank run (``RANK`` of the
launcher's environment). Unset (the normal case) it does nothing. Used by tests/trainer/test_resilience.py; not for production.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "MTPRL_FAULT"


def fault_point(phase: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec in (f"{phase}:{step}", f"{phase}:{step}@{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)
