"""The MPI download job of one round: `mpiexec|srun -n N python download_worker.py SCHEDULE DONE`.

Rank 0 runs the coordinator in a thread beside its own worker loop; every rank (0 included)
downloads. A rank's main loop is the only thread of that rank that talks MPI; lane threads
report finished batches to it through a queue. MPI waits are polled with short sleeps because
MPICH's blocking receives spin a core.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import pyarrow.parquet as pq

from distributed_downloader import config as config_mod
from distributed_downloader.engine import launch, ownership
from distributed_downloader.engine.coordinator import Coordinator
from distributed_downloader.engine.lane import Lane, LaneSpec
from distributed_downloader.engine.ownership import Ownership
from distributed_downloader.errors import internal_error_message
from distributed_downloader.logs import log_to
from distributed_downloader.net.fetch import FetchSettings
from distributed_downloader.net.hosts import HostRegistry
from distributed_downloader.net.robots import RobotsCache
from distributed_downloader.plan import snapshot
from distributed_downloader.plan.schedule import batch_mode
from distributed_downloader.plan.server_memory import MEMORY_FILE, read_memory
from distributed_downloader.store.batch_parts import PARTS_DIR, BatchParts
from distributed_downloader.store.files import atomic_write_json, read_marker, valid_marker

TAG_REQUEST = 11
TAG_REPLY = 12
TAG_PUSH = 13  # coordinator -> rank, unasked: a pause another lane of a shared server was told
POLL_SECONDS = 0.005
IDLE_POLL_SECONDS = 0.025  # the coordinator's poll after a while without requests (issue #16)
PROGRESS_SECONDS = 10.0  # a progress line this often: readable in a terminal and in Slurm logs
STATUS_SECONDS = 2.0  # each rank reports its lanes' live state this often

log = logging.getLogger("distributed_downloader.worker")


def _wait_for(comm, source: int, tag: int) -> object:  # noqa: ANN001 - mpi4py types
    while not comm.Iprobe(source=source, tag=tag):
        time.sleep(POLL_SECONDS)
    return comm.recv(source=source, tag=tag)


class CoordinatorThread(threading.Thread):
    """Serves lane and batch requests of every rank until all have said goodbye."""

    def __init__(self, comm, coordinator: Coordinator, progress_path: Path, memory_path: Path) -> None:  # noqa: ANN001
        super().__init__(name="coordinator", daemon=True)
        self.comm = comm
        self.coordinator = coordinator
        self.progress_path = progress_path
        self.memory_path = memory_path
        self.error: BaseException | None = None
        self._pushes: list = []  # pending isend requests (kept alive until complete)

    def run(self) -> None:
        from mpi4py import MPI

        try:
            goodbyes = 0
            last_report = 0.0
            status = MPI.Status()
            poll = POLL_SECONDS
            while goodbyes < self.comm.Get_size():
                if time.monotonic() - last_report > PROGRESS_SECONDS:
                    self.report()
                    last_report = time.monotonic()
                if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status):
                    # Quiet: poll less often, up to every 25 ms (a 5-ms poll all round cost rank 0
                    # ~0.8% of a core and a GIL hand-off each time); a request brings it back to 5 ms.
                    time.sleep(poll)
                    poll = min(IDLE_POLL_SECONDS, poll * 1.5)
                    continue
                poll = POLL_SECONDS
                source = status.Get_source()
                message = self.comm.recv(source=source, tag=TAG_REQUEST)
                reply = self.handle(source, message)
                if message["kind"] == "bye":
                    goodbyes += 1
                self.comm.send(reply, dest=source, tag=TAG_REPLY)
            self.report()
        except BaseException as exc:
            self.error = exc
            traceback.print_exc()
            self.comm.Abort(2)

    def handle(self, rank: int, message: Mapping) -> dict:
        kind = message["kind"]
        if kind == "lanes":
            given = self.coordinator.request_lanes(rank, message["free"], set(message["held"]))
            for server in {a.lane["server_name"] for a in given}:
                self._push_shares(server)  # its last batch handed out: no more lanes will open for it
            return {
                "assignments": [{"lane": a.lane, "batch": a.batch} for a in given],
                "exhausted": self.coordinator.exhausted,
            }
        if kind == "next":
            batch = self.coordinator.next_batch(
                message["server"], message["lane_index"], message["stats"], message.get("lane")
            )
            self._push_shares(message["server"])
            return {"batch": batch}
        if kind == "lane_closed":
            self.coordinator.lane_closed(message["server"], message["lane_index"])
            self._push_shares(message["server"])
            return {}
        if kind == "done":
            self.coordinator.finished_batch(message["server"], message["stats"], message.get("lane"))
            return {}
        if kind == "lane_failed":
            self.coordinator.lane_failed(message["server"], message["lane_index"], message["reason"])
            self._push_shares(message["server"])
            return {}
        if kind == "pause":
            for other in self.coordinator.pause(message["server"], message["until"], rank):
                self._push(other, dict(message))  # the pause and level as the lane relayed them
            return {}
        if kind == "status":
            self.coordinator.update_live(rank, message["lanes"])
        return {}

    def _push_shares(self, server: str) -> None:
        """Tell the ranks running the server's other lanes their grown share (Coordinator.reshares)."""
        for rank, share in self.coordinator.reshares(server):
            self._push(rank, {"kind": "share", "server": server, "share": share})

    def _push(self, rank: int, message: dict) -> None:
        """Send a rank an unasked message (TAG_PUSH); its request is kept until it completed."""
        self._pushes = [request for request in self._pushes if not request.Test()]
        self._pushes.append(self.comm.isend(message, dest=rank, tag=TAG_PUSH))

    def report(self) -> None:
        progress = self.coordinator.progress()
        print(format_progress(progress), flush=True)
        atomic_write_json(self.progress_path, progress)
        atomic_write_json(self.memory_path, self.coordinator.memory)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return f" ({shown}{', ...' if len(names) > most else ''})" if names else ""


def format_progress(progress: Mapping) -> str:
    """One plain line (no control characters): fine in a terminal, a log file and a Slurm log."""
    elapsed = max(progress["elapsed_s"], 1e-9)
    megabytes_per_s = progress["bytes"] / elapsed / 1e6
    return (
        f"[download] batches {progress['batches_done']:,}/{progress['batches_total']:,}"
        f" | URLs {progress['urls_done']:,}/{progress['urls_total']:,}"
        f" | {progress['successes']:,} images, {progress['images_per_s']:.1f}/s, {megabytes_per_s:.2f} MB/s"
        f" | elapsed {_duration(progress['elapsed_s'])}, ETA {_duration(progress['eta_s'])}"
        f" | servers {progress['servers_active']} active"
        f", {len(progress['servers_backing_off'])} backing off{_names(progress['servers_backing_off'])}"
        f", {len(progress['servers_failed'])} given up{_names(progress['servers_failed'])}"
    )


class LaneThread(threading.Thread):
    """Runs the batches the coordinator gives one lane, pipelined (Lane.run_lane).

    Talks to the rank's main loop through ``events``: ("more", spec, None) when the lane wants its
    next batch, ("done", spec, stats) for each committed batch, ("exit", spec, None) at the end,
    ("error", spec, exception) if the lane failed.
    """

    def __init__(self, lane: Lane, events: queue.Queue) -> None:
        super().__init__(name=f"lane-{lane.spec.key}", daemon=True)
        self.lane = lane
        self.inbox: queue.Queue[dict | None] = queue.Queue()
        self.events = events

    def run(self) -> None:
        spec = self.lane.spec
        try:
            self.lane.run_lane(
                self.inbox,
                ask_more=lambda: self.events.put((spec, "more", None)),
                finished=lambda stats: self.events.put((spec, "done", stats.to_json())),
            )
            self.events.put((spec, "exit", None))
        except BaseException as exc:
            self.events.put((spec, "error", exc))
        finally:
            self.lane.close()


def run_rank(comm, schedule: Mapping, paths: config_mod.Paths, slots: int, owner: Ownership) -> None:  # noqa: ANN001
    """One rank's loop: ask for lanes while it has free slots, feed each lane its next batch."""
    config = schedule["config"]
    params = config["downloader_parameters"]
    round_no = schedule["round"]
    events: queue.Queue = queue.Queue()
    lanes: dict[str, LaneThread] = {}
    laned = [info["server_name"] for info in schedule["servers"]]
    hosts = HostRegistry(params["default_rate_limit"], comm.Get_size(), params["rate_multiplier"], laned)
    robots = RobotsCache(paths.robots, FetchSettings.from_config(params).robots_token)  # one per rank, shared
    relayed: dict[str, float] = {}  # server -> the pause (epoch) last relayed or received
    told: dict[str, int] = {}  # server -> this rank's lane's congestion count last relayed
    exhausted = False
    next_status = time.monotonic() + STATUS_SECONDS

    def rpc(message: dict) -> dict:
        comm.send(message, dest=0, tag=TAG_REQUEST)
        return _wait_for(comm, 0, TAG_REPLY)  # type: ignore[return-value]

    def lane_ended(spec: LaneSpec) -> None:
        """Joined, it sends nothing more: only now may its server's other lanes take its share."""
        if spec.lanes > 1:
            rpc({"kind": "lane_closed", "server": spec.server_name, "lane_index": spec.lane_index})

    while True:
        try:
            # Every 50 ms while lanes run: relayed pauses and levels reach them within one poll (0.5 s
            # once the rank had all its lanes: a relayed 1-s Retry-After came ~1 s late).
            spec, kind, payload = events.get(timeout=0.05)
        except queue.Empty:
            spec = None
        while spec is not None:
            thread = lanes[spec.server_name]
            if kind == "error":  # the lane died (a bug, not a URL): its server waits for the next round
                reason = internal_error_message(payload, f"running lane {spec.key}")
                log.error("%s", reason, exc_info=payload)
                print(f"[download] {reason}", file=sys.stderr, flush=True)
                rpc(
                    {"kind": "lane_failed", "server": spec.server_name, "lane_index": spec.lane_index, "reason": reason}
                )
                thread.join()  # Lane.close: its in-flight fetches (and their redirect hops) are over
                del lanes[spec.server_name]
                lane_ended(spec)
            elif kind == "done":
                if payload.get("failed"):
                    log.error(
                        "batch failed %s/%s: %s", payload["server_name"], payload["partition_id"], payload["failed"]
                    )
                else:
                    log.info(
                        "batch done %s/%s: %s ok, %s errors in %.1fs",
                        payload["server_name"],
                        payload["partition_id"],
                        payload["successes"],
                        payload["errors"],
                        payload["seconds"],
                    )
                rpc({"kind": "done", "server": spec.server_name, "stats": payload, "lane": thread.lane.snapshot()})
            elif kind == "more":
                reply = rpc(
                    {
                        "kind": "next",
                        "server": spec.server_name,
                        "lane_index": spec.lane_index,
                        "stats": None,
                        "lane": thread.lane.snapshot(),
                    }
                )
                thread.inbox.put(reply["batch"])
            elif kind == "exit":
                thread.join()
                del lanes[spec.server_name]
                lane_ended(spec)
            try:
                spec, kind, payload = events.get_nowait()
            except queue.Empty:
                spec = None
        if not exhausted and len(lanes) < slots:
            reply = rpc({"kind": "lanes", "free": slots - len(lanes), "held": sorted(lanes)})
            for assignment in reply["assignments"]:
                lane_spec = LaneSpec(**assignment["lane"])
                thread = LaneThread(Lane(lane_spec, config, paths, round_no, hosts, robots), events)
                lanes[lane_spec.server_name] = thread
                thread.start()
                thread.inbox.put(assignment["batch"])
                log.info(
                    "lane %s (of %d) at %.2f req/s",
                    lane_spec.key,
                    lane_spec.lanes,
                    lane_spec.start_rate / lane_spec.lanes,
                )
            # An empty answer is final for this rank: a server's lanes close only once it has no
            # batches left, so no lane can open up for it later, and a rank past its fair share
            # leaves the rest to the ranks yet to ask (Coordinator.request_lanes). Asking again
            # would only cost rank 0 a scan per ask, for nothing.
            exhausted = not reply["assignments"]
        if exhausted and not lanes:
            rpc({"kind": "status", "lanes": []})
            rpc({"kind": "bye"})
            return
        _relay_pauses(comm, lanes, relayed, told, rpc)
        if time.monotonic() >= next_status:
            rpc({"kind": "status", "lanes": [thread.lane.snapshot() for thread in lanes.values()]})
            next_status = time.monotonic() + STATUS_SECONDS
        if reason := owner.lost():
            log.warning("stopping: %s", reason)
            print(f"[download] rank {comm.Get_rank()} stopping: {reason}", file=sys.stderr, flush=True)
            comm.Abort(4)


def _relay_pauses(  # noqa: ANN001
    comm, lanes: Mapping[str, LaneThread], relayed: dict[str, float], told: dict[str, int], rpc
) -> None:
    """Share pauses and congestion between the lanes of a server on different ranks, through rank 0.

    A lane that met congestion tells the others the level it found (for the whole server), so
    they take their share of it at once rather than each finding the limit with its own refusals.
    """
    while comm.Iprobe(source=0, tag=TAG_PUSH):
        push = comm.recv(source=0, tag=TAG_PUSH)
        thread = lanes.get(push["server"])
        if push["kind"] == "share":
            if thread is not None:
                thread.lane.controller.reshare(push["share"])
            continue
        relayed[push["server"]] = max(relayed.get(push["server"], 0.0), push["until"])
        if thread is not None:
            thread.lane.controller.pause_until(push["until"])
            if push.get("level"):
                thread.lane.controller.sibling_level(
                    push["level"], bool(push.get("guessed")), push.get("floor"), bool(push.get("measured", True))
                )
    for server, thread in lanes.items():
        if thread.lane.controller.share >= 1.0:
            continue  # nobody else to tell
        controller = thread.lane.controller
        until = controller.paused_until_epoch()
        congestion = controller.congestion_count()
        level = floor = None
        if congestion > told.get(server, 0) and controller.level is not None:
            level = controller.level / controller.share  # the whole server's
            if controller.level_floor is not None:
                floor = controller.level_floor / controller.share
        told[server] = congestion
        if until > relayed.get(server, 0.0) + 0.5 or level is not None:
            relayed[server] = max(relayed.get(server, 0.0), until)
            rpc(
                {
                    "kind": "pause",
                    "server": server,
                    "until": until,
                    "level": level,
                    "guessed": controller.level_guessed,
                    "floor": floor,
                    "measured": controller.level_measured,
                }
            )


def remaining_work(schedule: Mapping, paths: config_mod.Paths) -> dict:
    """The schedule minus batches already done (a rerun of a killed round skips them)."""
    servers = []
    for server in schedule["servers"]:
        batches = []
        for batch in server["batches"]:
            folder = paths.batch_images(server["server_name"], batch["partition_id"])
            mode = batch_mode(folder, batch["fingerprint"], schedule["round"], bool(server["ignored_code"]))
            if mode is None and (folder / PARTS_DIR).is_dir():  # a kill between a commit's marker and its cleanup
                marker = read_marker(folder)
                if marker is not None:
                    BatchParts(folder, batch["fingerprint"], schedule["round"]).drop_committed(marker.round)
            if mode is not None:
                batches.append({**batch, "mode": mode, "todo": _todo(paths, server["server_name"], batch, mode)})
        if batches:
            servers.append({**server, "batches": batches})
    return {**schedule, "servers": servers}


def _todo(paths: config_mod.Paths, server: str, batch: Mapping, mode: str) -> int:
    """How many URLs the batch tries this round (for progress and ETA)."""
    if mode == "retry":
        marker = read_marker(paths.batch_images(server, batch["partition_id"]))
        if marker is not None:
            return marker.transient
    rows = pq.ParquetFile(paths.batch_urls(server, batch["partition_id"])).metadata.num_rows
    if mode == "full":  # a monthly snapshot copies or keeps some rows without a request
        rows -= snapshot.not_downloaded(paths, server, batch["partition_id"])
    return rows


def leaves_work(schedule: Mapping, paths: config_mod.Paths) -> bool:
    """Whether the next round would have anything to do once this round's batches are in place: a
    batch without its marker (it failed) or with URLs to try again (``schedule.batch_mode``). The
    batches this round did not schedule had nothing to do, and nothing changed them."""
    next_round = int(schedule["round"]) + 1
    for server in schedule["servers"]:
        for batch in server["batches"]:
            folder = paths.batch_images(server["server_name"], batch["partition_id"])
            if batch_mode(folder, batch["fingerprint"], next_round, ignored=False) is not None:
                return True
    return False


def unfinished_batches(schedule: Mapping, paths: config_mod.Paths) -> list[str]:
    """Scheduled batches without a marker proving this round's work is in place."""
    missing = []
    for server in schedule["servers"]:
        for batch in server["batches"]:
            marker = valid_marker(
                paths.batch_images(server["server_name"], batch["partition_id"]), batch["fingerprint"]
            )
            if marker is None or (batch["mode"] != "full" and marker.round < schedule["round"]):
                missing.append(f"{server['server_name']}/{batch['partition_id']}")
    return missing


def main(argv: list[str] | None = None) -> int:
    args, comm = launch.join_world("download_worker.py", "DONE_FILE", argv)
    if comm is None:
        return 2
    from mpi4py import MPI  # already loaded by join_world

    schedule_path, done_path = args.schedule, args.done
    rank, size = comm.Get_rank(), comm.Get_size()
    schedule = json.loads(schedule_path.read_text())
    config = schedule["config"]
    paths = config_mod.paths(config)
    params = config["downloader_parameters"]
    round_no = schedule["round"]
    log_to(paths.logs / "download" / f"round_{round_no}" / f"rank_{rank}.log", params["logger_level"])
    identity = {
        "rank": rank,
        "size": size,
        "host": socket.gethostname(),
        "node": os.environ.get("SLURMD_NODENAME", ""),
        "pid": os.getpid(),
        "thread_level": MPI.Query_thread(),
    }
    ranks = comm.gather(identity, root=0)
    # A lane is one thread plus the connections its server allows: a slow server's lane is nearly
    # idle, so a rank holds as many lanes as it has download threads; then no server waits for a
    # slot while faster ones run (the slowest small servers often set the makespan).
    slots = max(1, params["threads_per_worker"])
    coordinator_thread = None
    owner_path = paths.state / f"round_{round_no}.owner"
    claimed = None
    if rank == 0:
        claimed = ownership.claim(owner_path)
        if claimed[1]:  # an earlier attempt may still have ranks running: let them see the new token
            time.sleep(ownership.GRACE_SECONDS)
        # Staging files of a killed earlier attempt: nothing else writes here now.
        shutil.rmtree(paths.staging / f"round_{round_no}", ignore_errors=True)
    token, _ = comm.bcast(claimed, root=0)
    owner = ownership.Ownership(owner_path, token)
    if rank == 0:
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            print("MPI library lacks MPI_THREAD_MULTIPLE, which the coordinator needs", file=sys.stderr)
            comm.Abort(3)
        atomic_write_json(paths.state / f"round_{round_no}_ranks.json", ranks)
        print(
            f"[download] round {round_no}: {size} ranks, {schedule['totals']['batches']} batches of "
            f"{schedule['totals']['servers']} servers, lower bound {schedule['totals']['lower_bound_seconds']}s",
            flush=True,
        )
        memory_path = paths.state / MEMORY_FILE
        coordinator = Coordinator(
            remaining_work(schedule, paths),
            decrease=params["rate_multiplier"],
            memory=read_memory(memory_path, config.get("previous_dataset")),
            ranks=size,
        )
        coordinator_thread = CoordinatorThread(
            comm, coordinator, paths.state / f"round_{round_no}_progress.json", memory_path
        )
        coordinator_thread.start()
    try:
        run_rank(comm, schedule, paths, slots, owner)
    except BaseException:
        log.exception("rank %d failed", rank)
        traceback.print_exc()
        comm.Abort(1)
    if rank == 0:
        assert coordinator_thread is not None
        coordinator_thread.join()
        atomic_write_json(paths.state / f"round_{round_no}_batches.json", coordinator_thread.coordinator.batch_stats)
    comm.Barrier()
    if rank == 0:
        failed = coordinator_thread.coordinator.failed_batches
        missing = unfinished_batches(schedule, paths)
        unexplained = [key for key in missing if key not in failed]
        if unexplained:
            print(f"[download] {len(unexplained)} batches unfinished, e.g. {unexplained[:5]}", file=sys.stderr)
            return 1
        if failed and round_no >= int(schedule.get("num_rounds") or round_no):
            # No round is left to redo them: the round is not done, so running the workflow again
            # (the same command) redoes just these batches; verification could not pass without them.
            print(
                f"[download] round {round_no} (the last): {len(failed)} batches failed, e.g. "
                + "; ".join(f"{key}: {why}" for key, why in list(failed.items())[:3])
                + ". Run the same command again to redo them.",
                file=sys.stderr,
                flush=True,
            )
            return 1
        if failed:  # data, not a crash: the next round downloads them again
            print(
                f"[download] round {round_no}: {len(failed)} batches failed and wait for the next round, e.g. "
                + "; ".join(f"{key}: {why}" for key, why in list(failed.items())[:3]),
                file=sys.stderr,
                flush=True,
            )
        atomic_write_json(
            done_path,
            {
                "round": round_no,
                "ranks": size,
                "progress": coordinator_thread.coordinator.progress(),
                "failed_batches": failed,
                "leaves_work": bool(failed) or leaves_work(schedule, paths),
            },
        )
    return 0
