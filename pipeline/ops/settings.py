"""Settings read from the environment, with the defaults a fresh checkout needs.

Everything that decides *where* the pipeline runs lives here: the run directory (logs,
broker data, state), an external Kafka cluster or registry, the topic namespace, and
Gemini's REST API (for backfills).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.gemini.rest import LIVE_URL

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    run_dir: Path
    bootstrap_servers: str | None
    schema_registry_url: str | None
    namespace: str
    gemini_rest_url: str = LIVE_URL  # GEMINI_REST_URL: Gemini's REST API, or the local venue

    @classmethod
    def from_env(cls, run_dir: str | Path | None = None) -> "Settings":
        raw_run_dir = run_dir or os.environ.get("PIPELINE_RUN_DIR") or REPO_ROOT / "run"
        return cls(
            run_dir=Path(raw_run_dir).expanduser().resolve(),
            bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            schema_registry_url=os.environ.get("SCHEMA_REGISTRY_URL") or None,
            namespace=os.environ.get("PIPELINE_NAMESPACE", "live"),
            gemini_rest_url=os.environ.get("GEMINI_REST_URL") or LIVE_URL,
        )

    @property
    def external_kafka(self) -> bool:
        """True when KAFKA_BOOTSTRAP_SERVERS names a cluster: then nothing is started."""
        return self.bootstrap_servers is not None


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove we can write there, or fail with one clear line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"run directory {path} is not writable ({exc.strerror}): "
            "set PIPELINE_RUN_DIR to a directory you own"
        ) from None
    return path


def cache_dir() -> Path:
    """Per-user cache for downloaded artifacts (Kafka jars), shared by every checkout."""
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gemini-kafka-pipeline"
