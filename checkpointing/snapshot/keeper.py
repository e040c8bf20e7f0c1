"""The per-node keeper: owns the memory tier's shared-memory slots and outlives the workers.

    python -m checkpointing.snapshot.keeper --shm-root /dev/shm/perennial/<job> --node-index 0 \
        --num-nodes 1 --port 29600 --local-ranks 8 --checkpoint-dir run/checkpoints [--peer h:p]

Workers map its slot files and copy into them directly; the keeper checksums completed slots,
sends them to the peer keeper (replicas), drains them to disk, and on SIGTERM persists the
newest complete snapshot that is newer than the disk's, then unlinks its shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import queue
import shutil
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

from checkpointing.commit import committed_dirs, prune
from checkpointing.snapshot import faults
from checkpointing.snapshot.persist import commit_when_complete, temp_dir_for, write_node_part
from checkpointing.snapshot.protocol import receive, send
from checkpointing.snapshot.replica import PeerLink, fetch_from_peer, serve_fetch, store_replica
from checkpointing.snapshot.slots import SlotLayout, box_checksums, write_json_atomically
from checkpointing.snapshot.store import SlotStore

COMMIT_TIMEOUT_S = 120.0
KEEPER_PID_FILE = "keeper.pid"
SHUTDOWN_COMMIT_TIMEOUT_S = 15.0


class Keeper:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shm_root = Path(args.shm_root)
        self.node_dir = self.shm_root / f"node{args.node_index}"
        self.store = SlotStore(self.shm_root, self.node_dir, args.run_id)
        self.replica_stores: dict[int, SlotStore] = {}
        # Three workers: a snapshot counts once checksummed, so checksums never queue behind a
        # persist (which may wait minutes on a slow disk or on other nodes' parts) or a replica.
        self.tasks: queue.Queue = queue.Queue()
        self.persists: queue.Queue = queue.Queue()
        self.replicas: queue.Queue = queue.Queue()  # a slow or dead peer delays nothing else
        self.root = Path(args.checkpoint_dir)
        on_disk = committed_dirs(self.root)
        self.status: dict[str, Any] = {"node": args.node_index,
                                       "persisted_step": on_disk[0][0] if on_disk else None,
                                       "persist_error": None, "persist_failures": 0}
        self.peer = PeerLink(args.peer, self.log) if args.peer else None
        self.pending_persist: set[int] = set()
        self.replica_lock = threading.Lock()
        self.stopping = False
        for directory in sorted(self.node_dir.glob("replica-node*")):  # adopt peers' replicas
            self._replica_store(int(directory.name.removeprefix("replica-node")))

    def log(self, message: str) -> None:
        print(f"[keeper node{self.args.node_index}] {message}", file=sys.stderr, flush=True)

    # -- requests -------------------------------------------------------------------------
    def handle(self, message: dict[str, Any], rfile, wfile) -> dict[str, Any] | None:
        cmd = message["cmd"]
        if cmd == "register":
            self.store.drop_ranks_outside(message["world_size"])
            layout = SlotLayout.from_json(message["layout"])
            return {"files": self.store.ensure_slots(message["rank"], layout,
                                                     self.args.local_ranks)}
        if cmd == "begin":
            slot = self.store.begin(message["rank"], message["step"], message["world_size"])
            return {"slot": slot}
        if cmd == "done":
            return self._done(message)
        if cmd == "list":
            return self.listing()
        if cmd == "read":
            self._serve_read(message, wfile)
            return None
        if cmd == "drain":
            self.join_background_work()
            return {"status": self.status}
        if cmd == "replica":
            with self.replica_lock:  # a stopping keeper takes no replica it would leave behind
                if self.stopping:
                    raise ValueError("keeper is stopping")
                store_replica(self._replica_store(message["node"]), message, rfile)
            return {"ok": True}
        if cmd == "fetch":
            serve_fetch(self._replica_store(message["node"]), wfile)
            return None
        raise ValueError(f"unknown keeper command {cmd!r}")

    def stores(self) -> list[SlotStore]:
        return [self.store, *self.replica_stores.values()]

    def listing(self) -> dict[str, Any]:
        """Every complete slot this keeper holds, its node's own and its peers' replicas, and
        where others reach it (a restore on another node fetches byte ranges from here)."""
        host = socket.gethostname() if self.args.bind == "0.0.0.0" else self.args.bind
        layouts, manifests = {}, []
        for store in self.stores():
            with store.lock:
                for (rank, _), m in sorted(store.manifests.items()):
                    if m["state"] != "complete" or rank not in store.layouts:
                        continue
                    key = f"{store.directory.name}/{rank}"  # each layout once, not per slot
                    if key not in layouts:
                        layouts[key] = store.layouts[rank].to_json(header=False)
                    manifests.append({**m, "layout_key": key})
        return {"manifests": manifests, "layouts": layouts, "address": f"{host}:{self.args.port}",
                "host": socket.gethostname(), "shm_root": str(self.shm_root)}

    def _serve_read(self, message: dict[str, Any], wfile) -> None:
        """Bytes [offset, offset + length) of a complete slot file of snapshot `step`; an error
        when that slot is gone, torn or now holds another step (the reader tries another copy)."""
        file, step = message["file"], message["step"]
        for store in self.stores():
            for (rank, slot), m in list(store.manifests.items()):
                if store.relative(rank, slot) == file:
                    if m["state"] != "complete" or m["step"] != step:
                        break
                    fd = os.open(store.path(rank, slot), os.O_RDONLY)  # a slot may be recreated
                    try:
                        data = os.pread(fd, message["length"], message["offset"])
                    finally:
                        os.close(fd)
                    if len(data) != message["length"]:
                        break
                    send(wfile, {"ok": True}, memoryview(data))
                    return
        send(wfile, {"error": f"{file}: no complete copy of step {step} here"})

    def _done(self, message: dict[str, Any]) -> dict[str, Any]:
        rank, slot = message["rank"], message["slot"]
        with self.store.lock:
            manifest = self.store.manifests[(rank, slot)]
            assert manifest["step"] == message["step"], f"rank {rank} slot {slot}: step mismatch"
            manifest = {**manifest, "state": "copied", "global_state": message["global_state"],
                        "rank_state": message["rank_state"], "persist": message["persist"],
                        "nodes": message.get("nodes", list(range(self.args.num_nodes))),
                        "node_ranks": message.get("node_ranks", self.args.local_ranks)}
            self.store.set_manifest(rank, slot, manifest)
            self.queue_checksum(rank, slot)
        return {"ok": True}

    def queue_checksum(self, rank: int, slot: int) -> None:
        """Pin the copied slot until it is checksummed (and replicated)."""
        self.store.pin(rank, slot, +1)
        self.tasks.put((self._checksum, rank, slot))

    def _replica_store(self, node: int) -> SlotStore:
        if node not in self.replica_stores:
            directory = self.node_dir / f"replica-node{node}"
            self.replica_stores[node] = SlotStore(self.shm_root, directory, self.args.run_id)
        return self.replica_stores[node]

    # -- background work (two threads, each in order) ------------------------------------
    def work(self, tasks: queue.Queue) -> None:
        while True:
            task, *args = tasks.get()
            try:
                task(*args)
            except Exception as err:  # noqa: BLE001 - a keeper must outlive any one task
                self.log(f"{task.__name__} failed: {err!r}")
            finally:
                tasks.task_done()

    def join_background_work(self) -> None:
        self.tasks.join()  # checksums first: they may queue persists and replicas
        self.persists.join()
        self.replicas.join()

    def _checksum(self, rank: int, slot: int) -> None:
        try:
            manifest = self.store.manifests[(rank, slot)]
            layout = self.store.layouts[rank]
            with open(self.store.path(rank, slot), "rb") as f:
                with mmap.mmap(f.fileno(), layout.size, prot=mmap.PROT_READ) as data:
                    crcs = box_checksums(memoryview(data), layout, manifest["block_size"])
            manifest = {**manifest, "state": "complete", "crc32": crcs}
            self.store.set_manifest(rank, slot, manifest)
            if self.peer is not None:  # pinned until sent
                self.store.pin(rank, slot, +1)
                self.replicas.put((self._replicate, rank, slot, manifest))
        finally:
            self.store.pin(rank, slot, -1)
        if manifest["persist"] and self.all_local_ranks_complete(manifest):
            self.queue_persist(manifest["step"], COMMIT_TIMEOUT_S)

    def all_local_ranks_complete(self, manifest: dict[str, Any]) -> bool:
        """Whether every rank of the world that took this manifest's step and uses this keeper
        has its slot of that step complete (the world may have changed between steps)."""
        same = [m for m in self.store.complete_ranks_at(manifest["step"])
                if m["world_size"] == manifest["world_size"]]
        return len(same) == manifest.get("node_ranks", self.args.local_ranks)

    def _replicate(self, rank: int, slot: int, manifest: dict[str, Any]) -> None:
        try:
            self.peer.send_replica(self.args.node_index, manifest, self.store.layouts[rank],
                                   self.store.path(rank, slot))
        finally:
            self.store.pin(rank, slot, -1)

    def queue_persist(self, step: int, timeout_s: float) -> None:
        """Pin the step's slots now, so no newer snapshot reuses them while the persist waits."""
        with self.store.lock:
            manifests = self.store.complete_ranks_at(step)
            world = max(m["world_size"] for m in manifests)  # one world's slots of the step
            manifests = [m for m in manifests if m["world_size"] == world]
            for m in manifests:
                self.store.pin(m["rank"], m["slot"], +1)
        self.persists.put((self.persist, step, manifests, timeout_s))

    def persist(self, step: int, manifests: list[dict[str, Any]], timeout_s: float) -> None:
        start = time.perf_counter()
        try:
            with faults.persist_file_size_limit():
                write_node_part(self.root, self.args.node_index, manifests, self.shm_root)
            nodes = manifests[0].get("nodes", list(range(self.args.num_nodes)))
            commits = any(m["rank"] == 0 for m in manifests)
            if commits:
                commit_when_complete(self.root, step, nodes, timeout_s)
            self.status.update(persisted_step=step, persist_error=None,
                               persist_seconds=time.perf_counter() - start)
            if commits:
                prune(self.root, self.args.keep)  # housekeeping after the commit, not before
                self.log(f"persisted step {step} to {self.root}")
        except (OSError, TimeoutError, AssertionError) as err:
            # At once: a full disk must get its space back for the next persist to succeed.
            shutil.rmtree(temp_dir_for(self.root, step), ignore_errors=True)
            self.status.update(persist_error=f"persist of step {step} failed: {err}")
            self.status["persist_failures"] += 1
            self.log(f"persist of step {step} failed: {err}; training goes on in memory")
        finally:
            for m in manifests:
                self.store.pin(m["rank"], m["slot"], -1)
            write_json_atomically(self.node_dir / "status.json", self.status)

    # -- start and stop -------------------------------------------------------------------
    def finish_adopted_work(self) -> None:
        """Redo what a killed predecessor left half done: checksum slots whose copy it had
        acknowledged, and persist the newest complete snapshot that was due to persist."""
        with self.store.lock:
            copied = [key for key, m in self.store.manifests.items() if m["state"] == "copied"]
            for rank, slot in copied:
                self.queue_checksum(rank, slot)
        self.tasks.join()
        step = self.newest_unpersisted_step(due_only=True)
        if step is not None:
            self.log(f"resuming the interrupted persist of step {step}")
            self.queue_persist(step, COMMIT_TIMEOUT_S)

    def newest_unpersisted_step(self, due_only: bool) -> int | None:
        """The newest step complete on all local ranks and newer than the newest on disk."""
        full = [m["step"] for m in self.store.complete_manifests()
                if (m.get("persist") or not due_only) and self.all_local_ranks_complete(m)]
        on_disk = committed_dirs(self.root)
        newest_disk = on_disk[0][0] if on_disk else -1
        return max(full) if full and max(full) > newest_disk else None

    def restore_from_peer(self) -> None:
        if self.peer is not None and not self.store.complete_manifests():
            count = fetch_from_peer(self.args.peer, self.args.node_index, self.store)
            if count:
                self.log(f"restored {count} slot(s) of this node from the peer replica")

    def persist_newest_on_exit(self) -> None:
        self.join_background_work()
        step = self.newest_unpersisted_step(due_only=False)
        if step is not None:
            self.log(f"persisting step {step} before exit")
            self.queue_persist(step, SHUTDOWN_COMMIT_TIMEOUT_S)
            self.persists.join()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # a worker died: it reconnects
            self._serve()

    def _serve(self) -> None:
        keeper: Keeper = self.server.keeper  # type: ignore[attr-defined]
        while (message := receive(self.rfile)) is not None:
            try:
                reply = keeper.handle(message, self.rfile, self.wfile)
            except (ValueError, OSError, KeyError) as err:
                reply = {"error": str(err)}
            if reply is not None:
                send(self.wfile, reply)
            else:
                self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m checkpointing.snapshot.keeper")
    p.add_argument("--shm-root", required=True)
    p.add_argument("--node-index", type=int, default=0)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    p.add_argument("--peer", default="", help="host:port of the keeper holding our replica")
    p.add_argument("--local-ranks", type=int, required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--run-id", default="", help="the run whose slots this keeper holds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    keeper = Keeper(parse_args(sys.argv[1:] if argv is None else argv))
    (keeper.node_dir / KEEPER_PID_FILE).write_text(str(os.getpid()))  # "in use" for launchers
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    faults.install_in_keeper()
    keeper.restore_from_peer()
    server = _Server((keeper.args.bind, keeper.args.port), _Handler)
    server.keeper = keeper  # type: ignore[attr-defined]
    for tasks in (keeper.tasks, keeper.persists, keeper.replicas):
        threading.Thread(target=keeper.work, args=(tasks,), daemon=True).start()
    keeper.finish_adopted_work()  # pins what it persists before any worker may reuse a slot
    threading.Thread(target=server.serve_forever, daemon=True).start()
    keeper.log(f"serving {keeper.node_dir} on port {keeper.args.port}")
    stop.wait()
    with keeper.replica_lock:  # one being received finishes first; later ones are refused
        keeper.stopping = True
    keeper.persist_newest_on_exit()
    server.shutdown()
    keeper.store.remove_all()
    if keeper.shm_root.is_dir() and not any(keeper.shm_root.iterdir()):
        keeper.shm_root.rmdir()
    keeper.log("stopped; shared memory released")
    return 0


if __name__ == "__main__":
    sys.exit(main())
