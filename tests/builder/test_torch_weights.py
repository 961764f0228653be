"""The weights reader: real packaged files load; anything but tensors is refused without executing it."""

import pickle

import numpy as np
import pytest

from builder.backbones import weights_path
from builder.torch_weights import WeightsFormatError, load_state_dict


def test_mobilenet_v2_weights_load_as_numpy():
    state = load_state_dict(weights_path("mobilenet_v2"))
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.0.weight"].dtype == np.float32
    assert abs(float(state["features.0.0.weight"].ravel()[0]) - 0.013185339979827404) < 1e-9


def test_efficientnet_lite0_weights_load_as_numpy():
    state = load_state_dict(weights_path("efficientnet_lite0"))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)


def _legacy_file(payload: bytes) -> bytes:
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    return magic + pickle.dumps(1001, protocol=2) + pickle.dumps({}, protocol=2) + payload


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_global_other_than_tensor_storage_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(pickle.dumps({"w": _Evil()}, protocol=2)))
    with pytest.raises(WeightsFormatError, match=r"refusing global (__builtin__|builtins)\.print"):
        load_state_dict(path)
    assert "must never run" not in capsys.readouterr().out


def test_bad_magic_is_refused(tmp_path):
    path = tmp_path / "not-weights.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2) + b"rest")
    with pytest.raises(WeightsFormatError, match="magic"):
        load_state_dict(path)


def test_truncated_storage_is_refused(tmp_path):
    data = weights_path("mobilenet_v2").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsFormatError, match="truncated"):
        load_state_dict(path)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(_legacy_file(pickle.dumps({"w": 1.5}, protocol=2) + pickle.dumps([], protocol=2)))
    with pytest.raises(WeightsFormatError, match="not a tensor"):
        load_state_dict(path)
