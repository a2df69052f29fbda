"""Every TensorRT attribute sdexport uses exists in the real Python API of each supported TensorRT version.

The API surfaces in tests/data/tensorrt_api/<version>.json were listed from NVIDIA's real bindings wheels
(``tensorrt_cu12_bindings``, 1.3 MB) with null stub libraries standing in for libnvinfer, which needs a GPU. When
pip and gcc can reach the wheels, ``test_snapshot_is_the_real_api`` lists them again and compares, so the stored
surfaces cannot drift from what NVIDIA ships. ``api_names.txt`` must cover every TensorRT attribute the code
touches, which ``test_names_file_covers_the_code`` checks by reading the code.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sdexport.engines.tensorrt

TRT_DIR = Path(sdexport.engines.tensorrt.__file__).parent
NAMES_FILE = TRT_DIR / "api_names.txt"
SNAPSHOTS = Path(__file__).parent / "data" / "tensorrt_api"
VERSIONS = sorted((p.stem for p in SNAPSHOTS.glob("*.json")), key=lambda v: tuple(int(x) for x in v.split(".")))
TRT_CODE = (TRT_DIR / "layer.py", TRT_DIR / "runtime.py")
CUDA_CODE = TRT_DIR / "cuda.py"
REMOVED_IN_11 = ("BuilderFlag.FP16", "BuilderFlag.INT8", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
                 "Builder.platform_has_fast_fp16", "ICudaEngine.device_memory_size")
# Variable names the TensorRT code gives TensorRT objects, and their classes (how the code scan types them).
VARIABLE_CLASSES = {
    "builder": "Builder", "config": "IBuilderConfig", "network": "INetworkDefinition", "parser": "OnnxParser",
    "profile": "IOptimizationProfile", "cache": "ITimingCache", "merged": "ITimingCache", "plan": "IHostMemory",
    "tensor": "ITensor", "runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext",
    "refitter": "Refitter", "onnx_refitter": "OnnxParserRefitter",
}
# Enough to list the bindings: every symbol the extension imports from libnvinfer / _plugin / libnvonnxparser.
STUB_C = """
void* createInferBuilder_INTERNAL(void* a, int b) { return 0; }
void* createInferRefitter_INTERNAL(void* a, void* b, int c) { return 0; }
void* createInferRuntime_INTERNAL(void* a, int b) { return 0; }
void* createNvOnnxParser_INTERNAL(void* a, void* b, int c) { return 0; }
void* createNvOnnxParserRefitter_INTERNAL(void* a, void* b, int c) { return 0; }
void* getPluginRegistry(void) { return 0; }
void* getBuilderPluginRegistry(int a) { return 0; }
int initLibNvInferPlugins(void* a, const char* b) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
"""
LIST_API = """
import json, tensorrt_bindings as trt
names = {n: (sorted(m for m in dir(o) if not m.startswith("__")) if isinstance(o, type) else None)
         for n in dir(trt) if not n.startswith("_") for o in [getattr(trt, n)]}
print(json.dumps({"version": trt.__version__, "names": names}, sort_keys=True))
"""


def names_file() -> tuple[list[str], list[str], list[str]]:
    """(required TensorRT names, optional ones, cuda-python runtime names)."""
    required, optional, cudart = [], [], []
    for line in NAMES_FILE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("cudart."):
            cudart.append(line[len("cudart."):])
        elif line.startswith("?"):
            optional.append(line[1:])
        else:
            required.append(line)
    return required, optional, cudart


def surface(version: str) -> dict[str, list[str] | None]:
    return json.loads((SNAPSHOTS / f"{version}.json").read_text())["names"]


def exists(api: dict[str, list[str] | None], dotted: str) -> bool:
    head, _, member = dotted.partition(".")
    if head not in api:
        return False
    return not member or member in (api[head] or [])


def test_supported_versions_are_snapshotted() -> None:
    majors = {v.split(".")[0] for v in VERSIONS}
    assert {"10", "11"} <= majors, VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_every_used_name_exists(version: str) -> None:
    required, optional, _ = names_file()
    api = surface(version)
    missing = [n for n in required if not exists(api, n)]
    assert not missing, f"TensorRT {version} lacks {missing}"
    assert all(exists(surface(VERSIONS[-1]), n) for n in optional)  # optional names exist at least in the newest


def test_names_removed_in_11_are_absent_there_and_unused() -> None:
    newest = surface(VERSIONS[-1])
    assert not [n for n in REMOVED_IN_11 if exists(newest, n)]
    assert all(exists(surface(VERSIONS[0]), n) for n in REMOVED_IN_11[:3])  # 10.x still had them
    code = "\n".join(p.read_text() for p in (*TRT_CODE, TRT_DIR / "build.py"))
    for name in ("FP16", "INT8", "EXPLICIT_BATCH", "platform_has_fast_fp16"):
        assert f'"{name}"' not in code and f".{name}" not in code, name


def _code_names() -> set[str]:
    """Class.member for every attribute the TensorRT code reads from ``trt.X`` or a TensorRT-typed variable."""
    found: set[str] = set()
    for path in TRT_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id == "trt" and node.attr != "__version__":
                found.add(node.attr)
            elif isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "trt":
                found.add(f"{value.attr}.{node.attr}")
            else:
                owner = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
                if owner in VARIABLE_CLASSES:
                    found.add(f"{VARIABLE_CLASSES[owner]}.{node.attr}")
    return found


def test_names_file_covers_the_code() -> None:
    required, optional, _ = names_file()
    listed = set(required) | set(optional)
    used = _code_names()
    api = surface(VERSIONS[-1])
    # Attributes on variables named like TensorRT objects that are not TensorRT API (TensorSpec.name) are fine.
    unlisted = sorted(n for n in used if n not in listed and not (n.startswith("ITensor.") and exists(api, n)))
    assert not unlisted, f"add to api_names.txt: {unlisted}"
    text = "\n".join(p.read_text() for p in (*TRT_CODE, TRT_DIR / "build.py"))
    stale = sorted(n for n in listed if n.rsplit(".", 1)[-1] not in text)
    assert not stale, f"api_names.txt lists names the code no longer uses: {stale}"


def test_cuda_names_file_covers_the_code() -> None:
    _, _, cudart = names_file()
    used = set()
    for node in ast.walk(ast.parse(CUDA_CODE.read_text())):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if chain and chain[-1] == "rt" and isinstance(node, ast.Name) and node.id == "self":
            used.add(".".join(reversed(chain[:-1])))
    used = {u for u in used if u and not any(o.startswith(u + ".") for o in used)}  # longest chains only
    assert used == set(cudart), f"used but not listed: {used - set(cudart)}; listed, unused: {set(cudart) - used}"


def test_cuda_python_names_exist() -> None:
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (gpu extra)")
    _, _, cudart = names_file()
    missing = []
    for dotted in cudart:
        obj = runtime
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(dotted)
    assert not missing


def _list_real_api(version: str, work: Path) -> dict[str, object]:
    """Download the real bindings wheel, link it against null stubs, and list its API in a child process."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the stub libraries")
    wheels = work / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels),
           f"tensorrt_cu12_bindings=={version}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot download tensorrt_cu12_bindings=={version}: {getattr(exc, 'stderr', b'')[-300:]!r}")
    wheel = next(wheels.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    site = work / f"site-{version}"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    major = version.split(".")[0]
    stubs = work / f"stubs{major}"
    stubs.mkdir(exist_ok=True)
    (work / "stub.c").write_text(STUB_C)
    for lib in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
        so = f"lib{lib}.so.{major}"
        subprocess.run([gcc, "-shared", "-fPIC", "-o", str(stubs / so), str(work / "stub.c"), f"-Wl,-soname,{so}"],
                       check=True, capture_output=True)
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(stubs), "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", LIST_API], check=True, capture_output=True, text=True, env=env,
                         timeout=120)
    return json.loads(out.stdout)


@pytest.mark.parametrize("version", VERSIONS)
def test_snapshot_is_the_real_api(version: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    live = _list_real_api(version, tmp_path_factory.getbasetemp() / "trt-bindings")
    assert live["version"] == version
    assert live["names"] == surface(version)
