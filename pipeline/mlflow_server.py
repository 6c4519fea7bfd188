"""A team's MLflow tracking server: PostgreSQL backend store, served artifact store.

`python -m pipeline.mlflow_server --dir .mlflow-server` (or `make mlflow-server`)
creates a PostgreSQL cluster in DIR/pgdata on first use (initdb, as a non-root user
when run as root), starts it on a loopback port, and runs `mlflow server` on it in
the foreground with artifacts under DIR/artifacts, proxied by the server
(`--serve-artifacts`), so clients need no access to the artifact store. Point
`MLFLOW_TRACKING_URI` at the printed URL. Stop with Ctrl-C: both servers stop.
The tests start the same two servers through the same functions.
"""
from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import UsageError

DATABASE = "mlflow"


def postgres_bin() -> Optional[Path]:
    """The directory holding initdb and pg_ctl (Debian keeps them off PATH), or None."""
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").is_file():
        return Path(found).resolve().parent  # /usr/local/bin may hold links to the real directory
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
                        if p.split("/")[-2].isdigit() else 0, reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as(user: Optional[str], args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: drop to `user` for its commands when we are root."""
    command = ["runuser", "-u", user, "--", *args] if user else args
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    user: Optional[str]  # the OS user the server runs as (None: the current one)

    @property
    def role(self) -> str:
        return self.user or pwd.getpwuid(os.getuid()).pw_name

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.role}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        """initdb on first use (trust auth on loopback only), then start and create the database."""
        if os.getuid() == 0 and self.user is None:
            raise UsageError("PostgreSQL will not run as root: give a user to run it as (--pg-user)")
        fresh = not (self.data / "PG_VERSION").is_file()
        if fresh:
            self.data.mkdir(parents=True, exist_ok=True)
            if self.user:
                shutil.chown(self.data, self.user)
            self.data.chmod(0o700)
            done = _run_as(self.user, [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.role,
                                       "--auth=trust", "-E", "UTF8", "--no-locale"])
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        options = f"-p {self.port} -h 127.0.0.1 -k ''"  # TCP on loopback only, no Unix socket
        done = _run_as(self.user, [str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                                   "-l", str(self.data / "server.log"), "-w", "-t", "60", "start"])
        if done.returncode != 0:
            log = (self.data / "server.log").read_text()[-1000:] if (self.data / "server.log").is_file() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-500:]} {log}")
        if fresh:
            done = _run_as(self.user, [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                       "-U", self.role, DATABASE])
            if done.returncode != 0:
                self.stop()
                raise RuntimeError(f"createdb failed: {done.stderr.strip()[-500:]}")

    def stop(self) -> None:
        _run_as(self.user, [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])


def default_pg_user() -> Optional[str]:
    """When root: `nobody` (exists on every Debian system); otherwise the current user."""
    return "nobody" if os.getuid() == 0 else None


def start_mlflow(backend_uri: str, artifacts: Path, port: int, log: Path,
                 wait_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1:port with a served artifact store; waits for /health."""
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", backend_uri,
               "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    process = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, uri
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def prepare_directory(root: Path, user: Optional[str]) -> None:
    """The server's directory: the PostgreSQL user must be able to reach its data directory."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "artifacts").mkdir(exist_ok=True)
    if user:
        root.chmod(0o755)
        closed = [str(parent) for parent in root.parents if not parent.stat().st_mode & 0o001]
        if closed:
            raise UsageError(f"PostgreSQL runs as {user!r}, who cannot enter {closed[0]}: "
                             f"chmod o+x it, or choose a --dir under /tmp")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.mlflow_server", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".mlflow-server"), help="database and artifacts (default: .mlflow-server)")
    parser.add_argument("--port", type=int, default=5000, help="MLflow port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1 (default: 5433)")
    parser.add_argument("--pg-user", default=default_pg_user(), help="OS user PostgreSQL runs as (root: nobody)")
    args = parser.parse_args(argv)
    pg_bin = postgres_bin()
    if pg_bin is None:
        print("mlflow-server: PostgreSQL not found (initdb, pg_ctl): apt-get install postgresql", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` or a service manager stops both servers too
    root = args.dir.resolve()
    try:
        prepare_directory(root, args.pg_user)
        postgres = Postgres(pg_bin, root / "pgdata", args.pg_port, args.pg_user)
        postgres.start()
    except UsageError as error:
        print(f"mlflow-server: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"mlflow-server: {error}", file=sys.stderr)
        return 1
    try:
        process, uri = start_mlflow(postgres.uri, root / "artifacts", args.port, root / "mlflow.log")
        print(f"mlflow-server: backend {postgres.uri}, artifacts {root / 'artifacts'}\n"
              f"mlflow-server: export MLFLOW_TRACKING_URI={uri}   (Ctrl-C stops both servers)", flush=True)
        try:
            process.wait()
        except KeyboardInterrupt:
            stop_process(process)
    finally:
        postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
