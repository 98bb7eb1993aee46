"""A throwaway PostgreSQL server for the tests and the benchmarks (never run by the server):
:func:`running_postgres` starts one in a temp dir and yields its SQLAlchemy URL
(``postgresql+psycopg://deskgen@127.0.0.1:<port>/deskgen``, trust auth, TCP on loopback only), and stops it
and removes the dir on exit.

The binaries are Debian's (``apt-get install postgresql``; ``make system-deps``, run by ``make test``, installs them on a fresh machine):
the highest ``/usr/lib/postgresql/<major>/bin``, else ``pg_config --bindir``, else ``initdb`` on PATH.
:func:`postgres_available` says whether any were found.

PostgreSQL refuses to run as root. Under root the server commands (``initdb``, ``pg_ctl``) therefore run as
the dedicated system user :data:`PG_USER` (created with ``useradd --system`` on first use; ``nobody`` if
that fails) through ``runuser -u <user> --``, and the temp dir is chowned to that user. As any other user
they run directly. Clients connect over TCP as the database superuser ``deskgen``, so the test process
itself needs no special rights.

The server runs with ``fsync=on`` (what production has), its log in ``<tmpdir>/server.log``; a server that
is not ready within :data:`READY_TIMEOUT_S` raises :class:`PostgresError` with that log.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: The unprivileged system user the server runs as when the tests run as root.
PG_USER = "deskgen-pg"
#: The database superuser and the database the yielded URL names.
DB_USER = "deskgen"
DB_NAME = "deskgen"
READY_TIMEOUT_S = 30.0


class PostgresError(RuntimeError):
    """The test server could not be found, initialised, started or stopped."""


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<ver>/bin/pg_ctl -> (ver parts); "9.6" sorts below "15".
    match = re.search(r"/postgresql/([0-9.]+)/bin/", path)
    return tuple(int(p) for p in match.group(1).split(".") if p) if match else ()


def find_bindir() -> Path | None:
    """The directory holding ``initdb``/``pg_ctl``/``pg_isready``: the highest Debian major version, else
    ``pg_config --bindir``, else the directory of ``initdb`` on PATH; ``None`` when there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key, reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10)
            bindir = Path(out.stdout.strip())
            if (bindir / "pg_ctl").is_file() and (bindir / "initdb").is_file():
                return bindir
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "pg_ctl").is_file():
        return Path(initdb).parent
    return None


def postgres_available() -> bool:
    """Whether PostgreSQL server binaries (initdb, pg_ctl, pg_isready) are installed."""
    bindir = find_bindir()
    return bindir is not None and all((bindir / b).is_file() for b in ("initdb", "pg_ctl", "pg_isready"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> str | None:
    """The user to run the server as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        pwd.getpwnam(PG_USER)
        return PG_USER
    created = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
         "--comment", "deskgen test PostgreSQL", PG_USER],
        capture_output=True, text=True,
    )  # fmt: skip
    with contextlib.suppress(KeyError):
        pwd.getpwnam(PG_USER)  # created now, or by a concurrent run
        return PG_USER
    with contextlib.suppress(KeyError):
        pwd.getpwnam("nobody")
        return "nobody"
    raise PostgresError(f"running as root, and could not create the user {PG_USER!r}: {created.stderr.strip()}")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a PostgreSQL server in a fresh temp dir; yield its SQLAlchemy URL; stop it and remove the dir."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresError("no PostgreSQL server binaries: run `make system-deps` or `apt-get install postgresql`")
    user = _server_user()
    prefix = ["runuser", "-u", user, "--"] if user else []
    tmp = Path(tempfile.mkdtemp(prefix="deskgen-pg-"))
    data, log = tmp / "data", tmp / "server.log"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(tmp, entry.pw_uid, entry.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
    for var in ("PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE"):
        env.pop(var, None)

    def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*prefix, str(bindir / args[0]), *args[1:]]
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise PostgresError(
                f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stdout}{done.stderr}\n--- server log ---\n{_tail(log)}"
            )
        return done

    try:
        run("initdb", "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        port = _start(run, data, log, tmp)
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME)
        yield f"postgresql+psycopg://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"
    finally:
        try:
            if (data / "postmaster.pid").exists():
                run("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60", timeout=90)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _start(run: Callable[..., subprocess.CompletedProcess[str]], data: Path, log: Path, tmp: Path) -> int:
    """Start the server on a free loopback port and wait until ``pg_isready`` says it accepts connections;
    return the port. A port taken between our probe and the server's bind is retried with another."""
    for _attempt in range(3):
        port = _free_port()
        options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=on"
        started = run("pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", f"{READY_TIMEOUT_S:.0f}",
                      "-o", options, check=False, timeout=READY_TIMEOUT_S + 30)  # fmt: skip
        if started.returncode != 0 and "Address already in use" in _tail(log, 20):
            continue
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ready = run("pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "-d", "postgres", "-t", "2",
                        check=False)  # fmt: skip
            if ready.returncode == 0:
                return port
            if not (data / "postmaster.pid").exists():
                break  # the postmaster gave up
            time.sleep(0.2)
        raise PostgresError(
            f"PostgreSQL was not ready within {READY_TIMEOUT_S:.0f} s (pg_ctl start exited {started.returncode}: "
            f"{started.stdout}{started.stderr}).\n--- server log ---\n{_tail(log)}"
        )
    raise PostgresError(f"PostgreSQL found no free port in 3 tries.\n--- server log ---\n{_tail(log)}")
