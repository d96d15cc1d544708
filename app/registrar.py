"""Checkpoints added at run time (``POST /checkpoints``): a file under a checkpoint folder, or an upload.

Every file from a request is validated in a child process with a memory cap and a time limit
(``isolate``), so a hostile file costs a child, not the server. Uploads are quarantined: written under
``STATE_DIR/checkpoints/.incoming/`` (a hidden folder, never searched), validated there, and only then
moved to their name in the upload folder, so a file that fails never reaches the folder searched at
start. Each file's sha256 is recorded when it is added (the database for a registration, the sidecar
for an uploaded ``.ptz``), and a file that has changed since is refused at the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgttt.api.schemas import RegisterCheckpoint
from pgttt.checkpoints.loading import architecture_problem
from pgttt.errors import PgtttError

from . import engine_bridge as bridge
from .catalog import SIDECAR_SUFFIX, Catalog, PathError, safe_path
from .isolate import INSPECT, run_isolated
from .service_errors import InvalidField

if TYPE_CHECKING:
    from .service import Service

INCOMING = ".incoming"


class Registrar:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._adding = asyncio.Lock()
        self.inspect_target = INSPECT  # tests swap in a hostile reader

    @property
    def incoming(self) -> Path:
        return self.service.settings.upload_dir / INCOMING

    def clear_incoming(self) -> None:
        """Uploads cut short by a stop are never served: drop them."""
        shutil.rmtree(self.incoming, ignore_errors=True)

    async def register(self, req: RegisterCheckpoint) -> dict[str, Any]:
        """Serve a file already under a checkpoint folder; remembered across restarts."""
        async with self._adding:
            catalog = self._check_new_name(req.name)
            try:
                path = catalog.checkpoint_path(req.path)
                tokenizer = (
                    None
                    if req.tokenizer is None
                    else str(safe_path(req.tokenizer, [*catalog.data_dirs, *catalog.checkpoint_dirs], "tokenizer"))
                )
            except PathError as exc:
                raise InvalidField(exc.field, str(exc), getattr(req, exc.field)) from None
            model_bin = bridge.is_model_bin(path)
            _check_architecture(model_bin, req.preset, req.overrides)
            if model_bin and req.tokenizer is not None:
                raise InvalidField("tokenizer", "tokenizer: a model.bin records its own tokenizer", req.tokenizer)
            spec = bridge.CheckpointSpec(req.name, str(path), req.preset, req.overrides, tokenizer)
            info = await self._validate(spec, "path")
            spec = dataclasses.replace(spec, sha256=info.sha256)
            self.service.store.register_checkpoint(spec)  # a full disk answers 503 here, before anything changed
            return self._serve(catalog, spec, info)

    async def upload(self, name: str, file: Any, preset: str | None, overrides: Any) -> dict[str, Any]:
        """Write an upload to quarantine, validate it there, then move it into the upload folder and serve it."""
        async with self._adding:
            catalog = self._check_new_name(name)
            head = await file.read(len(bridge.MAGIC))
            await file.seek(0)
            model_bin = head == bridge.MAGIC
            _check_architecture(model_bin, preset, overrides)
            suffix = ".bin" if model_bin else ".ptz"
            quarantined = self.incoming / f"{name}{suffix}"
            await asyncio.to_thread(_write, file.file, quarantined)
            try:
                spec = bridge.CheckpointSpec(
                    name, str(quarantined), None if model_bin else preset, None if model_bin else overrides or {}
                )
                info = await self._validate(spec, "file")
                path = self.service.settings.upload_dir / f"{name}{suffix}"
                meta = None if model_bin else {"preset": preset, "overrides": overrides or {}, "sha256": info.sha256}
                await asyncio.to_thread(_place, quarantined, path, meta)
            finally:
                quarantined.unlink(missing_ok=True)
            spec = bridge.CheckpointSpec(name, str(path), spec.preset, spec.overrides, sha256=info.sha256)
            return self._serve(catalog, spec, info)

    async def _validate(self, spec: bridge.CheckpointSpec, field: str) -> bridge.CheckpointInfo:
        settings = self.service.settings
        run = functools.partial(
            run_isolated,
            spec,
            memory_bytes=settings.validate_memory_bytes,
            timeout_s=settings.validate_timeout_s,
            target=self.inspect_target,
        )
        try:
            return await asyncio.to_thread(run)
        except PgtttError as exc:
            name = Path(spec.path).name
            message = str(exc) if name in str(exc) else f"{name}: {exc}"
            where = bridge.error_field(exc, field)
            raise InvalidField(where, f"{where}: {message}", spec.path) from None

    def _serve(self, catalog: Catalog, spec: bridge.CheckpointSpec, info: bridge.CheckpointInfo) -> dict[str, Any]:
        entry = catalog.add_checkpoint(spec, inspect=lambda _spec: info)  # validated already, in the child
        self.service.pool.load(spec)
        return entry.to_api(self.service.devices)

    def _check_new_name(self, name: str) -> Catalog:
        catalog = self.service.require_catalog()
        catalog.check_name(name)
        return catalog


def _check_architecture(model_bin: bool, preset: str | None, overrides: Any) -> None:
    """The loader's rule (``architecture_problem``), checked before the file is read, worded for HTTP."""
    problem = architecture_problem(model_bin, preset=preset, overrides=overrides)
    if problem == "extra":
        raise InvalidField(
            "preset", "preset: a model.bin carries its own architecture; give no preset or overrides", preset
        )
    if problem == "missing":
        raise InvalidField(
            "preset",
            "preset: not a model.bin, so read as a challenge .ptz, which carries no "
            "architecture: name a preset (e.g. pg-2026-04-09) and the overrides from its "
            "training log",
            preset,
        )
    if overrides is not None and not isinstance(overrides, dict):
        raise InvalidField("overrides", "overrides: must be an object of architecture keys", overrides)


def _write(src: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _place(quarantined: Path, path: Path, meta: dict[str, Any] | None) -> None:
    """Sidecar first, then the file by rename: a ``.ptz`` in the upload folder always has its sidecar."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if meta is None:
        sidecar.unlink(missing_ok=True)
    else:
        partial = sidecar.with_name(f".{sidecar.name}.partial")
        partial.write_text(json.dumps(meta))
        os.replace(partial, sidecar)
    os.replace(quarantined, path)
