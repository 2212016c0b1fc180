"""The measuring floor: the raw client against a static responder in its own process.

Answers every request on its one connection with the same fixed 200 response, about the
size of a conversation record, doing no other work. What the sampler measures against it is
the cost of the client, the loopback and the scheduler: the part of every Trellis latency
figure that is not Trellis.

Child: ``python bench/floor_server.py`` prints its port, serves one connection, exits when
the client closes it (or after ``LIFETIME_SECONDS`` without traffic).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

BODY = b'{"padding": "' + b"x" * 520 + b'"}'  # ~540 bytes, like a conversation record
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    + f"content-length: {len(BODY)}\r\n\r\n".encode()
    + BODY
)
LIFETIME_SECONDS = 30.0  # idle limit for the child: it never outlives a forgotten parent
RECV_BYTES = 65_536


def serve_one_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(LIFETIME_SECONDS)
        print(listener.getsockname()[1], flush=True)
        connection, _ = listener.accept()
    with connection:
        connection.settimeout(LIFETIME_SECONDS)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        while chunk := connection.recv(RECV_BYTES):
            buffer += chunk
            while b"\r\n\r\n" in buffer:  # the sampler only sends GETs: no request bodies
                _, buffer = buffer.split(b"\r\n\r\n", 1)
                connection.sendall(RESPONSE)


def measure(samples: int) -> dict[str, float]:
    """Start the responder, sample it like Trellis (``latency.sample_raw``), stop it."""
    from latency import sample_raw
    from server_process import python_executable

    command = [python_executable(), str(Path(__file__))]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        port = int(child.stdout.readline())  # "" (a ValueError) if the child died
        return sample_raw(port, "/", samples)
    finally:
        try:
            child.wait(timeout=LIFETIME_SECONDS)  # it exits once the client has closed
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


if __name__ == "__main__":
    serve_one_connection()
    sys.exit(0)
