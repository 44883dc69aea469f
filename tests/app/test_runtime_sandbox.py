"""The code sandbox: output, errors, timeouts (process group killed), no network."""
import os
import time

from kvcomm_app.runtime.sandbox import run_python


def test_captures_stdout_of_working_code():
    res = run_python("x = sum(range(10))\nprint('total', x)")
    assert res.ok and not res.timed_out and res.returncode == 0
    assert res.stdout.strip() == "total 45"
    assert res.error == ""


def test_captures_the_exception_of_failing_code():
    res = run_python("print('before')\n1 / 0\nprint('after')")
    assert not res.ok and res.returncode != 0
    assert res.stdout.strip() == "before"
    assert res.error == "ZeroDivisionError: division by zero"
    res = run_python("def f(:\n  pass")
    assert not res.ok and "SyntaxError" in res.error


def test_times_out_and_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child_alive"
    # the child forks a grandchild that would write a file after the deadline
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(2.0)\n"
        f"    open({str(marker)!r}, 'w').write('x')\n"
        "    os._exit(0)\n"
        "while True:\n"
        "    pass\n")
    t0 = time.perf_counter()
    res = run_python(code, timeout_s=0.7)
    elapsed = time.perf_counter() - t0
    assert res.timed_out and not res.ok
    assert "timed out" in res.error
    assert elapsed < 5.0
    time.sleep(2.5)
    assert not marker.exists(), "a forked child outlived the timeout"


def test_network_is_unavailable():
    code = ("import socket\n"
            "try:\n"
            "    s = socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
            "    print('CONNECTED')\n"
            "except OSError as e:\n"
            "    print('BLOCKED', type(e).__name__)\n")
    res = run_python(code)
    assert res.ok, res.stderr
    assert res.stdout.startswith("BLOCKED")


def test_runs_in_an_empty_scratch_folder_with_a_clean_environment():
    os.environ["KVCOMM_SANDBOX_SECRET"] = "leak"
    try:
        res = run_python("import os\nprint(sorted(os.listdir('.')))\n"
                         "print(os.environ.get('KVCOMM_SANDBOX_SECRET'))")
    finally:
        del os.environ["KVCOMM_SANDBOX_SECRET"]
    assert res.stdout.split() == ["[]", "None"]


def test_output_is_truncated():
    res = run_python("print('y' * 100000)", max_output_chars=500)
    assert res.ok and len(res.stdout) == 500
