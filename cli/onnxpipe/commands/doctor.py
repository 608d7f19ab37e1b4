"""`onnxpipe doctor`: what this machine can run, and what is missing where CUDA cannot.

The report is the command's result, so it goes to stdout (`--json`: one object). Each execution
provider onnxruntime lists is proved by running a tiny model shipped in `onnxpipe/data/`, because
onnxruntime-gpu lists CUDA even where its libraries cannot load. Only onnxruntime is imported:
the [export] extra is looked up in the installed metadata, never imported.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from onnxpipe.runtime.machine import nvidia_gpus, physical_cores, usable_cpus

TENSORRT = "TensorrtExecutionProvider"
ORT_PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-silicon",
)
EXPORT_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx")


@click.command("doctor")
@click.option(
    "--device",
    default="cuda",
    show_default=True,
    metavar="auto|cpu|cuda[:N]",
    help="The device that must work for exit status 0 (auto and cpu: the CPU provider runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def doctor(device: str, as_json: bool) -> None:
    """Check what this machine can run, and say what is missing.

    Reports the onnxruntime version and build, the execution providers it lists and the
    ones that really run (each is tried on a tiny model: onnxruntime-gpu lists CUDA even
    where it cannot load), the CUDA and cuDNN libraries found or missing and what to
    install, the GPU, the thread settings, the export home and its exports, and whether
    the [export] extra is installed. The report goes to stdout.

    The exit status is 1 when --device (default: cuda) would fail here, with the reason
    on stderr, so `onnxpipe doctor && onnxpipe classify --device cuda ...` is safe.

    \b
      onnxpipe doctor
      onnxpipe doctor --device cpu --json | jq '.providers'
    """
    from onnxpipe.errors import DeviceError
    from onnxpipe.runtime.device import parse_device

    target = parse_device(device)
    report = collect_report(cuda_index=target.index if target.kind == "cuda" else 0)
    verdict = report["verdict"][target.kind]
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        render(report)
    if not verdict["ok"]:
        raise DeviceError(
            f"--device {device} would fail here: {verdict['reason']}",
            hint="use --device cpu" if target.kind == "cuda" else None,
        )


# --- the report as data --------------------------------------------------------------------


def collect_report(cuda_index: int = 0) -> dict[str, Any]:
    """Everything doctor says, as one JSON-ready dict (see the keys below)."""
    import onnxruntime as ort

    from onnxpipe import __version__

    ort_info = _onnxruntime_info(ort)
    providers = [_probe(ort, name, cuda_index) for name in ort.get_available_providers()]
    # Probe the sessions first: loading libraries by hand below could make CUDA work here
    # where an ordinary onnxpipe run would not.
    cuda = _cuda_report(ort_info, providers)
    gpu = nvidia_gpus()
    if cuda["usable"] is False and not gpu["devices"] and not cuda["driver"]["found"]:
        cuda["reason"] = (
            "there is no NVIDIA driver (libcuda.so.1 is missing"
            + ("; no nvidia-smi" if not gpu["nvidia_smi"] else "")
            + f"), and the CUDA provider cannot load ({cuda['reason']})"
        )
    cpu = next((p for p in providers if p["name"] == "CPUExecutionProvider"), None)
    cpu_ok = bool(cpu and cpu["runs"])
    cpu_reason = None if cpu_ok else (cpu["reason"] if cpu else "onnxruntime lists no CPUExecutionProvider")
    verdict = {
        "cuda": {
            "ok": bool(cuda["usable"]),
            "reason": None if cuda["usable"] else f"CUDA cannot run: {cuda['reason']}",
        },
        "cpu": {"ok": cpu_ok, "reason": cpu_reason},
    }
    verdict["auto"] = {
        "ok": verdict["cuda"]["ok"] or cpu_ok,
        "uses": "cuda" if verdict["cuda"]["ok"] else "cpu" if cpu_ok else None,
        "reason": None if verdict["cuda"]["ok"] or cpu_ok else cpu_reason,
    }
    return {
        "onnxpipe": {
            "version": __version__,
            "python": platform.python_version(),
            "executable": sys.executable,
            "platform": platform.platform(),
        },
        "onnxruntime": ort_info,
        "providers": providers,
        "cuda": cuda,
        "gpu": gpu,
        "threads": _threads(),
        "export_home": _export_home(),
        "export_extra": _export_extra(),
        "verdict": verdict,
    }


def _onnxruntime_info(ort) -> dict[str, Any]:
    try:
        from onnxruntime.capi import build_and_package_info as build

        package, cuda_version = getattr(build, "package_name", None), getattr(build, "cuda_version", None)
    except ImportError:
        package, cuda_version = None, None
    installed = {}
    for name in ORT_PACKAGES:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    build_info = ort.get_build_info() if hasattr(ort, "get_build_info") else None
    if build_info:
        build_info = build_info.removeprefix("ORT Build Info:").strip()
    return {
        "version": ort.__version__,
        "package": package,
        "installed_packages": installed,
        "device": ort.get_device(),
        "cuda_version": cuda_version or None,
        "build": build_info,
        "path": str(Path(ort.__file__).parent),
    }


def _probe(ort, name: str, cuda_index: int) -> dict[str, Any]:
    """Make a session on the tiny model with NAME first, run it, and say what really ran."""
    import numpy as np

    from onnxpipe.runtime.device import CPU, cuda_failure_reason
    from onnxpipe.runtime.sessions import make_session

    model = _tiny_model()
    wanted: Any = (name, {"device_id": cuda_index}) if name in ("CUDAExecutionProvider", TENSORRT) else name
    providers = [wanted] if name == CPU else [wanted, CPU]
    result: dict[str, Any] = {"name": name, "listed": True, "loads": False, "runs": False, "reason": None}
    error = None
    log: list[str] = []  # what the provider's loaders said, when it fell back
    try:  # made as the task commands make their sessions
        session = make_session(model, providers=providers, on_fallback=log.append)
        got = session.get_providers()
        result["loads"] = bool(got) and got[0] == name
        if result["loads"]:
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            (y,) = session.run(None, {"x": x})
            result["runs"] = bool(np.array_equal(y, x + x))
            if not result["runs"]:
                error = "the tiny model gave a wrong result"
    except Exception as exc:  # any provider failure is a finding, not a crash
        error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if not result["runs"]:
        text = "".join(log)
        result["reason"] = error or (cuda_failure_reason(text) if text.strip() else "onnxruntime fell back to the CPU")
    return result


def _tiny_model() -> bytes:
    from importlib.resources import files

    return (files("onnxpipe") / "data" / "doctor.onnx").read_bytes()


# --- CUDA ------------------------------------------------------------------------------------


def cuda_library_names(cuda_version: str | None) -> list[tuple[str, str]]:
    """(soname, what it is) for the CUDA provider of a build for CUDA CUDA_VERSION.

    The same list onnxruntime's preload_dlls() loads: libonnxruntime_providers_cuda.so needs
    cuBLAS, cuRAND and the runtime; cuFFT and cuDNN are loaded when a graph needs them.
    """
    major = (cuda_version or "12").split(".")[0]
    cufft = "12" if major.isdigit() and int(major) >= 13 else "11"
    return [
        ("libcuda.so.1", "NVIDIA driver"),
        (f"libcudart.so.{major}", f"CUDA {major} runtime"),
        (f"libcublasLt.so.{major}", f"cuBLASLt (CUDA {major})"),
        (f"libcublas.so.{major}", f"cuBLAS (CUDA {major})"),
        ("libcurand.so.10", "cuRAND"),
        (f"libcufft.so.{cufft}", "cuFFT"),
        ("libcudnn.so.9", "cuDNN 9"),
    ]


def _pip_nvidia_dirs() -> list[Path]:
    """lib folders of NVIDIA's pip wheels (nvidia-*-cu12, nvidia-cudnn-cu13, ...) on sys.path."""
    dirs = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            dirs += sorted(p for p in root.glob("*/lib") if p.is_dir())
    return dirs


def _loaded_path(soname: str) -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if os.path.basename(path).startswith(soname):
                    return path
    except OSError:
        pass
    return None


def _library(soname: str, what: str, pip_dirs: list[Path]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": soname,
        "what": what,
        "found": False,
        "path": None,
        "pip_path": None,
        "error": None,
    }
    try:
        ctypes.CDLL(soname)
        entry["found"] = True
        entry["path"] = _loaded_path(soname)
    except OSError as exc:
        message = str(exc)
        missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", message)
        if missing and missing.group(1) != soname:
            entry["error"] = f"it needs {missing.group(1)}, which is missing"
        elif not missing:
            entry["error"] = message[:200]
    for folder in pip_dirs:
        if (folder / soname).is_file():
            entry["pip_path"] = str(folder / soname)
            break
    return entry


def _cuda_report(ort_info: dict[str, Any], providers: list[dict[str, Any]]) -> dict[str, Any]:
    probe = next((p for p in providers if p["name"] == "CUDAExecutionProvider"), None)
    libraries = []
    if sys.platform.startswith("linux"):
        pip_dirs = _pip_nvidia_dirs()
        libraries = [_library(name, what, pip_dirs) for name, what in cuda_library_names(ort_info["cuda_version"])]
    driver = next((l for l in libraries if l["name"] == "libcuda.so.1"), {"found": None})
    report: dict[str, Any] = {
        "listed": probe is not None,
        "usable": bool(probe and probe["runs"]),
        "reason": None,
        "built_for": ort_info["cuda_version"],
        "driver": {"found": driver["found"]},
        "libraries": libraries,
        "advice": [],
    }
    if report["usable"]:
        return report
    advice = report["advice"]
    if probe is None:
        report["reason"] = f"this onnxruntime build ({ort_info['package'] or 'onnxruntime'}) has no CUDA provider"
        advice.append("install onnxruntime-gpu instead: pip uninstall onnxruntime; pip install onnxruntime-gpu")
    else:
        report["reason"] = probe["reason"]
    if len(ort_info["installed_packages"]) > 1:
        both = " and ".join(ort_info["installed_packages"])
        advice.append(
            f"{both} are installed together and overwrite each other's files: "
            f"uninstall them all, then install onnxruntime-gpu alone"
        )
    if probe is None:
        return report
    major = (ort_info["cuda_version"] or "12").split(".")[0]
    if driver["found"] is False:
        advice.append(
            "install the NVIDIA driver (it provides libcuda.so.1 and nvidia-smi); "
            "without an NVIDIA GPU, use --device cpu (--device auto does so by itself)"
        )
    missing = [l for l in libraries if l["name"] != "libcuda.so.1" and not l["found"]]
    pip_only = [l for l in missing if l["pip_path"]]
    absent = [l["name"] for l in missing if not l["pip_path"]]
    if absent:
        advice.append(
            f"install the CUDA {major} and cuDNN 9 libraries ({', '.join(absent)} missing), either "
            f"from pip: pip install 'onnxruntime-gpu[cuda,cudnn]' (onnxpipe loads them from site-packages); or "
            f"NVIDIA's system packages: the CUDA {major} runtime, cuBLAS, cuRAND and cuFFT, and cuDNN 9 "
            f"for CUDA {major}, where the loader finds them (ldconfig or LD_LIBRARY_PATH)"
        )
    if pip_only:
        folders = sorted({str(Path(l["pip_path"]).parent) for l in pip_only})
        advice.append(
            "NVIDIA's pip wheels hold "
            + ", ".join(l["name"] for l in pip_only)
            + " but they did not load from there; try: export LD_LIBRARY_PATH="
            + ":".join(folders)
            + "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        )
    return report


def _threads() -> dict[str, Any]:
    usable = usable_cpus()
    physical = physical_cores()
    quota = None
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if limit != "max":
            quota = round(int(limit) / int(period), 2)
    except (OSError, ValueError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical,
        "cgroup_cpu_quota": quota,
        "intra_op_default": "onnxruntime's default: one thread per physical core; --threads N sets it "
        "(at most the usable CPUs)",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _export_home() -> dict[str, Any]:
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.home import export_home, list_exports
    from onnxpipe.manifest import read_manifest

    home = export_home()
    exports = []
    for folder in list_exports(home):
        try:
            m = read_manifest(folder)
            exports.append(
                {
                    "name": folder.name,
                    "task": m.get("task"),
                    "precision": m.get("precision"),
                    "validated": bool((m.get("validation") or {}).get("passed")),
                }
            )
        except OnnxpipeError as exc:
            exports.append({"name": folder.name, "error": str(exc)})
    return {
        "path": str(home),
        "set_by": "ONNXPIPE_HOME" if os.environ.get("ONNXPIPE_HOME") else "default",
        "exists": home.is_dir(),
        "exports": exports,
    }


def _export_extra() -> dict[str, Any]:
    """The [export] extra's packages against onnxpipe's own pins, from the installed metadata."""
    wanted: dict[str, Any] = {}
    try:
        from packaging.requirements import Requirement

        for line in metadata.requires("onnxpipe") or []:
            req = Requirement(line)
            if (
                req.marker is not None
                and req.marker.evaluate({"extra": "export"})
                and not req.marker.evaluate({"extra": ""})
            ):
                wanted[req.name] = req.specifier
    except (ImportError, metadata.PackageNotFoundError):
        pass
    packages = []
    for name in wanted or {n: None for n in EXPORT_PACKAGES}:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        spec = wanted.get(name)
        fits = version is not None and (spec is None or spec.contains(version, prereleases=True))
        packages.append({"name": name, "version": version, "wanted": str(spec) if spec else None, "fits": fits})
    missing = [p["name"] for p in packages if p["version"] is None]
    return {
        "installed": not missing,
        "missing": missing,
        "mismatched": [p["name"] for p in packages if p["version"] is not None and not p["fits"]],
        "packages": packages,
    }


# --- the readable report -------------------------------------------------------------------


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape

    plain = bool(os.environ.get("NO_COLOR")) or not sys.stdout.isatty()
    out = Console(file=sys.stdout, no_color=plain, highlight=False, soft_wrap=True, emoji=False)
    ok, bad = "[green]yes[/green]", "[red]no[/red]"

    def head(title: str) -> None:
        out.print(f"\n[bold]{title}[/bold]")

    def row(key: str, value: str) -> None:
        out.print(f"  {key:<14} {value}")

    o, r = report["onnxpipe"], report["onnxruntime"]
    out.print(f"[bold]onnxpipe {o['version']}[/bold] (Python {o['python']}, {escape(o['executable'])})")
    head("onnxruntime")
    built = f", built for CUDA {r['cuda_version']}" if r["cuda_version"] else ""
    row("version", f"{r['version']} ({r['package'] or 'onnxruntime'}{built})")
    row("build", escape(r["build"] or "?"))
    row("path", escape(r["path"]))
    if len(r["installed_packages"]) > 1:
        row(
            "[red]conflict[/red]",
            "installed together: " + ", ".join(f"{k} {v}" for k, v in r["installed_packages"].items()),
        )

    head("providers (listed by onnxruntime; tried on a tiny model)")
    width = max(len(p["name"]) for p in report["providers"]) if report["providers"] else 10
    for p in report["providers"]:
        why = f"  [dim]{escape(p['reason'])}[/dim]" if p["reason"] else ""
        out.print(f"  {p['name']:<{width}}  runs: {ok if p['runs'] else bad}{why}")

    c = report["cuda"]
    head("CUDA: " + ("[green]usable[/green]" if c["usable"] else "[red]cannot run here[/red]"))
    if c["reason"]:
        row("why", escape(c["reason"]))
    for lib in c["libraries"]:
        where = (
            lib["path"]
            if lib["found"]
            else (
                "in NVIDIA's pip wheel, not on the loader path: " + lib["pip_path"] if lib["pip_path"] else lib["error"]
            )
        )
        state = "[green]found[/green]  " if lib["found"] else "[red]missing[/red]"
        out.print(f"  {lib['name']:<18} {state}  {escape(lib['what'])}" + (f": {escape(where)}" if where else ""))
    for line in c["advice"]:
        out.print(f"  [yellow]to fix[/yellow]  {escape(line)}")

    g = report["gpu"]
    head("GPU")
    if g["devices"]:
        for gpu in g["devices"]:
            row(
                f"cuda:{gpu['index']}",
                f"{gpu['name']}, {gpu['memory_total_mib']} MiB "
                f"({gpu['memory_used_mib']} MiB used), driver {gpu['driver']}",
            )
    else:
        row("none found", escape(g["error"] or ("nvidia-smi is not installed" if not g["nvidia_smi"] else "")))

    t = report["threads"]
    head("threads")
    row(
        "CPUs",
        f"{t['cpu_count']} ({t['usable_cpus']} usable by this process"
        + (f", cgroup quota {t['cgroup_cpu_quota']}" if t["cgroup_cpu_quota"] else "")
        + ")",
    )
    row("physical cores", str(t["physical_cores"] or "?"))
    row("onnxpipe uses", t["intra_op_default"])
    if t["omp_num_threads"]:
        row("OMP_NUM_THREADS", t["omp_num_threads"])

    h = report["export_home"]
    head("export home")
    row(
        "path",
        escape(h["path"])
        + (" (from ONNXPIPE_HOME)" if h["set_by"] == "ONNXPIPE_HOME" else " (default)")
        + ("" if h["exists"] else " [dim](does not exist yet)[/dim]"),
    )
    if not h["exports"]:
        row("exports", "none yet: onnxpipe export SOURCE --name NAME")
    for e in h["exports"]:
        if "error" in e:
            out.print(f"  {escape(e['name'])}  [red]{escape(e['error'])}[/red]")
        else:
            out.print(
                f"  {escape(e['name'])}  {e['task']}, {e['precision']}, "
                + ("validated" if e["validated"] else "[red]not validated[/red]")
            )

    x = report["export_extra"]
    head("\\[export] extra (onnxpipe export, finetune)")
    if x["installed"] and not x["mismatched"]:
        row("installed", ok + ": " + ", ".join(f"{p['name']} {p['version']}" for p in x["packages"]))
    else:
        if x["missing"]:
            row(
                "installed",
                bad + f" ({', '.join(x['missing'])} missing): pip install 'onnxpipe\\[export]'"
                " (torch first: pip install torch==2.13.0)",
            )
        for p in x["packages"]:
            if p["name"] in x["mismatched"]:
                row(p["name"], f"[yellow]{p['version']}[/yellow], onnxpipe is tested with {p['wanted']}")

    v = report["verdict"]
    head("verdict")
    row(
        "--device cuda",
        "[green]works[/green]" if v["cuda"]["ok"] else f"[red]fails[/red]: {escape(v['cuda']['reason'])}",
    )
    row("--device cpu", "[green]works[/green]" if v["cpu"]["ok"] else f"[red]fails[/red]: {escape(v['cpu']['reason'])}")
    row("--device auto", f"runs on {v['auto']['uses']}" if v["auto"]["ok"] else "[red]fails[/red]")
