"""A task's output as kept: the tail of a stream, cut to a limit, decoded, marked when cut
(heartline/_output.py), and read from a worker slot's files (endpoint/_capture.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from heartline._output import MARKER_ROOM, clip_output, cut_marker, tail_text
from heartline.endpoint._capture import OutputFiles, OutputFolder


def test_a_whole_stream_is_its_text() -> None:
    assert tail_text(b"") == ""
    assert tail_text("héllo\n".encode()) == "héllo\n"


def test_a_cut_stream_starts_with_a_marker_of_the_bytes_dropped() -> None:
    assert tail_text(b"world\n", cut=6) == "[... 6 bytes cut ...]\nworld\n"
    assert cut_marker(123456) == "[... 123456 bytes cut ...]\n"


@pytest.mark.parametrize("char", ["é", "€", "𝄞"])  # 2, 3 and 4 bytes in UTF-8
def test_a_character_the_cut_fell_inside_is_dropped_whole(char: str) -> None:
    data = f"ab{char}cd".encode()
    start = 2 + len(char.encode())
    for cut in range(3, start):  # every place inside the character
        text = tail_text(data[cut:], cut)
        # No replacement character for the half: the rest of it is counted as cut.
        assert text == f"{cut_marker(start)}cd", (char, cut)
    assert tail_text(data[2:], 2) == f"{cut_marker(2)}{char}cd"


def test_bytes_that_are_no_utf8_become_replacement_characters() -> None:
    assert tail_text(b"ok \xff\xfe\n") == "ok \ufffd\ufffd\n"
    # More than 3 continuation bytes in a row at a cut: only a character's worth is dropped.
    assert tail_text(b"\x80\x80\x80\x80x", cut=1) == f"{cut_marker(4)}\ufffdx"


def test_clip_keeps_what_fits_and_the_tail_of_what_does_not() -> None:
    assert clip_output("", 10) == ""
    assert clip_output("short", 10) == "short"
    # A tail the agent cut already fits with its marker.
    marked = tail_text(b"x" * 10, cut=90)
    assert clip_output(marked, 10) == marked
    long = "".join(f"{i}\n" for i in range(10_000))
    clipped = clip_output(long, 100)
    marker, rest = clipped.split("\n", 1)
    assert marker == f"[... {len(long) - 100} bytes cut ...]"
    assert long.endswith(rest) and len(rest) == 100
    assert len(clipped.encode()) <= 100 + MARKER_ROOM


def test_clip_counts_bytes_not_characters() -> None:
    text = "€" * 100  # 300 bytes
    clipped = clip_output(text, 100)
    marker, rest = clipped.split("\n", 1)
    # The cut at byte 200 falls inside a character (3 bytes each): its last byte goes too.
    assert rest == "€" * 33 and marker == "[... 201 bytes cut ...]"


def test_a_limit_of_zero_keeps_nothing() -> None:
    assert clip_output("anything", 0) == ""


def test_output_files_give_their_tails_and_start_over(tmp_path: Path) -> None:
    files = OutputFiles(str(tmp_path / "worker-0"))
    try:
        assert files.take(100) == ("", "")
        # A worker's way of writing: appending, through its own descriptors.
        out = os.open(files.stdout_path, os.O_WRONLY | os.O_APPEND)
        err = os.open(files.stderr_path, os.O_WRONLY | os.O_APPEND)
        os.write(out, b"0123456789" * 20)
        os.write(err, "trouble: é\n".encode())
        stdout, stderr = files.take(100)
        assert stdout == cut_marker(100) + "0123456789" * 10
        assert stderr == "trouble: é\n"
        # Emptied: the next task's output starts at the beginning.
        assert os.path.getsize(files.stdout_path) == os.path.getsize(files.stderr_path) == 0
        os.write(out, b"next task\n")
        assert files.take(100) == ("next task\n", "")
        # A limit of 0 takes nothing, but still empties the files.
        os.write(out, b"unseen\n")
        assert files.take(0) == ("", "")
        assert os.path.getsize(files.stdout_path) == 0
        assert oct(os.stat(files.stdout_path).st_mode & 0o777) == "0o600"
        os.close(out)
        os.close(err)
    finally:
        files.close()


def test_the_output_folder_is_private_and_removed() -> None:
    folder = OutputFolder()
    try:
        assert oct(os.stat(folder.path).st_mode & 0o777) == "0o700"
        files = folder.slot(3)
        assert os.path.basename(files.stdout_path) == "worker-3.stdout"
        files.close()
    finally:
        folder.remove()
    assert not os.path.exists(folder.path)
