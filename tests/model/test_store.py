"""Tests of the versioned model store: atomic writes, integrity, safe loading, champion registry."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.model import store as model_store
from audiobooks_scoring.model.store import (
    ModelIntegrityError,
    ModelStore,
    ModelStoreError,
    UnsafeModelError,
)

keras = pytest.importorskip("keras")

REPO_ROOT = Path(__file__).resolve().parents[2]
N_FEATURES = len(FEATURES)
VERSION_FILES = (
    "model.keras",
    "preprocessing.json",
    "splits.npz",
    "metadata.json",
    "manifest.json",
)
PREPROCESSING = json.dumps({"mean": [1.5] * N_FEATURES, "scale": [2.0] * N_FEATURES})


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    """A tiny Sequential: Input(10) -> Dense(4, relu) -> Dense(1, sigmoid)."""
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


@pytest.fixture(scope="module")
def lambda_model() -> Any:
    """A model holding a Python lambda, which must never be deserialized."""
    inputs = keras.Input((N_FEATURES,))
    doubled = keras.layers.Lambda(lambda tensor: tensor * 2.0)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(doubled))


@pytest.fixture()
def splits() -> dict[str, dict[str, np.ndarray]]:
    """Small train/validation/test splits of float features and int labels."""
    rng = np.random.default_rng(3)
    return {
        name: {
            "features": rng.normal(size=(rows, N_FEATURES)),
            "labels": rng.integers(0, 2, size=rows).astype(np.int8),
        }
        for name, rows in (("train", 8), ("validation", 4), ("test", 3))
    }


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    """An empty store under a fresh temporary folder."""
    return ModelStore(tmp_path / "store")


@pytest.fixture()
def saved(store: ModelStore, tiny_model: Any, splits: dict) -> str:
    """The id of one version of the tiny model saved in the store."""
    return store.save_version(
        tiny_model, PREPROCESSING, splits, {"metrics": {"auc": 0.81}}, version="v1"
    )


def rewrite_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest body and re-sign it the way the store does, so only ``change`` differs."""
    document = json.loads((folder / "manifest.json").read_text())
    document.pop("manifest_sha256")
    change(document)
    body = model_store._canonical_json(document)
    document["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    (folder / "manifest.json").write_bytes(model_store._canonical_json(document))


def rehash_file(folder: Path, name: str) -> Callable[[dict[str, Any]], None]:
    """Return a manifest change that records the current digest of one file."""

    def change(document: dict[str, Any]) -> None:
        data = (folder / name).read_bytes()
        document["files"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }

    return change


def edit_keras_config(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite model.keras with an edited config.json and re-sign the manifest to match."""
    path = folder / "model.keras"
    with zipfile.ZipFile(path) as original:
        entries = {name: original.read(name) for name in original.namelist()}
    config = json.loads(entries["config.json"])
    change(config)
    entries["config.json"] = json.dumps(config).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as edited:
        for name, data in entries.items():
            edited.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    rewrite_manifest(folder, rehash_file(folder, "model.keras"))


# ------------------------------------------------------------------------- environment


def test_installed_keras_is_at_least_3_14() -> None:
    major, minor = (int(part) for part in keras.__version__.split(".")[:2])
    assert (major, minor) >= (3, 14)


def test_importing_the_store_does_not_import_tensorflow_or_keras() -> None:
    code = (
        "import sys, audiobooks_scoring.model.store; "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------- round trip


def test_round_trip_gives_identical_predictions(
    store: ModelStore, tiny_model: Any, saved: str
) -> None:
    x = np.random.default_rng(0).normal(size=(64, N_FEATURES)).astype("float32")
    stored = store.load_version(saved)
    np.testing.assert_array_equal(
        np.asarray(stored.model(x, training=False)), np.asarray(tiny_model(x, training=False))
    )
    assert stored.version == saved
    assert stored.preprocessing_json == PREPROCESSING
    assert stored.path == store.root / saved
    manifest_digest = hashlib.sha256((store.root / saved / "manifest.json").read_bytes())
    assert stored.artifact_digest == manifest_digest.hexdigest() == store.verify_version(saved)


def functional_with_every_allowed_layer() -> Any:
    normalization = keras.layers.Normalization()
    normalization.adapt(np.random.default_rng(1).normal(size=(32, N_FEATURES)).astype("float32"))
    inputs = keras.Input((N_FEATURES,))
    hidden = keras.layers.Dense(6)(normalization(inputs))
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.Dropout(0.2)(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))


def sequential_nested_in_sequential() -> Any:
    return keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            keras.Sequential([keras.layers.Dense(3, activation="relu")]),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


@pytest.mark.parametrize(
    "build", [functional_with_every_allowed_layer, sequential_nested_in_sequential]
)
def test_models_made_of_allowed_layers_round_trip(
    store: ModelStore, splits: dict, build: Callable[[], Any]
) -> None:
    model = build()
    version = store.save_version(model, PREPROCESSING, splits, {}, version="v1")
    x = np.random.default_rng(5).normal(size=(16, N_FEATURES)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(store.load_version(version).model(x, training=False)),
        np.asarray(model(x, training=False)),
        rtol=1e-6,
    )
    assert (store.root / version).stat().st_mode & 0o777 == 0o755


def test_version_folder_holds_exactly_the_documented_files(store: ModelStore, saved: str) -> None:
    assert sorted(p.name for p in (store.root / saved).iterdir()) == sorted(VERSION_FILES)
    manifest = json.loads((store.root / saved / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (store.root / saved / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_metadata_keeps_caller_fields_and_adds_provenance(store: ModelStore, saved: str) -> None:
    metadata = store.read_metadata(saved)
    assert metadata["metrics"] == {"auc": 0.81}
    assert metadata["version"] == saved
    assert metadata["created_at"].endswith("+00:00")
    assert metadata["library_versions"]["keras"] == keras.__version__
    assert metadata["library_versions"]["numpy"] == np.__version__
    assert set(metadata["library_versions"]) == {"keras", "tensorflow", "numpy", "python"}


def test_splits_round_trip_with_names_and_dtypes(
    store: ModelStore, saved: str, splits: dict
) -> None:
    loaded = store.load_splits(saved)
    assert set(loaded) == {"train", "validation", "test"}
    for name, arrays in splits.items():
        assert set(loaded[name]) == {"features", "labels"}
        for array_name, array in arrays.items():
            assert loaded[name][array_name].dtype == array.dtype
            np.testing.assert_array_equal(loaded[name][array_name], array)
    with zipfile.ZipFile(store.root / saved / "splits.npz") as archive:
        assert "train__features.npy" in archive.namelist()


def test_default_version_id_is_timestamped(store: ModelStore, tiny_model: Any, splits) -> None:
    version = store.save_version(tiny_model, PREPROCESSING, splits, {})
    assert model_store.VERSION_PATTERN.fullmatch(version)
    assert len(version) == len("v20250101T000000-abcdef")
    assert version.startswith("v20") and version[9] == "T" and version[16] == "-"


@pytest.mark.parametrize(
    ("bad_splits", "message"),
    [
        ({"train": {"ids": np.array(["a", None], dtype=object)}}, "dtype object"),
        ({"tr__ain": {"features": np.zeros(2)}}, "split name"),
        ({"train": {"../x": np.zeros(2)}}, "array name"),
    ],
)
def test_bad_splits_are_refused_before_touching_disk(
    store: ModelStore, tiny_model: Any, bad_splits: dict, message: str
) -> None:
    with pytest.raises(ModelStoreError, match=message):
        store.save_version(tiny_model, PREPROCESSING, bad_splits, {}, version="v1")
    assert not store.root.exists()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"version": "other"}, "set by the store"),
        ({"metrics": {"auc": float("nan")}}, "plain JSON"),
        ({"when": object()}, "plain JSON"),
    ],
)
def test_bad_metadata_is_refused_before_touching_disk(
    store: ModelStore, tiny_model: Any, splits: dict, metadata: dict, message: str
) -> None:
    with pytest.raises(ModelStoreError, match=message):
        store.save_version(tiny_model, PREPROCESSING, splits, metadata, version="v1")
    assert not store.root.exists()


def test_invalid_preprocessing_json_is_refused(
    store: ModelStore, tiny_model: Any, splits: dict
) -> None:
    with pytest.raises(ModelStoreError, match="preprocessing.json"):
        store.save_version(tiny_model, "{not json", splits, {}, version="v1")
    assert not store.root.exists()


def test_existing_version_is_never_overwritten(
    store: ModelStore, tiny_model: Any, splits: dict, saved: str
) -> None:
    before = (store.root / saved / "manifest.json").read_bytes()
    with pytest.raises(ModelStoreError, match="already exists"):
        store.save_version(tiny_model, PREPROCESSING, splits, {}, version=saved)
    assert (store.root / saved / "manifest.json").read_bytes() == before


def test_failed_write_leaves_no_version_and_no_temp(store: ModelStore, splits: dict) -> None:
    class BrokenModel:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"half a model")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save_version(BrokenModel(), PREPROCESSING, splits, {}, version="v1")
    assert [p.name for p in store.root.iterdir() if not p.name.endswith(".lock")] == []
    assert store.list_versions() == []


# ------------------------------------------------------------------------- version ids


@pytest.mark.parametrize(
    "version",
    ["../evil", "a/b", "..", "", ".", ".hidden", "a..b", "x" * 65, "registry.json", "sp ace"],
)
def test_unsafe_version_ids_are_refused_before_touching_disk(
    tmp_path: Path, tiny_model: Any, splits: dict, version: str
) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelStoreError, match="invalid model version id"):
        store.save_version(tiny_model, PREPROCESSING, splits, {}, version=version)
    for read in (store.load_version, store.load_splits, store.read_metadata):
        with pytest.raises(ModelStoreError, match="invalid model version id"):
            read(version)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("name", VERSION_FILES)
def test_one_flipped_byte_in_any_file_fails_integrity(
    store: ModelStore, saved: str, name: str, position: str
) -> None:
    path = store.root / saved / name
    data = bytearray(path.read_bytes())
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[position]
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as raised:
        store.load_version(saved)
    assert f"model version {saved!r}: {name} " in str(raised.value)
    with pytest.raises(ModelIntegrityError):
        store.load_splits(saved)


def test_every_single_byte_flip_in_the_manifest_is_caught(store: ModelStore, saved: str) -> None:
    """The manifest cannot list its own digest, so it signs its canonical body: check each byte."""
    path = store.root / saved / "manifest.json"
    original = path.read_bytes()
    for index in range(len(original)):
        flipped = bytearray(original)
        flipped[index] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(ModelIntegrityError, match=f"'{saved}': manifest.json "):
            store.verify_version(saved)
    path.write_bytes(original)
    assert store.verify_version(saved)


@pytest.mark.parametrize("name", ["notes.txt", "model.keras.bak", ".hidden"])
def test_unlisted_extra_file_fails_integrity(store: ModelStore, saved: str, name: str) -> None:
    (store.root / saved / name).write_text("extra")
    with pytest.raises(ModelIntegrityError, match=name.replace(".", r"\.")):
        store.load_version(saved)


def test_missing_file_fails_integrity(store: ModelStore, saved: str) -> None:
    (store.root / saved / "splits.npz").unlink()
    with pytest.raises(ModelIntegrityError, match="splits.npz"):
        store.load_version(saved)


def test_symlinked_file_fails_integrity(store: ModelStore, saved: str, tmp_path: Path) -> None:
    folder = store.root / saved
    outside = tmp_path / "outside.json"
    outside.write_bytes((folder / "preprocessing.json").read_bytes())
    (folder / "preprocessing.json").unlink()
    (folder / "preprocessing.json").symlink_to(outside)
    with pytest.raises(ModelIntegrityError, match="preprocessing.json"):
        store.load_version(saved)


def test_manifest_moved_to_another_version_fails(
    store: ModelStore, tiny_model: Any, splits: dict, saved: str
) -> None:
    other = store.save_version(tiny_model, PREPROCESSING, splits, {}, version="v2")
    (store.root / other / "manifest.json").write_bytes(
        (store.root / saved / "manifest.json").read_bytes()
    )
    with pytest.raises(ModelIntegrityError, match="manifest.json"):
        store.load_version(other)


def test_rehashed_manifest_with_unchanged_model_still_loads(store: ModelStore, saved: str) -> None:
    """Control for the hand-edit tests below: the editing helpers alone do not break loading."""
    edit_keras_config(store.root / saved, lambda config: None)
    assert store.load_version(saved).model.count_params() == 4 * 10 + 4 + 4 + 1


# ------------------------------------------------------------------------- safe loading


def test_writer_refuses_a_lambda_model(store: ModelStore, lambda_model: Any, splits) -> None:
    with pytest.raises(UnsafeModelError, match="Lambda"):
        store.save_version(lambda_model, PREPROCESSING, splits, {}, version="v1")
    assert store.list_versions() == []
    assert not any(p.name.startswith(".tmp-") for p in store.root.iterdir())


def test_lambda_model_written_past_the_writer_check_is_refused_on_load(
    store: ModelStore, lambda_model: Any, splits: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(model_store, "inspect_keras_archive", lambda archive, version: [])
        store.save_version(lambda_model, PREPROCESSING, splits, {}, version="v1")
    with pytest.raises(UnsafeModelError, match="'Lambda'") as raised:
        store.load_version("v1")
    assert "'v1'" in str(raised.value) and "model.keras" in str(raised.value)
    with pytest.raises(UnsafeModelError, match="Lambda"):
        store.promote("v1", "should never become champion")


def lambda_replaces_first_dense(config: dict[str, Any]) -> None:
    config["config"]["layers"][1]["class_name"] = "Lambda"


def conv_replaces_first_dense(config: dict[str, Any]) -> None:
    config["config"]["layers"][1]["class_name"] = "Conv1D"


def lambda_inside_nested_sequential(config: dict[str, Any]) -> None:
    inner = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "inner", "layers": [dict(config["config"]["layers"][1])]},
        "registered_name": None,
    }
    inner["config"]["layers"][0]["class_name"] = "Lambda"
    config["config"]["layers"][1] = inner


def lambda_hidden_as_activation(config: dict[str, Any]) -> None:
    config["config"]["layers"][1]["config"]["activation"] = {
        "class_name": "__lambda__",
        "config": {"code": "ZXZpbA=="},
    }


def dense_from_foreign_module(config: dict[str, Any]) -> None:
    config["config"]["layers"][1]["module"] = "evil.layers"


def dense_registered_as_custom(config: dict[str, Any]) -> None:
    config["config"]["layers"][1]["registered_name"] = "evil>Dense"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda_replaces_first_dense, "'Lambda'"),
        (conv_replaces_first_dense, "'Conv1D'"),
        (lambda_inside_nested_sequential, "'Lambda'"),
        (lambda_hidden_as_activation, "'__lambda__'"),
        (dense_from_foreign_module, "evil.layers"),
        (dense_registered_as_custom, "'Dense'"),
    ],
)
def test_hand_edited_config_with_matching_digests_is_refused(
    store: ModelStore, saved: str, edit: Callable[[dict[str, Any]], None], named: str
) -> None:
    edit_keras_config(store.root / saved, edit)
    with pytest.raises(UnsafeModelError, match=named):
        store.load_version(saved)


def test_unexpected_entry_in_keras_archive_is_refused(store: ModelStore, saved: str) -> None:
    path = store.root / saved / "model.keras"
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("assets/payload.py", "import os")
    rewrite_manifest(store.root / saved, rehash_file(store.root / saved, "model.keras"))
    with pytest.raises(UnsafeModelError, match="assets/payload.py"):
        store.load_version(saved)


def test_h5_file_present_in_version_is_refused(
    store: ModelStore, saved: str, tiny_model: Any
) -> None:
    tiny_model.save(store.root / saved / "model.h5")
    with pytest.raises(UnsafeModelError, match="model.h5"):
        store.load_version(saved)


def test_h5_model_named_in_manifest_is_refused(
    store: ModelStore, saved: str, tiny_model: Any
) -> None:
    folder = store.root / saved
    tiny_model.save(folder / "model.h5")

    def name_h5(document: dict[str, Any]) -> None:
        rehash_file(folder, "model.h5")(document)
        document["model_file"] = "model.h5"

    rewrite_manifest(folder, name_h5)
    with pytest.raises(UnsafeModelError, match="model.h5"):
        store.load_version(saved)


def test_h5_content_under_the_keras_name_is_refused(
    store: ModelStore, saved: str, tiny_model: Any, tmp_path: Path
) -> None:
    legacy = tmp_path / "legacy.h5"
    tiny_model.save(legacy)
    folder = store.root / saved
    (folder / "model.keras").write_bytes(legacy.read_bytes())
    rewrite_manifest(folder, rehash_file(folder, "model.keras"))
    with pytest.raises(UnsafeModelError, match="not a Keras v3 zip"):
        store.load_version(saved)


# ------------------------------------------------------------------------- registry


@pytest.fixture()
def three_versions(store: ModelStore, tiny_model: Any, splits: dict) -> list[str]:
    """Three saved versions a, b, c (in that order), all challengers."""
    return [
        store.save_version(tiny_model, PREPROCESSING, splits, {}, version=name)
        for name in ("a", "b", "c")
    ]


def statuses(store: ModelStore) -> dict[str, str | None]:
    return {info.version: info.status for info in store.list_versions()}


def test_new_versions_are_challengers_without_a_champion(
    store: ModelStore, three_versions: list[str]
) -> None:
    assert statuses(store) == {"a": "challenger", "b": "challenger", "c": "challenger"}
    assert store.champion() is None


def test_promote_retires_the_previous_champion(
    store: ModelStore, three_versions: list[str]
) -> None:
    store.promote("a", "first model")
    store.promote("b", "auc +0.02")
    assert store.champion() == "b"
    assert statuses(store) == {"a": "retired", "b": "champion", "c": "challenger"}
    last = store.history()[-2:]
    assert [(e["version"], e["from_status"], e["to_status"]) for e in last] == [
        ("a", "champion", "retired"),
        ("b", "challenger", "champion"),
    ]
    assert all(e["reason"] == "auc +0.02" and e["timestamp"] for e in last)
    with pytest.raises(ModelStoreError, match="already the champion"):
        store.promote("b", "again")


def test_rollback_walks_back_through_previous_champions(
    store: ModelStore, three_versions: list[str]
) -> None:
    for version in three_versions:
        store.promote(version, f"promote {version}")
    assert store.rollback("c misbehaves") == "b"
    assert statuses(store) == {"a": "retired", "b": "champion", "c": "retired"}
    assert store.rollback("b misbehaves too") == "a"
    assert statuses(store) == {"a": "champion", "b": "retired", "c": "retired"}
    with pytest.raises(ModelStoreError, match="no previous champion"):
        store.rollback("nothing left")
    assert store.champion() == "a"


def test_rollback_skips_rejected_versions(store: ModelStore, three_versions: list[str]) -> None:
    for version in three_versions:
        store.promote(version, f"promote {version}")
    store.set_status("b", "rejected", "found a leak in b's features")
    assert store.rollback("c misbehaves") == "a"
    assert store.champion() == "a"


def test_rollback_without_history_is_a_clear_error(
    store: ModelStore, three_versions: list[str]
) -> None:
    with pytest.raises(ModelStoreError, match="no previous champion"):
        store.rollback("nothing to roll back")
    store.promote("a", "first")
    with pytest.raises(ModelStoreError, match="no previous champion"):
        store.rollback("only one champion ever")
    assert store.champion() == "a"


def test_set_status_records_history_and_never_makes_a_champion(
    store: ModelStore, three_versions: list[str]
) -> None:
    store.set_status("c", "rejected", "auc below gate")
    assert statuses(store)["c"] == "rejected"
    assert store.history()[-1] == {
        **store.history()[-1],
        "version": "c",
        "from_status": "challenger",
        "to_status": "rejected",
        "reason": "auc below gate",
    }
    with pytest.raises(ModelStoreError, match="promote"):
        store.set_status("a", "champion", "sneaky")
    with pytest.raises(ModelStoreError, match="unknown status"):
        store.set_status("a", "winner", "typo")
    with pytest.raises(ModelStoreError, match="reason"):
        store.set_status("a", "rejected", " ")
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.set_status("zzz", "rejected", "no such version")
    assert store.champion() is None


def test_promoting_a_corrupted_version_changes_nothing(
    store: ModelStore, three_versions: list[str]
) -> None:
    store.promote("a", "first")
    (store.root / "b" / "metadata.json").write_text("{}")
    with pytest.raises(ModelIntegrityError, match="metadata.json"):
        store.promote("b", "would be bad")
    assert store.champion() == "a"


def test_list_versions_is_newest_first_with_metrics(
    store: ModelStore, tiny_model: Any, splits: dict
) -> None:
    for name, auc in (("zeta", 0.70), ("alpha", 0.75), ("mid", 0.80)):
        store.save_version(tiny_model, PREPROCESSING, splits, {"metrics": {"auc": auc}}, name)
    infos = store.list_versions()
    assert [info.version for info in infos] == ["mid", "alpha", "zeta"]
    assert [info.metrics["auc"] for info in infos] == [0.80, 0.75, 0.70]
    assert infos[0].created_at > infos[1].created_at > infos[2].created_at


def test_leftover_temp_folders_are_ignored_and_cleaned(store: ModelStore, saved: str) -> None:
    half = store.root / ".tmp-v2-abc123"
    half.mkdir()
    (half / "model.keras").write_bytes(b"PK half written")
    (store.root / ".tmp-registry-0123.json").write_text('{"versions": {')
    (store.root / "v9").mkdir()  # a folder made by hand, without a manifest
    assert [info.version for info in store.list_versions()] == [saved]
    with pytest.raises(ModelStoreError, match="invalid model version id"):
        store.load_version(half.name)
    assert sorted(store.clean_leftovers()) == [".tmp-registry-0123.json", ".tmp-v2-abc123"]
    assert not half.exists()
    assert store.load_version(saved).version == saved


# ------------------------------------------------------------------------- concurrency

WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    from audiobooks_scoring.model.store import ModelStore

    store = ModelStore(sys.argv[1])
    count = int(sys.argv[2])
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(4, activation="relu"),
         keras.layers.Dense(1, activation="sigmoid")]
    )
    rows = np.random.default_rng(0).normal(size=(40_000, 10))
    print("ready", flush=True)
    for index in range(count):
        version = store.save_version(
            model, "{}", {"train": {"features": rows}}, {"metrics": {"index": index}},
            version=f"w{index:02d}",
        )
        store.promote(version, f"writer {index}")
    """
)


def test_reader_sees_versions_absent_or_complete_while_another_process_writes(
    store: ModelStore,
) -> None:
    count = 4
    store.root.mkdir(parents=True)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(store.root), str(count)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    verified: set[str] = set()
    observations = 0
    deadline = time.monotonic() + 120
    while writer.poll() is None and time.monotonic() < deadline:
        for info in store.list_versions():
            observations += 1
            if info.version not in verified:
                assert store.verify_version(info.version) == info.artifact_digest
                assert store.read_metadata(info.version)["metrics"]["index"] >= 0
                verified.add(info.version)
        champion = store.champion()
        assert champion is None or (store.root / champion / "manifest.json").is_file()
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 0, stderr
    assert observations > 0
    assert [info.version for info in store.list_versions()] == [
        f"w{index:02d}" for index in reversed(range(count))
    ]
    assert store.champion() == f"w{count - 1:02d}"
    assert not any(p.name.startswith(".tmp-") for p in store.root.iterdir())
