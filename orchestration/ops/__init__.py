"""Operations: the ``taskrail`` command, ``status``, Prometheus metrics and their
exposition, and the demo. The top of ``orchestration``: nothing below imports it.
"""
