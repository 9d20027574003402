"""Running an example, benchmark or doc page as a user would (and `tables`, to
read the Markdown tables they print).

By default in this test process (`runpy`, as `__main__`, with its own `sys.argv`,
its printed output captured): a new process per script would pay for importing
JAX, Flax and the rest again, a few seconds each. Scripts that change process-wide
state run in their own process (`isolated=True`): one that sets `XLA_FLAGS` before
JAX starts, one that registers rules for `BatchedLoraArray` (which would change
what other tests see), one that clears JAX's caches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(args, *, isolated: bool = False) -> str:
    """`python *args` from the repository root on the CPU (a path, or `-m` and a
    module: `["-m", "benchmarks.serving", "--quick"]`); its stdout, or a failed
    assertion with what it printed."""
    if isolated:
        return _run_process(args)
    args = [str(a) for a in args]
    module = args[1] if args[0] == "-m" else None
    path, *argv = args[1:] if module else args
    out = io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [path, *argv]
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / path), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            message = f"{args} exited with {e.code}:\n{out.getvalue()}"
            raise AssertionError(message) from None
    except BaseException as e:
        raise AssertionError(f"{args} failed:\n{out.getvalue()}") from e
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return out.getvalue()


def _run_process(args) -> str:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        # The checkout under test first, whatever copy of lorax_arrays is
        # installed (`python path/to/script.py` puts only the script's folder
        # on sys.path).
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        # Compile without XLA's optimisation passes, as the tests do
        # (tests/conftest.py).
        "JAX_DISABLE_MOST_OPTIMIZATIONS": os.environ.get(
            "JAX_DISABLE_MOST_OPTIMIZATIONS", "1"
        ),
    }
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_devices_json(code: str, devices: int = 8) -> dict:
    """`code` run in its own process with `devices` simulated CPU devices (set
    before JAX starts, with the tests' compile options) and this checkout's
    `lorax_arrays`; the JSON object its last printed line holds."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "JAX_DISABLE_MOST_OPTIMIZATIONS": os.environ.get(
            "JAX_DISABLE_MOST_OPTIMIZATIONS", "1"
        ),
        "XLA_FLAGS": " ".join(
            [
                os.environ.get("XLA_FLAGS", ""),
                f"--xla_force_host_platform_device_count={devices}",
            ]
        ).strip(),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table in `markdown`: its rows (header first, the separator
    left out), each a list of stripped cells."""
    found, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found
