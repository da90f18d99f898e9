"""fedtune.errors: the one-line form every layer prints an error in."""

from fedtune.errors import one_line


def test_one_line_collapses_newlines_and_runs_of_spaces():
    assert one_line("bad value\n  in field   x\r\n\tof file.toml\n") == "bad value in field x of file.toml"


def test_one_line_accepts_an_exception():
    assert one_line(ValueError("a\nb")) == "a b"
