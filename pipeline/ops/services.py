"""Background services the pipeline runs itself (the broker, the registry): finding Java,
starting a detached process, recognising it later by its command line, stopping it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

from pipeline.core.errors import PipelineError

JVM_ROOTS = (Path("/usr/lib/jvm"), Path("/opt/java"), Path("/usr/local/lib/jvm"))


# --------------------------------------------------------------------------- tools


def require_tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise PipelineError(
            f"'{name}' is not installed; it is needed {purpose}. Install Java 17+ and Maven "
            "(e.g. `apt-get install openjdk-17-jre-headless maven`), or set "
            "KAFKA_BOOTSTRAP_SERVERS to use an existing Kafka cluster"
        )
    return path


def java_major_version(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise PipelineError(f"cannot tell the version of {java}: {out.stderr.strip()[:200]}")
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def find_java(min_major: int, purpose: str) -> str:
    """A ``java`` of at least ``min_major``: JAVA_HOME, then PATH, then the usual JVM dirs."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    if shutil.which("java"):
        candidates.append(Path(shutil.which("java")))  # type: ignore[arg-type]
    for root in JVM_ROOTS:
        if root.is_dir():
            candidates += sorted(root.glob("*/bin/java"), reverse=True)
    seen: dict[str, int] = {}
    for java in candidates:
        if not java.exists() or str(java.resolve()) in seen:
            continue
        seen[str(java.resolve())] = major = java_major_version(str(java))
        if major >= min_major:
            return str(java)
    found = ", ".join(f"{path} ({major})" for path, major in seen.items()) or "none"
    raise PipelineError(f"Java {min_major}+ is needed {purpose}; found {found}: install a JDK "
                        f"{min_major}+ (or point JAVA_HOME at one)")


# --------------------------------------------------------------------------- Maven


def pom_property(pom: Path, name: str) -> str:
    """A ``<properties>`` value of one of our poms, e.g. the Kafka version it fetches."""
    match = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", pom.read_text())
    if not match:
        raise PipelineError(f"{pom} does not declare <{name}>")
    return match.group(1)


def maven_artifacts(pom: Path, purpose: str, quiet: bool = True) -> Path:
    """The runtime dependencies of ``pom``, copied once into the per-user cache.

    The cache key is the pom's name and hash, so editing a version re-resolves while an
    unchanged pom never runs Maven again. Returns the directory holding the files.
    """
    from pipeline.ops.settings import cache_dir, ensure_writable_dir

    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    home = cache_dir() / f"{pom.parent.name}-{digest}"
    files, stamp = home / "artifacts", home / "complete"
    if stamp.exists():
        return files
    mvn = require_tool("mvn", f"once, to download {purpose} from Maven Central")
    ensure_writable_dir(home)
    partial = home / "artifacts.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
           f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
    if not quiet:
        print(f"downloading {purpose} from Maven Central into {home} ...", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(partial.iterdir() if partial.exists() else ()):
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise PipelineError(f"Maven could not fetch {purpose} from Maven Central "
                            f"(`{' '.join(cmd)}` exited {result.returncode}): {' | '.join(tail)}")
    shutil.rmtree(files, ignore_errors=True)
    partial.rename(files)
    stamp.write_text(pom.read_text())
    return files


# --------------------------------------------------------------------------- ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def require_free_port(port: int, host: str, what: str, hint: str) -> None:
    if not port_is_free(port, host):
        raise PipelineError(f"port {port} on {host} is already in use by another process, so "
                            f"the {what} cannot listen there: stop that process, or {hint}")


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def spawn(cmd: list[str], log_file: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` detached (its own session, so Ctrl-C in our terminal spares it)."""
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def runs_command(pid: int, *markers: str) -> bool:
    """True if process ``pid`` is alive and its command line holds every marker, so a
    recycled pid is never mistaken for our service."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return alive(pid) and all(any(m.encode() in arg for arg in cmdline) for m in markers)


def alive(pid: int) -> bool:
    try:
        # Reap it if it is our child, so it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; returns once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while alive(pid):
        time.sleep(0.05)


def log_tail(*paths: Path, lines: int = 3) -> str:
    """The last error lines (or last lines) of the first log that exists, for messages."""
    for path in paths:
        if path.exists():
            text = path.read_text(errors="replace").strip().splitlines()
            errors = [line for line in text if "ERROR" in line or "Exception" in line]
            return " | ".join((errors or text)[-lines:])[-600:]
    return "no log written"


# --------------------------------------------------------------------------- detached services


@dataclass(frozen=True)
class ServiceState:
    """What every detached service's state file records; each service adds its own."""

    pid: int
    port: int  # the port clients use
    started_at: float


State = TypeVar("State", bound=ServiceState)


class DetachedService(Generic[State]):
    """A service started detached and found again later through its state file.

    The state (a dataclass with a ``pid``) is trusted only while that pid still runs a
    command line holding ``markers``, so a stale file or a recycled pid is never taken
    for a running service.
    """

    what = "service"

    def __init__(self, state_type: type[State], state_file: Path, log_file: Path,
                 markers: tuple[str, ...]) -> None:
        self._state_type, self.state_file = state_type, state_file
        self.log_file, self._markers = log_file, markers

    def state(self) -> State | None:
        try:
            state = self._state_type(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return state if runs_command(state.pid, *self._markers) else None

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop it gracefully (SIGTERM, then SIGKILL). True if one was running."""
        state = self.state()
        self.state_file.unlink(missing_ok=True)
        if state is None:
            return False
        terminate(state.pid, timeout)
        return True

    def await_ready(self, proc: subprocess.Popen, state: State, ready: Callable[[], bool],
                    timeout: float, where: str) -> State:
        """Record ``state`` and wait until ``ready()``; on failure stop it and say why."""
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.state_file.unlink(missing_ok=True)
                raise PipelineError(f"the {self.what} exited with code {proc.returncode} while "
                                    f"starting: {log_tail(self.log_file)} "
                                    f"(full log: {self.log_file})")
            if ready():
                return state
            time.sleep(0.25)
        self.stop()
        raise PipelineError(f"the {self.what} did not answer at {where} within {timeout:.0f}s "
                            f"and was stopped: {log_tail(self.log_file)} (log: {self.log_file})")
