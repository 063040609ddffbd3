"""Messages between the master (rank 0) and the workers.

Control data (job headers, acknowledgements, errors) travel pickled with the lowercase
mpi4py methods; arrays (operand components, result tiles) with the uppercase buffer methods.
Every master->worker job is a header followed by one buffer per component it carries; the
worker answers with a result header followed by the tile buffer.

Components travel in their smallest form (wire_format.encode_component): 1- to 3-bit components
as packed bit planes, wider ones as 8- or 16-bit integers, so a coarse resolution moves far
fewer bytes than the operands.
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback

TAG_SETUP = 1     # master -> workers: a pass's configuration, "done", or a set-up error
TAG_JOB = 11      # master -> worker: job header
TAG_PAYLOAD = 12  # master -> worker: one component buffer
TAG_CANCEL = 13   # master -> worker: a job id whose result is no longer needed (re-issue)
TAG_RESULT = 21   # worker -> master: result header
TAG_TILE = 22     # worker -> master: result tile buffer
TAG_ERROR = 23    # worker -> master: traceback text
TAG_STOP = 31     # master -> worker: stop; the worker answers TAG_STOPPED
TAG_STOPPED = 32
TAG_PREPARED = 33  # first worker -> master: the preparation combined among the workers (parallel_prep.py)
# row-split jobs (mpilayer infer / adaptive --mpi): one set-up broadcast, one result per rank
TAG_INFER_SETUP, TAG_INFER_RESULT = 41, 42
TAG_ADAPTIVE_SETUP, TAG_ADAPTIVE_RESULT = 51, 52

POLL_MIN_S, POLL_MAX_S = 50e-6, 2e-3


def wait_for_message(comm, source, status, until: float | None = None) -> bool:
    """Sleep-wait until a message from ``source`` is pending (MPICH's blocking receives spin a
    core; on an oversubscribed node that core belongs to a worker). Backs off from 50 us to 2 ms,
    never sleeping past ``until`` (time.monotonic); False if ``until`` came first."""
    from mpi4py import MPI

    delay = POLL_MIN_S
    while not comm.Iprobe(source=source, tag=MPI.ANY_TAG, status=status):
        now = time.monotonic()
        if until is not None and now >= until:
            return False
        time.sleep(delay if until is None else min(delay, until - now))
        delay = min(delay * 2, POLL_MAX_S)
    return True


def yield_cores_to_workers(increment: int) -> None:
    """Lower a master's CPU priority (``nice``) so that, on a node where it shares the cores with
    workers, its bookkeeping and file writes run in their gaps instead of preempting them."""
    if increment > 0 and hasattr(os, "nice"):
        try:
            os.nice(increment)
        except OSError:
            pass


def header_bytes(message) -> int:
    """Bytes of a pickled control message on the wire (counted in the master's bytes_out, so that
    the bytes through rank 0 include the job descriptors, not only the data buffers)."""
    return len(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def recv_when_ready(comm, source: int, tag: int):
    """Receive a pickled message, sleep-waiting for it (see :func:`wait_for_message`);
    messages with other tags from ``source`` are dropped."""
    from mpi4py import MPI

    status = MPI.Status()
    while True:
        wait_for_message(comm, source, status)
        if status.Get_tag() == tag:
            return comm.recv(source=source, tag=tag)
        comm.recv(source=source, tag=status.Get_tag())


def send_setup(comm, message: dict) -> None:
    """Send a set-up message to every worker: ``{"split": ..., ...}`` starts a pass of
    :func:`mpilayer.mpi.worker.worker_run` (``"last": True`` if no other follows),
    ``{"done": True}`` ends the workers, ``{"error": text, "status": code}`` ends them with
    that exit status (the master reports the error)."""
    for rank in range(1, comm.Get_size()):
        comm.send(message, dest=rank, tag=TAG_SETUP)


def fail_setup(comm, err, status: int) -> int:
    """Set-up failed on the master: end the workers with ``status`` and print the one-line
    error (rank 0 only, so the user sees it once); returns ``status``."""
    import sys

    send_setup(comm, {"error": str(err), "status": status})
    print(f"mpilayer: error: {err}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------- errors

def format_exception(comm) -> str:
    """The current exception, prefixed with the rank and host it happened on."""
    return (f"### Worker {comm.Get_rank()} of {comm.Get_size()} on {socket.gethostname()}\n"
            + traceback.format_exc())


def last_line(text: str) -> str:
    """The final line of a traceback: the exception's type and message."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text.strip()
