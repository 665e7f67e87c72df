"""The benchmark results table (``benchmarks/results/rows.jsonl``): the writer replaces a row by its
key, every row carries its provenance, and the README's tables are what ``benchmarks/tables.py``
renders from the rows."""

import pytest

from benchmarks import tables
from benchmarks.common import KEY, make_row, read_rows, write_rows


def _row(variant, value, machine="test machine"):
    return make_row("bench", variant, "S=8", "fp32", machine, {"time_s": value}, {"commit": "abc1234"})


def test_write_rows_replaces_the_row_with_the_same_key(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    write_rows([_row("stock", 1.0), _row("mst", 2.0)], path)
    write_rows([_row("mst", 3.0), _row("mst", 4.0, machine="other machine")], path)
    rows = {(r["variant"], r["machine"]): r["metrics"]["time_s"] for r in read_rows(path)}
    assert rows == {("stock", "test machine"): 1.0, ("mst", "test machine"): 3.0, ("mst", "other machine"): 4.0}


def test_write_rows_refuses_two_new_rows_with_one_key(tmp_path):
    with pytest.raises(ValueError, match="share a key"):
        write_rows([_row("mst", 1.0), _row("mst", 2.0)], str(tmp_path / "rows.jsonl"))


def test_a_row_needs_every_key_field():
    with pytest.raises(ValueError, match="'shape'"):
        make_row("bench", "mst", "", "fp32", "m", {}, {})


def test_every_row_has_its_key_and_provenance():
    rows = read_rows()
    assert rows
    for r in rows:
        assert all(isinstance(r[k], str) and r[k] for k in KEY), r
        assert {"commit", "dirty", "torch", "megatron_core", "date", "source"} <= set(r["provenance"]), r


def test_readme_tables_are_rendered_from_the_rows():
    assert tables.main(["--check"]) == 0, "README tables differ from the rows: run python -m benchmarks.tables"


def test_check_fails_on_an_edited_table(tmp_path):
    with open(tables.README) as f:
        text = f.read()
    edited = text.replace("<!-- table:cpu -->\n", "<!-- table:cpu -->\n| an edited line |\n", 1)
    assert edited != text
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    assert tables.main(["--check", "--readme", str(readme)]) == 1


def test_an_unknown_table_name_is_an_error():
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        tables.render("<!-- table:nope -->\n<!-- /table:nope -->", [])
