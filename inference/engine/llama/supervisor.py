"""The supervisor: starts the engine process, watches it, restarts it when it dies. The only code that knows the
engine is a process.

One thread per supervisor reads the engine's messages and hands them to the client (engine.py). When the pipe
ends without a "close" from us, the process has died (a signal, the OOM killer, an exception in its loop): the
supervisor reaps it, names the cause in one log line, tells the client (which ends the requests that were running
and keeps the ones that had not started), and starts a new process. A death before the process said "ready",
while it ran with extra buffer types, is the CPU fault native.py describes: the next start goes without them.
ENGINE_CRASH_LOOP_DEATHS deaths within ENGINE_CRASH_LOOP_SECONDS stop the restarts: the engine is then `failed`.
"""

from __future__ import annotations

import collections
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from .native import describe_exit, extra_buffer_hazard

log = logging.getLogger("inference.engine")

STOP_TIMEOUT = 15.0  # seconds the engine process gets to end by itself at shutdown before it is killed


class EngineStartFailed(RuntimeError):
    """The engine process could not load the model (not a crash: starting it again would not help)."""


class Supervisor:
    def __init__(
        self,
        config: dict[str, Any],
        *,
        extra_buffers: str,
        crash_loop_deaths: int,
        crash_loop_seconds: float,
        on_message: Callable[[tuple], None],
        on_death: Callable[[str], tuple[int, int]],
        on_ready: Callable[[], None],
        on_failed: Callable[[str], None],
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.extra_buffers = extra_buffers != "off"
        self.extra_buffers_mode = extra_buffers
        self.crash_loop_deaths = crash_loop_deaths
        self.crash_loop_seconds = crash_loop_seconds
        self.on_message, self.on_death, self.on_ready, self.on_failed = on_message, on_death, on_ready, on_failed
        self.on_restart = on_restart
        self.state = "stopped"  # starting, ready, restarting, failed, closing, stopped
        self.reason: str | None = None
        self.restarts: collections.Counter[str] = collections.Counter()  # by cause
        self.ready_info: dict[str, Any] = {}
        self._deaths: collections.deque[float] = collections.deque()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._killed: tuple[str, str] | None = None  # (cause, how) when we killed it ourselves

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process and wait until it is ready (blocking; the first load). A crash before ready
        is handled as any death; a load error (a bad model file) raises EngineStartFailed."""
        self.state = "starting"
        while not self._spawn():  # each death on the way counts toward the crash loop
            if self.state == "failed":
                raise EngineStartFailed(self.reason or "the engine process could not start")
            if self.state in ("closing", "stopped"):
                raise EngineStartFailed("the service is shutting down")
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> bool:
        """One engine process, up to its "ready": True, or False when it died first (the death is handled)."""
        ours, theirs = socket.socketpair()
        config = {**self.config, "extra_buffers": self.extra_buffers}
        proc = subprocess.Popen([sys.executable, "-m", "inference.engine.llama.worker", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(config)
        self._proc, self._conn = proc, conn
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
        if message is not None and message[0] == "ready":
            self.ready_info = message[1]
            with self._send_lock:
                if self.state in ("closing", "stopped"):  # shut down while it started: it ends at once
                    try:
                        conn.send(("close",))
                    except OSError:
                        pass
                    return False
                self.state, self.reason = "ready", None
            return True
        if message is not None and message[0] == "failed":
            proc.wait()
            conn.close()
            self.state, self.reason = "failed", f"the engine could not load the model: {message[1]}"
            raise EngineStartFailed(self.reason)
        self._died(before_ready=True)
        return False

    # --- watching ------------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            conn = self._conn
            assert conn is not None
            try:
                message = conn.recv()
            except (EOFError, OSError):
                if self.state in ("closing", "stopped"):  # asked to end (stop, abort): no restart
                    return
                self._died(before_ready=False)
                while self.state == "restarting" and not self._spawn():  # each death on the way counts
                    pass
                if self.state != "ready":  # failed for good, or the service began to shut down meanwhile
                    return
                self.on_ready()
                continue
            self.on_message(message)

    def _died(self, *, before_ready: bool) -> None:
        """Reap the dead process, tell the client and decide what follows: `state` becomes restarting, or failed
        when it has died too often."""
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None
        conn.close()
        status = proc.wait()
        if self.state in ("closing", "stopped"):  # the service is shutting down: an end, not a death
            return
        how = describe_exit(status)
        self.state = "restarting"  # before anyone hears of the death: readiness already says so
        cause = signal.Signals(-status).name if status < 0 and -status in signal.valid_signals() else "exit"
        if self._killed is not None:
            (cause, how), self._killed = self._killed, None
        self.restarts[cause] += 1
        if self.on_restart is not None:
            self.on_restart(cause)
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.crash_loop_seconds:
            self._deaths.popleft()
        if before_ready and self.extra_buffers and self.extra_buffers_mode == "auto":
            self.extra_buffers = False
            feature = extra_buffer_hazard() or "this CPU's"
            log.warning("the engine process %s while warming up with llama.cpp's extra buffer types (%s): starting "
                        "it without them (a known llama.cpp fault on AMX CPUs, #20824; LLAMA_EXTRA_BUFFERS=off skips "
                        "this attempt)", how, feature)
        if len(self._deaths) >= self.crash_loop_deaths:
            self.state = "failed"
            self.reason = (f"the engine process died {len(self._deaths)} times within {self.crash_loop_seconds:g} s "
                           f"(last: {how}); not restarting it")
            ended, kept = self.on_death(how)
            log.error("the engine process (pid %d) %s: %d running requests ended with an error; %s; %d waiting "
                      "ones fail too", proc.pid, how, ended, self.reason, kept)
            self.on_failed(self.reason)
            return
        self.reason = f"the engine process {how}; restarting it"
        ended, kept = self.on_death(how)
        log.error("the engine process (pid %d) %s: %d running requests ended with an error, %d waiting ones are kept "
                  "for the new process; restarting it (death %d of %d allowed within %g s)", proc.pid, how, ended, kept,
                  len(self._deaths), self.crash_loop_deaths, self.crash_loop_seconds)

    # --- commands ------------------------------------------------------------------------------

    def send(self, message: tuple) -> bool:
        """Send a command to the running engine; False when there is none to take it (dead or restarting)."""
        with self._send_lock:
            conn = self._conn
            if conn is None or conn.closed or self.state != "ready":
                return False
            try:
                conn.send(message)
            except OSError:
                return False
            return True

    def kill(self, cause: str, how: str) -> bool:
        """End a running engine process that no longer works (the watchdog's call); its death is then handled as
        any other, with this cause and description. False when it is not running."""
        proc = self._proc
        if self.state != "ready" or proc is None:
            return False
        self._killed = (cause, how)
        proc.kill()
        return True

    def abort(self) -> bool:
        """The shutdown timeout: the engine process ends what it holds with an error and exits, which is not a
        death: nothing is restarted from here on. False when no engine process was there to tell."""
        with self._send_lock:
            ready, self.state = self.state == "ready", "closing"
            if not ready or self._conn is None:
                return False
            try:
                self._conn.send(("abort",))
            except OSError:
                return False
            return True

    def stop(self) -> None:
        """Ask the engine to finish (what is left fails), wait for it, kill it if it does not end in time."""
        with self._send_lock:
            state, self.state = self.state, "closing"
            if state == "ready" and self._conn is not None:
                try:
                    self._conn.send(("close",))
                except OSError:
                    pass
        self._end(self._proc)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_TIMEOUT)
        self._end(self._proc)  # one the watch thread was starting when the shutdown began (it is told to close)
        if self._conn is not None:
            self._conn.close()
        self.state = "stopped"

    @staticmethod
    def _end(proc: subprocess.Popen | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("the engine process did not end within %g s of shutdown: killing it", STOP_TIMEOUT)
            proc.kill()
            proc.wait()
