"""Messaging: the only part of ``orchestration`` that imports Celery or kombu.

Celery configuration and sending hops by name (``dispatch``), the hop message format
(``protocol``, ``codec``), taskrail's Redis and file-system transports and the dead
letters kept from them.
"""
