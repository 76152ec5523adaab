"""The store: the database, the transition store, leases, recovery, read models, migrations.

Nothing here imports Celery or kombu: the sweeper's claim hands its re-drives to
whatever sends hop messages.
"""
