"""--amp auto/none, --compile and `python -m eval.gpu_check --device cpu`."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import icon
import liftedcl
import mrpose
import mscl
from common import utils
from helpers import run_script

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given torch capability and /proc/cpuinfo flags."""
    def set_cpu(capability, flags):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(utils, "cpu_flags", lambda: set(flags))
        utils.native_bf16.cache_clear()
    yield set_cpu
    utils.native_bf16.cache_clear()


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX2", {"avx2", "fma"}, False),                        # bf16 emulated
    ("AVX512", {"avx512f", "avx512bw"}, False),              # AVX-512 without its bf16 extension
    ("AVX512", {"avx512f", "avx512_bf16"}, True),            # this project's CPU
    ("AVX512", {"avx512f", "avx512_bf16", "amx_bf16"}, True),
    # ATEN_CPU_CAPABILITY=avx2: torch will not use it
    ("AVX2", {"avx512f", "avx512_bf16"}, False),
])
def test_auto_amp_is_bf16_only_where_the_cpu_has_it(cpu, monkeypatch, capability, flags, native):
    cpu(capability, flags)
    monkeypatch.delenv("POSE_AMP_AUTO", raising=False)
    assert utils.native_bf16(CPU) is native
    assert utils.amp_dtype(SimpleNamespace(amp="auto"), CPU) == (torch.bfloat16 if native else None)
    with utils.autocast(SimpleNamespace(amp="auto"), CPU):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_amp_choices_and_the_test_pin(cpu, monkeypatch):
    cpu("AVX512", {"avx512_bf16"})
    for amp, dtype in [(None, None), ("none", None), ("bf16", torch.bfloat16),
                       ("fp16", torch.float16)]:
        assert utils.amp_dtype(SimpleNamespace(amp=amp), CPU) == dtype
    # conftest.py pins `auto` to fp32 for every test and the scripts they start; an explicit choice
    # still wins
    monkeypatch.setenv("POSE_AMP_AUTO", "none")
    assert utils.amp_dtype(SimpleNamespace(amp="auto"), CPU) is None
    assert utils.amp_dtype(SimpleNamespace(amp="bf16"), CPU) == torch.bfloat16


@pytest.mark.parametrize("script, paper",
                         [(mrpose, ["coco", "--pretrained", "none"]), (icon, ["mpii"]),
                          (mscl, ["imagenet"]), (liftedcl, ["coco", "--pretrained", "none"])])
def test_auto_is_the_demo_default_only(script, paper):
    assert script.get_args(["--data", "demo"]).amp == "auto"
    assert script.get_args(["--data"] + paper).amp is None  # paper presets: fp32 unless asked
    assert script.get_args(["--data", "demo", "--amp", "none"]).amp == "none"
    assert script.get_args(["--data", "demo", "--amp"]).amp == "bf16"
    assert (not script.get_args(["--data", "demo"]).compile
            and script.get_args(["--compile"]).compile)


def test_compiled_training_step_matches_eager():
    """One step of a small conv net with BatchNorm: the inductor-compiled model gives the eager loss
    and gradients, the parameters it trains are the eager module's (checkpoint keys unchanged)."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    twin = copy.deepcopy(eager)
    compiled = utils.compile_model(twin, True)
    assert utils.compile_model(eager, False) is eager and eager._compiled_call_impl is None
    # in place: the checkpoint keys stay
    assert compiled is twin and twin._compiled_call_impl is not None
    assert list(twin.state_dict()) == list(eager.state_dict())
    x, target = torch.randn(4, 3, 16, 12), torch.randn(4, 4, 16, 12)
    losses = []
    for model in (eager, compiled):
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # BN statistics updated the same way
    torch.testing.assert_close(twin[1].running_var, eager[1].running_var)


def test_gpu_check_on_the_cpu(tmp_path):
    """`python -m eval.gpu_check --device cpu` on a pose script (evaluated by --eval-only) and a
    pretraining one (evaluated by mrpose.py on its backbone): PASS lines for train, resume and
    evaluate, and a throughput row each. The four scripts together take twice as long (about 2 CPU
    minutes): icon.py and liftedcl.py take the same paths."""
    p = run_script("-m", ["eval.gpu_check", "--device", "cpu", "--scripts", "mrpose", "mscl",
                          "--out", tmp_path])
    lines = [line for line in p.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 6 and all(line.startswith("PASS") for line in lines), p.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["run"] for r in result["rows"]] == ["mrpose", "mscl"]
    assert all(r["rate"] > 0 and r["peak_mib"] > 0 and r["flops"] > 0 for r in result["rows"])
    # the resumed run continued the first one: two epochs in one log, and the evaluation scored its
    # checkpoint
    assert ([json.loads(x)["iteration"]
             for x in (tmp_path / "mrpose" / "log.jsonl").read_text().splitlines()] == [2, 4])
    assert "AP" in json.loads((tmp_path / "mscl" / "transfer" / "metrics.json").read_text())


def test_gpu_check_fails_a_line_that_does_not_run(tmp_path):
    from eval import gpu_check
    args = gpu_check.get_args(["--device", "cpu"])
    lines, row = gpu_check.run_script_checks(args, "mrpose", ["--no-such-flag"], str(tmp_path), 1)
    assert (row is None and len(lines) == 1 and not lines[0]["ok"]
            and lines[0]["why"].startswith("exit 2")), lines
