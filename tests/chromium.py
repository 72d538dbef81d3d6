"""Headless Chromium driven over the DevTools protocol (tests only).

Debian's ``chromium`` (apt) with a fresh profile, no network, no GPU; one page per
:class:`Browser`. :func:`find_chromium` names the binary or None.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

from websockets.sync.client import connect

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0")


def find_chromium() -> str | None:
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


class Browser:
  """A headless Chromium with one page; ``events`` collects console/log/network failures."""

  def __init__(self, binary: str, timeout: float = 60.0):
    self.timeout = timeout
    self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
    self._proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, log = None, []
    deadline = time.monotonic() + timeout
    while url is None and time.monotonic() < deadline:  # Chromium prints the socket on start
      line = self._proc.stderr.readline()
      if not line and self._proc.poll() is not None:
        raise RuntimeError(f"chromium exited {self._proc.returncode}: {''.join(log)[-2000:]}")
      log.append(line)
      m = re.search(r"DevTools listening on (ws://\S+)", line)
      url = m and m.group(1)
    if url is None:
      self.close()
      raise RuntimeError(f"chromium did not open DevTools: {''.join(log)[-2000:]}")
    self._ws = connect(url, max_size=None, open_timeout=timeout)
    self._ids = itertools.count(1)
    self.events: list[dict] = []
    target = self._call("Target.createTarget", url="about:blank")["targetId"]
    self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
      self.call(f"{domain}.enable")

  def _call(self, method: str, session: str | None = None, **params) -> dict:
    i = next(self._ids)
    message = dict(id=i, method=method, params=params)
    if session:
      message["sessionId"] = session
    self._ws.send(json.dumps(message))
    deadline = time.monotonic() + self.timeout
    while True:
      reply = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
      if reply.get("id") == i:
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})
      if "method" in reply:
        self.events.append(reply)

  def call(self, method: str, **params) -> dict:
    """A DevTools command on the page."""
    return self._call(method, self._session, **params)

  def evaluate(self, expression: str):
    """Value of a JavaScript expression (promises awaited)."""
    out = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
    if "exceptionDetails" in out:
      raise RuntimeError(f"{expression[:80]}: {out['exceptionDetails']}")
    return out["result"].get("value")

  def load(self, url: str) -> None:
    """Navigates and waits for the load event."""
    self.call("Page.navigate", url=url)
    deadline = time.monotonic() + self.timeout
    while self.evaluate("document.readyState") != "complete":
      if time.monotonic() > deadline:
        raise TimeoutError(f"{url} did not finish loading")
      time.sleep(0.1)

  def drain(self, seconds: float = 0.0) -> None:
    """Collects events that arrived (waiting up to ``seconds`` more)."""
    deadline = time.monotonic() + seconds
    while True:
      try:
        self.events.append(json.loads(self._ws.recv(timeout=max(0.0, deadline - time.monotonic()))))
      except TimeoutError:
        return

  def problems(self) -> list[str]:
    """Console errors, exceptions, error log entries and failed requests seen so far."""
    out = []
    for e in self.events:
      m, p = e.get("method"), e.get("params", {})
      if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}")
      elif m == "Runtime.exceptionThrown":
        out.append(f"exception: {p['exceptionDetails'].get('text')} "
                   f"{p['exceptionDetails'].get('exception', {}).get('description', '')}")
      elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
        out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
      elif m == "Network.loadingFailed":
        out.append(f"request failed: {p.get('errorText')} ({p.get('type')})")
    return out

  def screenshot(self) -> bytes:
    return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

  def close(self) -> None:
    try:
      if getattr(self, "_ws", None) is not None:
        self._ws.close()
    finally:
      if self._proc.poll() is None:
        self._proc.terminate()
        try:
          self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
          self._proc.kill()
          self._proc.wait()
      self._proc.stderr.close()
      shutil.rmtree(self._profile, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
