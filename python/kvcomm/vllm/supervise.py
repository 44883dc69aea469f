"""Runs a KVCOMM vLLM server as a child and stops it so that its anchor pool is saved.

vLLM's own shutdown (SIGTERM or SIGINT to the server) force-kills its engine and worker
processes, so the connector never gets to save the pool there. `kvcomm serve` therefore runs

    python -m kvcomm.vllm.supervise -- <the vLLM server's argv>

which starts the server, passes its output and exit status through, and on SIGTERM or SIGINT
first asks it to save (POST /kvcomm/save with the server's token: the workers save their
pools in the next engine step and the request returns when they have), then stops it
(SIGTERM, then SIGKILL after `--stop-timeout` seconds). The pool is also saved while the
server runs (kvcomm.vllm.pool_store), so a kill -9 loses at most what came after the last
periodic save.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request


def _arg(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else default


def server_token(argv: list[str]) -> str | None:
    """The front end's token, from the server's --kv-transfer-config."""
    cfg = _arg(argv, "--kv-transfer-config")
    try:
        return json.loads(cfg)["kv_connector_extra_config"]["server_token"] if cfg else None
    except (ValueError, KeyError, TypeError):
        return None


def request_save(host: str, port: int, token: str, timeout: float) -> str:
    """Asks the server to save its pool; what happened, in words."""
    req = urllib.request.Request(f"http://{host}:{port}/kvcomm/save", data=b"{}", method="POST",
                                 headers={"X-KVCOMM-Token": token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return f"pool saved ({r.status})"
    except Exception as e:   # not up yet, already stopping, a failed save: stop it anyway
        return f"pool not saved: {e}"


def _detach_and_die_with_parent() -> None:
    import ctypes
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:   # not glibc: the server then outlives a killed supervisor
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stop-timeout", type=float, default=60.0, help="seconds the server gets to stop")
    p.add_argument("--save-timeout", type=float, default=300.0, help="seconds the final save may take")
    p.add_argument("server", nargs=argparse.REMAINDER, help="-- then the vLLM server's argv")
    args = p.parse_args(argv)
    cmd = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not cmd:
        p.error("no server command after --")
    host = _arg(cmd, "--host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    port = int(_arg(cmd, "--port", "8000"))
    token = server_token(cmd)
    # Its own session: a terminal's Ctrl-C reaches it only through here. If this process is
    # killed outright, the kernel stops the server too (no orphaned server holding the port).
    child = subprocess.Popen(cmd, preexec_fn=_detach_and_die_with_parent)
    stopping = []

    def stop(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        if token and child.poll() is None:
            t0 = time.monotonic()
            what = request_save(host, port, token, args.save_timeout)
            print(f"kvcomm serve: {signal.Signals(signum).name}: {what} in {time.monotonic() - t0:.1f} s; stopping the "
                  "server", file=sys.stderr, flush=True)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = None
    while True:
        try:
            rc = child.wait(timeout=1.0)
            return rc if not stopping or rc >= 0 else 0
        except subprocess.TimeoutExpired:
            if not stopping:
                continue
            deadline = deadline or time.monotonic() + args.stop_timeout
            if time.monotonic() >= deadline:   # the whole server: API process, engine core, workers
                os.killpg(child.pid, signal.SIGKILL)
                return child.wait()


if __name__ == "__main__":
    sys.exit(main())
