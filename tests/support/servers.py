"""Real servers for the driver tests, started once per test session.

Each fixture starts its server on 127.0.0.1 on a free port, in a temporary
folder of its own, waits until the server answers, hands the test an object
that says how to reach it, and stops the server and removes the folder when
the session ends, whatever happened in between.

Where a server binary or a driver is missing, the fixture skips and names
the Debian or PyPI package that brings it.  With GREENIFY_REQUIRE_SERVERS=1
(as CI sets it) it fails instead, so a broken install cannot pass as a green
run of skipped tests.

The module is also a script: ``python servers.py slow-http`` runs the slow
HTTP server in the process that the ``slow_http`` fixture starts, and
``python servers.py slow-ldap SOCKET`` the responder behind slapd's slow
back-sock database, ``python servers.py slow-kdc ...`` the slow KDC proxy.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 20.0
RUNNING_AS_ROOT = os.geteuid() == 0


# --- missing pieces: skip, or fail under GREENIFY_REQUIRE_SERVERS=1 ---------

def servers_required() -> bool:
    return os.environ.get("GREENIFY_REQUIRE_SERVERS") == "1"


def missing(message: str) -> None:
    """Skip the test because `message` names something missing, or fail under
    GREENIFY_REQUIRE_SERVERS=1, where everything must be there."""
    import pytest

    if servers_required():
        pytest.fail(message + " (GREENIFY_REQUIRE_SERVERS=1: nothing may be skipped)", pytrace=False)
    pytest.skip(message)


def require_module(import_name: str, pypi_name: str):
    """Import and return the driver module `import_name`, or skip (fail under
    GREENIFY_REQUIRE_SERVERS=1) naming the PyPI package to install."""
    try:
        return importlib.import_module(import_name)
    except ImportError as exc:
        missing(f"the driver {import_name} cannot be imported ({exc}): "
                f"pip install {pypi_name} (or `pip install -e '.[drivers]'`)")


def find_binary(names: Sequence[str], debian_package: str, extra_dirs: Sequence[str] = ()) -> str:
    """The first of `names` found on PATH, in sbin folders or in `extra_dirs`;
    skips (or fails) naming `debian_package` when there is none."""
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/libexec", *extra_dirs])
    for name in names:
        found = shutil.which(name, path=search_path)
        if found:
            return found
    missing(f"none of {', '.join(names)} is installed: apt-get install {debian_package}")
    raise AssertionError("unreachable")


# --- processes ---------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def read_log(path: str, limit: int = 8000) -> str:
    try:
        with open(path, "rb") as log:
            text = log.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return text[-limit:]


def _die_with_parent() -> None:
    # In the server's process, between fork and exec (after any change of
    # user): the kernel kills it if pytest dies without stopping it (SIGKILL,
    # a timeout's SIGTERM), so no server outlives the test session.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def without_preload(env=None) -> dict:
    """`env` (default: ours) without LD_PRELOAD: a sanitizer run (`make
    sanitize`) preloads its runtime for Python, and the servers must not
    inherit it (PostgreSQL's initdb hangs under it)."""
    return {name: value for name, value in (os.environ if env is None else env).items() if name != "LD_PRELOAD"}


class ServerFailed(RuntimeError):
    """A server did not start: the message carries its command and log."""


def run_checked(command: List[str], log_path: str, what: str, timeout: float = STARTUP_TIMEOUT_S, **kwargs) -> None:
    """Run a setup command to completion, its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        try:
            kwargs["env"] = without_preload(kwargs.get("env"))
            result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired:
            raise ServerFailed(f"{what} did not finish in {timeout:.0f} s: {' '.join(command)}\n"
                               f"--- {log_path} ---\n{read_log(log_path)}") from None
    if result.returncode != 0:
        raise ServerFailed(f"{what} failed with exit code {result.returncode}: {' '.join(command)}\n"
                           f"--- {log_path} ---\n{read_log(log_path)}")


@dataclass
class Process:
    """A server process whose output goes to `log_path`."""

    name: str
    command: List[str]
    log_path: str
    stop_signal: int = signal.SIGTERM
    popen: Optional[subprocess.Popen] = None

    def start(self, **kwargs) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            # A session of its own: a ^C at the terminal reaches pytest, which
            # then stops the server in order, instead of killing it mid-test.
            kwargs["env"] = without_preload(kwargs.get("env"))
            self.popen = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent, **kwargs)

    def wait_ready(self, is_ready: Callable[[], bool], timeout: float = STARTUP_TIMEOUT_S,
                   extra_log: Optional[str] = None) -> float:
        """Poll `is_ready` until it answers True; return the seconds it took.
        Raises ServerFailed with the server's log if the process exits or the
        time runs out first."""
        started = time.monotonic()
        delay = 0.02
        while True:
            if self.popen.poll() is not None:
                self.fail(f"exited with code {self.popen.returncode} before it was ready", extra_log)
            try:
                if is_ready():
                    return time.monotonic() - started
            except (OSError, subprocess.TimeoutExpired):
                pass  # not yet; a probe that hangs may have met another process on a taken port
            if time.monotonic() - started > timeout:
                self.fail(f"was not ready after {timeout:.0f} s", extra_log)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def fail(self, why: str, extra_log: Optional[str] = None) -> None:
        message = f"{self.name} {why}: {' '.join(self.command)}\n--- {self.log_path} ---\n{read_log(self.log_path)}"
        if extra_log and extra_log != self.log_path:
            message += f"\n--- {extra_log} ---\n{read_log(extra_log)}"
        raise ServerFailed(message)

    def stop(self) -> None:
        """Stop the server: its stop signal, then SIGKILL to its whole session
        if it has not exited in SHUTDOWN_TIMEOUT_S."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGCONT)  # a test may have paused it
            self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(SHUTDOWN_TIMEOUT_S)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @contextlib.contextmanager
    def paused_for(self, seconds: float) -> Iterator[None]:
        """Stop the server (SIGSTOP) now and let it go on (SIGCONT) after
        `seconds`, from an OS thread, so it resumes even while a blocking
        call holds the gevent hub.  Its connections stay open meanwhile:
        requests wait unanswered.  Leaving the block resumes it in any case."""
        from gevent.monkey import get_original  # an OS thread even under monkey.patch_all()

        start_new_thread = get_original("_thread", "start_new_thread")
        real_sleep = get_original("time", "sleep")
        block_left = []

        def resume_later() -> None:
            real_sleep(seconds)
            if not block_left:
                os.kill(self.pid, signal.SIGCONT)

        stop_process(self.pid)
        start_new_thread(resume_later, ())
        try:
            yield
        finally:
            block_left.append(True)
            os.kill(self.pid, signal.SIGCONT)


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads has stopped:
    the signal is delivered asynchronously, and a thread running on another
    core stops only at its next entry into the kernel, so a request already
    being read could still be answered after kill() returned."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            states = [open(f"/proc/{pid}/task/{task}/stat").read().rsplit(")", 1)[1].split()[0]
                      for task in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # a thread ended meanwhile: look again
            continue
        if all(state in "Tt" for state in states):
            return
        time.sleep(0.001)


PORT_ATTEMPTS = 3


@contextlib.contextmanager
def running_on_free_port(name: str, command_for_port: Callable[[int], List[str]], log_path: str,
                         is_ready: Callable[[int], bool], stop_signal: int = signal.SIGTERM,
                         **popen_kwargs) -> Iterator[tuple]:
    """Start `command_for_port(port)` on a free port and wait until
    `is_ready(port)`; yield (process, port) and stop the process afterwards.
    Another process may take the port between our probe and the server's
    bind: then it starts again on another port."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        process = Process(name, command_for_port(port), log_path, stop_signal)
        log_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0  # this attempt's log begins here
        process.start(**popen_kwargs)
        try:
            process.wait_ready(lambda: is_ready(port))
        except ServerFailed:
            process.stop()
            with open(log_path, "rb") as log:
                log.seek(log_offset)
                port_taken = b"Address already in use" in log.read()
            if port_taken and attempt < PORT_ATTEMPTS:
                continue
            raise
        break
    try:
        yield process, port
    finally:
        process.stop()


OWNER_PID_FILE = "pytest.pid"


def _remove_stale_dirs(prefix: str) -> None:
    """Remove folders a killed test session left behind: those whose
    pytest.pid names a process that no longer exists."""
    for path in glob.glob(os.path.join("/tmp", prefix + "*")):
        try:
            with open(os.path.join(path, OWNER_PID_FILE)) as pid_file:
                owner_pid = int(pid_file.read())
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


@contextlib.contextmanager
def scratch_dir(prefix: str, owner: Optional[str] = None) -> Iterator[str]:
    """A temporary folder under /tmp (short paths: unix socket paths are
    limited to 107 bytes), owned by `owner` if given, removed afterwards."""
    _remove_stale_dirs(prefix)
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        with open(os.path.join(path, OWNER_PID_FILE), "w") as pid_file:
            pid_file.write(str(os.getpid()))
        if owner is not None:
            account = pwd.getpwnam(owner)
            os.chown(path, account.pw_uid, account.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tcp_answers(port: int, send: bytes = b"", expect: bytes = b"", timeout: float = 1.0) -> bool:
    """Whether a server on `port` accepts a connection and, if `expect` is
    given, answers `send` with data starting with `expect`."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        if send:
            conn.sendall(send)
        if not expect:
            return True
        received = b""
        while len(received) < len(expect):
            chunk = conn.recv(4096)
            if not chunk:
                return False
            received += chunk
        return received.startswith(expect)


# --- TLS: a self-signed certificate per server ------------------------------

@dataclass(frozen=True)
class TLSFiles:
    """A self-signed certificate for 127.0.0.1 and its private key (PEM).
    Clients verify the server with `certificate` as their CA file."""

    certificate: str
    key: str


def make_tls_files(folder: str, owner: Optional[str] = None) -> TLSFiles:
    """Generate a fresh self-signed certificate (EC P-256, subjectAltName
    IP:127.0.0.1) in `folder`, with the openssl command or, without it,
    Python's `cryptography`; the key is readable by its owner only (`owner`
    if given: PostgreSQL refuses a key others may read)."""
    certificate, key = os.path.join(folder, "server-cert.pem"), os.path.join(folder, "server-key.pem")
    openssl = shutil.which("openssl")
    if openssl:
        run_checked([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                     "-nodes", "-days", "2", "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}",
                     "-keyout", key, "-out", certificate], os.path.join(folder, "openssl.log"),
                    "generating a self-signed TLS certificate")
    else:
        _make_tls_files_with_cryptography(certificate, key)
    os.chmod(key, 0o600)
    if owner is not None:
        account = pwd.getpwnam(owner)
        for path in (certificate, key):
            os.chown(path, account.pw_uid, account.pw_gid)
    return TLSFiles(certificate, key)


def _make_tls_files_with_cryptography(certificate_path: str, key_path: str) -> None:
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        missing("TLS tests need a certificate: apt-get install openssl (or pip install cryptography)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(key, hashes.SHA256()))
    with open(key_path, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    with open(certificate_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))


# --- MariaDB -----------------------------------------------------------------

@dataclass
class MariaDB:
    host: str
    port: int
    unix_socket: str
    user: str
    password: str
    database: str
    log_path: str
    startup_s: float
    process: Process = field(repr=False)
    tls: Optional[TLSFiles] = None
    tls_user: str = "greenify_tls"  # same password; the server refuses it without TLS (REQUIRE SSL)

    def connect_kwargs(self) -> dict:
        """Keyword arguments for MySQLdb.connect / pymysql.connect over TCP."""
        return dict(host=self.host, port=self.port, user=self.user, password=self.password, database=self.database)

    def tls_connect_kwargs(self) -> dict:
        """MySQLdb.connect keywords for a TLS connection, as the user that
        the server accepts only over TLS, verifying the server's certificate."""
        return dict(self.connect_kwargs(), user=self.tls_user, ssl_mode="REQUIRED", ssl={"ca": self.tls.certificate})

    def restart(self) -> float:
        """Start the server again, on the same port, data and socket, after a
        test killed it; returns the seconds until it answered.  The session's
        clean-up stops the new process as it would have stopped the first."""
        if self.process.popen.poll() is None:
            raise RuntimeError(f"mariadbd (pid {self.process.pid}) is still running: kill it before restart()")
        self.process.start()
        return self.process.wait_ready(lambda: _mysql_handshake_received(self.port), extra_log=self.log_path)


def _mysql_handshake_received(port: int) -> bool:
    # The server speaks first: a handshake packet whose payload begins with
    # protocol version 10.  An "unreachable" error packet begins with 0xff.
    with socket.create_connection((HOST, port), timeout=1.0) as conn:
        header = conn.recv(5)
    return len(header) == 5 and header[4] == 10


@contextlib.contextmanager
def start_mariadb() -> Iterator[MariaDB]:
    server_binary = find_binary(["mariadbd", "mysqld"], "mariadb-server")
    install_db = find_binary(["mariadb-install-db", "mysql_install_db"], "mariadb-server")
    client = find_binary(["mariadb", "mysql"], "mariadb-client")
    started = time.monotonic()
    with scratch_dir("greenify-mariadb-") as base:
        tls = make_tls_files(base)
        datadir = os.path.join(base, "data")
        unix_socket = os.path.join(base, "mysqld.sock")
        log_path = os.path.join(base, "mariadb.log")
        run_as = ["--user=root"] if RUNNING_AS_ROOT else []
        # --no-defaults: nothing from /etc/mysql, where a system server's
        # port, socket and datadir live.
        small = ["--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M"]
        run_checked([install_db, "--no-defaults", f"--datadir={datadir}", *run_as,
                     "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve", *small],
                    log_path, "mariadb-install-db")
        def command(port: int) -> List[str]:
            return [server_binary, "--no-defaults", f"--datadir={datadir}", *run_as,
                    "--skip-networking=0", f"--bind-address={HOST}", f"--port={port}", f"--socket={unix_socket}",
                    f"--pid-file={os.path.join(base, 'mysqld.pid')}", f"--tmpdir={base}", f"--log-error={log_path}",
                    "--skip-name-resolve", "--skip-log-bin", "--max-connections=500",
                    "--innodb-flush-log-at-trx-commit=0", *small,
                    f"--ssl-cert={tls.certificate}", f"--ssl-key={tls.key}", f"--ssl-ca={tls.certificate}"]

        with running_on_free_port("mariadbd", command, log_path, _mysql_handshake_received) as (process, port):
            setup_sql = ("CREATE DATABASE greenify; "
                         "CREATE USER 'greenify'@'%' IDENTIFIED BY 'greenify'; "
                         "GRANT ALL ON greenify.* TO 'greenify'@'%'; "
                         "CREATE USER 'greenify_tls'@'%' IDENTIFIED BY 'greenify' REQUIRE SSL; "
                         "GRANT ALL ON greenify.* TO 'greenify_tls'@'%';")
            run_checked([client, "--no-defaults", "--user=root", f"--socket={unix_socket}", "-e", setup_sql],
                        log_path, "creating the greenify user and database")
            yield MariaDB(HOST, port, unix_socket, "greenify", "greenify", "greenify", log_path,
                          time.monotonic() - started, process, tls)


# --- PostgreSQL --------------------------------------------------------------

@dataclass
class PostgreSQL:
    host: str
    port: int
    socket_dir: str
    user: str
    database: str
    log_path: str
    startup_s: float
    process: Process = field(repr=False)
    tls: Optional[TLSFiles] = None

    @property
    def dsn(self) -> str:
        """A plain TCP connection (sslmode=disable: libpq would otherwise
        prefer TLS, which the server offers)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={self.database} sslmode=disable"

    @property
    def tls_dsn(self) -> str:
        """A TLS connection that verifies the server's certificate."""
        return (f"host={self.host} port={self.port} user={self.user} dbname={self.database} "
                f"sslmode=verify-full sslrootcert={self.tls.certificate}")


def _postgres_bin_dirs() -> List[str]:
    # Debian keeps the server binaries out of PATH, one folder per major version.
    def major(path: str) -> float:
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0
    return sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)


@contextlib.contextmanager
def start_postgres(settings: Sequence[str] = ()) -> Iterator[PostgreSQL]:
    """Start PostgreSQL; `settings` are extra ``name=value`` server settings."""
    bin_dirs = _postgres_bin_dirs()
    initdb = find_binary(["initdb"], "postgresql", bin_dirs)
    bin_dir = os.path.dirname(os.path.realpath(initdb))
    postgres = find_binary(["postgres"], "postgresql", [bin_dir])
    psql = find_binary(["psql"], "postgresql-client", [bin_dir])
    # PostgreSQL refuses to run as root: as root, run it as the `postgres`
    # account, switched to directly (not through runuser, which would stand
    # between the server and its stop signal).
    owner = None
    as_owner: dict = {}
    if RUNNING_AS_ROOT:
        owner = "postgres"
        try:
            account = pwd.getpwnam(owner)
        except KeyError:
            missing("running as root, PostgreSQL needs the `postgres` account: apt-get install postgresql")
        as_owner = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[],
                        env={**os.environ, "HOME": account.pw_dir, "USER": owner, "LOGNAME": owner})
    started = time.monotonic()
    with scratch_dir("greenify-postgres-", owner) as base:
        datadir = os.path.join(base, "data")
        log_path = os.path.join(base, "postgres.log")
        tls = make_tls_files(base, owner)
        run_checked([initdb, "-D", datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--locale=C", "--no-sync"], log_path, "initdb", cwd=base, **as_owner)
        def command(port: int) -> List[str]:
            return [postgres, "-D", datadir, "-p", str(port),
                    "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={base}",
                    "-c", "max_connections=200", "-c", "shared_buffers=32MB",
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "ssl=on", "-c", f"ssl_cert_file={tls.certificate}", "-c", f"ssl_key_file={tls.key}",
                    *(option for setting in settings for option in ("-c", setting))]

        def accepts_queries(port: int) -> bool:
            if not tcp_answers(port):
                return False
            probe = subprocess.run([psql, "-h", HOST, "-p", str(port), "-U", "postgres", "-d", "postgres",
                                    "-Atc", "SELECT 1"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=3, env=without_preload())
            return probe.returncode == 0 and probe.stdout.strip() == b"1"

        # SIGINT: PostgreSQL's fast shutdown, which does not wait for clients.
        with running_on_free_port("postgres", command, log_path, accepts_queries, signal.SIGINT,
                                  cwd=base, **as_owner) as (process, port):
            for statement in ("CREATE USER greenify", "CREATE DATABASE greenify OWNER greenify"):
                run_checked([psql, "-h", HOST, "-p", str(port), "-U", "postgres", "-d", "postgres",
                             "-v", "ON_ERROR_STOP=1", "-c", statement], log_path, statement)
            yield PostgreSQL(HOST, port, base, "greenify", "greenify", log_path, time.monotonic() - started, process,
                             tls)


# --- memcached ---------------------------------------------------------------

@dataclass
class Memcached:
    host: str
    port: int
    log_path: str
    startup_s: float
    process: Process = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.contextmanager
def start_memcached() -> Iterator[Memcached]:
    binary = find_binary(["memcached"], "memcached")
    started = time.monotonic()
    with scratch_dir("greenify-memcached-") as base:
        log_path = os.path.join(base, "memcached.log")
        run_as = ["-u", "root"] if RUNNING_AS_ROOT else []  # memcached refuses root without it

        def command(port: int) -> List[str]:
            return [binary, "-l", HOST, "-p", str(port), "-U", "0", *run_as, "-m", "64", "-c", "1024", "-t", "2", "-v"]

        def answers_version(port: int) -> bool:
            return tcp_answers(port, b"version\r\n", b"VERSION ")

        # SIGKILL: memcached keeps nothing worth a graceful stop, which takes it a second.
        with running_on_free_port("memcached", command, log_path, answers_version, signal.SIGKILL) as (process, port):
            yield Memcached(HOST, port, log_path, time.monotonic() - started, process)


# --- the slow HTTP server ----------------------------------------------------

@dataclass
class SlowHTTP:
    host: str
    port: int
    log_path: str
    startup_s: float
    process: Process = field(repr=False)
    https_port: int = 0
    tls: Optional[TLSFiles] = None

    def url(self, delay_s: float = 0.0, tag: str = "") -> str:
        """A URL the server answers after `delay_s` seconds with the body
        ``slept <delay_s> for <tag>``."""
        return f"http://{self.host}:{self.port}/?delay={delay_s}&tag={tag}"

    def https_url(self, delay_s: float = 0.0, tag: str = "") -> str:
        """The same over TLS (clients verify with `tls.certificate`)."""
        return f"https://{self.host}:{self.https_port}/?delay={delay_s}&tag={tag}"


def serve_slow_http(certificate: str, key: str) -> None:
    """The slow HTTP server's process: answers GET /?delay=S&tag=T after S
    seconds with ``slept S for T``, each request in a thread of its own, over
    HTTP on one port and HTTPS (`certificate`, `key`) on another.  Prints
    both ports on the first line of stdout once it listens."""
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            delay_s = float(query.get("delay", ["0"])[0])
            tag = query.get("tag", [""])[0]
            time.sleep(min(delay_s, 60.0))
            body = f"slept {delay_s} for {tag}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            sys.stderr.write("%s %s\n" % (threading.current_thread().name, format % args))

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # the default 5 drops bursts of concurrent connects

    class TLSServer(Server):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate, key)

        def get_request(self):
            # The handshake happens in the request's own thread, on first read.
            conn, address = self.socket.accept()
            return self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), address

        def handle_error(self, request, client_address) -> None:
            sys.stderr.write(f"{client_address}: {sys.exc_info()[1]!r}\n")  # a client gone mid-handshake

    server, tls_server = Server((HOST, 0), Handler), TLSServer((HOST, 0), Handler)
    threading.Thread(target=tls_server.serve_forever, daemon=True).start()
    print(server.server_address[1], tls_server.server_address[1], flush=True)
    server.serve_forever()


@contextlib.contextmanager
def start_slow_http() -> Iterator[SlowHTTP]:
    started = time.monotonic()
    with scratch_dir("greenify-http-") as base:
        log_path = os.path.join(base, "http.log")
        port_path = os.path.join(base, "port")
        tls = make_tls_files(base)
        process = Process("slow HTTP server", [sys.executable, "-u", os.path.abspath(__file__), "slow-http",
                                               tls.certificate, tls.key], log_path)
        with open(port_path, "wb") as port_file:
            # stdout (the port) to its own file, stderr (the access log) to the log.
            with open(log_path, "ab") as log:
                process.popen = subprocess.Popen(process.command, stdin=subprocess.DEVNULL, stdout=port_file,
                                                 stderr=log, start_new_session=True, preexec_fn=_die_with_parent,
                                                 env=without_preload())
        try:
            def listening() -> bool:
                with open(port_path) as port_file:
                    text = port_file.read()
                return text.endswith("\n") and all(tcp_answers(int(port)) for port in text.split())

            process.wait_ready(listening)
            with open(port_path) as port_file:
                port, https_port = map(int, port_file.read().split())
            yield SlowHTTP(HOST, port, log_path, time.monotonic() - started, process, https_port, tls)
        finally:
            process.stop()


# --- OpenLDAP's slapd ---------------------------------------------------------------

@dataclass
class Slapd:
    """slapd with two databases: ``base_dn`` (mdb, entries `people` and
    cn=person-0..person-{PEOPLE-1} under it) and ``slow_dn``, a back-sock
    database answered by `serve_slow_ldap`: a search whose filter is
    ``(cn=sleep-SECONDS-TAG)`` answers the entry cn=TAG,SLOW_DN after SECONDS,
    each search in a thread of its own."""

    host: str
    port: int
    base_dn: str
    slow_dn: str
    admin_dn: str
    admin_password: str
    log_path: str
    startup_s: float
    process: Process = field(repr=False)
    responder: Process = field(repr=False)
    tls: Optional[TLSFiles] = None  # StartTLS on the same port (slapd's TLS is GnuTLS on Debian)
    ldaps_port: Optional[int] = None  # LDAP over TLS from the first byte, with the same certificate

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}"


SLAPD_PEOPLE = 200


def serve_slow_ldap(socket_path: str) -> None:
    """The slow LDAP responder: slapd's back-sock database connects to
    `socket_path` once per request and writes it (slapd-sock(5)); a SEARCH
    with ``filter: (cn=sleep-S-T)`` gets the entry cn=T after S seconds, any
    other request an empty success."""
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = {}
            kind = self.rfile.readline().decode().strip()
            for line in iter(self.rfile.readline, b""):
                line = line.decode().rstrip("\n")
                if not line:
                    break
                name, _, value = line.partition(": ")
                request.setdefault(name, value)
            answer = ""
            if kind == "SEARCH" and request.get("filter", "").startswith("(cn=sleep-"):
                _, seconds, tag = request["filter"][1:-1].split("=", 1)[1].split("-", 2)
                time.sleep(min(float(seconds), 60.0))
                suffix = request.get("suffix", "")
                answer = f"dn: cn={tag},{suffix}\nobjectClass: device\ncn: {tag}\n\n"
            if kind != "UNBIND":  # an unbind gets no answer
                self.wfile.write(f"{answer}RESULT\ncode: 0\n".encode())

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True
        request_queue_size = 256

    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = Server(socket_path, Handler)
    print("listening", flush=True)
    server.serve_forever()


@contextlib.contextmanager
def start_slapd() -> Iterator[Slapd]:
    slapd = find_binary(["slapd"], "slapd")
    slapadd = find_binary(["slapadd"], "slapd")
    module_dir = next((folder for folder in ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap", "/usr/lib/openldap")
                       if os.path.exists(os.path.join(folder, "back_sock.so"))), None)
    if module_dir is None:
        missing("slapd's back_sock module is not installed: apt-get install slapd")
    schema = "/etc/ldap/schema/core.schema"
    if not os.path.exists(schema):
        missing(f"{schema} is missing: apt-get install slapd")
    started = time.monotonic()
    with scratch_dir("greenify-slapd-") as base:
        log_path = os.path.join(base, "slapd.log")
        base_dn, slow_dn = "dc=greenify,dc=test", "dc=slow"
        admin_dn, admin_password = f"cn=admin,{base_dn}", "greenify"
        socket_path = os.path.join(base, "slow.sock")
        data_dir = os.path.join(base, "data")
        os.mkdir(data_dir)
        tls = make_tls_files(base)
        config = os.path.join(base, "slapd.conf")
        with open(config, "w") as out:
            out.write(f"include {schema}\nmodulepath {module_dir}\nmoduleload back_mdb\nmoduleload back_sock\n"
                      f"pidfile {base}/slapd.pid\nargsfile {base}/slapd.args\n"
                      f"TLSCertificateFile {tls.certificate}\nTLSCertificateKeyFile {tls.key}\n"
                      f"database mdb\nmaxsize 67108864\nsuffix \"{base_dn}\"\nrootdn \"{admin_dn}\"\n"
                      f"rootpw {admin_password}\ndirectory {data_dir}\n"
                      f"database sock\nsuffix \"{slow_dn}\"\nsocketpath {socket_path}\n")
        entries = [f"dn: {base_dn}\nobjectClass: dcObject\nobjectClass: organization\ndc: greenify\no: greenify\n",
                   f"dn: ou=people,{base_dn}\nobjectClass: organizationalUnit\nou: people\n"]
        entries += [f"dn: cn=person-{index},ou=people,{base_dn}\nobjectClass: person\ncn: person-{index}\n"
                    f"sn: {index}\ndescription: {'x' * (index % 50)}\n" for index in range(SLAPD_PEOPLE)]
        ldif = os.path.join(base, "people.ldif")
        with open(ldif, "w") as out:
            out.write("\n".join(entries))
        run_checked([slapadd, "-f", config, "-b", base_dn, "-l", ldif], log_path, "slapadd")
        responder = Process("slow LDAP responder", [sys.executable, "-u", os.path.abspath(__file__), "slow-ldap",
                                                     socket_path], os.path.join(base, "responder.log"))
        responder.start()
        try:
            responder.wait_ready(lambda: os.path.exists(socket_path))

            ldaps_ports: Dict[int, int] = {}

            def command(port: int) -> List[str]:
                # ldaps on a second free port; taken meanwhile, slapd says "Address already in use" and
                # running_on_free_port starts it again on other ports
                ldaps_ports[port] = free_port()
                return [slapd, "-f", config, "-h", f"ldap://{HOST}:{port}/ ldaps://{HOST}:{ldaps_ports[port]}/",
                        "-d", "256"]

            def answers_bind(port: int) -> bool:
                # an anonymous LDAPv3 bind request; a BindResponse (0x61) comes back
                return tcp_answers(port, bytes.fromhex("300c020101600702010304008000"), b"\x30")

            # SIGKILL: slapd's SIGTERM waits for the searches the responder still sleeps on.
            with running_on_free_port("slapd", command, log_path, answers_bind, signal.SIGKILL) as (process, port):
                yield Slapd(HOST, port, base_dn, slow_dn, admin_dn, admin_password, log_path,
                            time.monotonic() - started, process, responder, tls, ldaps_ports[port])
        finally:
            responder.stop()


# --- OpenSSH's sshd ---------------------------------------------------------------------

@dataclass
class Sshd:
    """sshd accepting `user` with the private key at `key_path` (PEM RSA, which
    every libssh2 reads) and nothing else."""

    host: str
    port: int
    user: str
    key_path: str
    public_key_path: str
    log_path: str
    startup_s: float
    process: Process = field(repr=False)


@contextlib.contextmanager
def start_sshd() -> Iterator[Sshd]:
    sshd = find_binary(["sshd"], "openssh-server")
    keygen = find_binary(["ssh-keygen"], "openssh-client")
    user = pwd.getpwuid(os.geteuid()).pw_name
    if RUNNING_AS_ROOT and not os.path.isdir("/run/sshd"):
        # sshd's privilege separation folder, which Debian creates at boot (tmpfiles.d)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    started = time.monotonic()
    with scratch_dir("greenify-sshd-") as base:
        log_path = os.path.join(base, "sshd.log")
        host_key, user_key = os.path.join(base, "host_key"), os.path.join(base, "user_key")
        for key in (host_key, user_key):
            run_checked([keygen, "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", key],
                        log_path, "ssh-keygen")
        authorized = os.path.join(base, "authorized_keys")
        shutil.copyfile(user_key + ".pub", authorized)
        os.chmod(authorized, 0o600)

        def command(port: int) -> List[str]:
            return [sshd, "-D", "-e", "-f", "/dev/null", "-h", host_key,
                    "-o", f"ListenAddress={HOST}", "-o", f"Port={port}", "-o", f"PidFile={base}/sshd.pid",
                    "-o", f"AuthorizedKeysFile={authorized}", "-o", "PasswordAuthentication=no",
                    "-o", "KbdInteractiveAuthentication=no", "-o", "UsePAM=no", "-o", "StrictModes=no",
                    "-o", "PermitRootLogin=prohibit-password", "-o", "MaxStartups=200", "-o", "MaxSessions=50",
                    "-o", "PrintMotd=no", "-o", "PrintLastLog=no", "-o", "UseDNS=no", "-o", "LogLevel=ERROR"]

        def answers_banner(port: int) -> bool:
            return tcp_answers(port, b"", b"SSH-2.0-")

        with running_on_free_port("sshd", command, log_path, answers_banner) as (process, port):
            yield Sshd(HOST, port, user, user_key, user_key + ".pub", log_path, time.monotonic() - started, process)


# --- MIT Kerberos' KDC ---------------------------------------------------------------------

@dataclass
class Kdc:
    """krb5kdc for realm `realm` with the principal `user`@realm (password
    `password`), and client profiles (krb5.conf files for KRB5_CONFIG) that
    reach it directly, through a proxy that delays each request by
    `delay_s` over UDP or over TCP, or through a port where nothing answers."""

    host: str
    port: int
    realm: str
    user: str
    password: str
    direct_config: str
    slow_udp_config: str
    slow_tcp_config: str
    dead_config: str
    delay_s: float
    log_path: str
    startup_s: float
    process: Process = field(repr=False)
    proxy: Process = field(repr=False)


def serve_slow_kdc(kdc_port: int, delay_s: float, port_path: str) -> None:
    """The slow KDC proxy: forwards each request, over UDP and over TCP, to
    the KDC on `kdc_port` after `delay_s`, each in a thread of its own.
    Writes its port (UDP and TCP alike) to `port_path` once it listens."""
    import socketserver

    class UDPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, reply_socket = self.request
            time.sleep(delay_s)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
                upstream.settimeout(10)
                upstream.sendto(data, (HOST, kdc_port))
                answer = upstream.recv(65536)
            reply_socket.sendto(answer, self.client_address)

    class TCPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            def read_message(conn) -> bytes:  # a 4-byte length, then the message
                data = b""
                while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return b""
                    data += chunk
                return data

            request = read_message(self.request)
            if not request:
                return
            time.sleep(delay_s)
            with socket.create_connection((HOST, kdc_port), timeout=10) as upstream:
                upstream.sendall(request)
                self.request.sendall(read_message(upstream))

    class UDPServer(socketserver.ThreadingUDPServer):
        daemon_threads = True

    class TCPServer(socketserver.ThreadingTCPServer):
        daemon_threads = True
        request_queue_size = 256

    tcp_server = TCPServer((HOST, 0), TCPHandler)
    udp_server = UDPServer((HOST, tcp_server.server_address[1]), UDPHandler)
    threading.Thread(target=udp_server.serve_forever, daemon=True).start()
    with open(port_path + ".tmp", "w") as out:
        out.write(str(tcp_server.server_address[1]))
    os.replace(port_path + ".tmp", port_path)
    tcp_server.serve_forever()


@contextlib.contextmanager
def start_kdc(delay_s: float = 0.3) -> Iterator[Kdc]:
    krb5kdc = find_binary(["krb5kdc"], "krb5-kdc")
    kdb5_util = find_binary(["kdb5_util"], "krb5-kdc")
    kadmin_local = find_binary(["kadmin.local"], "krb5-admin-server")
    realm, user, password = "GREENIFY.TEST", "greenify", "greenify-password"
    started = time.monotonic()
    with scratch_dir("greenify-kdc-") as base:
        log_path = os.path.join(base, "kdc.log")

        def client_config(name: str, port: int, tcp: bool) -> str:
            path = os.path.join(base, name)
            with open(path, "w") as out:
                out.write(f"[libdefaults]\n default_realm = {realm}\n dns_lookup_kdc = false\n"
                          f" dns_lookup_realm = false\n rdns = false\n"
                          # 1: every request over TCP; the default sends small ones over UDP
                          f"{' udp_preference_limit = 1' if tcp else ''}\n"
                          f"[realms]\n {realm} = {{\n  kdc = {HOST}:{port}\n }}\n")
            return path

        def kdc_profile(port: int) -> str:
            path = os.path.join(base, "kdc.conf")
            with open(path, "w") as out:
                out.write(f"[kdcdefaults]\n kdc_ports = {port}\n kdc_tcp_ports = {port}\n"
                          f"[realms]\n {realm} = {{\n  database_name = {base}/principal\n"
                          f"  key_stash_file = {base}/stash\n  acl_file = {base}/kadm5.acl\n"
                          f"  kdc_ports = {port}\n  kdc_tcp_ports = {port}\n }}\n"
                          f"[logging]\n kdc = FILE:{log_path}\n")
            return path

        setup_env = dict(os.environ, KRB5_CONFIG=client_config("krb5-direct.conf", 88, False),
                         KRB5_KDC_PROFILE=kdc_profile(0))
        run_checked([kdb5_util, "create", "-s", "-r", realm, "-P", "greenify-master"], log_path,
                    "kdb5_util create", env=setup_env)
        run_checked([kadmin_local, "-r", realm, "-q", f"addprinc -pw {password} {user}"], log_path,
                    "kadmin.local addprinc", env=setup_env)

        def command(port: int) -> List[str]:
            kdc_profile(port)
            return [krb5kdc, "-n", "-r", realm]

        with running_on_free_port("krb5kdc", command, log_path, tcp_answers, env=setup_env) as (process, port):
            port_path = os.path.join(base, "proxy-port")
            proxy = Process("slow KDC proxy", [sys.executable, "-u", os.path.abspath(__file__), "slow-kdc",
                                               str(port), str(delay_s), port_path], os.path.join(base, "proxy.log"))
            proxy.start()
            try:
                proxy.wait_ready(lambda: os.path.exists(port_path))
                with open(port_path) as port_file:
                    proxy_port = int(port_file.read())
                # a UDP and TCP port nobody answers on: bound, never read (UDP) or never accepting (TCP backlog)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
                    dead.bind((HOST, 0))
                    yield Kdc(HOST, port, realm, user, password,
                              client_config("krb5-direct.conf", port, False),
                              client_config("krb5-slow-udp.conf", proxy_port, False),
                              client_config("krb5-slow-tcp.conf", proxy_port, True),
                              client_config("krb5-dead.conf", dead.getsockname()[1], False),
                              delay_s, log_path, time.monotonic() - started, process, proxy)
            finally:
                proxy.stop()


# --- ODBC drivers ----------------------------------------------------------------

def odbc_driver(file_name: str, debian_package: str) -> str:
    """The path of an ODBC driver library (unixODBC loads it at connect time
    from DRIVER=path); skips (or fails) naming `debian_package`."""
    for folder in sorted(glob.glob("/usr/lib/*/odbc")) + ["/usr/lib/odbc", "/usr/local/lib"]:
        path = os.path.join(folder, file_name)
        if os.path.exists(path):
            return path
    missing(f"the ODBC driver {file_name} is not installed: apt-get install {debian_package}")
    raise AssertionError("unreachable")


# --- waiting for greenlets ---------------------------------------------------

GREENLET_DEADLINE_S = 30.0


def join_all(greenlets, deadline_s: float = GREENLET_DEADLINE_S) -> list:
    """Wait for `greenlets` and return their values; re-raise the first
    error.  Greenlets still waiting after `deadline_s` (a wait that never
    wakes: a lost wake-up would otherwise hang the whole suite) are killed,
    and the test fails saying so."""
    import gevent
    import pytest

    finished = gevent.joinall(greenlets, timeout=deadline_s)
    if len(finished) < len(greenlets):
        gevent.killall([glet for glet in greenlets if not glet.ready()], block=True, timeout=5)
        pytest.fail(f"{len(greenlets) - len(finished)} of {len(greenlets)} greenlets were still waiting after "
                    f"{deadline_s:.0f} s: a green wait that was never woken", pytrace=False)
    return [glet.get() for glet in greenlets]


# --- fixtures ----------------------------------------------------------------

_started: List[str] = []  # what the session started, for the terminal summary


def pytest_terminal_summary(terminalreporter) -> None:
    if _started:
        terminalreporter.write_sep("-", "servers started by tests/support/servers.py")
        for line in _started:
            terminalreporter.write_line(line)

def serve(start):
    """For a generator fixture: enter `start()` (start_mariadb, ...) for the
    fixture's lifetime.  A server that does not start fails the tests that
    need it, with its log; a missing binary skips them."""
    import pytest

    try:
        with start() as server:
            _started.append(f"{type(server).__name__} on {server.host}:{server.port}, "
                            f"ready in {server.startup_s:.2f} s")
            yield server
    except ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)


# GREENIFY_TEST_MARIADB=HOST:PORT: the `mariadb` fixture uses a server that
# start_mariadb() started elsewhere (same user, password and database) instead
# of starting one; `make test-aarch64` starts it natively on the host
# (ci/host_mariadb.py) and the emulated tests reach it over loopback.
EXTERNAL_MARIADB = "GREENIFY_TEST_MARIADB"


@contextlib.contextmanager
def external_mariadb() -> Iterator[MariaDB]:
    host, _, port = os.environ[EXTERNAL_MARIADB].rpartition(":")
    yield MariaDB(host=host, port=int(port), unix_socket="", user="greenify", password="greenify",
                  database="greenify", log_path=f"(started outside: {EXTERNAL_MARIADB})", startup_s=0.0,
                  process=None)


try:
    import pytest
except ImportError:  # run as the slow HTTP server's script, outside pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def mariadb() -> Iterator[MariaDB]:
        """A MariaDB server with user, password and database `greenify`."""
        yield from serve(external_mariadb if os.environ.get(EXTERNAL_MARIADB) else start_mariadb)

    @pytest.fixture(scope="session")
    def postgres() -> Iterator[PostgreSQL]:
        """A PostgreSQL server (trust authentication) with user and database `greenify`."""
        yield from serve(start_postgres)

    @pytest.fixture(scope="session")
    def memcached() -> Iterator[Memcached]:
        """A memcached server."""
        yield from serve(start_memcached)

    @pytest.fixture(scope="session")
    def slow_http() -> Iterator[SlowHTTP]:
        """An HTTP server, in a process of its own, that answers after the delay a URL asks for."""
        yield from serve(start_slow_http)

    @pytest.fixture(scope="session")
    def MySQLdb():  # noqa: N802 - named as the module it hands out
        return require_module("MySQLdb", "mysqlclient")

    @pytest.fixture(scope="session")
    def psycopg2():
        return require_module("psycopg2", "psycopg2-binary")

    @pytest.fixture(scope="session")
    def pylibmc():
        return require_module("pylibmc", "pylibmc")

    @pytest.fixture(scope="session")
    def pycurl():
        return require_module("pycurl", "pycurl")

    @pytest.fixture(scope="session")
    def pymysql():
        return require_module("pymysql", "PyMySQL")

    @pytest.fixture(scope="session")
    def psycopg():
        # In process, the wheel's implementation (psycopg[binary]), which the
        # compatibility row names; psycopg would prefer psycopg[c] where both
        # are installed.  psycopg[c] runs in children of its own
        # (tests/support/psycopg_impl_child.py).
        if importlib.util.find_spec("psycopg_binary") is not None:
            os.environ.setdefault("PSYCOPG_IMPL", "binary")
        return require_module("psycopg", "psycopg[binary]")

    @pytest.fixture(scope="session")
    def psycopg_c_module(psycopg):
        """psycopg 3's compiled module (psycopg_binary._psycopg or psycopg_c._psycopg),
        where its wait_c loop calls libc's poll()."""
        module = psycopg._cmodule._psycopg
        if module is None:
            missing(f"psycopg {psycopg.__version__} runs its pure-Python implementation "
                    f"({psycopg.pq.__impl__}): pip install 'psycopg[binary]'")
        return module

    @pytest.fixture(scope="session")
    def slapd() -> Iterator[Slapd]:
        """OpenLDAP's slapd: 200 people under dc=greenify,dc=test and a slow back-sock database (Slapd)."""
        yield from serve(start_slapd)

    @pytest.fixture(scope="session")
    def ldap():
        return require_module("ldap", "python-ldap (and apt-get install libldap2-dev libsasl2-dev to build it)")

    @pytest.fixture(scope="session")
    def sshd() -> Iterator[Sshd]:
        """OpenSSH's sshd on a free port, key authentication only (Sshd)."""
        yield from serve(start_sshd)

    @pytest.fixture(scope="session")
    def ssh2():
        return require_module("ssh2.session", "ssh2-python")

    @pytest.fixture(scope="session")
    def kdc() -> Iterator[Kdc]:
        """MIT krb5kdc with a principal, and a proxy that delays each KDC request by 0.3 s (Kdc)."""
        yield from serve(start_kdc)

    @pytest.fixture(scope="session")
    def gssapi():
        return require_module("gssapi", "gssapi (and apt-get install libkrb5-dev to build it)")

    @pytest.fixture(scope="session")
    def pyodbc():
        """pyodbc, over unixODBC's driver manager (libodbc.so.2)."""
        return require_module("pyodbc", "pyodbc (and apt-get install unixodbc)")

    @pytest.fixture
    def patched_libmariadb(MySQLdb, greenified):
        """greenify active and libmariadb patched, through MySQLdb._mysql, for the test."""
        import greenify
        with greenify.patched(MySQLdb._mysql) as report:
            assert report, f"nothing patched under MySQLdb._mysql: {report!r}"
            yield report


if __name__ == "__main__" and sys.argv[1:2] == ["slow-http"]:
    serve_slow_http(*sys.argv[2:4])
if __name__ == "__main__" and sys.argv[1:2] == ["slow-ldap"]:
    serve_slow_ldap(sys.argv[2])
if __name__ == "__main__" and sys.argv[1:2] == ["slow-kdc"]:
    serve_slow_kdc(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
