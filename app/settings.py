"""The service's settings: one ``BaseSettings``, read from ``pgttt serve`` flags and ``PGTTT_*`` variables.

Lists are comma-separated in the environment (``PGTTT_DEVICES=cuda:0,cuda:1``,
``PGTTT_CHECKPOINT_DIRS=/runs,/more``). With nothing set the service serves the bundled demo
checkpoint and demo val data on the CPU, keeping its job database under the user's state folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pgttt.errors import PgtttError


class SettingsError(PgtttError):
    """A service setting (flag or ``PGTTT_*`` variable) that cannot be used."""


def demo_dir() -> Path:
    """The demo checkpoint, tokenizer and val shard shipped inside the installed package."""
    import pgttt.checkpoints

    return Path(pgttt.checkpoints.__file__).resolve().parent / "demo"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pgttt"


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PGTTT_", extra="forbid")

    checkpoint_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [demo_dir()], description="folders searched for *.bin and *.ptz checkpoints"
    )
    data_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [demo_dir()], description="folders searched for datasets (fineweb_val_*.bin)"
    )
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="cpu, cuda, or a list like cuda:0,cuda:1; empty: all GPUs, else cpu"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    state_dir: Path = Field(default_factory=default_state_dir, description="job database and uploads")
    database: Path | None = Field(None, description="SQLite job store; default STATE_DIR/jobs.sqlite")
    queue_limit: int = Field(256, ge=1, description="queued jobs accepted before 429")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1)
    validate_memory_bytes: int = Field(
        4 * 1024**3,
        ge=64 * 1024**2,
        description="memory a checkpoint from a request may take to validate, in its "
        "own process, above the process's own (PGTTT_VALIDATE_MEMORY_BYTES)",
    )
    validate_timeout_s: float = Field(
        300.0, gt=0, description="seconds a checkpoint from a request may take to validate (PGTTT_VALIDATE_TIMEOUT_S)"
    )
    warmup: bool = True
    compile_cache: Path | None = Field(
        None, description="torch.compile's on-disk caches, reused across restarts; default STATE_DIR/compile-cache"
    )
    cuda_graphs: bool = Field(
        True, description="replay compiled static training graphs as CUDA graphs (GPUs only; off to compare)"
    )
    log_level: str = "info"

    _split_lists = field_validator("checkpoint_dirs", "data_dirs", "devices", mode="before")(_split)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value  # PGTTT_API_KEY= : no key

    @field_validator("checkpoint_dirs", "data_dirs")
    @classmethod
    def _absolute(cls, dirs: list[Path]) -> list[Path]:
        return [d.expanduser().resolve() for d in dirs]

    @property
    def database_path(self) -> Path:
        return (self.database or self.state_dir / "jobs.sqlite").expanduser().resolve()

    @property
    def compile_cache_dir(self) -> Path:
        return (self.compile_cache or self.state_dir / "compile-cache").expanduser().resolve()

    @property
    def upload_dir(self) -> Path:
        """Uploaded checkpoints are written here; it is searched like a checkpoint dir."""
        return (self.state_dir / "checkpoints").expanduser().resolve()

    def resolved_devices(self) -> list[str]:
        """The worker devices: each entry one worker process (``cpu`` may repeat, e.g. for gloo tests)."""
        import torch

        requested = self.devices or (["cuda"] if torch.cuda.is_available() else ["cpu"])
        out: list[str] = []
        for name in requested:
            if name == "cuda":
                if not torch.cuda.is_available():
                    raise SettingsError("devices: 'cuda' asked for but no GPU is visible")
                out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            elif name == "cpu":
                out.append("cpu")
            elif name.startswith("cuda:") and name[5:].isdigit():
                index = int(name[5:])
                if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                    raise SettingsError(f"devices: {name!r} is not a visible GPU")
                out.append(name)
            else:
                raise SettingsError(f"devices: {name!r} is not cpu, cuda or cuda:N")
        gpus = [d for d in out if d != "cpu"]
        if len(gpus) != len(set(gpus)):
            raise SettingsError(f"devices: a GPU is listed twice in {requested}")
        return out
