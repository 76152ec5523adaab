"""The tables: ``tasks`` (one row per work item), ``task_events`` (its audit trail) and
``sweeper_runs`` (the sweeper's last pass)."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class TaskStatus(enum.StrEnum):
    """Where a task is in its lifecycle."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    ESCALATED = "escalated"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """completed and cancelled never move again. failed moves only on retry, and
        escalated only by a person (resolve, reopen, reject)."""
        return self in (TaskStatus.COMPLETED, TaskStatus.CANCELLED)

    @property
    def is_active(self) -> bool:
        """A hop drives this state forward (pending, assigned, in_progress)."""
        return self in ACTIVE_STATUSES


ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS)
# No hop moves these: they wait for a person (escalated, failed) or are done.
RESTING_STATUSES = (
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
    TaskStatus.ESCALATED,
    TaskStatus.CANCELLED,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; taskrail stores timezone-aware UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Json = JSON().with_variant(JSONB(), "postgresql")
Id = BigInteger().with_variant(Integer(), "sqlite")
StatusType = SAEnum(
    TaskStatus,
    name="task_status",
    native_enum=False,
    create_constraint=False,
    length=16,
    values_callable=lambda e: [m.value for m in e],
)


class Base(DeclarativeBase):
    pass


class Task(Base):
    """A domain work item ("personal tax return for client 42")."""

    __tablename__ = "tasks"
    __table_args__ = (
        # Active tasks by age, for the sweeper (migration 0003 dropped the full
        # (status, updated_at) index: every hop wrote to it).
        Index(
            "ix_tasks_active_updated_at",
            "updated_at",
            postgresql_where=text("status IN ('pending', 'assigned', 'in_progress')"),
            sqlite_where=text("status IN ('pending', 'assigned', 'in_progress')"),
        ),
        # Listing (``taskrail list``, the console): newest first by id within a filter,
        # keyset-paginated (migration 0006).
        Index("ix_tasks_status_id", "status", "id"),
        Index("ix_tasks_type_id", "task_type", "id"),
        Index("ix_tasks_status_type_id", "status", "task_type", "id"),
        Index("ix_tasks_client_id_id", "client_id", "id"),
        Index("ix_tasks_agent_id", "assigned_agent", "id"),
        Index("ix_tasks_created_at", "created_at"),
        Index(
            "ix_tasks_claimed_by_id",
            "claimed_by",
            "id",
            postgresql_where=text("claimed_by IS NOT NULL"),
            sqlite_where=text("claimed_by IS NOT NULL"),
        ),
        # The escalations inbox: the unclaimed, then the claimed, each by id.
        *(
            Index(
                f"ix_tasks_escalated_{name}",
                "id",
                postgresql_where=text(f"status = 'escalated' AND claimed_by {claim}"),
                sqlite_where=text(f"status = 'escalated' AND claimed_by {claim}"),
            )
            for name, claim in (("unclaimed", "IS NULL"), ("claimed", "IS NOT NULL"))
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    client_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    task_type: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[TaskStatus] = mapped_column(StatusType, nullable=False)
    assigned_agent: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(Json, nullable=False, default=dict)
    result: Mapped[Any | None] = mapped_column(Json)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Recovery: who runs the handler now, until when; when a hop may run next.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deferred_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    redriven_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The handler runs in a process of its own (a worker died while it ran).
    isolated: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    # The person handling an escalation (claim / unclaim), and since when.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.task_type} client={self.client_id} {self.status}>"


class TaskEvent(Base):
    """One row per transition of a task, and per claim or unclaim (from = to).

    ``actor`` is who made the move: the worker's name for the machine's moves, the
    person (``--by``) for a person's; ``note`` is what they said about it.
    """

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True
    )
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    from_status: Mapped[TaskStatus] = mapped_column(StatusType, nullable=False)
    to_status: Mapped[TaskStatus] = mapped_column(StatusType, nullable=False)
    agent: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    actor: Mapped[str | None] = mapped_column(String(255))
    note: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    def __repr__(self) -> str:
        return f"<TaskEvent task={self.task_id} {self.event} {self.from_status}->{self.to_status}>"


class SweeperRun(Base):
    """The sweeper's last pass, one row per sweeper (``taskrail status`` reads it)."""

    __tablename__ = "sweeper_runs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_run_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    redriven: Mapped[int] = mapped_column(Integer, nullable=False)
    duration_s: Mapped[float] = mapped_column(Float, nullable=False)


tasks_table = cast(Table, Task.__table__)
events_table = cast(Table, TaskEvent.__table__)
sweeper_runs_table = cast(Table, SweeperRun.__table__)
