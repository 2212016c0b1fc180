"""One client command's connection to the server: where it is, the key, the output.

:func:`open_session` resolves ``--server`` / ``$TRELLIS_SERVER`` and ``--api-key`` /
``$TRELLIS_API_KEY`` and opens the :class:`~app.client.TrellisClient` the command uses; it
is closed when the command returns. A command that needs a second connection from another
thread (``watch``'s position poller) opens its own with :meth:`Session.open_client`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.cli.client_parser import API_KEY_ENV_VAR, DEFAULT_SERVER, SERVER_ENV_VAR
from app.cli.output import Output
from app.client import TrellisClient

#: Seconds a request may take, except waits (``run --wait``) and streams, which the
#: client lengthens itself; the server answers everything else in milliseconds.
REQUEST_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Session:
    """The client, the output and the server's address of one command."""

    client: TrellisClient
    output: Output
    server: str
    api_key: str | None

    def open_client(self, *, timeout: float = REQUEST_TIMEOUT_SECONDS) -> TrellisClient:
        """Another client to the same server with the same key (the caller closes it)."""
        return TrellisClient(self.server, api_key=self.api_key, timeout=timeout)


def server_of(arguments: argparse.Namespace) -> str:
    """The server's address: ``--server``, else ``$TRELLIS_SERVER``, else the default."""
    server: str = arguments.server or os.environ.get(SERVER_ENV_VAR) or DEFAULT_SERVER
    return server


@contextmanager
def open_session(arguments: argparse.Namespace, output: Output) -> Iterator[Session]:
    """The session of one command, its client closed on the way out."""
    server = server_of(arguments)
    api_key = arguments.api_key or os.environ.get(API_KEY_ENV_VAR) or None
    with TrellisClient(server, api_key=api_key, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        yield Session(client, output, server, api_key)
