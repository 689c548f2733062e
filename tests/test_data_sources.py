"""Source readers: every source type streams the documents it holds; mistakes fail with clear errors."""

import gzip
import json
import time

import pytest

from grape_ds.config import SOURCE_TYPES, SourceConfig
from grape_ds.data import readers, sources
from grape_ds.data.sources import iter_documents, source_files

DOCS = ["first document", "second one\nwith two lines", "third: ünïcode ✓"]


def write_jsonl(path, records):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def test_every_source_type_has_a_reader_and_a_file_lister():
    assert set(sources.DOCUMENT_READERS) == set(sources.FILE_LISTERS) == set(SOURCE_TYPES)
    for lookup in (iter_documents, source_files):
        with pytest.raises(ValueError, match="unknown source type 'csv'; choose from"):
            lookup(SourceConfig(type="csv", path="x.csv"))


def test_jsonl_file_default_and_custom_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    assert list(iter_documents(SourceConfig(type="jsonl", path=str(tmp_path / "a.jsonl")))) == DOCS
    write_jsonl(tmp_path / "b.jsonl", [{"content": d} for d in DOCS])
    src = SourceConfig(type="jsonl", path=str(tmp_path / "b.jsonl"), field="content")
    assert list(iter_documents(src)) == DOCS


def test_jsonl_folder_glob_and_gzip(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "0.jsonl", [{"text": DOCS[0]}])
    write_jsonl(folder / "sub" / "1.jsonl.gz", [{"text": DOCS[1]}, {"text": DOCS[2]}])
    (folder / "notes.txt").write_text("not a jsonl file")
    (folder / "blank.jsonl").write_text("\n\n")  # blank lines are skipped
    assert list(iter_documents(SourceConfig(type="jsonl", path=str(folder)))) == DOCS
    only_gz = SourceConfig(type="jsonl", path=str(folder / "**" / "*.jsonl.gz"))
    assert list(iter_documents(only_gz)) == DOCS[1:]
    assert [p.name for p in source_files(only_gz)] == ["1.jsonl.gz"]


def test_jsonl_pretokenised_ids_pass_through(tmp_path):
    ids = [[50256, 1, 2], [7, 8, 9, 10]]
    write_jsonl(tmp_path / "ids.jsonl", [{"tokens": x} for x in ids])
    src = SourceConfig(type="jsonl", path=str(tmp_path / "ids.jsonl"), field="tokens")
    assert list(iter_documents(src)) == ids


def test_jsonl_missing_field_names_field_file_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x", "meta": 1}])
    with pytest.raises(ValueError, match=r"'text'") as err:
        list(iter_documents(SourceConfig(type="jsonl", path=str(path))))
    assert "a.jsonl" in str(err.value) and "'body'" in str(err.value) and "'meta'" in str(err.value)


def test_text_blank_line_splitting(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one\nline two\n\n\n  \nsecond doc\n\nthird")
    (tmp_path / "t" / "b.txt").write_text("\n\nfourth\n")
    docs = list(iter_documents(SourceConfig(type="text", path=str(tmp_path / "t"))))
    assert docs == ["one\nline two", "second doc", "third", "fourth"]


def test_parquet_text_and_pretokenised_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [[i, i + 1, i + 2] for i in range(10)]
    table = pa.table({"text": [f"doc {i}" for i in range(10)], "tokens": ids})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=3)  # 4 row groups
    src = SourceConfig(type="parquet", path=str(tmp_path))
    assert list(iter_documents(src)) == [f"doc {i}" for i in range(10)]
    src = SourceConfig(type="parquet", path=str(tmp_path / "*.parquet"), field="tokens")
    assert list(iter_documents(src)) == ids
    with pytest.raises(ValueError, match=r"'body'") as err:
        list(iter_documents(SourceConfig(type="parquet", path=str(tmp_path), field="body")))
    assert "part-0.parquet" in str(err.value) and "['text', 'tokens']" in str(err.value)


def test_disk_dataset_and_datasetdict_split(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(SourceConfig(type="disk", path=str(tmp_path / "ds")))) == DOCS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                               "validation": datasets.Dataset.from_dict({"text": DOCS})})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = SourceConfig(type="disk", path=str(tmp_path / "dd"), split="validation")
    assert list(iter_documents(src)) == DOCS
    assert source_files(src), "a disk source is keyed on the files of its folder"
    with pytest.raises(ValueError, match=r"no split 'test'.*'train', 'validation'"):
        list(iter_documents(SourceConfig(type="disk", path=str(tmp_path / "dd"), split="test")))
    with pytest.raises(ValueError, match=r"'body'"):
        list(iter_documents(SourceConfig(type="disk", path=str(tmp_path / "ds"), field="body")))


def test_hub_source_from_local_folder(tmp_path):
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": d} for d in DOCS])
    src = SourceConfig(type="hub", hub_id=str(folder), split="train")
    assert list(iter_documents(src)) == DOCS
    assert [p.name for p in source_files(src)] == ["train.jsonl"]


def test_unavailable_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setattr(readers, "_hub_reachable", lambda: False)  # as on a machine without network
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        list(iter_documents(SourceConfig(type="hub", hub_id="no-such-org/no-such-dataset")))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "no-such-org/no-such-dataset" in message and "type: disk" in message and "jsonl" in message


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_documents(SourceConfig(type="jsonl", path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(iter_documents(SourceConfig(type="text", path=str(tmp_path / "*.txt"))))
