import os
from fractions import Fraction

import pytest
import torch

from runtime import cpu_has_bf16_units, load_checkpoint, pick_device, pick_dtype, save_checkpoint


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, path)
    with pytest.raises(Exception):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_args": {}, "bad": lambda: 0}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoints_holding_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {}, "payload": Fraction(1, 3)}, path)  # an object, not plain data
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_checkpoint(str(path))


def test_dtype_auto_follows_the_hardware_and_names_are_checked():
    assert pick_dtype("cpu", "auto") == (torch.bfloat16 if cpu_has_bf16_units() else torch.float32)
    assert pick_dtype("cpu", "float32") == torch.float32
    with pytest.raises(ValueError, match="dtype='fp8' is not one of"):
        pick_dtype("cpu", "fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    assert pick_device("auto") in ("cpu", "mps")
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="is not one of"):
        pick_device("tpu")
