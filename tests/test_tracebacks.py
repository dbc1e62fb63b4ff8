"""Remote tracebacks keep their source lines, whatever cloudpickle does to file names.

cloudpickle 3.1.3 names the file of every by-value code object ``<dynamic-code>``; older
versions keep the client's path, which a remote worker may not have. The client ships the
source lines of by-value code with the payload (heartline/_serialize.py), and the worker
puts them back into the traceback.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest

from heartline import _forms
from heartline._serialize import (
    _SourcePickler,
    describe_exception,
    dumps_args,
    dumps_function,
    loads_with_sources,
)
from tests.conftest import ServerProc
from tests.helpers import Proc

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def divide(x: int) -> float:
    return helper_divide(x)


def helper_divide(x: int) -> float:
    return 1 / (x - x)  # the failing line of the helper


def wrap_error(x: int) -> None:
    try:
        divide(x)
    except ZeroDivisionError as exc:
        raise RuntimeError("wrapped") from exc  # the failing line of the wrapper


def call(fn, x):  # noqa: ANN001, ANN201 - a task that runs a function it was given
    return fn(x)


def remote_traceback(fn, *args) -> str:  # noqa: ANN001
    """Round-trip ``fn`` and its arguments through the payloads and fail it, as a worker would."""
    loaded, sources = loads_with_sources(dumps_function(fn))
    (call_args, kwargs), arg_sources = loads_with_sources(dumps_args(args, {}))
    with pytest.raises(BaseException) as info:
        loaded(*call_args, **kwargs)
    return describe_exception(info.value, {**sources, **arg_sources})[2]


def test_cloudpickle_hands_every_by_value_code_object_to_reducer_override() -> None:
    # The library behaviour the source map relies on, pinned for the version installed.
    import io

    pickler = _SourcePickler(io.BytesIO())
    pickler.dump(wrap_error)
    names = {code.co_qualname for code in pickler.codes}
    assert {"wrap_error", "divide", "helper_divide"} <= names


def test_a_by_value_function_keeps_its_file_and_lines_through_helpers_and_causes() -> None:
    tb = remote_traceback(wrap_error, 3)
    here = str(Path(__file__))
    assert "<dynamic-code>" not in tb, tb
    assert f'File "{here}"' in tb, tb
    assert "return 1 / (x - x)  # the failing line of the helper" in tb, tb
    assert 'raise RuntimeError("wrapped") from exc  # the failing line of the wrapper' in tb, tb
    assert "The above exception was the direct cause" in tb
    assert tb.rstrip().endswith("RuntimeError: wrapped"), tb


def test_a_lambda_and_a_closure_keep_their_lines() -> None:
    offset = 0
    tb = remote_traceback(lambda x: 1 / (x * offset), 2)
    assert "lambda x: 1 / (x * offset)" in tb, tb

    def nested(x: int) -> int:
        return [1][x]  # an index error in a closure

    assert "return [1][x]  # an index error in a closure" in remote_traceback(nested, 5)


def test_a_function_passed_as_an_argument_keeps_its_lines() -> None:
    tb = remote_traceback(call, helper_divide, 1)
    assert "return 1 / (x - x)  # the failing line of the helper" in tb, tb


def test_payloads_without_by_value_code_are_plain_cloudpickle() -> None:
    # cloudpickle's stream, then the trailer that says how it was made (heartline/_forms.py).
    plain = cloudpickle.dumps(pow, protocol=pickle.HIGHEST_PROTOCOL)
    payload = dumps_function(pow)
    assert payload.startswith(plain)
    made = _forms.read(payload)
    assert made is not None and made.forms == ("reference",) and made.end == len(plain)
    assert dumps_args((1, "a"), {"k": 2}) == cloudpickle.dumps(
        ((1, "a"), {"k": 2}), protocol=pickle.HIGHEST_PROTOCOL
    )
    # A payload with a source map still loads as the function alone with plain pickle.
    assert pickle.loads(dumps_function(divide)).__name__ == "divide"
    assert loads_with_sources(dumps_function(pow)) == (pow, {})


SCRIPT = '''
import sys
from heartline import Client, RemoteError


def explode(n):
    table = {"a": 1}
    return table["missing-" + str(n)]  # the line that fails in __main__


if __name__ == "__main__":
    with Client(sys.argv[1]) as hc:
        tid = hc.submit("local", explode, 7)
        try:
            hc.get_result(tid, timeout=60)
        except RemoteError as err:
            print(err.remote_traceback)
            sys.exit(0)
    sys.exit("the task did not fail")
'''


def test_a_function_of_a_scripts_main_shows_its_line_end_to_end(
    server: ServerProc, agent: Proc, tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = subprocess.run(
        [sys.executable, str(script), server.address],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 8, in explode' in out.stdout, out.stdout
    assert 'return table["missing-" + str(n)]  # the line that fails in __main__' in out.stdout
    assert "KeyError: 'missing-7'" in out.stdout
