"""taskrail's domain: the task lifecycle, its store, agents, breakers and producer API.

This package never imports the Celery hop code in ``workers``; producers use it to
submit work and operators use its CLI.
"""

__version__ = "0.1.0"
