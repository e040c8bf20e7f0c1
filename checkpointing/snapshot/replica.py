"""Peer replicas: a keeper sends each checksummed slot to the next node's keeper over TCP, and a
keeper that starts with an empty directory (its node was lost) fetches its slots back."""

from __future__ import annotations

import mmap
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from checkpointing.snapshot.protocol import (
    KeeperClient,
    parse_address,
    read_exactly,
    receive,
    send,
)
from checkpointing.snapshot.slots import SlotLayout
from checkpointing.snapshot.store import SlotStore

PEER_CONNECT_TIMEOUT_S = 2.0
PEER_IO_TIMEOUT_S = 30.0
PEER_RETRY_S = 10.0
"""While the peer is down, replicas are dropped at once and a connection retried this often."""


class PeerLink:
    """Sends replicas (from the keeper's replica thread, never in the way of checksums); a
    dead peer costs one log line, not the snapshot, and a hung one at most PEER_IO_TIMEOUT_S."""

    def __init__(self, address: str, log: Callable[[str], None]) -> None:
        self.client = KeeperClient(address, connect_timeout_s=PEER_CONNECT_TIMEOUT_S,
                                   io_timeout_s=PEER_IO_TIMEOUT_S)
        self.log = log
        self.failing = False
        self.retry_at = 0.0

    def send_replica(self, node: int, manifest: dict, layout: SlotLayout, path: Path) -> None:
        if self.failing and time.monotonic() < self.retry_at:
            return
        message = {"cmd": "replica", "node": node, "manifest": manifest,
                   "layout": layout.to_json()}
        error = None
        with open(path, "rb") as f, mmap.mmap(f.fileno(), layout.size,
                                              prot=mmap.PROT_READ) as data:
            try:
                self.client.request(message, memoryview(data))
            except (OSError, RuntimeError) as err:
                # Keep only the text: the traceback's frames hold views of `data`, and closing
                # the mmap while they live raises BufferError (which hid the peer's failure).
                error = str(err)
        if error is None:
            if self.failing:
                self.log(f"peer {self.client.address} is back; replicating again")
            self.failing = False
            return
        if not self.failing:
            self.log(f"cannot replicate to peer {self.client.address}: {error}")
        self.failing = True
        self.retry_at = time.monotonic() + PEER_RETRY_S


def _write_slot(store: SlotStore, manifest: dict, layout: SlotLayout, stream: BinaryIO) -> None:
    """Receive one slot's bytes into `store`; torn (state `writing`) until every byte is in."""
    rank, slot = manifest["rank"], manifest["slot"]
    store.ensure_slots(rank, layout, expected_ranks=1)
    store.set_manifest(rank, slot, {**manifest, "state": "writing"})
    with open(store.path(rank, slot), "r+b") as f, mmap.mmap(f.fileno(), layout.size) as data:
        read_exactly(stream, memoryview(data))
    store.set_manifest(rank, slot, {**manifest, "file": store.relative(rank, slot)})


def store_replica(store: SlotStore, message: dict[str, Any], stream: BinaryIO) -> None:
    _write_slot(store, message["manifest"], SlotLayout.from_json(message["layout"]), stream)


def serve_fetch(store: SlotStore, out: BinaryIO) -> None:
    """Answer a restarted peer: a count, then each complete replica slot with its bytes."""
    manifests = store.complete_manifests()
    send(out, {"count": len(manifests)})
    for m in manifests:
        layout = store.layouts[m["rank"]]
        path = store.path(m["rank"], m["slot"])
        with open(path, "rb") as f, mmap.mmap(f.fileno(), layout.size,
                                              prot=mmap.PROT_READ) as data:
            send(out, {"manifest": {k: v for k, v in m.items() if k != "layout"},
                       "layout": m["layout"]}, memoryview(data))
    out.flush()


def fetch_from_peer(address: str, node: int, store: SlotStore) -> int:
    """Copy this node's replica slots from the peer into `store`; 0 if the peer has none."""
    try:
        sock = socket.create_connection(parse_address(address), timeout=PEER_CONNECT_TIMEOUT_S)
    except OSError:
        return 0
    with sock, sock.makefile("rwb") as stream:
        sock.settimeout(None)
        send(stream, {"cmd": "fetch", "node": node})
        header = receive(stream)
        count = int(header["count"]) if header else 0
        for _ in range(count):
            message = receive(stream)
            assert message is not None, "peer closed during fetch"
            _write_slot(store, message["manifest"], SlotLayout.from_json(message["layout"]),
                        stream)
    return count
