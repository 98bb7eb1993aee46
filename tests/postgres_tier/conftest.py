"""The PostgreSQL tier: one real PostgreSQL server per session (:func:`deskgen.tools.postgres.running_postgres`) and a
fresh database per test, so the tests are independent and each starts from an empty schema."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from deskgen.tools.postgres import find_bindir, postgres_available, running_postgres


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The SQLAlchemy URL of a PostgreSQL server this session started in a temp dir. Missing binaries fail
    the tier (it is not skipped: CI must run it)."""
    if not postgres_available():
        pytest.fail(
            "the postgres tier needs PostgreSQL 15 server binaries (initdb, pg_ctl, pg_isready) and did not find "
            f"them all (looked in /usr/lib/postgresql/*/bin, `pg_config --bindir`, PATH; best candidate: {find_bindir()}): "
            "run `make system-deps`, or `apt-get install postgresql`",
            pytrace=False,
        )
    with running_postgres() as url:
        yield url


@pytest.fixture()
def pg_url(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the session's server; dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
