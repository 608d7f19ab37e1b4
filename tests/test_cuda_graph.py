"""onnxpipe's CUDA graph (export.cuda_graph) and the runtime that drives it (runtime.decoder.SharedBufferDecoder).

No GPU runs these tests, except the ones marked `gpu`: the graph's CPU twin (the same rewrite in float32)
and the fp16 graph itself run on ONNX Runtime's CPU provider, shared key/value buffer included, and where
CUDA matters (buffers on the device, the provider a session got) the provider is faked.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from onnxpipe.errors import DeviceError, ExportFolderError, UsageError
from onnxpipe.runtime.device import CUDA, Device

PROMPTS = ["The cat sat on the mat and looked at the long row of houses", "Hello", "A river runs"]
NEW = 24


@pytest.fixture(scope="module")
def llama(checkpoint):
    import transformers

    folder = checkpoint("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return folder, model, [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def graphs(llama, tmp_path_factory):
    """{"float32": the CPU twin's file, "float16": the CUDA graph's file}, built from the tiny Llama."""
    from onnxpipe.export import cuda_graph

    built = {}
    for dtype in ("float32", "float16"):
        out = tmp_path_factory.mktemp(f"cuda-graph-{dtype}")
        name, _ = cuda_graph.build(llama[1], out, dtype)
        built[dtype] = out / name
    return built


def _reference(model, prompts, num_beams: int = 1) -> list[list[int]]:
    import torch

    ids = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                num_beams=num_beams,
                pad_token_id=model.config.eos_token_id,
            )
        ids.append(out[0, len(prompt) :].tolist())
    return ids


def _decoder(path, max_positions=256):
    from onnxpipe.runtime.decoder import SharedBufferDecoder
    from onnxpipe.runtime.sessions import make_session

    return SharedBufferDecoder(make_session(path, threads=1), Device("cpu"), max_positions)


def _generate(decoder, prompts, num_beams: int = 1, eos: list[int] | None = None) -> list[list[int]]:
    from onnxpipe.decoding import GenerationConfig, generate

    eos = eos or [2]
    config = GenerationConfig(
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        num_beams=num_beams,
        eos_token_id=eos,
        pad_token_id=eos[0],
    )
    logits, step = decoder.prefill(prompts, eos[0], max_new_tokens=NEW)
    return [nbest[0].token_ids for nbest in generate(step, logits, prompts, config)]


# --- the graph -------------------------------------------------------------------------------


def test_the_graph_takes_one_buffer_per_cache_tensor(graphs):
    import onnx

    for dtype, path in graphs.items():
        graph = onnx.load(str(path)).graph
        inputs = {i.name: i for i in graph.input}
        assert list(inputs)[:3] == ["input_ids", "seqlens_k", "total_sequence_length"]
        assert "attention_mask" not in inputs and "position_ids" not in inputs  # positions come from seqlens_k
        elem = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.FLOAT
        outputs = {o.name: o for o in graph.output}
        assert outputs["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 at the boundary
        for i in range(2):
            for kind in ("key", "value"):
                past = inputs[f"past_key_values.{i}.{kind}"].type.tensor_type
                present = outputs[f"present.{i}.{kind}"].type.tensor_type
                assert past.elem_type == present.elem_type == elem
                assert [d.dim_param or d.dim_value for d in past.shape.dim] == [
                    "batch_size",
                    2,
                    "max_sequence_length",
                    8,
                ]
                assert past.shape == present.shape  # the same buffer, bound twice
        attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert len(attention) == 2
        for n in attention:  # no attention bias: the CUDA kernel refuses one
            assert list(n.input[5:]) == ["seqlens_k", "total_sequence_length"]
        for n in graph.node:  # the norms' mean and inv_std_var, which the CUDA kernels do not produce, unnamed
            if n.op_type == "SkipSimplifiedLayerNormalization":
                assert list(n.output[1:3]) == ["", ""]
        if dtype == "float16":
            assert {t.data_type for t in graph.initializer} <= {
                onnx.TensorProto.FLOAT16,
                onnx.TensorProto.INT64,
            }


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_cpu_twin_generates_transformers_ids(llama, graphs, num_beams):
    """Prompts of different lengths in one right-padded batch: every row's ids equal transformers' own
    generate of that prompt alone, greedy and beam search (beams move rows of the buffer)."""
    _, model, prompts = llama
    decoder = _decoder(graphs["float32"])
    assert _generate(decoder, prompts, num_beams) == _reference(model, prompts, num_beams)
    if num_beams == 1:  # per step: input_ids and seqlens_k in, the logits out; the cache never moves
        assert decoder.stats.as_dict() == {
            "steps": NEW,
            "h2d": 2 * NEW,
            "d2h": NEW,
            "cache_gathers": 0,
            "copies_per_step": 3.0,
        }


@pytest.mark.parametrize("arch", ["qwen2-window", "phi3-partial", "gemma"])
def test_the_cpu_twin_of_the_other_fused_families(arch, tmp_path):
    """The rewrite takes whatever fused.build writes: biases, sliding windows (GroupQueryAttention's
    local_window_size), partial rotary, Gemma's scaled embedding and gelu. Greedy ids equal transformers'."""
    import tiny_decoders
    import transformers

    from onnxpipe.export import cuda_graph

    folder = tiny_decoders.build(arch, tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    name, _ = cuda_graph.build(model, tmp_path / "graph", "float32")
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    decoder = _decoder(tmp_path / "graph" / name, model.config.max_position_embeddings)
    assert _generate(decoder, prompts, eos=eos) == _reference(model, prompts)


def test_the_fp16_graph_runs_on_the_cpu_provider_too(llama, graphs):
    """ORT's CPU kernels run the CUDA graph itself: greedy agreement with transformers (fp16: reported by
    export validation; on this tiny model every step agrees)."""
    _, model, prompts = llama
    got, ref = _generate(_decoder(graphs["float16"]), prompts), _reference(model, prompts)
    agree = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), NEW) / NEW for g, r in zip(got, ref)]
    assert np.mean(agree) >= 0.9, (got, ref)


# --- the key/value buffer --------------------------------------------------------------------


def test_buffer_length():
    from onnxpipe.runtime.kv_cache import UNSIZED_NEW_TOKENS, buffer_length

    assert buffer_length(10, 20, 256) == 30
    assert buffer_length(10, 500, 256) == 256  # never past the model's positions
    assert buffer_length(10, None, 256) == 256  # no max_new_tokens: every position the model has
    assert buffer_length(10, None, None) == 10 + UNSIZED_NEW_TOKENS
    assert buffer_length(300, 20, 256) == 300  # a prompt is never cut here (generate truncates it before)


def test_buffers_are_sized_typed_and_placed_for_the_device(graphs, monkeypatch):
    from onnxruntime import OrtValue

    decoder = _decoder(graphs["float16"])
    assert decoder.kv_dtype is np.float16 and (decoder.kv_heads, decoder.head_dim) == (2, 8)
    on_cpu = decoder.buffers(3, 40)
    assert len(on_cpu) == 4  # 2 layers x key, value
    assert all(v.shape() == [3, 2, 40, 8] and v.data_type() == "tensor(float16)" for v in on_cpu)
    assert not any(v.numpy().any() for v in on_cpu)

    asked = []
    monkeypatch.setattr(
        OrtValue, "ortvalue_from_shape_and_type", staticmethod(lambda *args: asked.append(args) or args)
    )
    decoder.device = Device("cuda", 1)  # the provider faked: where the buffers would go
    decoder.buffers(2, 64)
    assert asked == [((2, 2, 64, 8), np.float16, "cuda", 1)] * 4


def test_prefill_writes_the_prompts_in_place_at_the_start_of_each_row(llama, graphs, monkeypatch):
    """The buffers are bound as past and present: the prefill writes each row's (right-padded) prompt into
    positions 0..width-1 of the very buffers the decoder allocated, and each step writes one position per
    row, at that row's own length (over its padding), in place."""
    _, _, prompts = llama
    decoder = _decoder(graphs["float32"])
    allocated: list = []
    make = decoder.buffers
    monkeypatch.setattr(decoder, "buffers", lambda rows, length: allocated.extend(make(rows, length)) or allocated)
    _, step = decoder.prefill(prompts, 2, max_new_tokens=5)
    width = max(map(len, prompts))
    assert decoder.buffer_length == width + 5
    key = allocated[0].numpy()
    assert key.shape == (3, 2, width + 5, 8)
    assert np.abs(key[:, :, :width]).sum(axis=-1).all() and not key[:, :, width:].any()
    before = key.copy()
    step(np.array([5, 6, 7]), None)
    for row, prompt in enumerate(prompts):
        changed = np.flatnonzero((key[row] != before[row]).any(axis=(0, 2)))
        assert changed.tolist() == [len(prompt)]
    for _ in range(4):
        step(np.array([5, 6, 7]), None)
    with pytest.raises(RuntimeError, match="holds"):  # past max_new_tokens: refused, never written past the end
        step(np.array([5, 6, 7]), None)


def test_the_shared_buffer_is_not_fed_growing_pasts(graphs):
    """prefill_cache/decode (a growing cache's calls) are a programming error here: continuous batching
    drives the buffer through running() (runtime.running.SharedBatch, tests/test_continuous.py)."""
    decoder = _decoder(graphs["float32"])
    with pytest.raises(TypeError, match="does not grow"):
        decoder.prefill_cache([[1, 2]], 0)
    with pytest.raises(TypeError, match="does not grow"):
        decoder.decode(np.array([1]), np.ones((1, 3), np.int64), np.array([[2]]), [])


@pytest.mark.parametrize("host_copy", [False, True], ids=["cpu", "cuda-copy"])
def test_running_rows_join_at_their_own_lengths_and_the_buffer_grows(llama, graphs, monkeypatch, host_copy):
    """SharedBatch: a row admitted mid-generation into a longer buffer, another after it that needs more
    positions (the buffer grows), a row dropped: every step's logits equal each row's lone run's. With
    HOST_COPY, the joins take CUDA's path (new buffers built on the host and sent; the upload faked)."""
    from onnxruntime import OrtValue

    from onnxpipe.runtime import running

    monkeypatch.setattr(running, "LENGTH_STEP", 4)
    _, _, prompts = llama
    decoder = _decoder(graphs["float32"])
    if host_copy:
        sent: list = []
        monkeypatch.setattr(decoder, "device_type", "cuda")
        monkeypatch.setattr(
            running, "_from_numpy", lambda _d, a: sent.append(a.shape) or OrtValue.ortvalue_from_numpy(a.copy())
        )

    def alone(prompt, tokens):
        logits, step = decoder.prefill([prompt], 2, max_new_tokens=len(tokens) + 1)
        out = [logits[0]]
        for token in tokens:
            out.append(step(np.array([token]), None)[0])
        return out

    follow = [[5 + (7 * i + r) % 50 for i in range(12)] for r in range(3)]  # each row's next ids
    batch = decoder.running()
    got: list[list] = [[], [], []]
    got[0].append(batch.admit([prompts[0]], 2, [len(prompts[0]) + 12])[0])
    assert batch.length == -(-(len(prompts[0]) + 12) // 4) * 4
    for i in range(3):
        got[0].append(batch.step(np.array([follow[0][i]]))[0])
    first_length = batch.length
    got[1].append(batch.admit([prompts[1]], 2, [len(prompts[1]) + 6])[0])  # fits: the buffer stays
    assert batch.length == first_length and batch.lengths.tolist() == [len(prompts[0]) + 3, len(prompts[1])]
    for i in range(2):
        logits = batch.step(np.array([follow[0][3 + i], follow[1][i]]))
        got[0].append(logits[0])
        got[1].append(logits[1])
    got[2].append(batch.admit([prompts[2]], 2, [first_length + 9])[0])  # needs more: the buffer grows
    assert batch.length > first_length and batch.rows == 3
    batch.keep(np.array([0, 2]))  # row 1 leaves
    for i in range(4):
        logits = batch.step(np.array([follow[0][5 + i], follow[2][i]]))
        got[0].append(logits[0])
        got[2].append(logits[1])
    for row, steps in ((0, 9), (1, 2), (2, 4)):
        want = alone(prompts[row], follow[row][:steps])
        np.testing.assert_allclose(np.array(got[row]), np.array(want), atol=1e-4, rtol=0)
    batch.keep(np.array([], dtype=np.int64))
    assert batch.rows == 0 and batch.length == 0
    if host_copy:  # two joins into a running batch, each sending every cache tensor once
        assert len(sent) == 2 * 4 and sent[-1][0] == 3


# --- export, manifest, refusals ----------------------------------------------------------------


def _choose(graph, device, family="decoder", model_type="llama", cuda_here=False, monkeypatch=None, **flags):
    from onnxpipe.export import core, variants

    monkeypatch.setattr(variants, "cuda_unusable_reason", lambda: None if cuda_here else "no GPU")
    config = SimpleNamespace(model_type=model_type, hidden_act="silu", max_position_embeddings=256)
    return core._choose_graph({"graph": graph, "device": device, **flags}, family, config)


@pytest.mark.parametrize(
    "graph, device, cuda_here, builder",
    [
        ("auto", "auto", False, "fused"),
        ("auto", "auto", True, "optimum"),  # auto on a GPU machine: optimum's graph runs on both
        ("auto", "cpu", True, "fused"),
        ("auto", "cuda", False, "cuda"),  # no GPU needed to export for one
        ("auto", "cuda", True, "cuda"),
        ("fused", "cuda", False, "cuda"),
        ("fused", "cpu", False, "fused"),
        ("optimum", "cuda", False, "optimum"),
        ("optimum", "cpu", False, "optimum"),
    ],
)
def test_graph_selection(graph, device, cuda_here, builder, monkeypatch):
    assert _choose(graph, device, cuda_here=cuda_here, monkeypatch=monkeypatch) == builder


def test_graph_selection_outside_the_llama_family(monkeypatch):
    assert _choose("auto", "cuda", family="encoder", model_type="bert", monkeypatch=monkeypatch) == "optimum"
    assert _choose("auto", "cuda", model_type="gpt2", monkeypatch=monkeypatch) == "optimum"
    assert _choose("auto", "cuda", fp16=True, monkeypatch=monkeypatch) == "optimum"
    with pytest.raises(UsageError, match="--graph fused is not available here: model type gpt2"):
        _choose("fused", "cuda", model_type="gpt2", monkeypatch=monkeypatch)


def test_export_device_is_checked_before_anything_is_written(checkpoint, tmp_path):
    from onnxpipe.export import export_model

    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        export_model(checkpoint("llama"), tmp_path / "a", device="tpu")
    with pytest.raises(UsageError, match="--quantize and --device cuda exclude each other"):
        export_model(checkpoint("llama"), tmp_path / "b", device="cuda", quantize="int8")
    assert not any(tmp_path.iterdir())


def test_export_for_cuda_without_a_gpu(exported):
    folder = exported("llama", device="cuda")
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    assert manifest["device"] == "cuda" and manifest["precision"] == "fp16"
    graph = manifest["graph"]
    assert graph["builder"] == "onnxpipe-fused-cuda" and graph["kv_cache"] == "shared-buffer"
    assert graph["past_dtype"] == "float16" and graph["inputs"][:3] == [
        "input_ids",
        "seqlens_k",
        "total_sequence_length",
    ]
    assert graph["weights"].get("float16") and not graph["weights"].get("float32")
    validation = manifest["validation"]
    assert validation["passed"] and validation["fp32"]["passed"]  # the CPU twin, against PyTorch
    assert validation["fp32"]["greedy"]["agreement"] == 1.0
    assert validation["fp32"]["tolerance"] is not None  # the twin is held to the fp32 tolerance
    assert not list(folder.glob("*twin*"))  # the twin is not shipped


def test_cpu_exports_say_cpu_and_older_exports_still_load(exported, tmp_path):
    import shutil

    from onnxpipe.manifest import graph_device, read_manifest

    fused = exported("llama")
    assert json.loads((fused / "onnxpipe.json").read_text())["device"] == "cpu"
    old = tmp_path / "old"
    shutil.copytree(fused, old)
    manifest = json.loads((old / "onnxpipe.json").read_text())
    del manifest["device"]
    (old / "onnxpipe.json").write_text(json.dumps(manifest))
    assert graph_device(read_manifest(old)) == "cpu"  # the fused graph, from before the field
    manifest["graph"]["builder"] = "optimum"
    assert graph_device(manifest) == "any"
    manifest["device"] = "tpu"
    (old / "onnxpipe.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportFolderError, match="device 'tpu' is not one of cpu, cuda, any"):
        read_manifest(old)


def test_a_cuda_export_is_refused_on_the_cpu(exported):
    from click.testing import CliRunner

    from onnxpipe.main import cli

    folder = exported("llama", device="cuda")
    result = CliRunner().invoke(cli, ["generate", "-m", str(folder), "--device", "cpu"], input="Hello\n")
    assert result.exit_code != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "is onnxpipe's CUDA graph (fp16), made for CUDA, not for the CPU" in lines[0]
    assert "--device cpu" in lines[0]  # how to export for this device


@pytest.mark.parametrize("export_kw, refused", [({}, True), ({"graph": "optimum"}, False), ({"device": "cuda"}, False)])
def test_device_cuda_refuses_the_fused_cpu_graph(exported, monkeypatch, export_kw, refused):
    """--device cuda with the fused CPU graph (its float32 attention would run on the CPU) fails in one
    line saying how to export for CUDA; optimum's graph and the CUDA graph are taken (CUDA faked)."""
    from onnxpipe.runtime.decoder import CausalDecoder, SharedBufferDecoder
    from onnxpipe.runtime.model import ExportedModel
    from onnxpipe.runtime.sessions import make_session

    folder = exported("llama", **export_kw)

    def on_cuda(self, path):
        self.provider = CUDA
        return make_session(path, threads=1)

    monkeypatch.setattr(ExportedModel, "_make_session", on_cuda)
    model = ExportedModel(folder, device="cuda")
    if refused:
        with pytest.raises(DeviceError, match="fused CPU graph .* made for CPU") as caught:
            model.session()
        assert "--device cuda" in caught.value.hint
        return
    decoder = CausalDecoder.from_model(model)
    assert decoder.device == Device("cuda", 0)
    assert isinstance(decoder, SharedBufferDecoder) == (export_kw.get("device") == "cuda")
    if isinstance(decoder, SharedBufferDecoder):
        assert decoder.max_positions == 256 and decoder.graph_gather  # beams move rows on the device


def test_info_shows_the_device(exported):
    from click.testing import CliRunner

    from onnxpipe.main import cli

    result = CliRunner().invoke(cli, ["info", str(exported("llama", device="cuda"))])
    assert result.exit_code == 0
    assert "device          CUDA" in result.stdout.replace("\u2502", " ") or any(
        line.split()[:2] == ["device", "CUDA"] for line in result.stdout.splitlines()
    )
    assert "onnxpipe's fused CUDA graph" in result.stdout


# --- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_the_cuda_graph_on_cuda_generates_the_cpu_twins_ids(exported, llama, graphs):
    """On CUDA, through the runtime: the session is CUDA's, the cache stays in its buffers (3 copies a
    step: ids and seqlens_k in, logits out; no cache gathers in greedy search), and the ids agree with the
    fp16 graph on the CPU provider and with transformers (fp16: most steps)."""
    from onnxpipe.runtime import load_model
    from onnxpipe.tasks.causal import CausalLM

    _, model, prompts = llama
    lm = CausalLM.from_model(load_model(exported("llama", device="cuda"), device="cuda"))
    assert lm.decoder.session.get_providers()[0] == CUDA
    config = lm.defaults.update(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=1)
    got = [c[0].token_ids for c in lm.generate(prompts, config)]
    assert lm.decoder.stats.per_step == 3.0 and lm.decoder.stats.cache_gathers == 0
    ref = _reference(model, prompts)
    agree = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), NEW) / NEW for g, r in zip(got, ref)]
    assert np.mean(agree) >= 0.9, (got, ref)


@pytest.mark.gpu
def test_every_heavy_op_of_the_cuda_graph_runs_on_cuda(exported, llama, tmp_path):
    """ONNX Runtime's profile of a prefill and decoding steps: attention, rotary, norms and matrix products
    all ran on the CUDA provider (no silent CPU fallback of a kernel that lacks an fp16 form)."""
    import onnxruntime as ort

    from onnxpipe.runtime.decoder import SharedBufferDecoder
    from onnxpipe.runtime.sessions import make_session

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = make_session(exported("llama", device="cuda") / "model.onnx", Device("cuda"), options=options)
    assert session.get_providers()[0] == CUDA
    _generate(SharedBufferDecoder(session, Device("cuda"), 256), llama[2])
    events = json.loads(Path(session.end_profiling()).read_text())
    ran: dict[str, set[str]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "op_name" in args:
            ran.setdefault(args["op_name"], set()).add(args.get("provider", "?"))
    heavy = ("GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization", "MatMul", "GatherND")
    assert "GroupQueryAttention" in ran
    assert {op: providers for op, providers in ran.items() if op in heavy and providers != {CUDA}} == {}


@pytest.mark.gpu
def test_serve_batches_the_cuda_graph_on_cuda(exported, llama):
    """serve's continuous batching on CUDA (runtime.running.SharedBatch): requests that arrive together and
    leave at different steps share decoding steps on the device, and each gets (within fp16's near ties)
    the ids it gets alone."""
    import onnxpipe
    from onnxpipe.runtime.decoder import SharedBufferDecoder
    from onnxpipe.serve.continuous import ContinuousBatcher, GenerationRequest

    pipeline = onnxpipe.load(exported("llama", device="cuda"), device="cuda")
    lengths = [NEW, 6, 15]
    batcher = ContinuousBatcher(pipeline, max_batch=2)  # 3 requests on 2 rows: the third joins as one leaves
    try:
        assert isinstance(batcher.decoder, SharedBufferDecoder) and pipeline.model.provider == CUDA
        streams = [
            batcher.submit(GenerationRequest(p, max_new_tokens=n, temperature=0)) for p, n in zip(llama[2], lengths)
        ]
        got = [s.result().token_ids for s in streams]
    finally:
        batcher.close()
    assert batcher.max_rows == 2 and batcher.prefills >= 2
    lm = pipeline.task_for({}).lm
    alone = [
        lm.generate([p], lm.defaults.update(max_new_tokens=n, do_sample=False))[0][0].token_ids
        for p, n in zip(llama[2], lengths)
    ]
    agree = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) / len(r) for g, r in zip(got, alone)]
    assert np.mean(agree) >= 0.9, (got, alone)
