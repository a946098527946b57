"""A build's output (ops.buildlog, ops.progress): a recorded build of llama.cpp shows one
progress line and no warning; a failed command shows the log's tail."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from llamaserve.config import ConfigError
from llamaserve.ops.buildlog import BuildLog, tail
from llamaserve.ops.progress import ProgressLine, percent_of

# The start of a real build's output (make, two jobs), with the compiler's warnings.
RECORDED = Path(__file__).parent / "data" / "llama-cpp-build.txt"
LABEL = "llamaserve: compiling llama.cpp"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("line", "percent"),
    [
        ("[  7%] Building CXX object common/CMakeFiles/llama-common-base.dir/build-info.cpp.o", 7),
        ("[100%] Built target llama-server", 100),
        ("[12/240] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o", 5),
        ("[240/240] Linking CXX executable bin/llama-server", 100),
        ("/usr/lib/gcc/x86_64-linux-gnu/12/include/avx512fintrin.h:14148:10: warning: '__Y'", None),
        ("      |   [ 45%] not at the start of the line", None),
        ("-- Configuring done", None),
    ],
)
def test_the_percentage_of_a_line_of_make_or_ninja(line: str, percent: int | None) -> None:
    assert percent_of(line) == percent


def recorded_percentages() -> list[int]:
    """The percentages of the recorded output, each time it reaches a new one."""
    reached: list[int] = []
    for line in RECORDED.read_text().splitlines():
        percent = percent_of(line)
        if percent is not None and (not reached or percent > reached[-1]):
            reached.append(percent)
    return reached


def test_a_recorded_build_shows_its_progress_and_keeps_its_warnings_in_the_log(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    log = BuildLog(tmp_path / "build.log", out)
    log.run("compiling llama.cpp", ["cat", str(RECORDED)], progress=True)
    tenths = sorted({percent // 10 * 10 for percent in recorded_percentages()})
    assert out.getvalue().splitlines() == [f"{LABEL} {tenth:3d}%" for tenth in tenths]
    assert "warning:" not in out.getvalue()
    assert RECORDED.read_text() in log.path.read_text()
    assert "warning:" in log.path.read_text()


def test_on_a_terminal_the_line_is_rewritten_in_place(tmp_path: Path) -> None:
    out = Terminal()
    BuildLog(tmp_path / "build.log", out).run(
        "compiling llama.cpp", ["cat", str(RECORDED)], progress=True
    )
    reached = recorded_percentages()
    assert out.getvalue() == "".join(f"\r{LABEL} {percent:3d}%" for percent in reached) + "\n"


def test_progress_never_goes_backwards() -> None:
    out = Terminal()
    line = ProgressLine(out, "x")
    for percent in (3, 5, 4, 5, 9):
        line.update(percent)
    line.end()
    assert out.getvalue() == "\rx   3%\rx   5%\rx   9%\n"


def test_a_failed_command_shows_the_tail_of_the_log_and_ends_the_install(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    log = BuildLog(tmp_path / "logs" / "build.log", out)
    script = "for i in $(seq 1 100); do echo line $i; done; echo oops: error >&2; exit 3"
    with pytest.raises(ConfigError, match="exited with status 3") as failed:
        log.run("compiling llama.cpp", ["sh", "-c", script], progress=True)
    assert str(log.path) in str(failed.value)
    shown = out.getvalue().splitlines()
    assert shown[0] == f"--- the last 40 lines of {log.path} ---" and shown[-1] == "---"
    assert shown[1:-2] == [f"line {i}" for i in range(63, 101)] + ["oops: error"]
    assert re.fullmatch(r"\[exit status 3 after \d+ s\]", shown[-2])
    assert shown[1:-1] == tail(log.path)
