"""Versioned, digest-verified store of Keras models, their preprocessing, data splits and status.

Layout of a store root::

    <root>/
      registry.json            status of every version and the decision history
      .registry.lock           flock held around every registry read-modify-write
      .cleanup.lock            shared by writers while they build, exclusive for clean_leftovers
      <version>/
        model.keras            keras ``model.save`` (zip: config.json, metadata.json, weights)
        preprocessing.json     preprocessing parameters as plain JSON numbers (no pickle)
        splits.npz             ``<split>__<array>`` arrays, written and read without pickle
        metadata.json          caller's metadata + created_at, library versions, version id
        manifest.json          sha256 of every other file, plus a digest of itself

Decisions written down here:

* A version becomes visible only by one ``os.rename`` of a fully written, fsynced temporary
  folder (``.tmp-*``), so a reader in another process sees a version whole or not at all.
  The registry is replaced the same way with ``os.replace``. Readers take no lock.
* The manifest carries ``manifest_sha256``, a digest of its own canonical body, and must be
  byte-identical to its canonical form: a changed byte anywhere in any file of a version is
  detected. The sha256 of ``manifest.json`` is the version's *artifact digest*.
* Loading reads each file's bytes once, verifies them and then uses those same bytes (the
  model is deserialized from a private copy), so a file swapped after verification is not used.
* Before deserializing, the ``.keras`` archive's ``config.json`` is inspected: every layer
  must be a built-in Keras class from a small allow-list, and a ``Lambda`` anywhere is
  refused. The load itself uses ``safe_mode=True`` and ``compile=False``.
* A new version is registered as ``challenger``. ``set_status`` never makes a champion:
  only ``promote`` and ``rollback`` do, so there is at most one champion.
* ``rollback`` walks the champion succession recorded in the history like a stack: it
  restores the champion before the current one, skipping versions since rejected or gone;
  rolling back twice from C (after A, B, C were promoted) gives B, then A.
* Keras is imported lazily: importing this module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import platform
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

from audiobooks_scoring.files import fsync_directory, write_atomically

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
SPLITS_FILE = "splits.npz"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
REGISTRY_FILE = "registry.json"
ARTIFACT_FILES: tuple[str, ...] = (MODEL_FILE, PREPROCESSING_FILE, SPLITS_FILE, METADATA_FILE)

TEMP_PREFIX = ".tmp-"
REGISTRY_LOCK_FILE = ".registry.lock"
CLEANUP_LOCK_FILE = ".cleanup.lock"

STATUS_CHAMPION = "champion"
STATUS_CHALLENGER = "challenger"
STATUS_REJECTED = "rejected"
STATUS_RETIRED = "retired"
STATUSES: tuple[str, ...] = (STATUS_CHAMPION, STATUS_CHALLENGER, STATUS_REJECTED, STATUS_RETIRED)

ALLOWED_LAYER_CLASSES: frozenset[str] = frozenset(
    {
        "InputLayer",
        "Dense",
        "Dropout",
        "BatchNormalization",
        "Normalization",
        "Activation",
        "Sequential",
        "Functional",
    }
)
FORBIDDEN_CLASSES: frozenset[str] = frozenset(
    {"Lambda", "__lambda__", "TFOpLambda", "SlicingOpLambda"}
)
LEGACY_MODEL_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".pb", ".pkl", ".pickle", ".joblib")
KERAS_ARCHIVE_ENTRIES: frozenset[str] = frozenset(
    {"config.json", "metadata.json", "model.weights.h5"}
)
MAX_ARCHIVE_CONFIG_BYTES = 16 * 1024 * 1024

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ARRAY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*$")
SPLIT_SEPARATOR = "__"
RESERVED_VERSIONS: frozenset[str] = frozenset({REGISTRY_FILE})
RESERVED_METADATA_KEYS: frozenset[str] = frozenset({"version", "created_at", "library_versions"})
MANIFEST_FORMAT = 1
REGISTRY_FORMAT = 1
_HASH_CHUNK_BYTES = 1024 * 1024
# Recent numpy lets savez refuse pickling itself; object arrays are refused before that anyway.
_SAVEZ_NO_PICKLE: dict[str, bool] = (
    {"allow_pickle": False} if "allow_pickle" in inspect.signature(np.savez).parameters else {}
)


class ModelStoreError(Exception):
    """Base error of the model store; messages name the version and the file."""


class ModelIntegrityError(ModelStoreError):
    """A stored artifact does not match its manifest (changed, missing or unlisted file)."""


class UnsafeModelError(ModelStoreError):
    """A stored model uses a format or a layer class that is not allowed to be deserialized."""


@dataclass(frozen=True)
class StoredModel:
    """A verified, loaded model version with its preprocessing parameters and metadata."""

    version: str
    model: keras.Model
    preprocessing_json: str
    metadata: dict[str, Any]
    path: Path
    artifact_digest: str = ""


@dataclass(frozen=True)
class VersionInfo:
    """One stored version as listed: status (None if never registered), creation time, metrics."""

    version: str
    status: str | None
    created_at: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact_digest: str = ""


def validate_version_id(version: object) -> str:
    """Return the version id unchanged if it is a safe folder name, else raise ModelStoreError."""
    if (
        not isinstance(version, str)
        or not VERSION_PATTERN.fullmatch(version)
        or ".." in version
        or version in RESERVED_VERSIONS
    ):
        raise ModelStoreError(
            f"invalid model version id {version!r}: it must match "
            f"{VERSION_PATTERN.pattern}, contain no '..' and not be one of "
            f"{sorted(RESERVED_VERSIONS)}"
        )
    return version


def new_version_id(now: datetime | None = None) -> str:
    """Return a fresh version id ``v<UTC yyyymmddTHHMMSS>-<6 hex>``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"v{moment:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def inspect_keras_archive(archive: bytes, version: str = "?") -> list[str]:
    """Return the layer classes of a ``.keras`` archive; raise UnsafeModelError if any is unsafe."""
    where = f"model version {version!r}: {MODEL_FILE}"
    if not zipfile.is_zipfile(io.BytesIO(archive)):
        raise UnsafeModelError(f"{where} is not a Keras v3 zip archive")
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
            entries = {info.filename: info for info in bundle.infolist()}
            unexpected = sorted(set(entries) - KERAS_ARCHIVE_ENTRIES)
            if unexpected:
                raise UnsafeModelError(f"{where} holds unexpected archive entries {unexpected}")
            config_info = entries.get("config.json")
            if config_info is None:
                raise UnsafeModelError(f"{where} has no config.json")
            if config_info.file_size > MAX_ARCHIVE_CONFIG_BYTES:
                raise UnsafeModelError(
                    f"{where}: config.json is {config_info.file_size} bytes, "
                    f"above the limit of {MAX_ARCHIVE_CONFIG_BYTES}"
                )
            config = json.loads(bundle.read(config_info).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeModelError(f"{where}: config.json cannot be read: {exc}") from exc
    layer_classes: list[str] = []
    _check_config_node(config, "config", is_layer=True, where=where, found=layer_classes)
    return layer_classes


def _check_config_node(
    node: object, path: str, *, is_layer: bool, where: str, found: list[str]
) -> None:
    """Walk a Keras config tree, refusing Lambda anywhere and layers outside the allow-list."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            _check_config_node(
                item, f"{path}[{index}]", is_layer=is_layer, where=where, found=found
            )
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    if is_layer and not isinstance(class_name, str):
        raise UnsafeModelError(f"{where}: {path} is a layer without a class_name")
    if isinstance(class_name, str):
        if class_name in FORBIDDEN_CLASSES:
            raise UnsafeModelError(
                f"{where}: class {class_name!r} at {path} is refused (it can run arbitrary code)"
            )
        module = node.get("module")
        if module is not None and not (
            isinstance(module, str) and (module == "keras" or module.startswith("keras."))
        ):
            raise UnsafeModelError(
                f"{where}: class {class_name!r} at {path} comes from module {module!r}, "
                "not from Keras"
            )
        if is_layer:
            registered = node.get("registered_name")
            if class_name not in ALLOWED_LAYER_CLASSES or registered not in (None, class_name):
                raise UnsafeModelError(
                    f"{where}: layer class {class_name!r} at {path} is not allowed "
                    f"(allowed: {', '.join(sorted(ALLOWED_LAYER_CLASSES))})"
                )
            found.append(class_name)
    for key, value in node.items():
        _check_config_node(
            value, f"{path}.{key}", is_layer=(key == "layers"), where=where, found=found
        )


def _utc_now_iso() -> str:
    """Return the current UTC time as an ISO 8601 string with offset."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def _canonical_json(document: object) -> bytes:
    """Return the one canonical serialization of a JSON document used for digests."""
    return (json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _write_file_synced(path: Path, data: bytes) -> None:
    """Create a new file with the given bytes and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    """Fsync an existing file written by someone else (e.g. keras model.save)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_regular_file(path: Path, version: str) -> bytes:
    """Read a regular file without following symlinks, naming version and file on failure."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelIntegrityError(
                f"model version {version!r}: {path.name} is a symlink, not a regular file"
            ) from exc
        raise ModelIntegrityError(
            f"model version {version!r}: {path.name} cannot be read: {exc.strerror}"
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _hash_regular_file(path: Path, version: str) -> str:
    """Return the sha256 of a regular file read in chunks, without following symlinks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ModelIntegrityError(
            f"model version {version!r}: {path.name} cannot be read: {exc.strerror}"
        ) from exc
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build_manifest(folder: Path, version: str) -> bytes:
    """Return the canonical manifest bytes listing the sha256 and size of every artifact file."""
    files = {
        name: {
            "sha256": _hash_regular_file(folder / name, version),
            "bytes": (folder / name).stat().st_size,
        }
        for name in ARTIFACT_FILES
    }
    body = {"format": MANIFEST_FORMAT, "version": version, "model_file": MODEL_FILE, "files": files}
    return _canonical_json({**body, "manifest_sha256": _sha256_bytes(_canonical_json(body))})


def _write_manifest(folder: Path, version: str) -> None:
    """Write (or rewrite) a version folder's manifest.json from the files present."""
    manifest_path = folder / MANIFEST_FILE
    manifest_path.unlink(missing_ok=True)
    _write_file_synced(manifest_path, _build_manifest(folder, version))


def _parse_manifest(raw: bytes, version: str) -> dict[str, Any]:
    """Parse manifest bytes, checking its self-digest and canonical form; return the body."""
    where = f"model version {version!r}: {MANIFEST_FILE}"
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("manifest_sha256"), str):
        raise ModelIntegrityError(f"{where} has no manifest_sha256")
    body = {key: value for key, value in document.items() if key != "manifest_sha256"}
    try:
        canonical_body = _canonical_json(body)
        canonical_document = _canonical_json(document)
    except ValueError as exc:
        raise ModelIntegrityError(f"{where} holds non-standard JSON: {exc}") from exc
    if _sha256_bytes(canonical_body) != document["manifest_sha256"] or raw != canonical_document:
        raise ModelIntegrityError(f"{where} was modified: its own digest does not match")
    if body.get("format") != MANIFEST_FORMAT:
        raise ModelIntegrityError(f"{where} has unknown format {body.get('format')!r}")
    if body.get("version") != version:
        raise ModelIntegrityError(
            f"{where} belongs to version {body.get('version')!r}, not to this folder"
        )
    files = body.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in files.values()
    ):
        raise ModelIntegrityError(f"{where} has a malformed files section")
    return body


def _library_versions() -> dict[str, str | None]:
    """Return installed versions of keras, tensorflow, numpy and python, without importing them."""

    def installed(*distributions: str) -> str | None:
        for name in distributions:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(name)
        return None

    return {
        "keras": installed("keras"),
        "tensorflow": installed("tensorflow", "tensorflow-cpu"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _flatten_splits(
    splits: Mapping[str, Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return ``{split__array: ndarray}`` after refusing bad names and object arrays."""
    if not isinstance(splits, Mapping):
        raise ModelStoreError(f"splits must be a mapping of split name to arrays, got {splits!r}")
    flat: dict[str, np.ndarray] = {}
    for split_name, arrays in splits.items():
        if not isinstance(split_name, str) or not ARRAY_NAME_PATTERN.fullmatch(split_name):
            raise ModelStoreError(
                f"split name {split_name!r} must match {ARRAY_NAME_PATTERN.pattern}"
            )
        if not isinstance(arrays, Mapping):
            raise ModelStoreError(f"split {split_name!r} must map array names to arrays")
        for array_name, values in arrays.items():
            if not isinstance(array_name, str) or not ARRAY_NAME_PATTERN.fullmatch(array_name):
                raise ModelStoreError(
                    f"array name {array_name!r} in split {split_name!r} must match "
                    f"{ARRAY_NAME_PATTERN.pattern}"
                )
            array = np.asarray(values)
            if array.dtype.hasobject:
                raise ModelStoreError(
                    f"array {split_name}{SPLIT_SEPARATOR}{array_name} has dtype object; "
                    "only plain numeric, boolean or fixed-width string arrays are stored"
                )
            flat[f"{split_name}{SPLIT_SEPARATOR}{array_name}"] = array
    return flat


def _unflatten_splits(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Return ``{split: {array: ndarray}}`` from ``split__array`` keys."""
    splits: dict[str, dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        split_name, _, array_name = key.partition(SPLIT_SEPARATOR)
        splits.setdefault(split_name, {})[array_name] = array
    return splits


class ModelStore:
    """A folder of immutable model versions plus a registry of their champion/challenger status."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self.root)!r})"

    # ----------------------------------------------------------------- writing versions

    def save_version(
        self,
        model: keras.Model,
        preprocessing_json: str,
        splits: dict[str, dict[str, np.ndarray]],
        metadata: dict[str, Any],
        version: str | None = None,
    ) -> str:
        """Write a new immutable version atomically, register it as challenger; return its id."""
        version = validate_version_id(new_version_id() if version is None else version)
        if not isinstance(preprocessing_json, str):
            raise ModelStoreError(f"model version {version!r}: preprocessing_json must be a str")
        try:
            json.loads(preprocessing_json)
        except json.JSONDecodeError as exc:
            raise ModelStoreError(
                f"model version {version!r}: {PREPROCESSING_FILE} is not valid JSON: {exc}"
            ) from exc
        flat_splits = _flatten_splits(splits)
        metadata_bytes = self._metadata_bytes(metadata, version)
        if (self.root / version).exists():
            raise ModelStoreError(f"model version {version!r} already exists in {self.root}")

        self.root.mkdir(parents=True, exist_ok=True)
        with self._cleanup_guard():
            temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{version}-", dir=self.root))
            temp.chmod(0o755)  # mkdtemp makes 0700; readers may run as another user
            try:
                self._write_artifacts(
                    temp, model, preprocessing_json, flat_splits, metadata_bytes, version
                )
                with self._registry_lock():
                    self._publish_folder(temp, version)
                    registry = self._read_registry()
                    self._record_status(registry, version, STATUS_CHALLENGER, "saved", "save")
                    self._write_registry(registry)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
        logger.info("saved model version %s in %s", version, self.root)
        return version

    def _metadata_bytes(self, metadata: Mapping[str, Any], version: str) -> bytes:
        """Return metadata.json bytes: caller's metadata plus version, created_at, libraries."""
        if not isinstance(metadata, Mapping):
            raise ModelStoreError(f"model version {version!r}: metadata must be a mapping")
        clashes = sorted(RESERVED_METADATA_KEYS & set(metadata))
        if clashes:
            raise ModelStoreError(
                f"model version {version!r}: metadata keys {clashes} are set by the store"
            )
        document = {
            **metadata,
            "version": version,
            "created_at": _utc_now_iso(),
            "library_versions": _library_versions(),
        }
        try:
            return _canonical_json(document)
        except (TypeError, ValueError) as exc:
            raise ModelStoreError(
                f"model version {version!r}: {METADATA_FILE} must be plain JSON "
                f"(finite numbers, strings, lists, dicts): {exc}"
            ) from exc

    def _write_artifacts(
        self,
        folder: Path,
        model: keras.Model,
        preprocessing_json: str,
        flat_splits: dict[str, np.ndarray],
        metadata_bytes: bytes,
        version: str,
    ) -> None:
        """Write every artifact of a version into a (temporary) folder and fsync it."""
        model_path = folder / MODEL_FILE
        model.save(model_path)
        _fsync_file(model_path)
        inspect_keras_archive(model_path.read_bytes(), version)
        _write_file_synced(folder / PREPROCESSING_FILE, preprocessing_json.encode("utf-8"))
        buffer = io.BytesIO()
        np.savez(buffer, **_SAVEZ_NO_PICKLE, **flat_splits)  # type: ignore[arg-type]
        _write_file_synced(folder / SPLITS_FILE, buffer.getvalue())
        _write_file_synced(folder / METADATA_FILE, metadata_bytes)
        _write_manifest(folder, version)
        fsync_directory(folder)

    def _publish_folder(self, temp: Path, version: str) -> None:
        """Rename a complete temporary folder into place as the version, atomically."""
        final = self.root / version
        if final.exists():
            raise ModelStoreError(f"model version {version!r} already exists in {self.root}")
        try:
            os.rename(temp, final)
        except OSError as exc:
            raise ModelStoreError(
                f"model version {version!r} could not be published: {exc.strerror}"
            ) from exc
        fsync_directory(self.root)

    def clean_leftovers(self) -> list[str]:
        """Remove ``.tmp-*`` leftovers of interrupted writes; return the names removed."""
        if not self.root.is_dir():
            return []
        removed: list[str] = []
        with self._lock(CLEANUP_LOCK_FILE, fcntl.LOCK_EX):
            for entry in sorted(self.root.iterdir()):
                if not entry.name.startswith(TEMP_PREFIX):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry.name)
        if removed:
            logger.warning("removed %d leftover temporary entries: %s", len(removed), removed)
        return removed

    # ----------------------------------------------------------------- reading versions

    def version_path(self, version: str) -> Path:
        """Return the folder of a version after validating its id."""
        return self.root / validate_version_id(version)

    def verify_version(self, version: str) -> str:
        """Verify every file and the model config of a version; return its artifact digest."""
        digest, contents = self._verified_contents(version, keep=(MODEL_FILE,))
        inspect_keras_archive(contents[MODEL_FILE], version)
        return digest

    def load_version(self, version: str) -> StoredModel:
        """Verify a version's digests and model config, then load it in Keras safe mode."""
        digest, contents = self._verified_contents(
            version, keep=(MODEL_FILE, PREPROCESSING_FILE, METADATA_FILE)
        )
        inspect_keras_archive(contents[MODEL_FILE], version)
        metadata = self._parse_metadata(contents[METADATA_FILE], version)
        try:
            preprocessing_json = contents[PREPROCESSING_FILE].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelIntegrityError(
                f"model version {version!r}: {PREPROCESSING_FILE} is not UTF-8"
            ) from exc
        model = self._deserialize_model(contents[MODEL_FILE], version)
        logger.info("loaded model version %s from %s", version, self.root)
        return StoredModel(
            version=version,
            model=model,
            preprocessing_json=preprocessing_json,
            metadata=metadata,
            path=self.root / version,
            artifact_digest=digest,
        )

    def load_splits(self, version: str) -> dict[str, dict[str, np.ndarray]]:
        """Return a version's digest-verified data splits as ``{split: {array: ndarray}}``."""
        _, contents = self._verified_contents(version, keep=(SPLITS_FILE,))
        try:
            with np.load(io.BytesIO(contents[SPLITS_FILE]), allow_pickle=False) as archive:
                flat = {key: archive[key] for key in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise ModelIntegrityError(
                f"model version {version!r}: {SPLITS_FILE} cannot be read: {exc}"
            ) from exc
        return _unflatten_splits(flat)

    def read_metadata(self, version: str) -> dict[str, Any]:
        """Return a version's digest-verified metadata."""
        _, contents = self._verified_contents(version, keep=(METADATA_FILE,))
        return self._parse_metadata(contents[METADATA_FILE], version)

    def _verified_contents(
        self, version: str, keep: tuple[str, ...]
    ) -> tuple[str, dict[str, bytes]]:
        """Verify a version folder against its manifest; return its digest and the kept files."""
        folder = self.version_path(version)
        if not folder.exists() and not folder.is_symlink():
            raise ModelStoreError(f"model version {version!r} does not exist in {self.root}")
        if folder.is_symlink() or not folder.is_dir():
            raise ModelIntegrityError(f"model version {version!r}: {folder} is not a real folder")

        present = sorted(entry.name for entry in folder.iterdir())
        if MANIFEST_FILE not in present:
            raise ModelIntegrityError(f"model version {version!r}: {MANIFEST_FILE} is missing")
        manifest_raw = _read_regular_file(folder / MANIFEST_FILE, version)
        manifest = _parse_manifest(manifest_raw, version)
        listed: dict[str, dict[str, Any]] = manifest["files"]

        model_file = manifest.get("model_file")
        legacy = [
            name
            for name in sorted({*present, *listed, str(model_file)})
            if name.lower().endswith(LEGACY_MODEL_SUFFIXES)
        ]
        if legacy or model_file != MODEL_FILE:
            named = legacy[0] if legacy else model_file
            raise UnsafeModelError(
                f"model version {version!r}: model file {named!r} is refused; "
                f"only the Keras v3 format {MODEL_FILE!r} is loaded"
            )
        unlisted = [name for name in present if name != MANIFEST_FILE and name not in listed]
        if unlisted:
            raise ModelIntegrityError(
                f"model version {version!r}: file {unlisted[0]!r} is not listed in "
                f"{MANIFEST_FILE} (unlisted: {unlisted})"
            )
        if set(listed) != set(ARTIFACT_FILES):
            raise ModelIntegrityError(
                f"model version {version!r}: {MANIFEST_FILE} lists {sorted(listed)}, "
                f"expected {sorted(ARTIFACT_FILES)}"
            )
        missing = [name for name in ARTIFACT_FILES if name not in present]
        if missing:
            raise ModelIntegrityError(f"model version {version!r}: file {missing[0]!r} is missing")

        contents: dict[str, bytes] = {}
        for name in ARTIFACT_FILES:
            path = folder / name
            if name in keep:
                data = _read_regular_file(path, version)
                actual = _sha256_bytes(data)
                contents[name] = data
            else:
                actual = _hash_regular_file(path, version)
            if actual != listed[name]["sha256"]:
                raise ModelIntegrityError(
                    f"model version {version!r}: {name} does not match its sha256 in "
                    f"{MANIFEST_FILE} (expected {listed[name]['sha256']}, found {actual})"
                )
        return _sha256_bytes(manifest_raw), contents

    @staticmethod
    def _parse_metadata(raw: bytes, version: str) -> dict[str, Any]:
        """Parse metadata.json bytes into a dict."""
        try:
            metadata = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelIntegrityError(
                f"model version {version!r}: {METADATA_FILE} is not valid JSON: {exc}"
            ) from exc
        if not isinstance(metadata, dict):
            raise ModelIntegrityError(
                f"model version {version!r}: {METADATA_FILE} is not a JSON object"
            )
        return metadata

    @staticmethod
    def _deserialize_model(archive: bytes, version: str) -> keras.Model:
        """Load verified archive bytes with Keras safe mode from a private copy."""
        import keras

        with tempfile.TemporaryDirectory(prefix="audiobooks-model-") as private:
            path = Path(private) / MODEL_FILE
            path.write_bytes(archive)
            try:
                return keras.saving.load_model(path, safe_mode=True, compile=False)
            except ValueError as exc:
                error = UnsafeModelError if "safe_mode" in str(exc) else ModelStoreError
                raise error(
                    f"model version {version!r}: {MODEL_FILE} could not be loaded: {exc}"
                ) from exc

    # ----------------------------------------------------------------- listing

    def list_versions(self) -> list[VersionInfo]:
        """Return every complete version, newest first, with status, created_at and metrics."""
        if not self.root.is_dir():
            return []
        statuses = {
            name: entry["status"] for name, entry in self._read_registry()["versions"].items()
        }
        infos: list[VersionInfo] = []
        for entry in self.root.iterdir():
            if not VERSION_PATTERN.fullmatch(entry.name) or ".." in entry.name:
                continue
            if entry.is_symlink() or not (entry / MANIFEST_FILE).is_file():
                continue
            infos.append(self._describe(entry, statuses.get(entry.name)))
        infos.sort(key=lambda info: (info.created_at, info.version), reverse=True)
        return infos

    def _describe(self, folder: Path, status: str | None) -> VersionInfo:
        """Return the listing entry of one version folder (without verifying digests)."""
        created_at = ""
        metrics: dict[str, Any] = {}
        digest = ""
        try:
            digest = _sha256_bytes((folder / MANIFEST_FILE).read_bytes())
            metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
            created_at = str(metadata.get("created_at", ""))
            raw_metrics = metadata.get("metrics", {})
            metrics = dict(raw_metrics) if isinstance(raw_metrics, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            logger.warning("model version %s has unreadable metadata: %s", folder.name, exc)
        return VersionInfo(
            version=folder.name,
            status=status,
            created_at=created_at,
            metrics=metrics,
            artifact_digest=digest,
        )

    # ----------------------------------------------------------------- registry

    def champion(self) -> str | None:
        """Return the current champion version, or None if there is none."""
        return self._champion_of(self._read_registry())

    def status_of(self, version: str) -> str | None:
        """Return the registered status of a version, or None if it was never registered."""
        entry = self._read_registry()["versions"].get(validate_version_id(version))
        return None if entry is None else entry["status"]

    def history(self) -> list[dict[str, Any]]:
        """Return the decision history, oldest first."""
        return self._read_registry()["history"]

    def set_status(self, version: str, status: str, reason: str) -> None:
        """Set a version to challenger, rejected or retired (champions only via promote)."""
        validate_version_id(version)
        if status == STATUS_CHAMPION:
            raise ModelStoreError(
                f"model version {version!r}: use promote() to make a champion, not set_status()"
            )
        if status not in STATUSES:
            raise ModelStoreError(f"unknown status {status!r}; expected one of {STATUSES}")
        self._require_reason(reason)
        self._require_exists(version)
        with self._cleanup_guard(), self._registry_lock():
            registry = self._read_registry()
            if self._status_in(registry, version) == status:
                logger.info("model version %s is already %s", version, status)
                return
            self._record_status(registry, version, status, reason, "set_status")
            self._write_registry(registry)
        logger.info("model version %s set to %s: %s", version, status, reason)

    def record_decision(self, version: str, reason: str) -> None:
        """Record a champion/challenger decision on a version without changing its status."""
        validate_version_id(version)
        self._require_reason(reason)
        self._require_exists(version)
        with self._cleanup_guard(), self._registry_lock():
            registry = self._read_registry()
            status = self._status_in(registry, version) or STATUS_CHALLENGER
            self._record_status(registry, version, status, reason, "decision")
            self._write_registry(registry)
        logger.info("model version %s stays %s: %s", version, status, reason)

    def promote(self, version: str, reason: str) -> None:
        """Make a verified version the champion; the previous champion becomes retired."""
        validate_version_id(version)
        self._require_reason(reason)
        self.verify_version(version)
        with self._cleanup_guard(), self._registry_lock():
            registry = self._read_registry()
            current = self._champion_of(registry)
            if current == version:
                raise ModelStoreError(f"model version {version!r} is already the champion")
            if current is not None:
                self._record_status(registry, current, STATUS_RETIRED, reason, "promote")
            self._record_status(registry, version, STATUS_CHAMPION, reason, "promote")
            self._write_registry(registry)
        logger.info("promoted model version %s (was %s): %s", version, current, reason)

    def rollback(self, reason: str) -> str:
        """Restore the previous champion; the current one becomes retired. Return the version."""
        self._require_reason(reason)
        with self._cleanup_guard(), self._registry_lock():
            registry = self._read_registry()
            current = self._champion_of(registry)
            target = None
            for candidate in reversed(self._champion_succession(registry)):
                if candidate == current:
                    continue
                if self._status_in(registry, candidate) == STATUS_REJECTED:
                    continue
                if not (self.root / candidate / MANIFEST_FILE).is_file():
                    continue
                target = candidate
                break
            if target is None:
                raise ModelStoreError(
                    f"no previous champion to roll back to in {self.root} "
                    f"(current champion: {current!r})"
                )
            self.verify_version(target)
            if current is not None:
                self._record_status(registry, current, STATUS_RETIRED, reason, "rollback")
            self._record_status(registry, target, STATUS_CHAMPION, reason, "rollback")
            self._write_registry(registry)
        logger.warning("rolled back champion %s -> %s: %s", current, target, reason)
        return target

    @staticmethod
    def _champion_succession(registry: dict[str, Any]) -> list[str]:
        """Replay the history into the stack of champions still eligible, oldest first."""
        stack: list[str] = []
        for entry in registry["history"]:
            version = entry["version"]
            if entry["to_status"] == STATUS_CHAMPION:
                if entry.get("action") == "rollback" and version in stack:
                    while stack[-1] != version:
                        stack.pop()
                else:
                    stack.append(version)
            elif (
                entry["from_status"] == STATUS_CHAMPION
                and entry.get("action") == "set_status"
                and stack
                and stack[-1] == version
            ):
                stack.pop()
        return stack

    @staticmethod
    def _require_reason(reason: object) -> None:
        """Refuse a decision without a human-readable reason."""
        if not isinstance(reason, str) or not reason.strip():
            raise ModelStoreError("a non-empty reason is required for every status decision")

    def _require_exists(self, version: str) -> None:
        """Refuse a decision about a version that is not stored."""
        if not (self.root / version / MANIFEST_FILE).is_file():
            raise ModelStoreError(f"model version {version!r} does not exist in {self.root}")

    @staticmethod
    def _status_in(registry: dict[str, Any], version: str) -> str | None:
        """Return a version's status in a registry document."""
        entry = registry["versions"].get(version)
        return None if entry is None else entry["status"]

    def _champion_of(self, registry: dict[str, Any]) -> str | None:
        """Return the single champion of a registry document, or None."""
        champions = sorted(
            name
            for name, entry in registry["versions"].items()
            if entry["status"] == STATUS_CHAMPION
        )
        if len(champions) > 1:
            raise ModelStoreError(f"{self.root / REGISTRY_FILE} has several champions: {champions}")
        return champions[0] if champions else None

    @staticmethod
    def _record_status(
        registry: dict[str, Any], version: str, status: str, reason: str, action: str
    ) -> None:
        """Change a version's status in a registry document and append the decision."""
        now = _utc_now_iso()
        previous = registry["versions"].get(version, {}).get("status")
        registry["versions"][version] = {"status": status, "updated_at": now}
        registry["history"].append(
            {
                "timestamp": now,
                "version": version,
                "from_status": previous,
                "to_status": status,
                "reason": reason,
                "action": action,
            }
        )

    def _read_registry(self) -> dict[str, Any]:
        """Return the registry document (empty if none was written yet)."""
        path = self.root / REGISTRY_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {"format": REGISTRY_FORMAT, "versions": {}, "history": []}
        try:
            registry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelStoreError(f"{path} is not valid JSON: {exc}") from exc
        if (
            not isinstance(registry, dict)
            or not isinstance(registry.get("versions"), dict)
            or not isinstance(registry.get("history"), list)
            or any(
                not isinstance(entry, dict) or entry.get("status") not in STATUSES
                for entry in registry["versions"].values()
            )
        ):
            raise ModelStoreError(f"{path} is malformed")
        return registry

    def _write_registry(self, registry: dict[str, Any]) -> None:
        """Replace registry.json atomically (temp file, fsync, os.replace, fsync dir)."""
        write_atomically(
            self.root / REGISTRY_FILE, _canonical_json(registry), prefix=f"{TEMP_PREFIX}registry-"
        )

    # ----------------------------------------------------------------- locks

    @contextlib.contextmanager
    def _lock(self, name: str, mode: int) -> Iterator[None]:
        """Hold an flock on a lock file in the root for the duration of the block."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _registry_lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive lock around a registry read-modify-write."""
        return self._lock(REGISTRY_LOCK_FILE, fcntl.LOCK_EX)

    def _cleanup_guard(self) -> contextlib.AbstractContextManager[None]:
        """Shared lock held while temporary entries are built, so cleaning never removes them."""
        return self._lock(CLEANUP_LOCK_FILE, fcntl.LOCK_SH)


__all__ = [
    "ALLOWED_LAYER_CLASSES",
    "ModelIntegrityError",
    "ModelStore",
    "ModelStoreError",
    "StoredModel",
    "UnsafeModelError",
    "VersionInfo",
    "inspect_keras_archive",
    "new_version_id",
    "validate_version_id",
]
