"""Loaders read the release layouts strictly; every broken checkpoint fails with a message naming the problem."""
import json
import shutil

import pytest
import torch

from illume_edge.errors import CheckpointError
from illume_edge.export.checkpoint import load_checkpoint, read_safetensors
from illume_edge.export.modules import grouped_state_dict


@pytest.fixture()
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("tiny-plus"), dst)
    return dst


def test_layout_is_the_release_layout(tiny_checkpoint):
    root = tiny_checkpoint("tiny-plus")
    mllm = root / "mllm"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        assert (mllm / name).is_file(), name
    assert (root / "dualvitok" / "pytorch_model.bin").is_file()
    for sub in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (root / "diffusion_decoder" / sub).is_file(), sub
    keys = json.loads((mllm / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert any(k.startswith("model.vision_tower.semantic_encoder.blocks.0.") for k in keys)
    assert any(k.startswith("model.vision_tower.pixel_encoder.") for k in keys)
    assert {"model.mm_projector.projector_1.0.weight", "model.mm_projector.projector_2.2.bias"} <= set(keys)
    dv = torch.load(root / "dualvitok" / "pytorch_model.bin", weights_only=True)
    assert any(k.startswith("semantic_quantizer.") for k in dv) and any(k.startswith("pixel_decoder.") for k in dv)


@pytest.mark.parametrize("preset", ["tiny-plus", "tiny-v1"])
def test_load_round_trips_every_weight(tiny_checkpoint, preset):
    from safetensors.torch import load_file

    root = tiny_checkpoint(preset)
    mods = load_checkpoint(root)
    index = json.loads((root / "mllm" / "model.safetensors.index.json").read_text())["weight_map"]
    saved = {}
    for shard in set(index.values()):
        saved.update(load_file(str(root / "mllm" / shard)))
    loaded = grouped_state_dict(mods.mllm_modules())
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    dv = torch.load(root / "dualvitok" / "pytorch_model.bin", weights_only=True)
    loaded = grouped_state_dict(mods.dualvitok_modules())
    assert set(dv) == set(loaded)
    for k, v in dv.items():
        assert torch.equal(loaded[k], v), k
    assert not any(p.is_meta for m in mods.all_modules() for p in m.parameters())


def _rewrite_shard(root, edit):
    from safetensors.torch import load_file, save_file

    path = root / "mllm" / "model-00001-of-00002.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_path = root / "mllm" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name}
    index["weight_map"].update({k: path.name for k in tensors})
    index_path.write_text(json.dumps(index))
    return tensors


def test_missing_key_is_named(ckpt_copy):
    name = []
    _rewrite_shard(ckpt_copy, lambda t: name.append(sorted(t)[0]) or t.pop(name[0]))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): " + name[0].replace(".", r"\.")):
        load_checkpoint(ckpt_copy)


def test_unexpected_key_is_named(ckpt_copy):
    _rewrite_shard(ckpt_copy, lambda t: t.update({"model.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model\.extra_head\.weight"):
        load_checkpoint(ckpt_copy)


def test_wrong_shape_is_named(ckpt_copy):
    key = []

    def edit(t):
        key.append(next(k for k in sorted(t) if t[k].dim() == 2))
        t[key[0]] = torch.zeros(t[key[0]].shape[0] + 1, t[key[0]].shape[1])

    _rewrite_shard(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\): " + key[0].replace(".", r"\.") + ": expected"):
        load_checkpoint(ckpt_copy)


def test_truncated_safetensors_names_the_file(ckpt_copy):
    path = ckpt_copy / "mllm" / "model-00002-of-00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: not a readable safetensors"):
        load_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_safetensors(path)


def test_lfs_pointer_is_recognised(ckpt_copy):
    path = ckpt_copy / "mllm" / "model-00001-of-00002.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="git-lfs pointer.*git lfs pull"):
        load_checkpoint(ckpt_copy)


def test_corrupt_dualvitok_names_the_file(ckpt_copy):
    path = ckpt_copy / "dualvitok" / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read by torch.load"):
        load_checkpoint(ckpt_copy)


def test_dualvitok_training_parts_are_ignored_but_strangers_are_not(ckpt_copy):
    path = ckpt_copy / "dualvitok" / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)
    sd["semantic_decoder.proj_in.weight"] = torch.zeros(2, 2)  # a tokenizer-training part: ignored
    torch.save({"model": sd}, path)  # the release nests under "model"
    load_checkpoint(ckpt_copy)
    sd["mystery.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): mystery\.weight"):
        load_checkpoint(ckpt_copy)


def test_config_mismatch_is_named(ckpt_copy):
    path = ckpt_copy / "mllm" / "config.json"
    d = json.loads(path.read_text())
    d["num_hidden_layers"] += 1
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="num_layers is 3, the model config 'tiny-plus' says 2"):
        load_checkpoint(ckpt_copy)


def test_wrong_preset_is_refused(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="use the preset that matches"):
        load_checkpoint(tiny_checkpoint("tiny-plus"), preset_name="tiny-v1")


def test_diffusers_config_mismatch_is_named(ckpt_copy):
    path = ckpt_copy / "diffusion_decoder" / "unet" / "config.json"
    d = json.loads(path.read_text())
    d["in_channels"] = 4
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="unet/config.json: in_channels .*leave code_channels 0"):
        load_checkpoint(ckpt_copy)
    d["in_channels"] = 4 + 32
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="unet/config.json: code_channels is 32, the model config 'tiny-plus' "
                                              "expects 16"):
        load_checkpoint(ckpt_copy)
