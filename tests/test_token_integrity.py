"""A prepared directory's token files against what its meta.json records: a file truncated, extended or changed in
place since it was prepared is refused in one line naming it, by its size at every open and by its SHA-256 where
that is checked (every open up to DIGEST_CHECK_BYTES, `verify_data` and `prepare_data.py --verify` at any size)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from helpers import load_script
from train_helpers import corpus_file

import ttl_core.loader as loader
from ttl_core.data import prepare_data
from ttl_core.errors import DataError
from ttl_core.evaluate import split_tokens
from ttl_core.loader import PackedLoader, verify_data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    prepare_data([corpus_file(tmp)], tmp / "prepared", vocab_size=400, val_fraction=0.1, workers=1)
    return tmp / "prepared"


@pytest.fixture
def data(prepared, tmp_path):
    return shutil.copytree(prepared, tmp_path / "data")


def damage(path, how: str) -> None:
    """Cut the last two tokens off `path`, append two, or change four in place to other ids of the vocabulary:
    read as they are, the changed ones would be trained on as text."""
    tokens = np.fromfile(path, np.uint16)
    if how == "truncate":
        tokens = tokens[:-2]
    elif how == "append":
        tokens = np.concatenate([tokens, tokens[:2]])
    else:
        at = np.random.default_rng(3).choice(len(tokens), 4, replace=False)
        tokens[at] = (tokens[at] + 7) % 400
    tokens.tofile(path)


def edit_meta(data, **changes) -> None:
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({k: v for k, v in {**meta, **changes}.items() if v is not None}))


def test_meta_json_records_the_sha256_of_each_token_file(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    for split in ("train", "val"):
        assert meta[f"{split}_sha256"] == hashlib.sha256((prepared / f"{split}.bin").read_bytes()).hexdigest()
    assert meta["val_tokens"] > 0 and verify_data(prepared) is True


@pytest.mark.parametrize("how, refusal", [
    ("truncate", r"train\.bin: [\d,]+ bytes, but meta\.json records [\d,]+ uint16 tokens \([\d,]+ bytes\): the file "
                 r"was truncated or replaced since it was prepared, .*; prepare the data again$"),
    ("append", r"train\.bin: [\d,]+ bytes, .*: the file was extended or replaced since it was prepared"),
    ("replace", r"train\.bin: its content is not what was prepared \(its SHA-256 differs from the one meta\.json "
                r"records\): the file is corrupted or replaced; prepare the data again$"),
])
def test_a_damaged_token_file_is_refused_in_one_line_naming_it(data, how, refusal):
    damage(data / "train.bin", how)
    for read in (lambda: PackedLoader(data, "train", 16, 2), lambda: split_tokens(data, "train"),
                 lambda: verify_data(data)):
        with pytest.raises(DataError, match=refusal) as error:
            read()
        assert "\n" not in str(error.value)


def test_a_meta_json_without_counts_or_with_another_dtype_is_told_from_the_file(data):
    """A hand-made meta.json may record no count: the size must still be whole tokens. A uint16 file that meta.json
    says is uint32 holds half the tokens recorded."""
    edit_meta(data, train_tokens=None)
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"train\.bin: [\d,]+ bytes is not a whole number of uint16 tokens"):
        PackedLoader(data, "train", 16, 2)
    meta = json.loads((data / "meta.json").read_text())
    edit_meta(data, dtype="uint32")
    size = (data / "val.bin").stat().st_size
    with pytest.raises(DataError, match=rf"val\.bin: {size:,} bytes, but meta\.json records {meta['val_tokens']:,} "
                                        rf"uint32 tokens \({2 * size:,} bytes\)"):
        PackedLoader(data, "val", 4, 1)


def test_above_the_digest_limit_only_a_full_verification_reads_the_whole_file(data, monkeypatch):
    damage(data / "val.bin", "replace")
    monkeypatch.setattr(loader, "DIGEST_CHECK_BYTES", (data / "val.bin").stat().st_size - 1)
    PackedLoader(data, "val", 16, 1, shuffle=False)  # the size fits: opened without hashing
    with pytest.raises(DataError, match=r"val\.bin: its content is not what was prepared"):
        verify_data(data)
    with pytest.raises(DataError, match=r"val\.bin: its content is not what was prepared"):
        load_script("prepare_data").main(["--out", str(data), "--verify"])


def test_verify_reports_what_it_checked_and_refuses_preparing_options(data, capsys):
    script = load_script("prepare_data")
    assert script.main(["--out", str(data), "--verify"]) == 0
    assert capsys.readouterr().out == f"{data}: train.bin and val.bin match meta.json (size and SHA-256)\n"
    with pytest.raises(SystemExit):
        script.main(["--out", str(data), "--verify", "--val-fraction", "0.2"])
    assert "--val-fraction has no effect with --verify" in capsys.readouterr().err
    edit_meta(data, train_sha256="not a digest")
    with pytest.raises(DataError, match=r"meta\.json: 'train_sha256' is 'not a digest'; expected 64 lowercase hex"):
        script.main(["--out", str(data), "--verify"])


def test_a_directory_prepared_before_digests_were_recorded_loads_with_its_sizes_checked(data, capsys):
    edit_meta(data, train_sha256=None, val_sha256=None)
    damage(data / "train.bin", "replace")  # nothing records what the content was: read as it is
    PackedLoader(data, "train", 16, 2)
    assert verify_data(data) is False
    assert load_script("prepare_data").main(["--out", str(data), "--verify"]) == 0
    assert "size only: an older meta.json records no digests" in capsys.readouterr().out
    damage(data / "train.bin", "truncate")
    with pytest.raises(DataError, match=r"train\.bin: [\d,]+ bytes, but meta\.json records"):
        PackedLoader(data, "train", 16, 2)


def test_preparing_again_replaces_a_file_damaged_in_place(prepared, tmp_path):
    """The refusal says "prepare the data again": with the same inputs that must not find the directory prepared."""
    data = shutil.copytree(prepared, tmp_path / "prepared")
    good = (data / "train.bin").read_bytes()
    damage(data / "train.bin", "replace")
    prepare_data([prepared.parent / "corpus.txt"], data, vocab_size=400, val_fraction=0.1, workers=1)
    assert (data / "train.bin").read_bytes() == good
    PackedLoader(data, "train", 16, 2)
