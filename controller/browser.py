"""Headless chromium for the dashboard: a screenshot of a page once it says it is ready.

Debian's chromium (/usr/bin/chromium, installed by install.sh for the tests) is driven
over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended by
a NUL byte, commands on the child's fd 3, answers on its fd 4), so no driver, no
websocket library and no debugging port anyone else on the machine could reach. The
browser runs in its own process group with a fresh --user-data-dir in a temp dir; both
are removed at the end, whatever happens (the group SIGKILLed).

    screenshot(url, out)            -> None when written, else why not (never raises)
    with Browser() as b:            # what the tests use to look at the page live
        b.open(url); b.wait_for(READY_JS, 30); b.evaluate("1 + 1"); b.screenshot(out)
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from dml_app import net

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-default-browser-check", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--no-proxy-server", "--disable-features=Translate,MediaRouter,OptimizationHints"]
READY_JS = "!!(document.body && document.body.dataset.ready === '1')"
MAX_MESSAGE = 64 << 20          # a full-page PNG in base64 fits; anything larger is refused


class BrowserError(Exception):
    pass


def _high_fd(fd: int) -> int:
    """The same file on a descriptor >= 10 (closing `fd`): the wrapper's `3<&N 4>&M`
    would otherwise overwrite or close a pipe end that happens to be fd 3 or 4."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless chromium with one page, driven synchronously over the pipe. Every
    call has a deadline; close() (or leaving the with block) kills its process group
    and removes its profile directory."""

    def __init__(self, *, width: int = 1400, height: int = 900, binary: str = CHROMIUM,
                 start_timeout_s: float = 30):
        if not (100 <= width <= 8000 and 100 <= height <= 8000):
            raise BrowserError(f"window {width}x{height} out of range (100..8000)")
        if not os.access(binary, os.X_OK):
            raise BrowserError(f"no chromium at {binary} (install.sh installs Debian's chromium)")
        self.width, self.height = width, height
        self._id = 0
        self._buf = b""
        self.proc = None
        self.page_errors: list[str] = []     # uncaught exceptions in the page (first 100)
        self.profile = tempfile.mkdtemp(prefix="edgetb-chromium-")
        cmd_r, self._cmd_w = os.pipe()      # we write commands, chromium reads on its fd 3
        self._ans_r, ans_w = os.pipe()      # chromium writes answers on its fd 4
        cmd_r, ans_w = _high_fd(cmd_r), _high_fd(ans_w)   # never 3 or 4 themselves
        try:
            # bash (not dash: fds above 9) puts the two pipe ends on fds 3 and 4 and execs
            # chromium; a new session, so the whole browser is one process group to kill.
            wrapper = f'exec "$0" "$@" 3<&{cmd_r} 4>&{ans_w} {cmd_r}<&- {ans_w}>&-'
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", wrapper, binary, *FLAGS, "--remote-debugging-pipe",
                 f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
                pass_fds=(cmd_r, ans_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except BaseException:
            os.close(self._cmd_w)
            os.close(self._ans_r)
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        finally:
            os.close(cmd_r)
            os.close(ans_w)
        try:
            deadline = time.monotonic() + start_timeout_s
            targets = self.call("Target.getTargets", {}, deadline=deadline)["targetInfos"]
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                target = pages[0]["targetId"]
            else:
                target = self.call("Target.createTarget", {"url": "about:blank"}, deadline=deadline)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     deadline=deadline)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False},
                      session=True, deadline=deadline)
            self.call("Runtime.enable", {}, session=True, deadline=deadline)   # page errors reported
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------------- protocol
    def call(self, method: str, params: dict | None = None, *, session: bool = False,
             deadline: float | None = None, timeout_s: float = 30) -> dict:
        """Send one command and wait (until the deadline) for its answer; events and
        other answers in between are skipped. A protocol error raises BrowserError."""
        deadline = deadline if deadline is not None else time.monotonic() + timeout_s
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                if not net.wait_fd(self._cmd_w, max(0.0, deadline - time.monotonic()), write=True):
                    raise BrowserError(f"{method}: chromium took no command before the deadline")
                data = data[os.write(self._cmd_w, data):]
        except OSError as e:
            raise BrowserError(f"{method}: chromium closed its pipe ({e})") from None
        while True:
            answer = self._next(deadline, method)
            if answer.get("method") == "Runtime.exceptionThrown" and len(self.page_errors) < 100:
                d = answer.get("params", {}).get("exceptionDetails", {})
                self.page_errors.append(d.get("exception", {}).get("description") or d.get("text") or str(d)[:300])
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message', answer['error'])}")
                return answer.get("result", {})

    def _next(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if not net.wait_fd(self._ans_r, max(0.0, left)):
                raise BrowserError(f"{method}: no answer from chromium before the deadline")
            chunk = os.read(self._ans_r, 1 << 20)
            if not chunk:
                raise BrowserError(f"{method}: chromium exited (code {self.proc.poll()})")
            self._buf += chunk
            if len(self._buf) > MAX_MESSAGE:
                raise BrowserError(f"{method}: a message from chromium over {MAX_MESSAGE} bytes")
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    # -------------------------------------------------------------------- page
    def open(self, url: str, timeout_s: float = 30) -> None:
        result = self.call("Page.navigate", {"url": url}, session=True, timeout_s=timeout_s)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")

    def evaluate(self, expression: str, timeout_s: float = 10):
        """The JSON value of a JS expression in the page (awaited when a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True, "timeout": int(timeout_s * 1000)},
                           session=True, timeout_s=timeout_s + 1)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {d.get('exception', {}).get('description') or d.get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float, every_s: float = 0.2) -> None:
        """Until the expression is truthy in the page; BrowserError at the deadline."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                if self.evaluate(expression, timeout_s=max(0.5, min(10, deadline - time.monotonic()))):
                    return
            except BrowserError as e:       # e.g. the page is still navigating
                last = e
            if time.monotonic() >= deadline:
                raise BrowserError(f"not true within {timeout_s:g} s: {expression}" + (f" ({last})" if last else ""))
            time.sleep(every_s)

    def screenshot(self, out: Path, timeout_s: float = 30) -> None:
        """The visible page as a PNG at `out` (written whole: a temp file renamed)."""
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True,
                         timeout_s=timeout_s)["data"]
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tmp.write_bytes(base64.b64decode(data))
        os.replace(tmp, out)

    def close(self) -> None:
        """Kill the browser's process group, reap it, remove its profile. Idempotent."""
        if self.proc is not None:
            pgid = self.proc.pid
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            # the group's other processes (renderers, zygotes) die asynchronously: wait,
            # bounded, until none is left, so a caller sees nothing of the browser after
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            self.proc = None
        for fd in ("_cmd_w", "_ans_r"):
            if getattr(self, fd, None) is not None:
                os.close(getattr(self, fd))
                setattr(self, fd, None)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def screenshot(url: str, out: Path, *, width: int = 1400, height: int = 900, timeout_s: float = 60,
               wait_for: str | None = None) -> str | None:
    """Open `url` in headless chromium, wait until the page sets document.body.dataset.ready
    = "1" (or the JS expression `wait_for` is truthy), save a PNG of it at `out`. None when
    written; else why not ("no chromium at ...", "not ready within ..."). Never raises;
    the browser is gone (its process group killed) within about timeout_s."""
    deadline = time.monotonic() + timeout_s
    browser = None
    try:
        if not (0 < timeout_s <= 3600):
            return f"timeout_s {timeout_s!r} out of range (0, 3600]"
        browser = Browser(width=width, height=height, start_timeout_s=min(30, timeout_s))
        browser.open(url, timeout_s=max(0.1, deadline - time.monotonic()))
        browser.wait_for(wait_for or READY_JS, max(0.1, deadline - time.monotonic() - 2))
        browser.screenshot(Path(out), timeout_s=max(0.1, deadline - time.monotonic()))
        return None
    except Exception as e:           # the caller goes on without a picture, told why
        return f"{type(e).__name__}: {e}" if not isinstance(e, BrowserError) else str(e)
    finally:
        if browser is not None:
            browser.close()
