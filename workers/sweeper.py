"""The sweeper as a Celery beat job: re-drives tasks nothing drives any more.

``celery -A workers beat`` schedules ``taskrail.sweep`` every ``TASKRAIL_SWEEP_INTERVAL_S``;
``taskrail sweep`` runs the same pass once by hand. Claims are atomic, so two beat
processes started by mistake do no harm. A pass that meets a database or broker outage
logs a warning (``sweep_retry_later``) and ends: the next scheduled pass is the retry.
"""

from __future__ import annotations

from celery import Task

from orchestration import constants as c
from orchestration.errors import InfrastructureError
from orchestration.logging import get_logger
from orchestration.store.recovery import sweep as sweep_once
from workers.celery_app import app
from workers.runtime import runtime

log = get_logger("taskrail.sweeper")


@app.task(name=c.SWEEP_TASK, bind=True, ignore_result=True, acks_late=False)
def sweep(self: Task) -> int:
    """One sweep pass; returns how many tasks were re-driven (0 after an outage)."""
    rt = runtime(app)
    try:
        redriven = sweep_once(
            rt.db,
            rt.dispatcher,
            redrive_after_s=rt.settings.redrive_after_s,
            batch=rt.settings.sweep_batch,
        )
    except InfrastructureError as err:
        log.warning(
            "sweep_retry_later",
            error=str(err),
            error_type=type(err).__name__,
            next_pass_in_s=rt.settings.sweep_interval_s,
        )
        return 0
    if redriven:
        log.info("sweep_done", redriven=len(redriven))
    return len(redriven)
