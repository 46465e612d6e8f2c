"""Every test runs fp32 whatever the CPU: `--amp auto` (the demo presets' default) would pick bf16
on a CPU with native bf16 and fp32 elsewhere, so the same test would compare different numbers on
different machines. The scripts the tests start inherit this environment; a test that wants bf16
asks for it with --amp bf16.

A passed test's tmp_path is deleted when it ends: the training tests write checkpoints, and pytest
would otherwise keep every test's folder of its last three sessions (about 7 GB each). A failed
test's folder stays for inspection."""
import os
import shutil

import pytest

os.environ["POSE_AMP_AUTO"] = "none"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.test_passed = report.passed
    return report


@pytest.fixture(autouse=True)
def _delete_tmp_path_if_passed(request):
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None and getattr(request.node, "test_passed", False):
        shutil.rmtree(path, ignore_errors=True)
