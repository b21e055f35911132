"""The command line's one renderer: tables and key/value lines, laid out the same way everywhere."""

from __future__ import annotations

from reports.common import number, percent
from reports.terminal import key_values, table


def test_table_lines_up_columns_two_spaces_apart() -> None:
    rows = [["lossless", "0.0515", percent(0.9071, 2)], ["fast", "0.4027", percent(0.8876, 2)]]
    assert table(["preset", "threshold", "accuracy"], rows, align="<>>").splitlines() == [
        "preset    threshold  accuracy",
        "lossless     0.0515    90.71%",
        "fast         0.4027    88.76%",
    ]


def test_columns_are_left_aligned_unless_align_says_otherwise_and_no_line_ends_in_spaces() -> None:
    text = table((), [["PASS", "zero 5xx: 0 answers 5xx"], ["FAIL", "nothing lost: 3 lost"]], indent="  ")
    assert text == "  PASS  zero 5xx: 0 answers 5xx\n  FAIL  nothing lost: 3 lost"
    assert table(["a", "b"], [["1", ""]]) == "a  b\n1"


def test_minimum_widths_line_up_rows_printed_one_at_a_time() -> None:
    widths = (12, 12)
    first = table((), [["closed 64", number(123.456, 1, " req/s"), "errors 0"]], align="<>", widths=widths)
    second = table((), [["open 1000", number(1234.5, 1, " req/s"), "errors 2"]], align="<>", widths=widths)
    assert first.index("errors") == second.index("errors")
    assert first == "closed 64      123.5 req/s  errors 0"


def test_key_values_line_values_up_after_the_longest_name() -> None:
    assert key_values([("load", "open loop, 50 req/s"), ("errors", "none"), ("requests ok / sent", "9 / 10")]) == (
        "load                open loop, 50 req/s\nerrors              none\nrequests ok / sent  9 / 10"
    )
    assert table((), []) == ""
