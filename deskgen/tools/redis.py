"""A Redis server started from the project's own files: the jobs' broker and state (issue 25).

    python -m deskgen.tools.redis start --dir build/redis [--port 6379]   # make serve: AOF under build/
    python -m deskgen.tools.redis stop --dir build/redis

:func:`running_redis` (tests, benchmarks) starts one in a temporary folder and yields its URL
(``redis://127.0.0.1:<port>/0``), and stops it and removes the folder on exit; :func:`start` /
:func:`stop` run one in a given folder for ``make serve``. Every server listens on 127.0.0.1 only, keeps
its data with the append-only file (``appendonly yes``, ``appendfsync everysec``: a restart loses at
most the last second) in its folder, and writes its log there. The binary is Debian's ``redis-server``
(``make system-deps`` installs it where missing).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT_S = 20.0
CONF = "redis.conf"
PIDFILE = "redis.pid"


class RedisError(RuntimeError):
    """The server could not be found, started or stopped."""


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).is_file()), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf(folder: Path, port: int) -> str:
    return "\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode yes", f"dir {folder.resolve()}", "daemonize yes",
        f"pidfile {(folder / PIDFILE).resolve()}", f"logfile {(folder / 'redis.log').resolve()}",
        "appendonly yes", "appendfsync everysec", "save \"\"", "",
    ])  # fmt: skip


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _tail(folder: Path) -> str:
    with contextlib.suppress(OSError):
        return "\n".join((folder / "redis.log").read_text(errors="replace").splitlines()[-30:])
    return "(no log)"


def start(folder: Path, port: int | None = None) -> str:
    """Start a server with its data in ``folder`` (created), on ``port`` (default: a free one, or the port
    of the server's last start in this folder); returns its URL once it answers PING."""
    binary = redis_binary()
    if binary is None:
        raise RedisError("no redis-server: run `make system-deps` (or `apt-get install redis-server`)")
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / CONF
    if port is None and conf.exists():
        port = int(next(line.split()[1] for line in conf.read_text().splitlines() if line.startswith("port ")))
    port = port or free_port()
    if _ping(port):
        return f"redis://127.0.0.1:{port}/0"
    conf.write_text(_conf(folder, port))
    done = subprocess.run([binary, str(conf)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RedisError(f"redis-server exited {done.returncode}: {done.stdout}{done.stderr}\n{_tail(folder)}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _ping(port):
        if time.monotonic() > deadline:
            raise RedisError(f"redis-server did not answer on 127.0.0.1:{port} within {READY_TIMEOUT_S} s\n{_tail(folder)}")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


def stop(folder: Path, timeout_s: float = 20.0) -> None:
    """Stop the server of ``folder`` (SHUTDOWN: the append-only file is flushed), if it runs."""
    pidfile = folder / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        import os
        import signal

        os.kill(pid, signal.SIGTERM)  # redis-server shuts down cleanly on SIGTERM
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        raise RedisError(f"redis-server {pid} did not stop within {timeout_s} s")


@contextlib.contextmanager
def running_redis(folder: Path | None = None) -> Iterator[str]:
    """A server in ``folder`` (default: a new temporary folder, removed afterwards); yields its URL."""
    own = folder is None
    folder = folder or Path(tempfile.mkdtemp(prefix="deskgen-redis-"))
    try:
        yield start(folder)
    finally:
        try:
            stop(folder)
        finally:
            if own:
                shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deskgen.tools.redis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, default=Path("build/redis"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.dir, args.port))
        else:
            stop(args.dir)
    except RedisError as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
