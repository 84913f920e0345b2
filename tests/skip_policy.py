"""The suite's skip policy, as pytest hooks that conftest.py imports.

Skips that depend on what the machine permits, not on what `make setup` installs, are allowed.
With CBD_FAIL_ON_SKIP=1 (set by `make test`, so CI) any other skip fails the session: a test that
should run here (libtpu comes with the dev extra) must not pass silently by not running.
"""

import os

ALLOWED_SKIPS = (
    "unshare -Urm is not permitted",  # test_reliability: no tmpfs to fill.
    "unshare -U is not permitted",  # test_reliability: root, and no user namespace.
)
_unexpected_skips: list[str] = []


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")


def _note_skip(report) -> None:
  if report.skipped and not hasattr(report, "wasxfail"):
    reason = _skip_reason(report)
    if not any(allowed in reason for allowed in ALLOWED_SKIPS):
      _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
  _note_skip(report)


def pytest_collectreport(report):
  _note_skip(report)


def _fail_on_skip() -> bool:
  return os.environ.get("CBD_FAIL_ON_SKIP", "") not in ("", "0")


def pytest_terminal_summary(terminalreporter):
  if _fail_on_skip() and _unexpected_skips:
    terminalreporter.section("skips not in skip_policy.ALLOWED_SKIPS (CBD_FAIL_ON_SKIP=1)",
                             red=True)
    for line in _unexpected_skips:
      terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
  if _fail_on_skip() and _unexpected_skips and exitstatus in (0, 5):  # 5: nothing else ran.
    session.exitstatus = 1
