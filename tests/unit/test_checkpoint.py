"""Selective checkpoint reading: only the bytes asked for, clear errors on bad files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cluster.checkpoint.reader import Checkpoint, CheckpointError, parse_dtype
from experts.kernels.weights import load_slots


def _bytes(ckpt: Checkpoint, names) -> int:
    return sum(torch.Size(ckpt.shape(n)).numel() * 4 for n in names)


def test_sharded_index_is_used(tiny_checkpoint):
    assert (tiny_checkpoint / "model.safetensors.index.json").exists()
    ckpt = Checkpoint(tiny_checkpoint)
    assert len(set(ckpt.file_of.values())) > 1


def test_dense_load_holds_no_expert(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    dense = ckpt.load_dense()
    assert dense and not any(ckpt.spec.is_expert_tensor(n) for n in dense)
    assert "model.layers.0.block_sparse_moe.gate.weight" in dense
    assert ckpt.loaded_bytes == _bytes(ckpt, dense)


def test_two_experts_load_only_their_bytes(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    slots = [(0, 1), (1, 5)]
    weights = load_slots(ckpt, slots, torch.float32)
    names = [n for l, e in slots for n in ckpt.spec.expert_tensor_names(l, e)]
    assert ckpt.loaded_bytes == _bytes(ckpt, names) == weights.nbytes
    # each tensor owns exactly its bytes: no view into a larger mapped or loaded buffer
    for t in (weights.w_gate, weights.w_up, weights.w_down):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    gate, _, _ = Checkpoint(tiny_checkpoint).load_expert(1, 5)
    assert torch.equal(weights.w_gate[1], gate)


def test_dtype_conversion_and_bad_dtype(tiny_checkpoint):
    gate, up, down = Checkpoint(tiny_checkpoint).load_expert(0, 0, torch.bfloat16)
    assert gate.dtype == torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    with pytest.raises(CheckpointError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        parse_dtype("int8")


def test_expert_out_of_range(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=r"expert must be in \[0, 7\], got 8"):
        ckpt.load_expert(0, 8)
    with pytest.raises(CheckpointError, match="layer 5 is not an MoE layer"):
        ckpt.load_expert(5, 0)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.layers.1.block_sparse_moe.experts.2.w2.weight' is missing"):
        Checkpoint(copy).load_expert(1, 2)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    victim = sorted(copy.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {victim.name}, which is missing"):
        Checkpoint(copy)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd", "", 7])
def test_index_naming_a_shard_outside_the_directory_is_refused(tiny_checkpoint, tmp_path, shard):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    shutil.copy(sorted(copy.glob("*.safetensors"))[0], tmp_path / "outside.safetensors")  # a real file out there
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed_tokens.weight"] = shard
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shards must be relative paths inside the checkpoint directory"):
        Checkpoint(copy)


def _single_file(dst):
    from cluster.checkpoint.make import make_checkpoint

    return make_checkpoint("mixtral", "tiny", dst, seed=0)


def test_corrupt_header(tmp_path):
    path = _single_file(tmp_path / "ckpt")
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"{garbage garbage garbage garbag}"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        Checkpoint(path)


def test_header_that_lies_about_its_length(tmp_path):
    """A header length far beyond the file must be an error, not a huge allocation."""
    path = _single_file(tmp_path / "ckpt")
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        Checkpoint(path)


def test_truncated_file(tmp_path):
    path = _single_file(tmp_path / "ckpt")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        Checkpoint(path)


def test_pickled_checkpoints_are_refused(tmp_path):
    path = _single_file(tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickled weights are not loaded"):
        Checkpoint(path)
