"""ttl_core.documents on its own: the documents of a .parquet input, and the one-line errors of one that is
not a parquet file of texts."""

import pytest

from ttl_core.documents import read_documents
from ttl_core.errors import DataError


def test_parquet_input(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = ["primeiro documento em parquet", "", "segundo, com acentuação: ação e coração"]
    pq.write_table(pa.table({"text": texts, "n": [1, 2, 3]}), tmp_path / "docs.parquet", row_group_size=2)
    assert list(read_documents(tmp_path / "docs.parquet")) == [texts[0], texts[2]]
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: no 'text' column"):
        list(read_documents(tmp_path / "bad.parquet"))
    # damaged compressed pages, found only as the rows are read, are an OSError from pyarrow, not an ArrowException
    pq.write_table(pa.table({"text": [f"documento {i} " * 20 for i in range(200)]}), tmp_path / "big.parquet",
                   row_group_size=50)
    damaged = bytearray((tmp_path / "big.parquet").read_bytes())
    damaged[len(damaged) // 3:len(damaged) // 3 + 200] = bytes(200)
    (tmp_path / "damaged.parquet").write_bytes(damaged)
    with pytest.raises(DataError, match=r"damaged\.parquet: not a readable parquet file \("):
        list(read_documents(tmp_path / "damaged.parquet"))


def test_only_the_file_start_loses_a_byte_order_mark(tmp_path):
    """A BOM opening the file is the editor's (as Python's utf-8-sig reads it); U+FEFF further on is the text's."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfprimeiro\n\n\xef\xbb\xbfsegundo\n")
    assert list(read_documents(tmp_path / "bom.txt")) == ["primeiro", "\ufeffsegundo"]
