"""Tests for cocam.checkpoint: round trips, safe loading and atomic saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cocam import CELEBA_ATTRIBUTES
from cocam.checkpoint import (
    FORMAT,
    CheckpointError,
    ModelSpec,
    load_checkpoint,
    load_model,
    save_checkpoint,
    versions,
)

SPEC = ModelSpec(image_size=64, hidden=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SPEC.build().eval()


@pytest.fixture
def saved(tmp_path: Path, model) -> Path:
    return save_checkpoint(tmp_path / "model.pt", model, SPEC, config={"lr": 1e-3, "seed": 0}, epoch=3)


def _images(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


class _Payload:
    """Unpickling this object would call ``open(marker, "w")``, i.e. create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_gives_identical_logits(saved: Path, model) -> None:
    loaded, spec, payload = load_model(saved)
    assert spec == SPEC
    loaded.eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_spec_versions_and_config_are_stored(saved: Path) -> None:
    payload = load_checkpoint(saved)
    assert payload["format"] == FORMAT
    assert payload["spec"] == SPEC.to_dict()
    assert ModelSpec.from_dict(payload["spec"]) == SPEC
    assert payload["versions"] == versions()
    assert set(payload["versions"]) >= {"cocam", "torch", "torchvision", "python"}
    assert payload["versions"]["torch"] == torch.__version__
    assert payload["config"] == {"lr": 1e-3, "seed": 0}
    assert payload["epoch"] == 3
    assert all(t.device.type == "cpu" for t in payload["model"].values())


def test_spec_dict_round_trip_with_defaults() -> None:
    spec = ModelSpec(arch="alexnet", image_size=72, hidden=None, dropout=0.25)
    d = spec.to_dict()
    assert d["attributes"] == list(CELEBA_ATTRIBUTES)
    assert ModelSpec.from_dict(d) == spec
    minimal = {"arch": "alexnet", "image_size": 64, "attributes": list(CELEBA_ATTRIBUTES)}
    assert ModelSpec.from_dict(minimal) == ModelSpec(image_size=64, hidden=None)


def test_extra_tensors_and_nested_containers_survive(tmp_path: Path, model) -> None:
    rng = torch.get_rng_state()
    history = [{"epoch": 0, "train_bce": 0.7, "valid_bce": float("nan")}, {"epoch": 1, "train_bce": 0.6}]
    path = save_checkpoint(tmp_path / "x.pt", model, SPEC, rng=rng, history=history, best=None,
                           shape=(1, 2))
    payload = load_checkpoint(path)
    assert torch.equal(payload["rng"], rng)
    assert payload["history"][1] == history[1]
    assert np.isnan(payload["history"][0]["valid_bce"])
    assert payload["best"] is None and payload["shape"] == (1, 2)


def test_numpy_and_path_values_are_stored_as_plain_data(tmp_path: Path, model) -> None:
    """A value save_checkpoint accepts must load back with weights_only=True."""
    path = save_checkpoint(tmp_path / "np.pt", model, SPEC, best=np.float64(0.25), steps=np.int64(7),
                           where=tmp_path, counts=np.arange(3), history=[{"loss": np.float32(0.5)}])
    payload = load_checkpoint(path)
    assert payload["best"] == 0.25 and isinstance(payload["best"], float)
    assert payload["steps"] == 7 and isinstance(payload["steps"], int)
    assert payload["where"] == str(tmp_path)
    assert torch.equal(payload["counts"], torch.arange(3))
    assert payload["history"][0]["loss"] == 0.5


def test_unstorable_extra_is_refused_before_writing(tmp_path: Path, model) -> None:
    path = tmp_path / "bad.pt"
    with pytest.raises(TypeError, match="payload"):
        save_checkpoint(path, model, SPEC, payload=object())
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_map_location(saved: Path) -> None:
    payload = load_checkpoint(saved, map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in payload["model"].values())
    model, _, _ = load_model(saved, map_location="cpu")
    assert next(model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------


def test_pickled_objects_are_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "spec": SPEC.to_dict(), "model": {}, "x": _Payload(marker)}, path)
    assert not marker.exists()  # saving does not call the reducer
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()
    # Control: the same file does run code when loaded without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_file_is_a_checkpoint_error(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_checkpoint(bad)


def test_foreign_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a cocam checkpoint"):
        load_checkpoint(other)
    plain = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), plain)
    with pytest.raises(CheckpointError, match="not a cocam checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)


def test_wrong_attributes_are_refused(saved: Path) -> None:
    load_model(saved, attributes=CELEBA_ATTRIBUTES)  # the right ones are fine
    with pytest.raises(CheckpointError, match="other attributes"):
        load_model(saved, attributes=tuple(reversed(CELEBA_ATTRIBUTES)))
    with pytest.raises(CheckpointError, match="other attributes"):
        load_model(saved, attributes=CELEBA_ATTRIBUTES[:39])


def test_weights_not_fitting_the_spec_are_refused(tmp_path: Path, model) -> None:
    path = save_checkpoint(tmp_path / "lie.pt", model, ModelSpec(image_size=64, hidden=48))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


def test_missing_file_has_a_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cocam train") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cocam train"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint file


# --------------------------------------------------------------------------------------------
# Atomic saves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_save_keeps_the_previous_checkpoint(saved: Path, model, monkeypatch, error) -> None:
    before = saved.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temporary file
        raise error("interrupted")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(error):
        save_checkpoint(saved, model, SPEC, epoch=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert saved.read_bytes() == before
    assert load_checkpoint(saved)["epoch"] == 3
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temporary file left


def test_save_creates_parent_folders_and_overwrites(tmp_path: Path, model) -> None:
    path = tmp_path / "a" / "b" / "c.pt"
    save_checkpoint(path, model, SPEC, epoch=1)
    save_checkpoint(path, model, SPEC, epoch=2)
    assert load_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]


def test_subclassed_scalars_are_stored_as_their_base_type(tmp_path: Path, model) -> None:
    import enum

    class Colour(str, enum.Enum):
        RED = "red"

    path = save_checkpoint(tmp_path / "v.pt", model, SPEC, colour=Colour.RED, version=torch.__version__)
    payload = load_checkpoint(path)
    assert payload["colour"] == "red" and type(payload["colour"]) is str
    assert payload["version"] == str(torch.__version__)


@pytest.mark.parametrize("damage", ["no spec", "spec not a dict", "spec without arch"])
def test_a_checkpoint_without_its_model_description_is_a_checkpoint_error(saved: Path, tmp_path: Path,
                                                                          damage: str) -> None:
    payload = torch.load(saved, weights_only=True)
    if damage == "no spec":
        del payload["spec"]
    elif damage == "spec not a dict":
        payload["spec"] = "alexnet"
    else:
        del payload["spec"]["arch"]
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="'spec'") as info:
        load_model(tmp_path / "damaged.pt")
    assert str(tmp_path / "damaged.pt") in str(info.value) and "\n" not in str(info.value)


def test_weights_of_another_architecture_are_one_line(tmp_path: Path, model) -> None:
    resnet = ModelSpec(arch="resnet18", image_size=64, hidden=None)
    path = save_checkpoint(tmp_path / "resnet.pt", resnet.build(), resnet)
    payload = torch.load(path, weights_only=True)
    payload["spec"] = SPEC.to_dict()  # says alexnet, holds a resnet's weights
    torch.save(payload, tmp_path / "lying.pt")
    with pytest.raises(CheckpointError, match=r"do not fit a alexnet model.*missing.*unexpected") as info:
        load_model(tmp_path / "lying.pt")
    assert "\n" not in str(info.value)  # torch's own message lists every key over many lines


def test_a_model_built_for_one_input_size_is_rebuilt_for_the_size_its_spec_names(tmp_path: Path) -> None:
    """vit_tiny's positional embeddings cover the patch grid of its image_size: the spec's size rebuilds it."""
    spec = ModelSpec(arch="vit_tiny", image_size=32, hidden=None)
    torch.manual_seed(0)
    model = spec.build().eval()
    path = save_checkpoint(tmp_path / "vit.pt", model, spec)
    loaded, loaded_spec, _ = load_model(path)
    assert loaded_spec == spec and loaded.input_size == 32
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_images(size=32)), model(_images(size=32)))

    payload = torch.load(path, weights_only=True)
    payload["spec"]["image_size"] = 40  # a 5×5 patch grid: the stored 4×4 embeddings do not fit
    torch.save(payload, tmp_path / "resized.pt")
    with pytest.raises(CheckpointError, match=r"do not fit a vit_tiny model.*of another shape.*pos_embedding") as info:
        load_model(tmp_path / "resized.pt")
    assert "\n" not in str(info.value)
    payload["spec"]["arch"] = "no_such_arch"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match=r"cannot be built \(Unknown architecture 'no_such_arch'") as info:
        load_model(tmp_path / "unknown.pt")
    assert "\n" not in str(info.value)
