"""TensorRT runtime bookkeeping on CPU, against the fake TensorRT / CUDA (tests/fakes/tensorrt*.py): checks
before deserializing, profile selection, buffers and contexts per shape, shared scratch memory, CUDA graph
capture / replay / invalidation, device arrays in and out, and LoRA refits (A -> B -> A, back to base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file

from fakes.tensorrt import NEWEST, copied_folder, fake_build_target, install
from fakes.tensorrt_runtime import FakeCuda, StrictArrays
from sdexport.engines import get_backend
from sdexport.engines.artifacts import load_manifest, write_manifest
from sdexport.engines.lora import LoraSwapper, ort_session
from sdexport.engines.tensorrt import compat
from sdexport.engines.tensorrt import runtime as trt_runtime
from sdexport.engines.tensorrt.build import TrtOptions, build_engines
from sdexport.engines.tensorrt.compat import Environment, GpuInfo
from sdexport.engines.tensorrt.cuda import DeviceArray
from sdexport.engines.tensorrt.profiles import Bucket
from sdexport.engines.tensorrt.runtime import Worker, load_components
from sdexport.errors import ArtifactError, CompatibilityError
from sdexport.export.onnx import dummy_inputs
from sdexport.specs import ModelSpec

ADA = GpuInfo(0, "NVIDIA GeForce RTX 4090", "8.9", 24564, "GPU-1234")
ENV = Environment(gpus=(ADA,), tensorrt_version=NEWEST)
UNET_ENV = {"batch": 2, "latent_height": 8, "latent_width": 8, "sequence": 77}



@pytest.fixture(autouse=True)
def portable_host_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake device runs the portable graphs (as TensorRT does): host loops run them too, not the fused ones."""
    monkeypatch.setattr("sdexport.engines.ort.fused_graph", Path)

@pytest.fixture(scope="module")
def built(tiny_folder: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = copied_folder(tiny_folder("tiny-sdxl"), tmp_path_factory)
    manifest = load_manifest(folder)
    options = TrtOptions(refittable=True, components=("unet", "vae_decoder"),
                         buckets=(Bucket(64, 64), Bucket(96, 64)), timing_cache=folder / ".timing")
    out = build_engines(folder, manifest, options, None, ENV, fake_build_target)
    manifest = dict(manifest, engines=out["engines"], files={**manifest["files"], **out["files"]})
    write_manifest(folder, manifest)  # as `sdexport build --backend tensorrt` does
    return {"folder": folder, "manifest": manifest, "spec": ModelSpec.from_dict(manifest["model"])}


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, built: dict[str, Any]) -> tuple[Any, FakeCuda]:
    trt = install(monkeypatch)
    cuda = FakeCuda()
    monkeypatch.setattr(trt_runtime, "cuda_api", lambda: cuda)
    return trt, cuda


def _open(built: dict[str, Any], cuda: FakeCuda, **kwargs: Any) -> tuple[Worker, dict[str, Any]]:
    components = load_components(built["folder"], built["manifest"], env=ENV)
    worker = Worker(components, cuda=cuda)
    return worker, worker.engines(**kwargs)


def _feeds(built: dict[str, Any], seed: int, env: dict[str, int] = UNET_ENV) -> dict[str, np.ndarray]:
    return dummy_inputs(built["spec"].components["unet"], env, seed)


def _ort(built: dict[str, Any], name: str, feeds: dict[str, np.ndarray],
         overrides: dict[str, np.ndarray] | None = None) -> np.ndarray:
    graph = built["folder"] / built["manifest"]["components"][name]["graph"]
    session = ort_session(graph, overrides) if overrides else ort.InferenceSession(str(graph))
    return session.run(None, feeds)[0]


def test_runs_like_ort_with_buffers_and_context_made_once_per_shape(built: dict[str, Any], fakes: Any) -> None:
    trt, cuda = fakes
    worker, engines = _open(built, cuda, cuda_graphs=False)
    assert cuda.calls["malloc"] == 1 and worker.scratch_bytes == max(e.device_memory_size_v2 for e in trt.engines)
    feeds = _feeds(built, 0)
    out = engines["unet"].run(feeds)["out_sample"]
    np.testing.assert_allclose(out, _ort(built, "unet", feeds), rtol=0, atol=1e-6)
    assert cuda.calls["malloc"] == 1 + 6  # five inputs (SDXL: text_embeds, time_ids too), one output
    engines["unet"].run(_feeds(built, 1))
    assert cuda.calls["malloc"] == 7 and len(trt.engines[0]._contexts) == 1  # same shape: nothing new
    engines["unet"].run(_feeds(built, 2, dict(UNET_ENV, batch=1)))
    assert cuda.calls["malloc"] == 13 and len(trt.engines[0]._contexts) == 2
    contexts = [c for e in trt.engines for c in e._contexts]
    assert {c._memory for c in contexts} == {worker.scratch}  # every context shares the worker's scratch
    for engine in engines.values():
        engine.close()
    worker.close()
    assert not cuda.buffers


def test_profile_selection_picks_the_bucket_and_refuses_other_sizes(built: dict[str, Any], fakes: Any) -> None:
    trt, cuda = fakes
    _, engines = _open(built, cuda, cuda_graphs=False)
    engines["unet"].run(_feeds(built, 0))
    engines["unet"].run(_feeds(built, 0, dict(UNET_ENV, latent_width=12)))  # 96x64 pixels
    assert [c._profile for c in trt.engines[0]._contexts] == [0, 1]
    with pytest.raises(CompatibilityError, match="64x64, 96x64.*--bucket"):
        engines["unet"].run(_feeds(built, 0, dict(UNET_ENV, latent_width=10)))


def test_cuda_graph_is_recorded_on_the_second_run_replayed_and_rerecorded_after_refit(
        built: dict[str, Any], fakes: Any) -> None:
    trt, cuda = fakes
    _, plain = _open(built, FakeCuda(), cuda_graphs=False)
    _, graphed = _open(built, cuda, cuda_graphs=True)
    for seed in range(3):
        feeds = _feeds(built, seed)
        np.testing.assert_array_equal(graphed["unet"].run(feeds)["out_sample"], plain["unet"].run(feeds)["out_sample"])
    assert cuda.calls["capture"] == 1 and cuda.calls["launch"] == 2
    graphed["unet"].component.weights_version += 1  # what a refit does (refits themselves are tested below)
    graphed["unet"].run(_feeds(built, 5))
    assert cuda.calls["destroy_graph"] == 1 and cuda.calls["capture"] == 2


def test_device_arrays_in_and_out_stay_on_the_device(built: dict[str, Any], fakes: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, cuda = fakes
    arrays = StrictArrays()
    monkeypatch.setattr(trt_runtime, "device_arrays", lambda worker: arrays)
    _, engines = _open(built, cuda, cuda_graphs=False)
    assert engines["unet"].array_device is arrays
    assert _open(built, cuda, device_loop=False)[1]["unet"].array_device is None
    feeds = _feeds(built, 0)
    assert isinstance(engines["unet"].run(feeds)["out_sample"], np.ndarray)  # numpy in, numpy out
    before = dict(cuda.calls)
    latent = engines["unet"].run({k: arrays.put(v) for k, v in feeds.items()})["out_sample"]
    assert arrays.owns(latent) and latent.shape == (2, 4, 8, 8) and latent.dtype == arrays.xp.float32
    image = engines["vae_decoder"].run({"latent": latent})["image"]
    assert arrays.owns(image)
    moved = {k: cuda.calls[k] - before.get(k, 0) for k in ("htod", "dtoh", "dtod")}
    assert moved == {"htod": 0, "dtoh": 0, "dtod": 5 + 1 + 1 + 1}  # unet 5 in, 1 out; decoder 1 in, 1 out: no host trip
    want = _ort(built, "vae_decoder", {"latent": _ort(built, "unet", feeds)})
    np.testing.assert_allclose(arrays.get(image), want, rtol=0, atol=1e-5)
    # the outputs are the caller's: running again does not overwrite them
    kept = arrays.get(latent)
    engines["unet"].run({k: arrays.put(v) for k, v in _feeds(built, 1).items()})
    np.testing.assert_array_equal(arrays.get(latent), kept)
    # any CUDA array (``__cuda_array_interface__``) is accepted as an input
    raw = DeviceArray(arrays.pointer(latent), tuple(latent.shape), np.dtype(np.float32))
    np.testing.assert_array_equal(arrays.get(engines["vae_decoder"].run({"latent": raw})["image"]),
                                  arrays.get(image))


def test_least_recently_used_shapes_are_released(built: dict[str, Any], fakes: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, cuda = fakes
    monkeypatch.setattr(trt_runtime, "MAX_BINDINGS", 1)
    _, engines = _open(built, cuda, cuda_graphs=False)
    engines["unet"].run(_feeds(built, 0))
    engines["unet"].run(_feeds(built, 0, dict(UNET_ENV, batch=1)))
    assert cuda.calls["free"] == 6


def test_plans_are_checked_before_tensorrt_sees_them(built: dict[str, Any], fakes: Any, tmp_path: Path) -> None:
    trt, _ = fakes
    other = Environment(gpus=(GpuInfo(0, "NVIDIA H100", "9.0"),), tensorrt_version="10.16.1.11")
    with pytest.raises(CompatibilityError, match=r"(?s)built for NVIDIA GeForce RTX 4090 \(sm_89\), this is NVIDIA "
                                                 r"H100 \(sm_90\).*TensorRT 11.4.0.106, this is TensorRT 10.16"):
        load_components(built["folder"], built["manifest"], env=other)
    plan = built["folder"] / "vae_decoder/engine.plan"
    original = plan.read_bytes()
    try:
        plan.write_bytes(original.replace(b"level", b"LEVEL"))  # same size, other bytes
        with pytest.raises(ArtifactError, match="does not match its sha256"):
            load_components(built["folder"], built["manifest"], env=ENV)
        plan.write_bytes(original[:10])
        with pytest.raises(ArtifactError, match="truncated"):
            load_components(built["folder"], built["manifest"], env=ENV)
    finally:
        plan.write_bytes(original)
    assert trt.deserialized == 0


def _lora(built: dict[str, Any], path: Path, seed: int, modules: list[str]) -> Path:
    rng = np.random.default_rng(seed)
    shapes = LoraSwapper(built["folder"], built["manifest"]).maps["unet"].shapes
    tensors = {}
    for module in modules:
        out, inp = shapes[module + ".weight"]
        tensors[f"unet.{module}.lora_A.weight"] = rng.standard_normal((2, inp)).astype(np.float32)
        tensors[f"unet.{module}.lora_B.weight"] = rng.standard_normal((out, 2)).astype(np.float32) * 0.3
    save_file(tensors, str(path))
    return path


def test_lora_refits_match_ort_and_a_b_a_restores_a(built: dict[str, Any], fakes: Any, tmp_path: Path) -> None:
    trt, cuda = fakes
    swapper = LoraSwapper(built["folder"], built["manifest"])
    attn = sorted(m[: -len(".weight")] for m in swapper.maps["unet"].params if m.endswith("attn1.to_q.weight"))
    outs = sorted(m[: -len(".weight")] for m in swapper.maps["unet"].params if m.endswith("attn1.to_out.0.weight"))
    a = _lora(built, tmp_path / "a.safetensors", 1, attn[:2])
    b = _lora(built, tmp_path / "b.safetensors", 2, [attn[0], outs[0]])
    trt.known_biases = {swapper.maps["unet"].params[outs[0] + ".bias"]}
    _, engines = _open(built, cuda, cuda_graphs=True)
    unet = engines["unet"]
    feeds = _feeds(built, 7)

    def swap(loras: list[tuple[Path, float]]) -> np.ndarray:
        update = swapper.update(loras)
        unet.component.refit(update.refit["unet"], lambda n: swapper.current("unet", n))
        unet.run(feeds)
        return unet.run(feeds)["out_sample"]  # the second run replays a CUDA graph recorded after the refit

    base = unet.run(feeds)["out_sample"]
    with_a = swap([(a, 1.0)])
    np.testing.assert_allclose(with_a, _ort(built, "unet", feeds, swapper.applied["unet"]), rtol=0, atol=1e-6)
    with_b = swap([(b, 0.5)])
    bias = swapper.maps["unet"].params[outs[0] + ".bias"]
    assert bias in trt.sent and np.array_equal(trt.sent[bias], swapper.base("unet", [bias])[bias])
    assert not np.array_equal(with_a, with_b)
    np.testing.assert_array_equal(swap([(a, 1.0)]), with_a)
    np.testing.assert_array_equal(swap([]), base)


def test_refit_needs_a_refittable_engine(built: dict[str, Any], fakes: Any) -> None:
    _, cuda = fakes
    components = load_components(built["folder"], built["manifest"], env=ENV)
    components["unet"].record["refittable"] = False
    with pytest.raises(CompatibilityError, match="--refittable"):
        components["unet"].refit({}, lambda n: np.zeros(1))


def test_backend_factory_shares_one_session_and_worker_per_folder(built: dict[str, Any], fakes: Any,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from types import SimpleNamespace

    trt, _ = fakes
    monkeypatch.setattr(trt_runtime, "_SESSIONS", {})
    monkeypatch.setattr(compat, "probe_environment", lambda: ENV)
    folder = tmp_path / "copy"
    shutil.copytree(built["folder"], folder)
    write_manifest(folder, built["manifest"])

    def component(name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, graph=folder / name / "model.onnx")

    unet = trt_runtime.tensorrt_backend(component("unet"), {"cuda_graphs": False, "worker": 1})
    vae = trt_runtime.tensorrt_backend(component("vae_decoder"), {"worker": 1})
    other = trt_runtime.tensorrt_backend(component("unet"), {"worker": 2})
    assert unet.worker is vae.worker and other.worker is not unet.worker
    assert unet.component is other.component and trt.deserialized == 2  # each plan deserialized once
    feeds = _feeds(built, 4)
    np.testing.assert_allclose(unet.run(feeds)["out_sample"], _ort(built, "unet", feeds), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no option"):
        get_backend("tensorrt").open_component(component("unet"), {"fp16": True})
    with pytest.raises(CompatibilityError, match="no TensorRT engine for text_encoder"):
        trt_runtime.tensorrt_backend(component("text_encoder"), {})


class _Rt:
    """cuda-python's runtime module as CudaApi uses it: calls return (error, values...)."""

    class cudaError_t:  # cuda-python's names
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> tuple[Any, ...]:
            self.calls.append(name)
            if name == "cudaGetErrorString":
                return 0, b"CUDA driver version is insufficient"
            if name == "cudaMalloc":
                return self.cudaError_t.cudaErrorInsufficientDriver, None
            return (0, f"{name}-handle") if name in ("cudaStreamEndCapture", "cudaGraphInstantiate") else (0,)
        return call


def test_cuda_api_records_graphs_in_order_and_turns_errors_into_exceptions() -> None:
    from sdexport.engines.tensorrt.cuda import CudaApi, CudaError

    rt = _Rt()
    api = CudaApi(rt)
    assert api.capture(1, lambda: rt.calls.append("work")) == "cudaGraphInstantiate-handle"
    assert rt.calls == ["cudaStreamBeginCapture", "work", "cudaStreamEndCapture", "cudaGraphInstantiate",
                        "cudaGraphDestroy"]
    rt.calls.clear()
    with pytest.raises(RuntimeError):
        api.capture(1, lambda: (_ for _ in ()).throw(RuntimeError("enqueue failed")))
    # the capture is ended (the stream stays usable) and its graph destroyed; nothing is instantiated
    assert rt.calls == ["cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphDestroy"]
    with pytest.raises(CudaError, match=r"cudaMalloc\(16\) failed: CUDA driver version is insufficient"):
        api.malloc(16)


def test_cuda_api_over_the_real_cuda_python() -> None:
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (gpu extra)")
    from sdexport.engines.tensorrt.cuda import CudaApi, CudaError

    api = CudaApi(runtime)
    try:
        ptr = api.malloc(256)
    except CudaError as exc:  # no usable GPU here: the driver's own message comes through
        assert "cudaMalloc(256) failed: " in str(exc) and len(str(exc)) > len("cudaMalloc(256) failed: ")
    else:
        api.free(ptr)


def _device_pipe(built: dict[str, Any], cuda: FakeCuda, arrays: StrictArrays, decoder: bool = True) -> Any:
    """The folder's Pipeline on ONNX Runtime, with the UNet (and VAE decoder) swapped for fake TensorRT engines."""
    from sdexport.runtime.pipeline import Pipeline

    pipe = Pipeline.load(built["folder"], verify=False)
    _, engines = _open(built, cuda, cuda_graphs=True)
    for name in ("unet", "vae_decoder") if decoder else ("unet",):
        pipe.replace_engine(name, engines[name])
    assert pipe.arrays is arrays
    return pipe


LOOP_CASES = {
    "txt2img-euler_a-rescale": dict(scheduler="euler_a", guidance_rescale=0.7),
    "inpaint-dpmpp_2m_sde": dict(scheduler="dpmpp_2m_sde", strength=0.8, inpaint=True),
    "img2img-unipc-batch": dict(scheduler="unipc", strength=0.6, image=True, num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_denoising_loop_on_device_arrays_matches_the_host_loop(built: dict[str, Any], fakes: Any, case: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from sdexport.runtime.pipeline import Pipeline

    _, cuda = fakes
    arrays = StrictArrays()
    monkeypatch.setattr(trt_runtime, "device_arrays", lambda worker: arrays)
    options = dict(LOOP_CASES[case])
    kwargs: dict[str, Any] = {"scheduler": options.pop("scheduler"), "height": 64, "width": 64, "seed": 3,
                              "guidance_scale": 5.0, "output_type": "latent"}
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    if options.pop("image", False):
        kwargs["image"] = picture
    if options.pop("inpaint", False):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[16:48, 8:40] = 255
        kwargs.update(image=picture, mask_image=Image.fromarray(mask))
    kwargs.update(options)
    host = Pipeline.load(built["folder"], verify=False)("a red cube", num_inference_steps=4, **kwargs)
    pipe = _device_pipe(built, cuda, arrays)
    device = pipe("a red cube", num_inference_steps=4, **kwargs)
    steps = len(device.timings.steps)
    assert steps == len(device.timings.unet) == len(host.timings.steps) > 0
    assert all(0 < u <= s for u, s in zip(device.timings.unet, device.timings.steps, strict=True))
    # Same graphs, same float32 arithmetic (array-api-strict computes with numpy): equal up to summation order.
    np.testing.assert_allclose(device.images, host.images, rtol=0, atol=1e-6)
    # Host transfers are per request, not per step: the same with 4 and with 8 steps.
    moved = []
    for steps in (4, 8):
        before = (arrays.puts, arrays.gets, cuda.calls["htod"], cuda.calls["dtoh"])
        pipe("a red cube", num_inference_steps=steps, **kwargs)
        moved.append(tuple(b - a for a, b in zip(before, (arrays.puts, arrays.gets, cuda.calls["htod"],
                                                          cuda.calls["dtoh"]), strict=True)))
    assert moved[0] == moved[1]
    assert moved[0][2:] == (0, 0)  # the TensorRT engines only ever saw device arrays


def test_device_loop_decodes_through_a_host_decoder_and_streams_device_latents(
        built: dict[str, Any], fakes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexport.runtime.pipeline import Pipeline
    from sdexport.runtime.result import GenerationCancelled

    _, cuda = fakes
    arrays = StrictArrays()
    monkeypatch.setattr(trt_runtime, "device_arrays", lambda worker: arrays)
    kwargs = {"height": 64, "width": 64, "seed": 5, "num_inference_steps": 3, "output_type": "np"}
    host = Pipeline.load(built["folder"], verify=False)("a blue ball", **kwargs)
    pipe = _device_pipe(built, cuda, arrays, decoder=False)  # UNet on the device, VAE decoder on ONNX Runtime
    np.testing.assert_array_equal(pipe("a blue ball", **kwargs).images, host.images)
    seen = []

    def stop_after_two(step: int, total: int, timestep: float, latents: Any) -> bool:
        seen.append(arrays.owns(latents))
        return step < 1

    with pytest.raises(GenerationCancelled) as info:
        pipe("a blue ball", callback=stop_after_two, **kwargs)
    assert seen == [True, True] and isinstance(info.value.partial.images, np.ndarray)


def test_device_loop_names_the_first_non_finite_step(built: dict[str, Any], fakes: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexport.runtime.result import NonFiniteError

    _, cuda = fakes
    arrays = StrictArrays()
    monkeypatch.setattr(trt_runtime, "device_arrays", lambda worker: arrays)
    pipe = _device_pipe(built, cuda, arrays)
    unet = pipe.engines["unet"]

    class PoisonedAtStep2:
        """The device UNet, returning NaN on its second call (checked without a host read per step)."""

        def __init__(self) -> None:
            self.name, self.inputs, self.outputs, self.array_device = unet.name, unet.inputs, unet.outputs, arrays
            self.calls = 0

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            out = unet.run(feeds)
            return {"out_sample": out["out_sample"] * float("nan")} if self.calls == 2 else out

    pipe.replace_engine("unet", PoisonedAtStep2())
    gets = arrays.gets
    with pytest.raises(NonFiniteError, match="unet at step 2 "):
        pipe("a green cone", height=64, width=64, seed=1, num_inference_steps=5)
    assert arrays.gets == gets + 1  # one read of all the checks, after the loop


def test_threads_sharing_a_worker_take_turns(built: dict[str, Any], fakes: Any) -> None:
    import threading

    _, cuda = fakes
    worker, engines = _open(built, cuda, cuda_graphs=True)
    feeds = _feeds(built, 6)
    results: list[np.ndarray] = []
    other = threading.Thread(target=lambda: results.append(engines["unet"].run(feeds)["out_sample"]))
    with worker.lock:  # what a request's GPU loop holds for its whole duration
        other.start()
        other.join(timeout=0.5)
        assert other.is_alive() and not results  # the other thread waits for the stream
    other.join(timeout=60)
    np.testing.assert_allclose(results[0], _ort(built, "unet", feeds), rtol=0, atol=1e-6)
