"""Checkpoints safe to share: safetensors weights, a weights_only training state, atomic as a whole, and
one clear line for a checkpoint that cannot be read."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tread_bench.core.errors import CheckpointError
from tread_bench.data import load_dataset
from tread_bench.training.checkpoint import _load_state, file_sha256, find_checkpoint, load_ema
from tread_bench.training.trainer import Trainer, TrainConfig
from suite_helpers import build_denoiser

ROUTES = [{"start": 1, "end": 3, "rate": 0.5}]


def trainer(run_dir, steps, **cfg):
    data = load_dataset("synthetic", 32, limit=32)
    torch.manual_seed(0)
    den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=ROUTES)
    return Trainer(den, data, TrainConfig(steps=steps, global_batch=4, log_every=1, lr=1e-3, **cfg), run_dir)


def losses(tr):
    return [s["loss"] for s in tr.stats]


def test_round_trip_is_safetensors_plus_a_weights_only_state_and_resumes_exactly(tmp_path):
    whole = trainer(tmp_path / "whole", 6)
    whole.train()
    half = trainer(tmp_path / "half", 3)
    half.train()
    folder = tmp_path / "half" / "checkpoint"
    assert sorted(os.listdir(folder)) == ["ema.safetensors", "manifest.json", "model.safetensors", "state.pt"]
    model = load_file(folder / "model.safetensors")
    assert torch.equal(model["net.backbone.blocks.0.attn.qkv.weight"],
                       half.raw.state_dict()["net.backbone.blocks.0.attn.qkv.weight"])
    assert "n_averaged" in load_file(folder / "ema.safetensors")
    state = torch.load(folder / "state.pt", weights_only=True)  # plain types only
    assert state["step"] == 3 and json.loads((folder / "manifest.json").read_text())["step"] == 3
    assert isinstance(json.loads(state["config"]), dict)

    resumed = trainer(tmp_path / "half", 6)
    torch.manual_seed(123)  # the global RNG state must come from the checkpoint
    assert resumed.try_resume()
    resumed.train()
    assert losses(resumed) == losses(whole)  # bit for bit
    for a, b in zip(resumed.ema.parameters(), whole.ema.parameters()):
        assert torch.equal(a, b)


def test_load_ema_gives_the_weights_the_trainer_resumes_with_and_checks_the_files(tmp_path):
    """A finished run's EMA model for sampling, read without a trainer: the trainer's own resume is the truth."""
    done = trainer(tmp_path / "run", 3)
    done.train()
    resumed = trainer(tmp_path / "run", 3)
    assert resumed.try_resume()
    data = load_dataset("synthetic", 32, limit=32)
    ema, step = load_ema(find_checkpoint(tmp_path / "run"), build_denoiser("dit", "tiny", data.shape,
                                                                          data.num_classes, routes=ROUTES))
    assert step == 3
    theirs, ours = resumed.ema_denoiser.state_dict(), ema.state_dict()
    assert list(theirs) == list(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert not torch.equal(ours["net.backbone.blocks.0.attn.qkv.weight"],
                           resumed.raw.state_dict()["net.backbone.blocks.0.attn.qkv.weight"])  # EMA, not the model
    ema_file = tmp_path / "run" / "checkpoint" / "ema.safetensors"
    ema_file.write_bytes(ema_file.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="ema.safetensors.*damaged"):
        load_ema(find_checkpoint(tmp_path / "run"), build_denoiser("dit", "tiny", data.shape, data.num_classes))


def test_a_kill_between_the_renames_leaves_one_complete_checkpoint(tmp_path, monkeypatch):
    tr = trainer(tmp_path, 2, checkpoint_every=1)
    tr.train()  # checkpoint of step 2
    tr.step = 3  # pretend one more step, then die after renaming the current folder away

    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.setattr(os, "rename", real)
    assert not (tmp_path / "checkpoint").exists()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.new"  # complete: its manifest was written
    fresh = trainer(tmp_path, 5)
    assert fresh.try_resume() and fresh.step == 3
    fresh.train()  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_kill_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = trainer(tmp_path, 2)
    tr.train()
    tr.step = 3
    import tread_bench.training.checkpoint as ck

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing state.pt")

    monkeypatch.setattr(ck.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.undo()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    fresh = trainer(tmp_path, 2)
    assert fresh.try_resume() and fresh.step == 2


def touch(path):
    Path(path).touch()


class Payload:
    """A pickle that would create a file if it were unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (touch, (str(self.marker),))


def test_unreadable_checkpoints_give_one_line_naming_the_file_and_the_fix(tmp_path):
    tr = trainer(tmp_path, 1)
    tr.train()
    folder = tmp_path / "checkpoint"
    state_file = folder / "state.pt"
    good = state_file.read_bytes()
    marker = tmp_path / "code_ran"

    def refused(match):
        with pytest.raises(CheckpointError, match=match) as err:
            trainer(tmp_path, 2).try_resume()
        message = str(err.value)
        assert "\n" not in message and "force=true" in message and str(folder) in message
        return message

    def vouch_for(name):  # what someone who can write the manifest too could do: weights_only still refuses
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        (folder / "manifest.json").write_text(json.dumps(manifest))

    # a state.pt that would run code: refused by weights_only, nothing runs
    torch.save({"step": 1, "x": Payload(marker)}, state_file)
    vouch_for("state.pt")
    message = refused("state.pt \\(not plain tensors and values: it holds a pickled object, which is never loaded since "
                      "loading it could run its code: ")
    assert "test_checkpoint.touch" in message
    assert "weights_only` set to `False`" not in message and "Do it only" not in message and "likely succeed" not in message
    assert not marker.exists()
    torch.load(state_file, weights_only=False)  # what the loader did before: the file's code runs
    assert marker.exists()
    # truncated (size differs from the manifest)
    state_file.write_bytes(good[:100])
    refused("state.pt .*truncated")
    # corrupt bytes of the right size, vouched for by the manifest: the reader still refuses them
    state_file.write_bytes(b"\x00" * len(good))
    vouch_for("state.pt")
    refused("state.pt .*corrupt")
    state_file.write_bytes(good)
    vouch_for("state.pt")
    # damaged safetensors header, vouched for
    model_file = folder / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[8:40] = b"#" * 32
    model_file.write_bytes(bytes(data))
    vouch_for("model.safetensors")
    refused("model.safetensors")
    # no manifest: an unfinished folder
    (folder / "manifest.json").unlink()
    refused("manifest.json .*missing")


@pytest.mark.parametrize("name, offset, size", [("model.safetensors", 4096, 4096), ("ema.safetensors", 4096, 4096),
                                                ("state.pt", 1024, 2048)])
def test_same_size_damage_to_any_checkpoint_file_is_refused_by_its_hash(tmp_path, name, offset, size):
    """Bytes flipped or overwritten inside a file, its size unchanged, the manifest untouched: one line naming the
    file, before anything is loaded."""
    trainer(tmp_path, 2).train()
    file = tmp_path / "checkpoint" / name
    data = bytearray(file.read_bytes())
    assert len(data) > offset + size
    data[offset:offset + size] = bytes(b ^ 0xFF for b in data[offset:offset + size])
    file.write_bytes(bytes(data))
    resumed = trainer(tmp_path, 4)
    with pytest.raises(CheckpointError) as err:
        resumed.try_resume()
    assert str(err.value) == (f"cannot read checkpoint file {file} (damaged: its SHA-256 is not the one the manifest "
                              f"recorded when it was written); delete {tmp_path / 'checkpoint'} (the run then trains "
                              f"from its start) or rerun the suite with force=true")
    assert resumed.step == 0


def test_a_checkpoint_of_the_previous_format_is_refused_in_one_line(tmp_path):
    trainer(tmp_path, 2).train()
    manifest_file = tmp_path / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "format": "tread-bench-checkpoint/1",
                                         "files": {k: v["bytes"] for k, v in manifest["files"].items()}}))
    with pytest.raises(CheckpointError, match=r"manifest.json \(unknown format: expected tread-bench-checkpoint/2\); "
                                              r".*force=true"):
        trainer(tmp_path, 4).try_resume()


def test_an_old_format_checkpoint_pt_is_refused_in_one_line_that_says_to_rerun(tmp_path):
    tr = trainer(tmp_path / "new", 2)
    tr.train()
    (tmp_path / "old").mkdir()
    torch.save({"model": tr.raw.state_dict(), "step": tr.step}, tmp_path / "old" / "checkpoint.pt")
    assert find_checkpoint(tmp_path / "old") == tmp_path / "old" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint.pt is a checkpoint of a tread-bench version before .*force=true"):
        trainer(tmp_path / "old", 4).try_resume()


def test_state_that_weights_only_would_refuse_is_refused_when_saved(tmp_path):
    tr = trainer(tmp_path, 1)
    tr.raw.net.rng_state = lambda: {"gen": object()}
    with pytest.raises(TypeError, match="state.rng.routing.gen is a object"):
        tr.save()
    assert find_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a training state"):
        (tmp_path / "checkpoint").mkdir()
        torch.save([1, 2], tmp_path / "checkpoint" / "state.pt")
        _load_state(tmp_path / "checkpoint" / "state.pt", tmp_path / "checkpoint")
