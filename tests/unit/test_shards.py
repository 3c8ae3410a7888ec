"""Raw dataset shards on local disk: listing, gzip (corrupt, truncated, multi-member), row identity."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest

from tauon_core.errors import DATASET_NOT_FOUND, INVALID_DATASET, PermanentError
from tauon_train import data, shards
from tauon_train.config import DatasetConfig


def _cfg(path: Path | str, fmt: str = "jsonl") -> DatasetConfig:
    p = str(path)
    return DatasetConfig(
        source=p, path=p, format=fmt, text_field="text", label_field=None, validation_split=0
    )


def _rows(n: int, start: int = 0) -> bytes:
    return b"".join(b'{"text": "row %d"}\n' % i for i in range(start, start + n))


def test_directory_of_shards_in_uri_order_with_gzip_and_skips(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.jsonl").write_bytes(_rows(3))
    (tmp_path / "b" / "c.jsonl.gz").write_bytes(gzip.compress(_rows(2, 3)) + gzip.compress(_rows(1, 5)))
    (tmp_path / "b" / "d.csv").write_text("text\nnot jsonl\n")
    (tmp_path / "README").write_text("skip")
    found = shards.list_shards(str(tmp_path), "jsonl")
    assert [Path(s.uri).name for s in found] == ["a.jsonl", "c.jsonl.gz"]
    rows = data.load_rows(_cfg(tmp_path), ["text"])
    assert [r.fields["text"] for r in rows] == [f"row {i}" for i in range(6)]
    # identity: lines counted across shards (a.jsonl has 3 lines + the empty tail)
    assert [r.line for r in rows] == [1, 2, 3, 5, 6, 7]
    assert rows[3].where.endswith("c.jsonl.gz:1")
    assert len({r.line for r in rows}) == 6


def test_single_file_keeps_its_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "one.jsonl"
    f.write_bytes(b'\n{"text": "a"}\n\n{"text": "b"}\n')
    rows = data.load_rows(_cfg(f), ["text"])
    assert [(r.line, r.where) for r in rows] == [(2, f"{f}:2"), (4, f"{f}:4")]


def test_corrupt_and_truncated_gzip_name_shard_and_line(tmp_path: Path) -> None:
    packed = gzip.compress(_rows(2000))
    (tmp_path / "t.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(tmp_path / "t.jsonl.gz"), ["text"])
    assert e.value.reason == INVALID_DATASET and "truncated gzip" in e.value.message
    line = int(e.value.message.split(":")[1])
    assert e.value.message.startswith(f"{tmp_path / 't.jsonl.gz'}:") and 1 < line <= 2000
    bad = bytearray(packed)
    bad[len(bad) // 2 : len(bad) // 2 + 64] = b"\xff" * 64
    (tmp_path / "c.jsonl.gz").write_bytes(bytes(bad))
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(tmp_path / "c.jsonl.gz"), ["text"])
    assert e.value.reason == INVALID_DATASET and str(tmp_path / "c.jsonl.gz") in e.value.message


def test_bad_row_in_second_shard_names_that_shard(tmp_path: Path) -> None:
    (tmp_path / "p0.jsonl").write_bytes(_rows(2))
    (tmp_path / "p1.jsonl").write_bytes(b'{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(tmp_path), ["text"])
    assert e.value.message == f"{tmp_path / 'p1.jsonl'}:2: field 'text' missing"


def test_csv_shards_and_missing_or_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x.csv.gz").write_bytes(gzip.compress(b"text\nhello\n"))
    assert [r.fields["text"] for r in data.load_rows(_cfg(tmp_path, "csv"), ["text"])] == ["hello"]
    assert shards.format_of("s3://b/x.CSV.gz") == "csv" and shards.format_of("s3://b/p/") == "jsonl"
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(tmp_path, "jsonl"), ["text"])
    assert e.value.reason == DATASET_NOT_FOUND and "no .jsonl or .jsonl.gz shard" in e.value.message
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(tmp_path / "absent"), ["text"])
    assert e.value.reason == DATASET_NOT_FOUND


# --- parquet ---------------------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict[str, object]], row_group: int = 1000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group)
    return path


def test_parquet_rows_read_by_record_batch_across_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "a.parquet", [{"text": f"row {i}", "n": i} for i in range(23)], row_group=5)
    write_parquet(d / "b.parquet", [{"text": f"row {i}", "n": i} for i in range(23, 30)], row_group=3)
    (d / "c.jsonl").write_bytes(_rows(2))  # another format's shard: skipped
    assert pq.ParquetFile(d / "a.parquet").num_row_groups == 5
    batches: list[int] = []
    real = pq.ParquetFile.iter_batches

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        for b in real(self, *args, **kwargs):
            batches.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(shards, "PARQUET_BATCH_ROWS", 4)
    found = shards.list_shards(str(d), "parquet")
    assert [Path(s.uri).name for s in found] == ["a.parquet", "b.parquet"]
    got = list(shards.iter_parquet(found[0], ["text"], batch_rows=4))
    assert got == [(i + 1, {"text": f"row {i}"}) for i in range(23)]  # only the columns asked for
    assert batches and max(batches) <= 4 and sum(batches) == 23
    rows = data.load_rows(_cfg(d, "parquet"), ["text"])
    assert [r.fields["text"] for r in rows] == [f"row {i}" for i in range(30)]
    # identity: rows counted across the shards (a.parquet has 23 rows)
    assert [r.line for r in rows] == list(range(1, 31))
    assert rows[23].where == f"{d / 'b.parquet'}: row 1"
    assert shards.format_of("s3://b/x.PARQUET") == "parquet" and shards.format_of("x.parquet.gz") == "parquet"


def test_parquet_bad_row_is_named_by_shard_and_row_number(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [{"text": f"row {i}"} for i in range(40)]
    rows[16] = {"text": None}
    f = write_parquet(tmp_path / "p.parquet", rows, row_group=10)
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(f, "parquet"), ["text"])
    assert e.value.reason == "MissingColumn" and e.value.message == f"{f}: row 17: field 'text' missing"
    g = write_parquet(tmp_path / "q.parquet", [{"text": "fine"}, {"text": "  "}])
    with pytest.raises(PermanentError) as e:
        data.load_records(_cfg(g, "parquet"), None)
    assert e.value.reason == INVALID_DATASET and e.value.message == f"{g}: row 2: field 'text' is empty"
    h = write_parquet(tmp_path / "r.parquet", [{"body": "x"}])
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg(h, "parquet"), ["text"])
    assert (
        e.value.reason == "MissingColumn"
        and "column 'text' not in the parquet schema (columns: body)" in (e.value.message)
    )


def test_corrupt_or_gzipped_parquet_is_a_permanent_error_naming_the_shard(tmp_path: Path) -> None:
    good = write_parquet(tmp_path / "good.parquet", [{"text": "x" * 50 + str(i)} for i in range(500)], 100)
    raw = good.read_bytes()
    (tmp_path / "notparquet.parquet").write_bytes(b'{"text": "jsonl in disguise"}\n')
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    broken = bytearray(raw)
    broken[8:400] = b"\xff" * 392  # the first row group's pages
    (tmp_path / "pages.parquet").write_bytes(bytes(broken))
    for name in ("notparquet.parquet", "cut.parquet", "pages.parquet"):
        f = tmp_path / name
        with pytest.raises(PermanentError) as e:
            data.load_rows(_cfg(f, "parquet"), ["text"])
        assert e.value.reason == INVALID_DATASET, (name, e.value)
        assert e.value.message.startswith(f"{f}:"), e.value.message
    (tmp_path / "z").mkdir()
    gz = tmp_path / "z" / "rows.parquet.gz"
    gz.write_bytes(gzip.compress(raw))
    for path in (gz, gz.parent):
        with pytest.raises(PermanentError) as e:
            shards.list_shards(str(path), "parquet")
        assert e.value.reason == INVALID_DATASET
        assert e.value.message.startswith(f"{gz}: a parquet shard cannot be gzipped")


@pytest.mark.parametrize(
    ("path", "given", "expected"),
    [
        ("/d/corpus.parquet", None, "parquet"),
        ("/d/corpus.csv.gz", None, "csv"),
        ("/d/shards/", None, "jsonl"),
        ("/d/shards/", "parquet", "parquet"),
    ],
)
def test_job_config_takes_parquet_from_the_suffix_or_the_field(
    path: str, given: str | None, expected: str
) -> None:
    from tauon_train.config import parse_config

    ds: dict[str, str] = {"path": path, **({"format": given} if given else {})}
    cfg = parse_config(
        {
            "model": {"source": "file:///m", "path": "/m", "task": "causal-lm"},
            "dataset": ds,
            "output": {"path": "/out"},
        }
    )
    assert cfg.dataset.format == expected


def test_the_api_accepts_parquet_datasets() -> None:
    from tauon.api.finetunejob import DatasetSpec

    assert (
        DatasetSpec.model_validate({"source": "s3://corpora/web/", "format": "parquet"}).format == "parquet"
    )
