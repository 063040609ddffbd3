"""The scheduling engine of rank 0, shared by every master/worker job (matmul, stream,
deadline-experiment).

The engine owns everything about *how* work reaches the workers and comes back; a *policy*
(master.py's ``Master``, apps/stream.py's ``StreamPhase``, jobs/deadline_experiment.py's
``ExperimentPolicy``) owns *what* the work is. With one rank the engine computes each job
itself through the worker code (``WorkerState``); with more it runs the event loop below on
rank 0 while every other rank runs worker.py's ``worker_run``.

Per pass of the loop: the policy's ``tick`` (arrivals, expiries), every worker's queue filled
(a re-issued copy first, else the policy's next job), every pending message received (result
headers at once, tiles non-blocking), finished sends dropped, silent workers declared lost,
the policy's ``after_pass`` (publishing), then a sleep-wait with backoff when nothing happened
(the master must not spin a core a worker needs).

- *Queues and flow control*: a worker gets jobs while it holds fewer than ``prefetch``, or
  less than ``QUEUE_S`` estimated seconds and ``queue_max`` jobs (``QUEUE_MAX``; 1 keeps every
  worker at one job, so that the policy's priorities hold: the deadline experiment), within the
  bytes in flight (memory/INFLIGHT_SHARE). At most ``flow_limit`` messages (job headers, component buffers,
  cancels) may be on their way to a worker, counting every message of the jobs it has not
  answered: a rank that stops receiving keeps the messages sent to it parked in the sender's
  MPI buffers, and MPICH's shared-memory transport has a fixed pool of them per sender (64
  cells by default); once silent ranks hold them all, the master can send to nobody
  (measured: two hung workers holding 40 small messages each starved a third rank). Cancels
  beyond the limit wait until the worker answers, then go together in one message.
- *Re-issue* (``reissue``, on by default): a worker with room gets a copy of the oldest
  outstanding job the policy allows (``reissue_order``) that has a single live copy, held by
  another worker, out for more than ``REISSUE_AFTER`` median turnarounds. The first result
  wins; the other copies are cancelled (``TAG_CANCEL``) and drained if they come anyway.
  Results are integers computed the same way by any worker, so they stay bit-identical.
- *Lost workers*: a worker that owes an answer and has sent nothing for ``worker_timeout``
  seconds (or ``LOST_TURNAROUNDS`` times the longest recent turnaround, if more) gets no more
  work; its jobs without another copy go back to the policy (``requeue``). It is taken back if
  it answers again. With no worker left the loop ends.
- *Deadline* (core/deadline.py, matmul's ``--deadline``; None for the stream, whose deadlines
  are per item and the policy's): at the deadline no more work goes out, results arriving
  within ``grace`` seconds are kept, and the loop ends.
- *Preloading*: blocks a worker must hold before its first job (the stream's resident A) go
  in one message marked ``preload``; the worker stores them and acknowledges without computing.
- *Stopping* (:meth:`Engine.stop_workers`): bounded waits, results still on their way drained.

Policy interface (:class:`Policy` has the defaults of the optional hooks; ``split``, ``next_job``,
``job``, ``job_message``, ``job_seconds``, ``result_shape``, ``requeue``, ``result`` and
``finished`` every policy defines):

``split``                         the run's ComponentSplit (the local worker state)
``new_view(rank)``                a WorkerView (or subclass) for a worker rank
``preload(view)``                 ``(header, payloads)`` to send before any job, or None
``started()``                     called when the work starts (after preloading)
``tick()``                        per pass: arrivals, expiries; True if anything happened
``next_job(view)``                the next unsent job for this worker (taken off the policy's
                                  pending work), or None; a job has an integer ``id``
``job(jid)``                      the job of an id sent earlier
``job_message(view, job)``        ``(header, payloads)``; updates what the worker holds
``job_seconds(job)``              estimated seconds of a job (queue depth)
``result_shape(job)``             shape of its result tile
``may_queue(view)``               False to hold back jobs for a worker that has some (memory)
``sent(view, job)``               a copy of ``job`` went to ``view``
``reissue_order(view)``           a function of an outstanding job's id: its sort key (lower:
                                  copied first) if it may be copied to ``view`` now, else None
``requeue(jobs)``                 jobs of a lost worker with no other copy: pending again
``result(view, job, info, tile, sent)``  the first answer to a job (tile None: the worker
                                  wrote it and ``info["summary"]`` says how; ``sent``: when this
                                  copy was sent)
``after_pass()``                  end of a pass (publishing)
``finished()``                    True when no work is left
``next_event_s()``                seconds until the policy's next timed event (caps the sleep)
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mpilayer.core.products import tally_kernels
from mpilayer.errors import InputError, MpilayerError, OutputError
from mpilayer.mpi.protocol import (POLL_MAX_S, POLL_MIN_S, TAG_CANCEL, TAG_ERROR, TAG_JOB, TAG_PAYLOAD, TAG_RESULT,
                                   TAG_STOP, TAG_STOPPED, TAG_TILE, header_bytes, last_line, wait_for_message,
                                   yield_cores_to_workers)
from mpilayer.mpi.rank_stats import RankStats

QUEUE_S = 0.02        # estimated seconds of work kept queued on each worker (at least ``prefetch`` jobs),
                      # so that polling and encoding latency on the master never starve it
QUEUE_MAX = 16        # jobs queued per worker at most
INFLIGHT_SHARE = 10   # sends not yet completed hold at most memory/INFLIGHT_SHARE bytes
REISSUE_AFTER = 2.0   # a job is copied when out for longer than this many median turnarounds
MAX_COPIES = 2        # live copies of a job at most (the original and one re-issued copy)
LOST_TURNAROUNDS = 4  # a worker is never lost before this many times the longest recent turnaround
STOP_MIN_S = 5.0      # at the stop, a worker is waited for at least this long (a lost one: STOP_LOST_S)
STOP_LOST_S = 1.0
PARKED_MESSAGES = 48  # messages on their way to the workers, shared among them (flow control)
IDLE_WAKEUPS = 16     # idle sleeps grow up to a 1/16 of the median turnaround (above POLL_MAX_S) ...
IDLE_SLEEP_MAX_S = 0.01  # ... and at most this: workers hold QUEUE_S of work, so a later refill costs nothing


class WorkerFailed(MpilayerError):
    """A worker raised; the message is its exception's last line."""


def straggler_config(args, size: int) -> dict:
    """The engine's config from ``--service-time``, ``--seed``, ``--reissue`` and
    ``--worker-timeout`` (cli/options.add_stragglers), checked for a run of ``size`` ranks."""
    if not args.worker_timeout > 0:
        raise InputError(f"--worker-timeout must be > 0 seconds, not {args.worker_timeout}")
    service_time = args.service_time if args.service_time is not None and args.service_time.active else None
    if service_time is not None:
        try:
            service_time.check_ranks(size)
        except ValueError as err:
            raise InputError(str(err)) from None
    return {"reissue": args.reissue == "on", "worker_timeout": args.worker_timeout, "service_time": service_time,
            "seed": args.seed}


@dataclass
class WorkerView:
    """What the master knows of one worker: the blocks it holds and its queue."""

    rank: int
    held: dict = field(default_factory=dict)       # block key -> set of components
    queue: dict = field(default_factory=dict)      # job id sent, not yet answered -> its estimated seconds
    queued_s: float = 0.0                          # estimated compute time of the queue (not cancelled)
    job_messages: dict = field(default_factory=dict)  # job id of the queue -> messages it took (flow control)
    cancel_messages: int = 0  # cancel messages sent since its last answer
    deferred_cancels: list = field(default_factory=list)  # held back by flow control
    cancelled: set = field(default_factory=set)    # job ids of the queue cancelled, answer not yet in
    jobs_done: int = 0
    owes_since: float = 0.0  # last message from it, or when its queue last became non-empty
    lost: bool = False       # silent for too long: no more work (taken back if it answers)

    @property
    def parked(self) -> int:
        """Messages sent to it that it may not have received yet: those of the jobs it has not
        answered (it reads a job's messages only when it gets to that job) and recent cancels."""
        return sum(self.job_messages.values()) + self.cancel_messages


class Policy:
    """Defaults of the optional policy hooks (see the module docstring)."""

    def new_view(self, rank: int) -> WorkerView:
        return WorkerView(rank)

    def preload(self, view: WorkerView):
        return None

    def started(self) -> None:
        pass

    def tick(self) -> bool:
        return False

    def may_queue(self, view: WorkerView) -> bool:
        return True

    def sent(self, view: WorkerView, job) -> None:
        pass

    def reissue_order(self, view: WorkerView):
        return lambda jid: None

    def after_pass(self) -> None:
        pass

    def next_event_s(self) -> float:
        return float("inf")


class Engine:
    """Rank 0's scheduling of one run for ``policy``. ``config``: ``reissue`` (True),
    ``worker_timeout`` (60 s), ``service_time`` (ServiceTime or None; emulated on rank 0 with
    one rank), ``seed``, ``grace`` (0 s), ``prefetch`` (2), ``queue_max`` (QUEUE_MAX),
    ``master_nice`` (5), ``poll`` ((min, max) idle sleep, seconds)."""

    def __init__(self, comm, policy, config: dict, memory: int, deadline=None, stats: RankStats | None = None,
                 log=print):
        self.comm, self.policy, self.memory, self.deadline, self.log = comm, policy, memory, deadline, log
        self.stats = stats or RankStats(0, "master")
        self.reissue = config.get("reissue", True)
        self.worker_timeout = config.get("worker_timeout", 60.0)
        self.service_time = config.get("service_time")
        self.seed = config.get("seed", 0)
        self.grace = config.get("grace", 0.0)
        self.queue_max = max(1, config.get("queue_max", QUEUE_MAX))
        self.prefetch = min(self.queue_max, max(1, config.get("prefetch", 2)))
        self.nice = config.get("master_nice", 5)
        self.poll_min, self.poll_max = config.get("poll", (POLL_MIN_S, POLL_MAX_S))
        self.flow_limit = max(6, PARKED_MESSAGES // max(1, comm.Get_size() - 1 if comm is not None else 0))
        self.views = {}     # rank -> WorkerView
        self.copies = {}    # job id -> {rank: send time} of its live copies (sent, not answered)
        self._copies_reordered = False  # see _oldest_overdue
        self.done = set()   # ids of the jobs that need no more work (answered, decoded or not needed)
        self.superseded = set()  # ids of jobs settled without their own result (settle(superseded=True))
        self.turnarounds = deque(maxlen=64)  # seconds from send to result, recent winning copies
        self._median = None  # their median, until the next one comes in
        self.counts = {"reissued": 0, "duplicates_ignored": 0, "cancelled": 0, "requeued": 0, "superseded": 0}
        self.lost_ranks = []  # every rank ever treated as lost, in order
        self.unanswered = []  # ranks that did not answer the stop
        self.stop_error = None  # the first error a worker reported while stopping (it fails the run)
        self.rank_rows = []   # the workers' statistics rows, from their stop acknowledgements
        self.kernels = {}     # kernel name -> count (products.tally_kernels)
        self.sends = []       # (requests, buffers) of messages whose sends may not have completed
        self.recvs = []       # (request, job, tile, source, info) of result tiles on their way
        self.inflight_bytes = 0
        self.end_time = None
        self.stopped_by = "running"  # then complete, deadline, signal or workers-lost (stop_reason)
        self.worker_traceback = None

    def expired(self) -> bool:
        return self.deadline is not None and self.deadline.expired()

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Run until the policy is finished, the deadline passes or every worker is lost."""
        if self.comm is None or self.comm.Get_size() == 1:
            self._run_local()
        else:
            self._run_distributed()
        self.end_time = time.monotonic()
        self.stopped_by = self._stop_reason()

    def _stop_reason(self) -> str:
        if self.policy.finished():
            return "complete"
        if self.deadline is not None and self.deadline.signal is not None:  # SIGTERM/SIGINT/SIGUSR1
            return "signal"                                                 # (run_guard.StopSignals)
        if self.expired() or not self.lost_ranks:
            return "deadline"
        return "workers-lost"

    def overshoot(self):
        """Seconds the work ran past the deadline, when the deadline stopped it (else None)."""
        return self.deadline.overshoot(self.end_time) if self.stopped_by == "deadline" else None

    def _run_local(self) -> None:
        """One rank: rank 0 computes every job itself, in order, through the worker code."""
        from mpilayer.mpi.worker import WorkerState

        policy = self.policy
        state = WorkerState(policy.split)
        view = self.views[0] = policy.new_view(0)
        self.stats.role = "master+worker"
        emulator = self.service_time.for_rank(0, self.seed) if self.service_time else None
        message = policy.preload(view)
        if message is not None:
            state.apply(*message)
        policy.started()
        delay = self.poll_min
        while not policy.finished() and not self.expired():
            policy.tick()
            if emulator is not None and emulator.hangs_now(view.jobs_done):  # the only worker hangs
                self.lost_ranks.append(0)
                return
            job = policy.next_job(view)
            if job is None:
                policy.after_pass()
                delay = self._sleep(delay)
                continue
            delay = self.poll_min
            header, payloads = policy.job_message(view, job)
            sent = time.monotonic()
            with self.stats.timing("compute"):
                t0 = time.perf_counter()
                state.apply(header, payloads)
                tile, kernel = state.compute(header)
                if emulator is not None:  # emulated service time, cut short by the deadline
                    extra = emulator.extra(time.perf_counter() - t0, header.get("service_share", 1.0))
                    left = self.deadline.remaining() if self.deadline is not None else float("inf")
                    if extra > left:
                        time.sleep(max(0.0, left))
                        return  # the emulated job did not finish in time
                    time.sleep(extra)
            self.stats.jobs += 1
            self._result_in(view, job, {"kernel": kernel}, tile, local_sent=sent)
            policy.after_pass()

    def _run_distributed(self) -> None:
        from mpi4py import MPI

        comm, policy = self.comm, self.policy
        yield_cores_to_workers(self.nice)  # its latency matters little: QUEUE_S
        self.views = {rank: policy.new_view(rank) for rank in range(1, comm.Get_size())}
        status = MPI.Status()
        self._preload(status)
        policy.started()
        delay = self.poll_min
        while not policy.finished():
            if self.expired():
                break
            busy = policy.tick()
            for view in self.views.values():   # fill every worker's queue
                while not view.lost and self._wants_work(view):
                    job = self._reissue_candidate(view) or policy.next_job(view)
                    if job is None:
                        break
                    self._send_job(view, job)
                    busy = True
            while not self.expired() and comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                self._receive(status)
                busy = True
            if self.recvs and not self.expired():
                busy |= self._complete_receives()
            self._drop_completed_sends()
            if self._check_lost():  # every worker lost: stop with what is complete
                break
            policy.after_pass()
            if busy:
                delay = self.poll_min
            else:
                delay = self._sleep(delay)
        if self.expired():
            self._grace(status)

    def _sleep(self, delay: float) -> float:
        """Sleep-wait (the master must not spin a core that a worker needs), never past the
        policy's next event; returns the next, doubled, delay. Its cap grows with the jobs'
        turnaround, so the master wakes a bounded number of times per result however long jobs
        take (each wake-up is a pass of the loop: the master's CPU time)."""
        wait = min(delay, max(0.0, self.policy.next_event_s()))
        with self.stats.timing("idle"):
            time.sleep(max(wait, 1e-5))
        cap = self.poll_max
        if self.turnarounds and self.queue_max > 1:  # with one job per worker, a late wake-up idles it
            cap = max(cap, min(IDLE_SLEEP_MAX_S, self._median_turnaround() / IDLE_WAKEUPS))
        return min(2 * delay, cap)

    def _grace(self, status) -> None:
        """After the deadline, keep results that arrive within the grace period."""
        from mpi4py import MPI

        until = time.monotonic() + self.grace
        while self.copies and time.monotonic() < until:
            if (self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status)
                    or self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_ERROR, status=status)):
                self._receive(status)
            elif self.recvs:
                self._complete_receives()
            else:
                time.sleep(POLL_MIN_S)

    # ------------------------------------------------------------------ sending

    def _preload(self, status) -> None:
        """Send each worker its preload message and wait for every acknowledgement."""
        from mpi4py import MPI

        waiting = set()
        for view in self.views.values():
            message = self.policy.preload(view)
            if message is not None:
                self._send(view.rank, *message)
                waiting.add(view.rank)
        while waiting:
            wait_for_message(self.comm, MPI.ANY_SOURCE, status)
            source, tag = status.Get_source(), status.Get_tag()
            if tag != TAG_RESULT:
                self._receive(status)  # an error: raises
            info = self.comm.recv(source=source, tag=TAG_RESULT)
            if not info.get("preloaded"):
                raise RuntimeError(f"rank {source} answered {info!r} to its preload")
            waiting.discard(source)
        self._drop_completed_sends()

    def _wants_work(self, view: WorkerView) -> bool:
        if view.parked >= self.flow_limit:
            return False
        if view.queue and not self.policy.may_queue(view):
            return False
        if len(view.queue) < self.prefetch:
            return True
        return (view.queued_s < QUEUE_S and len(view.queue) < self.queue_max
                and self.inflight_bytes < self.memory // INFLIGHT_SHARE)

    def _send(self, rank: int, header: dict, payloads: list) -> int:
        """Send a header and its component buffers (non-blocking); returns the message count."""
        comm = self.comm
        with self.stats.timing("comm"):
            reqs = [comm.isend(header, dest=rank, tag=TAG_JOB)]
            reqs += [comm.Isend(buf, dest=rank, tag=TAG_PAYLOAD) for buf in payloads]
        self.sends.append((reqs, payloads))  # buffers live until the sends complete
        nbytes = sum(buf.nbytes for buf in payloads)
        self.inflight_bytes += nbytes
        self.stats.bytes_out += nbytes + header_bytes(header)
        return len(reqs)

    def _send_job(self, view: WorkerView, job) -> None:
        """Send ``job`` (with the components the worker lacks) to a worker's queue."""
        with self.stats.timing("io"):  # reading and encoding blocks
            header, payloads = self.policy.job_message(view, job)
        view.job_messages[job.id] = view.job_messages.get(job.id, 0) + self._send(view.rank, header, payloads)
        now = time.monotonic()
        if not view.queue:
            view.owes_since = now
        seconds = self.policy.job_seconds(job)
        view.queue[job.id] = seconds
        view.queued_s += seconds
        self.copies.setdefault(job.id, {})[view.rank] = now
        self.policy.sent(view, job)

    def _drop_completed_sends(self) -> None:
        from mpi4py import MPI

        still = []
        for reqs, bufs in self.sends:
            if MPI.Request.Testall(reqs):
                self.inflight_bytes -= sum(buf.nbytes for buf in bufs)
            else:
                still.append((reqs, bufs))
        self.sends = still

    # ------------------------------------------------------------------ receiving

    def _receive(self, status) -> None:
        """A pending message: a worker's error (raised here), or a result header (its tile, if
        any, is received non-blocking: MPICH moves a large message only while its sender is in
        MPI, and the worker is computing its next job; a blocking Recv would spin here)."""
        comm = self.comm
        source, tag = status.Get_source(), status.Get_tag()
        if tag == TAG_ERROR:
            raise self._worker_error(source, comm.recv(source=source, tag=TAG_ERROR))
        if tag != TAG_RESULT:
            raise RuntimeError(f"unexpected message with tag {tag} from rank {source}")
        info = comm.recv(source=source, tag=TAG_RESULT)
        view = self.views[source]
        view.owes_since = time.monotonic()
        view.cancel_messages = 0
        if view.lost:  # it answers again: take it back
            view.lost = False
            self.log(f"worker rank {source} answered again: taken back")
        if info.get("cancelled"):  # a cancelled copy, skipped by the worker: no tile follows
            self._answered(view, info["id"])
            return
        job = self.policy.job(info["id"])
        if "dtype" not in info:  # a distributed result: the tile is in its part file
            self.stats.bytes_in += header_bytes(info)
            self._result_in(view, job, info, None)
            return
        tile = np.empty(self.policy.result_shape(job), dtype=np.dtype(info["dtype"]))
        # posted for late duplicates too, so that the worker's send completes
        self.recvs.append((comm.Irecv(tile, source=source, tag=TAG_TILE), job, tile, source, info))

    def _complete_receives(self) -> bool:
        """Fold in the result tiles whose transfer finished; True if any did."""
        done, still = [], []
        for item in self.recvs:
            (done if item[0].Test() else still).append(item)
        self.recvs = still
        for _, job, tile, source, info in done:
            self.stats.bytes_in += tile.nbytes
            self._result_in(self.views[source], job, info, tile)
        return bool(done)

    def _worker_error(self, source: int, text: str) -> MpilayerError:
        """The error a worker's traceback ``text`` stands for (kept in ``worker_traceback``)."""
        self.worker_traceback = text
        kind, _, message = last_line(text).partition(": ")
        user_error = {"InputError": InputError, "OutputError": OutputError}.get(kind.rsplit(".", 1)[-1])
        if user_error is not None:  # an input it reads changed, a part it writes failed: as on the master
            return user_error(message)
        return WorkerFailed(f"worker rank {source} failed: {last_line(text)}")

    def _result_in(self, view: WorkerView, job, info: dict, tile, local_sent: float | None = None) -> None:
        """A worker's answer to ``job`` (``local_sent``: computed on rank 0, started then). The
        first answer wins: its other copies are cancelled, later ones only counted."""
        sent = self._answered(view, job.id) if local_sent is None else local_sent
        if job.id in self.done:
            self.counts["superseded" if job.id in self.superseded else "duplicates_ignored"] += 1
            return
        if sent is not None and local_sent is None:
            self.turnarounds.append(time.monotonic() - sent)
            self._median = None
        self.settle(job)
        view.jobs_done += 1
        tally_kernels(self.kernels, info["kernel"])
        self.policy.result(view, job, info, tile, sent)

    def _answered(self, view: WorkerView, jid: int):
        """The worker answered job ``jid`` (result or cancel): off its queue. Returns the send
        time of its copy if that copy was still live, else None."""
        view.job_messages.pop(jid, None)
        self._send_cancels(view)
        if jid in view.queue:
            seconds = view.queue.pop(jid)
            if jid in view.cancelled:
                view.cancelled.discard(jid)
            else:
                view.queued_s -= seconds
        if not view.queue:
            view.queued_s = 0.0  # no rounding left over
        return self.copies.get(jid, {}).pop(view.rank, None)

    def settle(self, job, superseded: bool = False) -> None:
        """``job`` needs no more work (its result is in, was decoded, or is not needed --
        ``superseded``): its other copies are cancelled; the policy skips it if still pending."""
        self.done.add(job.id)
        if superseded:
            self.superseded.add(job.id)
        for rank in self.copies.pop(job.id, {}):
            view = self.views[rank]
            if job.id not in view.cancelled and job.id in view.queue:
                view.cancelled.add(job.id)
                view.queued_s -= view.queue[job.id]
                view.deferred_cancels.append(job.id)
                self._send_cancels(view)
                self.counts["cancelled"] += 1

    def _send_cancels(self, view: WorkerView) -> None:
        """Send a worker's held-back cancels in one message, unless flow control holds them."""
        if view.deferred_cancels and view.parked < self.flow_limit:
            self.sends.append(([self.comm.isend(view.deferred_cancels, dest=view.rank, tag=TAG_CANCEL)], []))
            view.deferred_cancels = []
            view.cancel_messages += 1

    # ------------------------------------------------------------------ stragglers and failures

    def _reissue_candidate(self, view: WorkerView):
        """A speculative copy for ``view``, or None: among the outstanding jobs the policy lets
        it copy (lowest key first, then the oldest), one with a single live copy, held by
        another worker, sent more than REISSUE_AFTER median turnarounds ago -- a straggler's
        or a hung worker's job, not one merely queued."""
        if not self.copies:
            self._copies_reordered = False
        if not self.reissue or not self.copies or not self.turnarounds:
            return None
        if not self._copies_reordered and not self._oldest_overdue():
            return None
        order = self.policy.reissue_order(view)
        behind = []
        for jid, holders in self.copies.items():
            if view.rank not in holders and len(holders) < MAX_COPIES:
                key = order(jid)
                if key is not None:
                    behind.append((key, min(holders.values()), jid))
        if not behind:
            return None
        _, sent, jid = min(behind)
        if time.monotonic() - sent <= REISSUE_AFTER * self._median_turnaround():
            return None
        self.counts["reissued"] += 1
        return self.policy.job(jid)

    def _oldest_overdue(self) -> bool:
        """Whether the oldest live copy was sent more than REISSUE_AFTER median turnarounds ago, in
        O(1): ``copies`` holds jobs in the order of their first send, and a job's oldest copy is
        its first, so the first entry is the oldest (until a lost worker's copy is dropped from a
        job that keeps another: ``_copies_reordered``, then every entry is looked at). Without it,
        every worker with room scanned every job out: O(workers) per job handed out."""
        holders = next(iter(self.copies.values()))
        if not holders:  # (answered, about to be settled): look at every entry
            return True
        return time.monotonic() - min(holders.values()) > REISSUE_AFTER * self._median_turnaround()

    def _median_turnaround(self) -> float:
        """Median of the recent turnarounds, computed once per new turnaround (it is asked for
        every time a worker has room)."""
        if self._median is None:
            self._median = statistics.median(self.turnarounds)  # (numpy's costs 100x more on 64 values)
        return self._median

    def _check_lost(self) -> bool:
        """Treat workers silent for too long as lost; True if no worker is left."""
        now = time.monotonic()
        limit = self.lost_after()
        for view in self.views.values():
            if view.lost or not view.queue or now - view.owes_since <= limit:
                continue
            view.lost = True
            self.lost_ranks.append(view.rank)
            back = []
            for jid in view.queue:  # its copies are dead; jobs with no other copy go back
                holders = self.copies.get(jid)
                if holders is not None:
                    holders.pop(view.rank, None)
                    if not holders:
                        del self.copies[jid]
                        back.append(self.policy.job(jid))
                    else:  # its oldest copy may now be younger than a later job's
                        self._copies_reordered = True
            view.queue.clear()
            view.cancelled.clear()
            view.deferred_cancels = []
            view.queued_s = 0.0
            if back:
                self.policy.requeue(back)
                self.counts["requeued"] += len(back)
            self.log(f"worker rank {view.rank} sent nothing for {now - view.owes_since:.1f} s: treated as lost; "
                     f"{len(back)} of its jobs re-queued")
        return all(v.lost for v in self.views.values())

    def lost_after(self) -> float:
        """Seconds of silence after which a worker that owes an answer is treated as lost."""
        return max(self.worker_timeout, LOST_TURNAROUNDS * max(self.turnarounds, default=0.0))

    def owed(self) -> bool:
        """Whether some worker still owes answers (a silent one may delay the stop)."""
        return any(view.queue for view in self.views.values())

    # ------------------------------------------------------------------ stopping the workers

    def stop_workers(self, timeout: float | None = None) -> bool:
        """Tell every worker to stop and wait for each acknowledgement (its statistics row, in
        ``rank_rows``), discarding results that were still on their way. The wait is bounded: a
        worker gets until it has been silent for :meth:`lost_after` seconds (at least
        ``STOP_MIN_S`` from now), one already lost only ``STOP_LOST_S``, and when the policy is
        finished (nothing it owes is needed) every worker ``STOP_MIN_S``; ``timeout`` caps it.
        False if some worker did not answer (``unanswered``): its sends may never complete, so
        the caller must end the MPI job with ``MPI_Abort`` (after publishing). An error a worker
        reports meanwhile is kept in ``stop_error``: the caller must fail the run with it."""
        from mpi4py import MPI

        comm = self.comm
        size = comm.Get_size()
        now = time.monotonic()
        finished = self.policy.finished()
        until = {}
        for rank in range(1, size):
            self.sends.append(([comm.isend(None, dest=rank, tag=TAG_STOP)], []))
            view = self.views.get(rank)
            if view is None or finished:  # stopped before the run started, or all is done
                until[rank] = now + STOP_MIN_S
            elif view.lost:
                until[rank] = now + STOP_LOST_S
            else:
                until[rank] = max(now + min(STOP_MIN_S, self.lost_after()), view.owes_since + self.lost_after())
            if timeout is not None:
                until[rank] = min(until[rank], now + timeout)
        waiting = set(range(1, size))
        status = MPI.Status()
        while waiting and wait_for_message(comm, MPI.ANY_SOURCE, status, max(until[rank] for rank in waiting)):
            source, tag = status.Get_source(), status.Get_tag()
            if tag == TAG_STOPPED:
                self.rank_rows.append(comm.recv(source=source, tag=TAG_STOPPED))
                waiting.discard(source)
            elif tag == TAG_ERROR:  # e.g. a final part that did not reach the disk (worker.sync_parts)
                error = self._worker_error(source, comm.recv(source=source, tag=TAG_ERROR))
                self.stop_error = self.stop_error or error
            elif tag == TAG_RESULT:  # a result (or a cancelled copy's answer) nobody needs now
                info = comm.recv(source=source, tag=TAG_RESULT)
                if "dtype" in info:  # a tile follows
                    comm.Recv(np.empty(self.policy.result_shape(self.policy.job(info["id"])),
                                       np.dtype(info["dtype"])), source=source, tag=TAG_TILE)
            else:
                comm.recv(source=source, tag=tag)
        if not waiting:  # every worker drained its jobs, so every send has completed
            MPI.Request.Waitall([r for reqs, _ in self.sends for r in reqs] + [item[0] for item in self.recvs])
            self.sends, self.recvs = [], []
        self.unanswered = sorted(waiting)
        return not waiting
