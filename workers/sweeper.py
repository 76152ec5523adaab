"""The sweeper: re-drives tasks that nothing drives any more (see orchestration.recovery)."""
