"""
Child processes for integration tests, and waiting on what they print.

A process's output is read by threads into a list of lines; a test waits
for a line with L{Process.wait_for}, which blocks on a condition, not a
sleep.  The deadline is only a guard against a hang: nothing asserts how
long anything took.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred

# Guards against a hung child, never a measurement.
HANG_GUARD = 60.0


class Process:
    """A running child process whose stdout and stderr lines are kept."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.args = list(args)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        # Deferreds waiting for a line, fired in the reactor thread.
        self._watchers: list[tuple[re.Pattern[str], Deferred]] = []
        self._log = open(log, "a") if log else None
        self.popen = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=preexec,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.popen.stdout, self.popen.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                if self._log:
                    self._log.write(line)
                    self._log.flush()
                for watcher in list(self._watchers):
                    match = watcher[0].search(line)
                    if match:
                        self._watchers.remove(watcher)
                        reactor.callFromThread(watcher[1].callback, match)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def expect(self, pattern: str, start: int = 0) -> Deferred:
        """
        Like L{wait_for}, for tests that must keep the reactor running while
        they wait: fires with the match when the line arrives.
        """
        regex = re.compile(pattern)
        waiting: Deferred = Deferred()
        with self._changed:
            for line in self.lines[start:]:
                match = regex.search(line)
                if match:
                    waiting.callback(match)
                    return waiting
            self._watchers.append((regex, waiting))
        return waiting.addTimeout(HANG_GUARD, reactor)

    def wait_for(self, pattern: str, start: int = 0) -> re.Match[str]:
        """The first line from index C{start} on that matches C{pattern}."""
        regex = re.compile(pattern)
        checked = start
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    match = regex.search(line)
                    if match:
                        return match
                checked = len(self.lines)
                if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise AssertionError(
                        f"{self.args[0]} exited ({self.popen.returncode}) before printing"
                        f" {pattern!r}:\n" + "\n".join(self.lines[-30:])
                    )
                if not self._changed.wait(HANG_GUARD):
                    raise AssertionError(
                        f"{self.args[0]} printed no {pattern!r}:\n" + "\n".join(self.lines[-30:])
                    )

    def wait_exit(self) -> int:
        code = self.popen.wait(HANG_GUARD)
        for reader in self._readers:
            reader.join(HANG_GUARD)
        return code

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(HANG_GUARD)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(HANG_GUARD)
        for reader in self._readers:
            reader.join(HANG_GUARD)
        if self._log:
            self._log.close()
