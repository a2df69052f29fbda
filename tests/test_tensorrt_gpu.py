"""Real TensorRT on a real GPU (``pytest -m gpu``; see docs/gpu.md): tiny fp16 engines against ONNX Runtime CPU,
refit round trips, CUDA graph replay. Skipped, and reported as not run, when the subprocess probe finds no GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file

from sdexport.engines.artifacts import load_manifest, write_manifest
from sdexport.engines.lora import LoraSwapper, ort_session
from sdexport.engines.tensorrt import compat
from sdexport.engines.tensorrt.build import TrtOptions, build_engines
from sdexport.engines.tensorrt.profiles import Bucket
from sdexport.engines.tensorrt.runtime import Worker, load_components
from sdexport.export.onnx import dummy_inputs
from sdexport.specs import ModelSpec

pytestmark = pytest.mark.gpu
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
ENVS = [{"batch": 2, "latent_height": 8, "latent_width": 8, "sequence": 77, "image_height": 64, "image_width": 64},
        {"batch": 1, "latent_height": 10, "latent_width": 6, "sequence": 154, "image_height": 80, "image_width": 48}]


@pytest.fixture(scope="module")
def gpu() -> compat.Environment:
    env = compat.probe_environment()  # nvidia-smi / libcuda / `import tensorrt`, each in a child process
    if not env.gpus:
        pytest.skip(f"no NVIDIA GPU: {env.gpu_error}")
    if env.tensorrt_version is None:
        pytest.skip(f"TensorRT is not usable: {env.tensorrt_error}")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (pip install 'sdexport[gpu]')")
    return env


@pytest.fixture(scope="module")
def built(gpu: compat.Environment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sdexport.export.build import BuildConfig, build

    folder = tmp_path_factory.mktemp("gpu") / "tiny-sd15-fp16"
    build(BuildConfig(model="tiny-sd15", out=folder, precision="fp16"))
    manifest = load_manifest(folder)
    options = TrtOptions(shapes="both", buckets=(Bucket(64, 64),), refittable=True, components=COMPONENTS,
                         timing_cache=folder.parent / "timing.cache")
    out = build_engines(folder, manifest, options, env=gpu)
    manifest = dict(manifest, engines=out["engines"], files={**manifest["files"], **out["files"]})
    write_manifest(folder, manifest)  # as `sdexport build --backend tensorrt` does
    return {"folder": folder, "manifest": manifest, "spec": ModelSpec.from_dict(manifest["model"]),
            "components": load_components(folder, manifest, env=gpu)}


def _graph(built: dict[str, Any], name: str) -> Path:
    return built["folder"] / built["manifest"]["components"][name]["graph"]


def test_engines_record_this_gpu_and_tensorrt(built: dict[str, Any], gpu: compat.Environment) -> None:
    for name in COMPONENTS:
        record = built["manifest"]["engines"][name]
        assert record["tensorrt_version"] == gpu.tensorrt_version
        assert record["gpu"]["compute_capability"] == gpu.gpus[0].compute_capability
        assert compat.engine_problems(record, gpu) == []


@pytest.mark.parametrize("env", ENVS, ids=["static-bucket", "dynamic-profile"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_engine_matches_onnx_runtime_cpu_at_fp16_tolerance(built: dict[str, Any], name: str,
                                                           env: dict[str, int]) -> None:
    component = built["spec"].components[name]
    feeds = dummy_inputs(component, env, seed=11)
    session = ort.InferenceSession(str(_graph(built, name)), providers=["CPUExecutionProvider"])
    want = dict(zip([t.name for t in component.outputs], session.run(None, feeds), strict=True))
    worker = Worker(built["components"])
    got = worker.engines(cuda_graphs=False)[name].run(feeds)
    tol = component.tolerance("fp16")
    for tensor in component.outputs:
        np.testing.assert_allclose(got[tensor.name].astype(np.float32), want[tensor.name].astype(np.float32),
                                   atol=tol.atol, rtol=tol.rtol)


def test_cuda_graph_replay_equals_plain_execution(built: dict[str, Any]) -> None:
    worker = Worker(built["components"])
    plain = worker.engines(cuda_graphs=False)["unet"]
    graphed = worker.engines(cuda_graphs=True)["unet"]
    for seed in range(4):  # the second call records the graph, later calls replay it
        feeds = dummy_inputs(built["spec"].components["unet"], ENVS[0], seed)
        np.testing.assert_array_equal(graphed.run(feeds)["out_sample"], plain.run(feeds)["out_sample"])


def _lora(built: dict[str, Any], path: Path, seed: int) -> Path:
    swapper = LoraSwapper(built["folder"], built["manifest"])
    rng = np.random.default_rng(seed)
    tensors = {}
    for param, shape in swapper.maps["unet"].shapes.items():
        if param.endswith(("attn1.to_q.weight", "attn2.to_v.weight")):
            module = param[: -len(".weight")]
            tensors[f"unet.{module}.lora_A.weight"] = rng.standard_normal((4, shape[1])).astype(np.float32) * 0.2
            tensors[f"unet.{module}.lora_B.weight"] = rng.standard_normal((shape[0], 4)).astype(np.float32) * 0.2
    save_file(tensors, str(path))
    return path


def test_refit_round_trip_a_b_a_and_back_to_base(built: dict[str, Any], tmp_path: Path) -> None:
    component = built["components"]["unet"]
    swapper = LoraSwapper(built["folder"], built["manifest"])
    engine = Worker(built["components"]).engines(cuda_graphs=True)["unet"]
    feeds = dummy_inputs(built["spec"].components["unet"], ENVS[0], seed=3)
    tol = built["spec"].components["unet"].tolerance("fp16")

    def swap(loras: list[tuple[Path, float]]) -> np.ndarray:
        update = swapper.update(loras)
        component.refit(update.refit["unet"], lambda n: swapper.current("unet", n))
        return engine.run(feeds)["out_sample"].astype(np.float32)

    base = engine.run(feeds)["out_sample"].astype(np.float32)
    a = swap([(_lora(built, tmp_path / "a.safetensors", 1), 1.0)])
    want = ort_session(_graph(built, "unet"), swapper.applied["unet"]).run(None, feeds)[0].astype(np.float32)
    np.testing.assert_allclose(a, want, atol=tol.atol, rtol=tol.rtol)
    assert np.abs(a - base).max() > 10 * tol.atol
    b = swap([(_lora(built, tmp_path / "b.safetensors", 2), 0.8)])
    assert np.abs(b - a).max() > 10 * tol.atol
    np.testing.assert_allclose(swap([(tmp_path / "a.safetensors", 1.0)]), a, atol=1e-3, rtol=0)
    np.testing.assert_allclose(swap([]), base, atol=1e-3, rtol=0)


def _pipeline(built: dict[str, Any], **engine_options: Any) -> Any:
    """The folder's Pipeline with the UNet and VAE decoder on TensorRT (text encoder and VAE encoder on ORT CPU)."""
    from sdexport.runtime.pipeline import Pipeline

    pipe = Pipeline.load(built["folder"])
    engines = Worker(built["components"]).engines(**engine_options)
    for name in ("unet", "vae_decoder"):
        pipe.replace_engine(name, engines[name])
    return pipe


def test_denoising_loop_runs_on_cupy_arrays_and_matches_the_host_loop(built: dict[str, Any]) -> None:
    pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'sdexport[gpu]')")
    from sdexport.engines.arrays import HOST, CupyArrays

    device = _pipeline(built, cuda_graphs=True)
    host_loop = _pipeline(built, cuda_graphs=True, device_loop=False)
    assert isinstance(device.arrays, CupyArrays) and host_loop.arrays is HOST
    kinds = []
    kwargs = {"height": 64, "width": 64, "seed": 2, "num_inference_steps": 6, "scheduler": "euler_a",
              "guidance_rescale": 0.5, "output_type": "latent"}
    got = device("a red cube", callback=lambda i, n, t, x: kinds.append(type(x).__module__.split(".")[0]),
                 **kwargs).images
    assert set(kinds) == {"cupy"}
    want = host_loop("a red cube", **kwargs).images
    # Same engines; only the loop's float32 elementwise arithmetic differs (CuPy kernels may fuse multiply-adds).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    images = device("a red cube", **dict(kwargs, output_type="np")).images
    reference = host_loop("a red cube", **dict(kwargs, output_type="np")).images
    assert np.abs(images.astype(int) - reference.astype(int)).max() <= 1
