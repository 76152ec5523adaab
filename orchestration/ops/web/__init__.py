"""The web console behind ``taskrail web``: the people's side in a browser.

Pages: ``/`` (counts by state, the last hour's throughput, what is not moving, the
circuit breakers with a reset), ``/tasks`` (the filters of ``taskrail list``, a page at
a time), ``/tasks/{id}`` (the task, its timeline and the moves its state allows) and
``/escalations`` (the inbox: claim, resolve, reopen, reject). JSON mirrors:
``/api/tasks`` (as ``taskrail list --json``) and ``/api/tasks/{id}`` (as ``taskrail
show --json``).

Starlette, Jinja2 templates (autoescaped) and htmx, every asset served from this
package (no CDN). Every route is behind HTTP basic auth from ``TASKRAIL_WEB_AUTH``;
the user name is who acts; every POST carries a CSRF token (:mod:`.guard`).

::

    app = create_app(Taskrail(settings), parse_credentials("ana:secret"))
"""

from orchestration.ops.web.app import create_app
from orchestration.ops.web.guard import Credentials, CsrfTokens, parse_credentials

__all__ = ["Credentials", "CsrfTokens", "create_app", "parse_credentials"]
