"""Every log line of every stage carries the request id.

Serve's replica handlers (on the ``ray.serve`` logger) stamp each line with the id of the request being
served, read from Serve's request context — a context variable, which ``asyncio.to_thread`` carries into
the model threads. The model layer logs under ``deskgen.*``; :func:`stamp_library_logs` sends those lines
through the same handlers, so a line from inside SDXL's pipeline is as traceable as the access log.
"""

from __future__ import annotations

import logging


def stamp_library_logs() -> None:
    """Route the ``deskgen`` loggers through Serve's replica handlers (call in a deployment's ``__init__``;
    outside a replica, e.g. a unit test constructing a deployment class, nothing changes)."""
    from ray import serve

    try:
        serve.get_replica_context()
    except Exception:
        return
    serve_logger = logging.getLogger("ray.serve")
    library = logging.getLogger("deskgen")
    for handler in serve_logger.handlers:
        if handler not in library.handlers:
            library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False
