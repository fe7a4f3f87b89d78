"""Process isolation: a capability's ``run`` in a forked child, killed at the deadline.

Python cannot stop a thread, so by default a capability that ignores ``ctx.cancelled``
keeps its concurrency slot until it returns (capacity stays honest, but it is lost).
A capability that sets ``isolation = "process"`` runs each job in a child process forked
from the worker instead. The worker waits for the child's answer until the deadline and
then kills the child's whole process group (SIGKILL): the slot is free at the deadline even
when the code is stuck in a system call, in a C extension holding the GIL, or in a
subprocess of its own.

What the child has: a copy of the worker as it was (the capability object, its imports and
open files, but not its sockets: see :func:`_let_go_of_sockets`), the loaded payload, and a
``Context`` whose ``progress`` travels back to the worker over a pipe. What comes back: the
result, already checked against ``Output``, or the exception raised, both pickled; an
exception that does not survive pickling comes back as a ``RuntimeError`` naming it. The
child also dies with its worker (``PR_SET_PDEATHSIG``), so a killed worker leaves no job
running behind it.

The price: a ``fork`` per job and a result that must pickle. For a worker of about 50 MB a
trivial job took 7.6 ms instead of 0.6 ms, 4 ms of it the worker's own CPU (the fork, and
copying the pages the worker writes while the child lives): worth it for jobs that run for
seconds, not for a trivial one.

Only the forking thread exists in the child: a lock that another thread of the worker held
at that moment stays held there, so code that shares state with the worker's other threads
(a connection pool used by other jobs, say) should open its own in ``run``; if it does not,
it hangs until the deadline kills it, which is at least bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import pickle
import select
import signal
import stat
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from runnerkit.errors import TRACEBACK_ATTR, RunnerError, Timeout, traceback_text

if TYPE_CHECKING:
    from runnerkit.runner.capability import Capability, Context, Progress

#: The ``isolation`` values a Capability may declare (see ``Capability.isolation``).
MODES = ("thread", "process", "inline")

_HEADER = struct.Struct("!I")
#: Signals whose handlers the child inherits from the worker (gunicorn's) and must not run.
_RESET = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCHLD")
_PR_SET_PDEATHSIG = 1
#: Exit code of a child that could not even report its failure.
_CHILD_BROKE = 70


def run_isolated(capability: Capability, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """``capability.dump_output(capability.run(payload, ctx))`` in a child process.

    Raises what ``run`` raised; :class:`~runnerkit.errors.Timeout` once the deadline has
    passed (the child is killed first); ``RuntimeError`` if the child died without an answer.
    """
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its outcome is what the tests check
        os.close(read_fd)
        _child(capability, payload, ctx, write_fd, parent)
    os.close(write_fd)
    child = _Child(pid)
    try:
        kind, value = _collect(read_fd, child, ctx)
    finally:
        os.close(read_fd)
        child.kill()
    if kind == "result":
        result: dict[str, Any] = value
        return result
    raise value


class _Child:
    """A forked child, in a process group of its own; killed and reaped exactly once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None
        # Also here, not only in the child: the group must exist before a kill can come.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)

    def kill(self) -> None:
        """SIGKILL the child and its group (whatever it started), then reap it."""
        if self.status is not None:
            return  # reaped: the pid may belong to another process by now
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(self.pid, signal.SIGKILL)
        self.wait()

    def wait(self) -> int:
        if self.status is None:
            _, self.status = os.waitpid(self.pid, 0)
        return self.status


def _collect(read_fd: int, child: _Child, ctx: Context) -> tuple[str, Any]:
    """Read the child's frames until its answer, its death or the deadline."""
    poller = select.poll()  # not select(): a worker's descriptors may number over 1024
    poller.register(read_fd, select.POLLIN)
    buffer = bytearray()  # appended to in place: a large result must not be copied per read
    answer: tuple[str, Any] | None = None
    while answer is None:
        remaining = ctx.deadline_monotonic - time.monotonic()
        if remaining <= 0:
            child.kill()
            raise Timeout(
                f"{ctx.capability_id!r} did not finish within {ctx.timeout_ms:g} ms "
                "(its process was killed)",
                code="DEADLINE_EXCEEDED",
            )
        if not poller.poll(math.ceil(remaining * 1000)):
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if len(buffer) < _HEADER.size + size:
                break
            frame = pickle.loads(buffer[_HEADER.size : _HEADER.size + size])
            del buffer[: _HEADER.size + size]
            if frame[0] == "progress":
                ctx.progress(frame[1], frame[2])
            else:
                answer = (frame[0], frame[1])
    if answer is None:
        raise RuntimeError(
            f"the process running {ctx.capability_id!r} {_ended(child.wait())} without an answer"
        )
    return answer


def _ended(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _child(
    capability: Capability, payload: dict[str, Any], ctx: Context, write_fd: int, parent: int
) -> NoReturn:
    """Run the job and send its answer; never returns (``os._exit``, no worker cleanup)."""
    code = 0
    try:
        os.setpgid(0, 0)  # its own group: the deadline kills whatever it starts too
        _let_go_of_sockets(write_fd)
        for name in _RESET:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before the death signal was armed
            os._exit(_CHILD_BROKE)

        def report(update: Progress) -> None:
            _send(write_fd, ("progress", update.percent, update.message))

        child_ctx = ctx.for_child(report)
        try:
            answer: tuple[str, Any] = (
                "result",
                capability.dump_output(capability.run(payload, child_ctx)),
            )
            frame = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the worker
            sent = _portable(exc)
            if not isinstance(exc, RunnerError):
                # Its frames do not pickle: the job's log line gets them as text.
                with contextlib.suppress(Exception):
                    setattr(sent, TRACEBACK_ATTR, traceback_text(exc))
            frame = pickle.dumps(("error", sent), protocol=pickle.HIGHEST_PROTOCOL)
        _write(write_fd, frame)
    except BaseException:  # noqa: BLE001 - the worker sees the exit code
        code = _CHILD_BROKE
    finally:
        for stream in (sys.stdout, sys.stderr):  # os._exit skips the usual flush
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _let_go_of_sockets(keep: int) -> None:
    """Drop the child's copies of the worker's sockets (its clients' connections above all).

    A copy held here would keep a connection open after the worker closed it: a client
    reusing it (a keep-alive pool) would send a request nobody reads and wait for its
    timeout. Each socket descriptor is pointed at ``/dev/null`` rather than closed, so the
    socket objects still in the child's memory never close a number reused by the job.
    Standard streams stay (they may be sockets to a log collector).
    """
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd in (keep, null):
                continue
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
    except OSError:  # no /proc: keep the copies
        pass
    finally:
        os.close(null)


def _portable(exc: BaseException) -> Exception:
    """``exc`` if it survives pickling, else a RuntimeError that names it."""
    if isinstance(exc, Exception):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001 - any pickling failure
            pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _send(fd: int, frame: tuple[Any, ...]) -> None:
    _write(fd, pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL))


def _write(fd: int, data: bytes) -> None:
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]
