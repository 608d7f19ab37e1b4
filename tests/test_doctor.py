"""`onnxpipe doctor`: the report on stdout (text or JSON), the providers proved on the shipped tiny
model, the CUDA verdict and its exit status, and no heavy imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.commands import doctor as doctor_module
from onnxpipe.main import cli

DATA = Path(doctor_module.__file__).resolve().parent.parent / "data" / "doctor.onnx"
NO_GPU = not shutil.which("nvidia-smi") and not Path("/proc/driver/nvidia").exists()


def _doctor(*args: str):
    return CliRunner().invoke(cli, ["doctor", *args])


def _report(*args: str) -> tuple[dict, object]:
    result = _doctor("--json", *args)
    return json.loads(result.stdout), result  # the whole of stdout is the JSON: nothing else leaked there


def test_json_shape():
    report, result = _report("--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert set(report) == {
        "onnxpipe",
        "onnxruntime",
        "providers",
        "cuda",
        "gpu",
        "threads",
        "export_home",
        "export_extra",
        "verdict",
    }
    assert set(report["gpu"]) == {"nvidia_smi", "devices", "error"}
    assert report["onnxruntime"]["version"].startswith("1.")
    names = [p["name"] for p in report["providers"]]
    assert names[-1] == "CPUExecutionProvider"
    for p in report["providers"]:
        assert set(p) == {"name", "listed", "loads", "runs", "reason"}
        assert p["runs"] or p["reason"], p  # a provider that does not run always says why
    assert report["providers"][-1]["runs"] is True and report["verdict"]["cpu"] == {"ok": True, "reason": None}
    assert set(report["cuda"]) >= {"listed", "usable", "reason", "built_for", "libraries", "advice"}
    assert set(report["threads"]) >= {"cpu_count", "usable_cpus", "physical_cores", "intra_op_default"}
    assert report["threads"]["cpu_count"] == os.cpu_count()
    assert set(report["export_extra"]) == {"installed", "missing", "mismatched", "packages"}


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA driver")
def test_on_a_machine_without_a_gpu_cuda_is_not_usable_and_says_why():
    report, result = _report()
    assert result.exit_code == 1
    cuda = report["cuda"]
    assert cuda["usable"] is False and cuda["reason"]
    assert report["verdict"]["cuda"]["ok"] is False
    assert report["verdict"]["auto"] == {"ok": True, "uses": "cpu", "reason": None}
    if cuda["listed"]:  # onnxruntime-gpu: it lists CUDA, and the probe shows it does not load
        probe = next(p for p in report["providers"] if p["name"] == "CUDAExecutionProvider")
        assert probe["listed"] and not probe["runs"] and probe["reason"]
        assert "no NVIDIA driver" in cuda["reason"]
        assert any(lib["name"] == "libcuda.so.1" and not lib["found"] for lib in cuda["libraries"])
        assert any("onnxruntime-gpu[cuda,cudnn]" in line for line in cuda["advice"])
    # the verdict is one line on stderr, the report stays on stdout
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("onnxpipe: error: --device cuda would fail here: CUDA cannot run: ")


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA driver")
def test_text_report_says_plainly_that_cuda_cannot_run_here():
    result = _doctor()
    assert result.exit_code == 1
    out = result.stdout
    assert "CUDA: cannot run here" in out
    assert "CPUExecutionProvider" in out and "runs: yes" in out
    assert "--device cuda  fails: CUDA cannot run: " in out
    assert "--device auto  runs on cpu" in out
    assert "\x1b[" not in out  # stdout is not a terminal here: plain text
    assert "EP Error" not in out  # onnxruntime's own banner is kept off stdout
    assert "would fail here" in result.stderr and "Traceback" not in result.stderr


def test_cpu_and_auto_exit_zero_where_the_cpu_runs():
    for device in ("cpu", "auto"):
        result = _doctor("--device", device)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert "--device cpu   works" in result.stdout


def test_bad_device_is_a_usage_error():
    result = _doctor("--device", "tpu")
    assert result.exit_code == 2 and "unknown device" in result.stderr and result.stdout == ""


def test_export_home_and_its_exports(tmp_path):
    home = Path(os.environ["ONNXPIPE_HOME"])
    (home / "sentiment").mkdir(parents=True)
    (home / "sentiment" / "model.onnx").write_bytes(b"graph")  # the manifest's schema wants its graph there
    (home / "sentiment" / "onnxpipe.json").write_text(
        json.dumps(
            {
                "format": 1,
                "name": "sentiment",
                "task": "text-classification",
                "family": "encoder",
                "files": {"model": "model.onnx"},
                "precision": "int8",
                "validation": {"passed": True},
            }
        )
    )
    (home / "broken").mkdir()
    (home / "broken" / "onnxpipe.json").write_text("{not json")
    report, _ = _report("--device", "cpu")
    h = report["export_home"]
    assert h["path"] == str(home) and h["set_by"] == "ONNXPIPE_HOME" and h["exists"]
    assert h["exports"][1] == {
        "name": "sentiment",
        "task": "text-classification",
        "precision": "int8",
        "validated": True,
    }
    assert h["exports"][0]["name"] == "broken" and "not valid JSON" in h["exports"][0]["error"]
    text = _doctor("--device", "cpu").stdout
    assert f"{home} (from ONNXPIPE_HOME)" in text and "sentiment  text-classification, int8, validated" in text


def test_export_extra_is_read_from_metadata():
    extra = _report("--device", "cpu")[0]["export_extra"]
    names = {p["name"] for p in extra["packages"]}
    assert {"torch", "transformers", "optimum", "onnx"} <= names
    for p in extra["packages"]:
        assert p["fits"] == (p["version"] is not None and p["name"] not in extra["mismatched"])
    assert extra["installed"] == (not extra["missing"])


def test_an_onnxruntime_without_cuda_is_told_to_install_onnxruntime_gpu(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    report, result = _report()
    assert result.exit_code == 1
    assert report["cuda"]["listed"] is False
    assert "has no CUDA provider" in report["cuda"]["reason"]
    assert any("pip install onnxruntime-gpu" in line for line in report["cuda"]["advice"])


def test_cuda_library_names_follow_the_build():
    names13 = [n for n, _ in doctor_module.cuda_library_names("13.0")]
    assert names13 == [
        "libcuda.so.1",
        "libcudart.so.13",
        "libcublasLt.so.13",
        "libcublas.so.13",
        "libcurand.so.10",
        "libcufft.so.12",
        "libcudnn.so.9",
    ]
    names12 = [n for n, _ in doctor_module.cuda_library_names("12.8")]
    assert "libcudart.so.12" in names12 and "libcufft.so.11" in names12


def test_the_shipped_model_is_tiny_and_what_onnx_helper_builds():
    assert DATA.stat().st_size < 1024
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(DATA.read_bytes())
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Add"]
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    assert model.opset_import[0].version == 13


def test_doctor_imports_no_export_stack():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "onnxpipe", "doctor", "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "onnxruntime" in imported
    assert not imported & {"torch", "transformers", "optimum", "onnx"}


def _fake_nvidia_smi(tmp_path, monkeypatch, script: str):
    """An nvidia-smi on PATH that runs SCRIPT (sh)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n" + script)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    return smi


def test_gpu_from_nvidia_smi(tmp_path, monkeypatch):
    smi = _fake_nvidia_smi(tmp_path, monkeypatch, "echo '0, NVIDIA H200, 143771, 0, 570.86.15'\n")
    report, _ = _report("--device", "cpu")
    assert report["gpu"] == {
        "nvidia_smi": str(smi),
        "error": None,
        "devices": [
            {"index": 0, "name": "NVIDIA H200", "memory_total_mib": 143771, "memory_used_mib": 0, "driver": "570.86.15"}
        ],
    }
    assert "cuda:0         NVIDIA H200, 143771 MiB (0 MiB used), driver 570.86.15" in _doctor("--device", "cpu").stdout


def test_a_failing_nvidia_smi_is_reported(tmp_path, monkeypatch):
    _fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n",
    )
    gpu = _report("--device", "cpu")[0]["gpu"]
    assert gpu["devices"] == [] and gpu["error"].startswith("NVIDIA-SMI has failed")
