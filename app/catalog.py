"""What the service serves: checkpoints and datasets found in the configured folders, and path safety.

Checkpoints: every ``*.bin`` in model.bin format (sniffed by its magic; token shards are skipped) and
every challenge ``*.ptz`` with a sidecar ``NAME.ptz.json`` = ``{"preset": ..., "overrides": {...},
"tokenizer": "path"}`` (paths relative to the sidecar). A file called ``model.bin`` is named after its
folder (``runs/abc/model.bin`` is ``abc``), any other after its file name without the suffix.

Datasets: every folder holding ``fineweb_val_*.bin`` shards, named after the folder; CaseOps byte sidecars
(``fineweb_val_bytes_*.bin``) are listed as such, never as shards. Its tokenizer is,
in order: the ``tokenizer`` of a ``dataset.json`` in the folder; the one ``*.model`` in the folder; or,
for a folder named ``..._sp{V}`` (the challenge's ``data/datasets/fineweb10B_sp8192``),
``tokenizers/fineweb_{V}_bpe.model`` beside the folder or one level up (the challenge's
``data/tokenizers/``).

Paths in requests must stay inside the configured folders: ``..`` is refused, and a path (after
following symlinks) outside every folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgttt.api.challenge import ARTIFACT_LIMIT_BYTES
from pgttt.errors import PgtttError

from . import engine_bridge as bridge
from .service_errors import InvalidField, NameTaken

log = logging.getLogger("pgttt.app.catalog")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: "$" would allow a final "\n"
MAX_PATH_CHARS = 4096
SIDECAR_SUFFIX = ".json"


class CatalogError(PgtttError):
    """A checkpoint or dataset that cannot be served; the message names the file and the reason."""


class PathError(CatalogError):
    """A path in a request that is malformed or leaves the configured folders; ``field`` names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.field: str = field


@dataclass
class CheckpointEntry:
    spec: bridge.CheckpointSpec
    info: bridge.CheckpointInfo

    def to_api(self, devices: list[str]) -> dict[str, Any]:
        info = self.info
        return {
            "name": self.spec.name,
            "kind": info.kind,
            "path": self.spec.path,
            "sha256": info.sha256,
            "size_bytes": info.size_bytes,
            "parameters": info.parameters,
            "config": info.config.to_dict(),
            "tokenizer": info.tokenizer,
            "fits_16mb": info.size_bytes <= ARTIFACT_LIMIT_BYTES,
            "devices": devices,
        }


@dataclass
class DatasetEntry:
    spec: bridge.DatasetSpec
    info: bridge.DatasetInfo

    def to_api(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "path": self.spec.path,
            "tokenizer": self.spec.tokenizer,
            "tokenizer_sha256": self.info.tokenizer_sha256,
            "val_files": self.info.val_files,
            "val_tokens": self.info.val_tokens,
            "val_byte_files": self.info.val_byte_files,
            "fingerprint": self.info.fingerprint,
        }


@dataclass
class Catalog:
    checkpoint_dirs: list[Path]
    data_dirs: list[Path]
    checkpoints: dict[str, CheckpointEntry] = field(default_factory=dict)
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add_checkpoint(self, spec: bridge.CheckpointSpec, inspect: Any = None) -> CheckpointEntry:
        """Fully read and validate a checkpoint (``inspect``: how; default in this process), then serve it
        (CatalogError if it cannot be). A ``spec.sha256`` (recorded at registration) must still match."""
        self.check_name(spec.name)
        info = (inspect or bridge.inspect_checkpoint)(spec)
        if spec.sha256 is not None and info.sha256 != spec.sha256:
            raise CatalogError(
                f"{spec.path}: changed since it was registered (sha256 {info.sha256[:12]}, recorded "
                f"{spec.sha256[:12]}): a damaged or replaced file; register it again if intended"
            )
        entry = CheckpointEntry(spec, info)
        self.checkpoints[spec.name] = entry
        return entry

    def check_name(self, name: str) -> None:
        """A new checkpoint's name, found at start or given in a request: well formed and not served yet."""
        if not NAME_RE.fullmatch(name):
            raise InvalidField(
                "name", "name: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", name
            )
        if name in self.checkpoints:
            raise NameTaken(name, self.checkpoints[name].spec.path)

    def specs(self) -> list[bridge.CheckpointSpec]:
        return [entry.spec for entry in self.checkpoints.values()]

    def _problem(self, message: str) -> None:
        log.warning("%s", message)
        self.problems.append(message)

    # ---- discovery ------------------------------------------------------------------------
    def discover(self, registered: list[bridge.CheckpointSpec] = ()) -> None:
        """Find and validate everything under the folders, then the checkpoints registered over HTTP. A file
        that fails, however it fails, is skipped and listed under ``problems``: one bad file never stops
        the server from serving the rest."""
        for root in self.data_dirs:
            for folder in _walk_dirs(root):
                if any(not bridge.is_sidecar(p) for p in folder.glob(bridge.VAL_PATTERN)):
                    try:
                        self._add_dataset(folder)
                    except Exception as exc:  # noqa: BLE001 - see above
                        self._problem(f"dataset {folder} skipped: {_describe(exc)}")
        for spec in [*self._found_checkpoints(), *registered]:
            try:
                self.add_checkpoint(spec)
            except Exception as exc:  # noqa: BLE001 - see above
                self._problem(f"checkpoint {spec.path} skipped: {_describe(exc)}")

    def _add_dataset(self, folder: Path) -> None:
        name = folder.name
        if name in self.datasets:
            raise CatalogError(f"the name {name!r} is taken by {self.datasets[name].spec.path}")
        spec = bridge.DatasetSpec(name=name, path=str(folder), tokenizer=str(_dataset_tokenizer(folder)))
        self.datasets[name] = DatasetEntry(spec, bridge.inspect_dataset(spec))

    def _found_checkpoints(self) -> list[bridge.CheckpointSpec]:
        found = []
        for root in self.checkpoint_dirs:
            for folder in _walk_dirs(root):
                for path in sorted(folder.iterdir()):
                    if not path.is_file() or not _inside(path.resolve(), [root]):
                        continue
                    if path.suffix == ".bin" and bridge.is_model_bin(path):
                        name = folder.name if path.name == "model.bin" else path.stem
                        found.append(bridge.CheckpointSpec(name=name, path=str(path)))
                    elif path.suffix == ".ptz":
                        try:
                            found.append(ptz_spec(path))
                        except Exception as exc:  # noqa: BLE001 - as in discover()
                            self._problem(f"checkpoint {path} skipped: {_describe(exc)}")
        return found

    # ---- request paths --------------------------------------------------------------------
    def checkpoint_path(self, raw: str, extra_roots: list[Path] = ()) -> Path:
        """A request's checkpoint path: relative to a checkpoint dir (first that has it), or absolute inside one."""
        return safe_path(raw, [*self.checkpoint_dirs, *extra_roots], "path")


def safe_path(raw: str, roots: list[Path], field_name: str) -> Path:
    """``raw`` as an existing file inside one of ``roots``, symlinks followed; PathError otherwise."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathError(field_name, "must be a non-empty path")
    if len(raw) > MAX_PATH_CHARS:
        raise PathError(field_name, f"{len(raw)} characters: a path has at most {MAX_PATH_CHARS}")
    if "\0" in raw:
        raise PathError(field_name, "contains a NUL byte")
    try:
        os.fsencode(raw)
    except UnicodeEncodeError:
        raise PathError(field_name, f"{raw!r} cannot be a file name here (not encodable)") from None
    try:
        return _safe_path(raw, roots, field_name)
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise PathError(field_name, f"{raw!r}: {exc.strerror or exc}") from None


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, PgtttError) else f"{type(exc).__name__}: {exc}"


def _safe_path(raw: str, roots: list[Path], field_name: str) -> Path:
    candidate = Path(raw)
    if ".." in candidate.parts:
        raise PathError(field_name, f"{raw!r} contains '..'; give a path inside a configured folder")
    options = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
    for option in options:
        resolved = option.resolve()
        if not _inside(resolved, roots):
            if candidate.is_absolute() or option.is_symlink() or option.exists():
                raise PathError(field_name, f"{raw!r} is outside the configured folders ({_listing(roots)})")
            continue
        if resolved.is_file():
            return resolved
    raise PathError(field_name, f"{raw!r} is not a file in the configured folders ({_listing(roots)})")


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root.resolve()) for root in roots)


def _listing(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def _walk_dirs(root: Path) -> list[Path]:
    """``root`` and every folder below it (hidden ones and symlinked folders skipped), sorted."""
    if not root.is_dir():
        return []
    out = []
    for folder, subdirs, _files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        out.append(Path(folder))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a JSON object")
    return data


def ptz_spec(path: Path) -> bridge.CheckpointSpec:
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        raise CatalogError(
            f"a .ptz carries no architecture: add {sidecar.name} with "
            '{"preset": "pg-2026-04-09", "overrides": {}, "tokenizer": "path/to/tokenizer.model"}'
        )
    meta = _read_json(sidecar)
    unknown = sorted(set(meta) - {"preset", "overrides", "tokenizer", "sha256"})
    if unknown:
        raise CatalogError(
            f"{sidecar}: unknown key(s) {', '.join(unknown)} (known: preset, overrides, tokenizer, sha256)"
        )
    sha256 = meta.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise CatalogError(f"{sidecar}: 'sha256' must be the file's sha256 in hex (64 characters)")
    if not isinstance(meta.get("preset"), str):
        raise CatalogError(f"{sidecar}: 'preset' must name a preset, e.g. \"pg-2026-04-09\"")
    overrides = meta.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise CatalogError(f"{sidecar}: 'overrides' must be an object of architecture keys")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, str):
            raise CatalogError(f"{sidecar}: 'tokenizer' must be a path")
        tokenizer = str((sidecar.parent / tokenizer).resolve())
    name = path.name[: -len(".ptz")]
    return bridge.CheckpointSpec(
        name=name, path=str(path), preset=meta["preset"], overrides=overrides, tokenizer=tokenizer, sha256=sha256
    )


def _dataset_tokenizer(folder: Path) -> Path:
    manifest = folder / "dataset.json"
    if manifest.is_file():
        meta = _read_json(manifest)
        if not isinstance(meta.get("tokenizer"), str):
            raise CatalogError(f"{manifest}: 'tokenizer' must be the path of a SentencePiece .model")
        path = (folder / meta["tokenizer"]).resolve()
        if not path.is_file():
            raise CatalogError(f"{manifest}: tokenizer {path} does not exist")
        return path
    models = sorted(folder.glob("*.model"))
    if len(models) == 1:
        return models[0].resolve()
    if len(models) > 1:
        raise CatalogError(f"{len(models)} tokenizers ({', '.join(m.name for m in models)}): name one in dataset.json")
    match = re.search(r"_sp(\d+)$", folder.name)
    if match:
        wanted = f"fineweb_{match.group(1)}_bpe.model"
        for base in (folder.parent, folder.parent.parent):
            path = base / "tokenizers" / wanted
            if path.is_file():
                return path.resolve()
    raise CatalogError(
        'no tokenizer: put its .model in the folder, name it in dataset.json ({"tokenizer": "path"}), '
        "or use the challenge layout data/datasets/NAME_sp{V}/ beside data/tokenizers/fineweb_{V}_bpe.model"
    )
