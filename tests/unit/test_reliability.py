"""The reliability pieces one by one: safe checkpoint reads, the newest-intact choice, disk-full
saves, step-file rotation, data-dir digests, source checks, tokenizer-training text. The CLI
behaviour built from them is catalogued in tests/integration/test_bad_input.py; kills and a
filling disk in tests/integration/test_faults.py."""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmtrain.train import checkpoint_io
from lmtrain.train.checkpoint import CheckpointError, newest_checkpoint, safe_load
from lmtrain.train.checkpoint_io import AtomicCheckpointIO, DiskFull


def ckpt(step: int) -> dict:
    return {"global_step": step, "hyper_parameters": {"config": {}}, "state_dict": {"w": torch.full((4,), step)}}


# --- safe reads ----------------------------------------------------------------------------

class Marker:
    """Unpickling this would create a file: a stand-in for code a crafted checkpoint runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.ckpt"
    torch.save({"global_step": 1, "payload": Marker(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused: it holds objects"):
        safe_load(bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):  # and the training IO reads the same way
        AtomicCheckpointIO().load_checkpoint(bad)
    assert not marker.exists()


def test_damaged_files_are_named_as_such(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save(ckpt(3), good)
    assert safe_load(good)["global_step"] == 3
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt: damaged"):
        safe_load(cut)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"global_step": 1}))  # a legacy pickle, not a zip archive
    with pytest.raises(CheckpointError, match="not a torch zip archive"):
        safe_load(plain)
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.ones(2), tensor)
    with pytest.raises(CheckpointError, match="not an lmtrain checkpoint"):
        safe_load(tensor)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        safe_load(tmp_path / "missing.ckpt")


# --- the newest intact checkpoint -----------------------------------------------------------

def run_dir(tmp_path: Path, **files) -> Path:
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name, step in files.items():
        path = d / f"{name}.ckpt"
        if step is None:
            path.write_bytes(b"PK\x03\x04 torn")  # a zip header, then nothing
        else:
            torch.save(ckpt(step), path)
    return tmp_path


def test_a_damaged_last_falls_back_to_the_newest_intact_step_file(tmp_path):
    choice = newest_checkpoint(run_dir(tmp_path, step000002=2, step000004=4, last=None))
    assert (choice.path.name, choice.step) == ("step000004.ckpt", 4)
    assert [p.name for p, _ in choice.skipped] == ["last.ckpt"]
    assert "last.ckpt is unusable" in choice.notes()[0]


def test_a_damaged_newer_step_file_falls_back_to_last(tmp_path):
    choice = newest_checkpoint(run_dir(tmp_path, step000004=4, last=4, step000006=None))
    assert (choice.path.name, choice.step) == ("last.ckpt", 4)
    assert [p.name for p, _ in choice.skipped] == ["step000006.ckpt"]


def test_every_candidate_damaged_means_no_choice_and_every_reason(tmp_path):
    choice = newest_checkpoint(run_dir(tmp_path, step000002=None, last=None))
    assert choice.path is None
    assert sorted(p.name for p, _ in choice.skipped) == ["last.ckpt", "step000002.ckpt"]


# --- a full disk ----------------------------------------------------------------------------

def saved(tmp_path: Path) -> tuple[AtomicCheckpointIO, Path]:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(ckpt(1), path)
    return io, path


def assert_old_intact_and_no_tmp(path: Path) -> None:
    assert safe_load(path)["global_step"] == 1
    assert not list(path.parent.glob(".*.tmp*"))


class FailingFile(io.BufferedWriter):
    """A file whose writes fail with `code` once `limit` bytes are written."""

    def __init__(self, path: Path, limit: int, code: int):
        super().__init__(io.FileIO(path, "wb"))
        self.limit, self.code, self.n = limit, code, 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.n + n > self.limit:
            raise OSError(self.code, os.strerror(self.code))
        self.n += n
        return super().write(data)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("limit", [10, 2000, 30_000])  # in the header, the records, the tensor data
def test_a_disk_that_fills_during_the_write(tmp_path, monkeypatch, code, limit):
    """torch.save's zip writer swallows the failed write's OSError and raises a bare
    RuntimeError ("unexpected pos"); the save still says the disk is full, removes its
    partial file, and the previous checkpoint stays."""
    io_, path = saved(tmp_path)
    monkeypatch.setattr(checkpoint_io, "_open_tmp", lambda tmp: FailingFile(tmp, limit, code))
    big = {**ckpt(2), "state_dict": {"w": torch.zeros(10_000)}}
    with pytest.raises(DiskFull, match=r"the disk is full: .* free, this checkpoint needs about .*last.ckpt is intact"):
        io_.save_checkpoint(big, path)
    monkeypatch.undo()
    assert_old_intact_and_no_tmp(path)


def test_another_write_error_is_raised_as_itself(tmp_path, monkeypatch):
    """An I/O error is not a full disk; it surfaces as the OSError it is, not torch's
    "unexpected pos"."""
    io_, path = saved(tmp_path)
    monkeypatch.setattr(checkpoint_io, "_open_tmp", lambda tmp: FailingFile(tmp, 2000, errno.EIO))
    with pytest.raises(OSError) as info:
        io_.save_checkpoint({**ckpt(2), "state_dict": {"w": torch.zeros(10_000)}}, path)
    assert info.value.errno == errno.EIO and not isinstance(info.value, DiskFull)
    monkeypatch.undo()
    assert_old_intact_and_no_tmp(path)


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    io, path = saved(tmp_path)
    calls = []
    monkeypatch.setattr(checkpoint_io, "free_bytes", lambda d: 8)
    monkeypatch.setattr(torch, "save", lambda *a, **k: calls.append(a))
    with pytest.raises(DiskFull, match="needs about"):
        io.save_checkpoint(ckpt(2), path)
    assert not calls
    monkeypatch.undo()
    assert_old_intact_and_no_tmp(path)


def test_tensor_bytes_counts_shared_storage_once():
    w = torch.zeros(256)
    assert checkpoint_io.tensor_bytes({"a": w, "b": [w, w[:10]], "c": {"d": torch.zeros(2, dtype=torch.int8)}}) == 1026


# --- rotation -------------------------------------------------------------------------------

def test_rotation_keeps_the_newest_step_files_whoever_wrote_them(tmp_path, monkeypatch):
    """A run resumed from a copied step file: files its ModelCheckpoint never saw count too."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lmtrain.train.callbacks.checkpointing import RunCheckpoint, step_checkpoints

    for step in (2, 4, 40):
        (tmp_path / f"step{step:06d}.ckpt").write_bytes(b"")
    (tmp_path / "step000001.notes").write_bytes(b"")  # not a checkpoint: left alone
    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", lambda self, trainer, fp: Path(fp).write_bytes(b""))
    cb = RunCheckpoint(tmp_path, every_n_steps=2, keep_last=2)
    trainer = SimpleNamespace(is_global_zero=True)
    cb._save_checkpoint(trainer, str(tmp_path / "step000006.ckpt"))
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step000006.ckpt", "step000040.ckpt"]
    cb._save_checkpoint(trainer, str(tmp_path / "last.ckpt"))  # last.ckpt never rotates anything
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step000006.ckpt", "step000040.ckpt"]
    assert (tmp_path / "step000001.notes").exists()


# --- data -----------------------------------------------------------------------------------

def test_sample_digest_sees_truncation_and_overwrites(tmp_path):
    from data_pipelines.shards import BLOCK, SAMPLES, sample_digest

    f = tmp_path / "train.bin"
    size = 8 * (1 << 20)
    data = bytearray(os.urandom(size))
    f.write_bytes(data)
    base = sample_digest(f)
    assert base["size"] == size and sample_digest(f) == base
    at = size * 5 // SAMPLES + BLOCK // 2  # inside a sampled block in the middle
    data[at] ^= 0xFF
    f.write_bytes(data)
    assert sample_digest(f)["digest"] != base["digest"]
    f.write_bytes(data[:-1])
    assert sample_digest(f)["size"] == size - 1


def test_token_ids_beyond_the_vocabulary_are_found_with_their_position():
    import numpy as np

    from data_pipelines.shards import DataDirError, check_window

    check_window(np.array([0, 5, 99], dtype=np.uint16), 100, "x.bin", 0)
    with pytest.raises(DataDirError, match=r"x.bin: token 1,002 is id 300, beyond the vocabulary of 100"):
        check_window(np.array([0, 1, 300, 4], dtype=np.uint16), 100, "x.bin", 1000)


def test_json_rows_are_checked_with_their_line(tmp_path):
    from data_pipelines.sources import SourceError, check_json

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": 3}\n')
    with pytest.raises(SourceError, match=r"d.jsonl: line 4: data.text_field 'text' is a int"):
        check_json(f, "text")
    f.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(SourceError, match=r"line 2: not JSON"):
        check_json(f, "text")
    f.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(SourceError, match=r"line 2: not valid UTF-8"):
        check_json(f, "text")
    f.write_text('{"body": "a"}\n')
    with pytest.raises(SourceError, match=r"line 1: no 'text' field .*this row has body"):
        check_json(f, "text")


def test_source_text_is_decoded_strictly(tmp_path):
    from data_pipelines.sources import SourceError, read_text

    f = tmp_path / "a.txt"
    f.write_bytes("héllo\nwörld\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"a.txt: line 1: not valid utf-8"):
        read_text(f)
    assert read_text(f, "latin-1") == "héllo\nwörld\n"
    f.write_bytes(b"abc\x00def")
    with pytest.raises(SourceError, match="binary"):
        read_text(f)


def test_tokenizer_training_text_cuts_only_long_runs():
    from data_pipelines.prepare import MAX_RUN, tokenizer_text

    normal = "def f(x):\n    return x + 1  # a comment\n"
    assert tokenizer_text(normal) == normal
    long = "a" * (MAX_RUN * 2 + 7)
    cut = tokenizer_text(f"x = '{long}'\n")
    pieces = cut.split()
    assert max(map(len, pieces)) <= MAX_RUN
    assert "".join(pieces) == "x='" + long + "'"  # nothing lost, only spaces added


def test_the_process_group_is_destroyed_before_exit(tmp_path):
    """A DDP rank that leaves its gloo group to interpreter finalisation may abort on the way out."""
    import torch.distributed as dist

    from lmtrain.train.run import release_process_group

    release_process_group()  # none joined: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    t = torch.ones(3)
    dist.all_reduce(t)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()
