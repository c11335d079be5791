"""Model files and checkpoints carry a hash of their content: a flipped byte is found on load, in one line."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from nero_deap.nets.export import ModelFileError, load_model, save_model
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype

NET = "layer:conv num-filters:4 filter-shape:3 input:-1 | layer:fc num-units:10 input:0 || learning:adam lr:0.001"


def tensor_data_offsets(path: Path) -> list:
    """Where each stored tensor's bytes start in a torch zip file (its members are stored uncompressed)."""
    offsets = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if "/data/" in info.filename and info.file_size:
                f.seek(info.header_offset)
                header = f.read(30)
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                offsets.append(info.header_offset + 30 + name_length + extra_length)
    return offsets


def test_a_model_file_with_one_flipped_weight_byte_is_refused(tmp_path):
    model = build_network(Phenotype.from_text(NET))
    path = save_model(model, tmp_path / "m.pt", num_classes=10, in_shape=(3, 32, 32), mean=(0.5,) * 3,
                      std=(0.25,) * 3)
    assert load_model(path).params == model.params
    data = bytearray(path.read_bytes())
    offset = tensor_data_offsets(path)[0] + 3
    data[offset] ^= 0x01  # a weight's low mantissa bit: still a finite number, so nothing else notices
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="damaged model file: its content does not match the SHA-256"):
        load_model(path)


def test_model_files_written_before_the_hash_still_load():
    old = Path(__file__).resolve().parent / "fixtures" / "run-v2" / "weights" / "0.pt"
    assert load_model(old).params > 0


def test_a_checkpoint_with_one_flipped_byte_is_found_and_the_previous_one_resumes(tmp_path, capsys):
    """A flipped byte that still unpickles (a digit of a fitness value) once resumed a different run."""
    from conftest import TINY_GRAMMAR
    from nero_deap.cli import main
    from nero_deap.store.logbook import CorruptCheckpoint, load_checkpoint

    run = tmp_path / "run"
    argv = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:40", "--val-size", "10", "--population", "4",
            "--epochs", "0.5", "--threads", "1", "--generations", "1", "--out", str(run)]
    assert main(argv) == 0
    checkpoint = run / "checkpoint.pkl"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="damaged checkpoint: its content does not match the SHA-256"):
        load_checkpoint(checkpoint)
    capsys.readouterr()
    assert main(["--resume", str(run), "--generations", "2"]) == 0
    out = capsys.readouterr().out
    assert "damaged checkpoint" in out and "resuming from checkpoint.prev.pkl (generation 0)" in out
    assert load_checkpoint(checkpoint)["gen"] == 2
