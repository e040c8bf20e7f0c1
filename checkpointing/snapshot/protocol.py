"""JSON-line requests over TCP between workers and keepers, and between peer keepers.

A message is one JSON object on one line; a message with `"payload": n` is followed by n raw
bytes (slot contents sent to a peer replica).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, BinaryIO

CONNECT_TIMEOUT_S = 60.0


def send(stream: BinaryIO, message: dict[str, Any], payload: memoryview | None = None) -> None:
    if payload is not None:
        message = {**message, "payload": len(payload)}
    stream.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    if payload is not None:
        stream.write(payload)
    stream.flush()


def receive(stream: BinaryIO) -> dict[str, Any] | None:
    line = stream.readline()
    return json.loads(line) if line else None


def read_exactly(stream: BinaryIO, into: memoryview) -> None:
    done = 0
    while done < len(into):
        count = stream.readinto(into[done:])
        if not count:
            raise ConnectionError(f"peer closed after {done} of {len(into)} bytes")
        done += count


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


class KeeperClient:
    """A persistent connection to a keeper; reconnects when it was restarted."""

    def __init__(self, address: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 io_timeout_s: float | None = None) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.io_timeout_s = io_timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stream: BinaryIO | None = None

    def request(self, message: dict[str, Any], payload: memoryview | None = None) -> dict:
        """Send one request and return the reply; raises ConnectionError if the keeper is gone
        for longer than the connect timeout, RuntimeError if it answers with an error.

        A keeper being restarted may still accept connections in the kernel's backlog and then
        reset them, so every failure is retried (on a new connection) until the deadline.
        """
        deadline = time.monotonic() + self.connect_timeout_s
        with self._lock:
            while True:
                try:
                    stream = self._connected(deadline)
                    send(stream, message, payload)
                    reply = receive(stream)
                    if reply is None:
                        raise ConnectionError(f"keeper {self.address} closed the connection")
                    break
                except OSError:
                    self._close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def request_into(self, message: dict[str, Any], buffers: list[memoryview]) -> None:
        """One request whose reply is followed by raw bytes, read into `buffers` in order.
        No retry: a reader that fails here tries another copy."""
        with self._lock:
            try:
                stream = self._connected(time.monotonic() + self.connect_timeout_s)
                send(stream, message)
                reply = receive(stream)
                if reply is None:
                    raise ConnectionError(f"keeper {self.address} closed the connection")
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                for buffer in buffers:
                    read_exactly(stream, buffer)
            except Exception:
                self._close()  # the stream may be mid-payload: never reuse it
                raise

    def _connected(self, deadline: float) -> BinaryIO:
        if self._stream is None:
            while True:
                try:
                    self._sock = socket.create_connection(parse_address(self.address), timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            self._sock.settimeout(self.io_timeout_s)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._stream = self._sock.makefile("rwb")
        return self._stream

    def _close(self) -> None:
        for closable in (self._stream, self._sock):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass
        self._stream = self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()
