"""A fake ``tensorrt`` module for CPU tests, held to the real API (its runtime half: fakes/tensorrt_runtime.py).

Every fake object answers only to attribute names its real TensorRT class has in the chosen version's API
surface (tests/data/tensorrt_api), so code tested against it cannot use a name TensorRT lacks. Behaviour is a
stand-in: a "plan" is JSON describing the build, and an engine runs its ONNX graph with ONNX Runtime on CPU.
Nothing here says anything about TensorRT's numerics or speed; tests marked ``gpu`` do that.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SNAPSHOTS = Path(__file__).parent.parent / "data" / "tensorrt_api"
OLDEST, NEWEST = "10.8.0.43", "11.4.0.106"
NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 9: "BOOL"}
# The fake's own bookkeeping (not TensorRT API): what tests inspect or set.
FAKE_FIELDS = frozenset({"api", "version", "fail_build", "engines", "deserialized", "sent", "known_biases"})


def surface(version: str) -> dict[str, list[str] | None]:
    return json.loads((SNAPSHOTS / f"{version}.json").read_text())["names"]


class Strict:
    """Base of the fakes: public attribute reads and writes must exist on the real class."""

    api_class = ""

    def __init__(self, trt: FakeTrt) -> None:
        object.__setattr__(self, "_trt", trt)

    def _check(self, name: str) -> None:
        trt = object.__getattribute__(self, "_trt")
        cls = type(self).api_class
        if not name.startswith("_") and name not in (trt.api[cls] or []):
            raise AttributeError(f"TensorRT {trt.version} {cls} has no attribute {name!r}")

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            object.__getattribute__(self, "_check")(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._check(name)
        object.__setattr__(self, name, value)


class Enum:
    """An enum class of the real API: members are the upper-case names of its surface entry."""

    def __init__(self, name: str, members: list[str]) -> None:
        self._name = name
        for index, member in enumerate(m for m in members if m.isupper()):
            setattr(self, member, index)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{self._name} has no member {name!r}")


def _onnx_io(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    model = onnx.load(path, load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "dtype": ONNX_TYPES[t.elem_type], "shape": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)


class Tensor(Strict):
    api_class = "ITensor"

    def __init__(self, trt: FakeTrt, info: dict[str, Any]) -> None:
        super().__init__(trt)
        object.__setattr__(self, "name", info["name"])
        object.__setattr__(self, "dtype", getattr(trt.DataType, info["dtype"]))
        object.__setattr__(self, "shape", tuple(info["shape"]))


class Network(Strict):
    api_class = "INetworkDefinition"

    def __init__(self, trt: FakeTrt, flags: int) -> None:
        super().__init__(trt)
        object.__setattr__(self, "_flags", flags)
        object.__setattr__(self, "_io", ([], []))

    @property
    def num_inputs(self) -> int:
        return len(self._io[0])

    @property
    def num_outputs(self) -> int:
        return len(self._io[1])

    def get_input(self, i: int) -> Tensor:
        return Tensor(self._trt, self._io[0][i])

    def get_output(self, i: int) -> Tensor:
        return Tensor(self._trt, self._io[1][i])


class OnnxParser(Strict):
    api_class = "OnnxParser"

    def __init__(self, network: Network, logger: Any) -> None:
        super().__init__(network._trt)
        object.__setattr__(self, "_network", network)
        object.__setattr__(self, "num_errors", 0)

    def parse_from_file(self, path: str) -> bool:
        object.__setattr__(self._network, "_io", _onnx_io(path))
        object.__setattr__(self._network, "_onnx", path)
        return True

    def get_error(self, i: int) -> str:
        return ""


class Profile(Strict):
    api_class = "IOptimizationProfile"

    def __init__(self, trt: FakeTrt) -> None:
        super().__init__(trt)
        object.__setattr__(self, "_shapes", {})

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self._shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}


class TimingCache(Strict):
    api_class = "ITimingCache"

    def __init__(self, trt: FakeTrt, data: bytes) -> None:
        super().__init__(trt)
        object.__setattr__(self, "_entries", set(json.loads(data)) if data else set())

    def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
        self._entries.update(other._entries)
        return True

    def serialize(self) -> bytes:
        return json.dumps(sorted(self._entries)).encode()


class Config(Strict):
    api_class = "IBuilderConfig"

    def __init__(self, trt: FakeTrt) -> None:
        super().__init__(trt)
        for key, value in (("_flags", []), ("_pools", {}), ("_profiles", []), ("_cache", None),
                           ("builder_optimization_level", 3), ("hardware_compatibility_level", 0)):
            object.__setattr__(self, key, value)

    def set_flag(self, flag: int) -> None:
        self._flags.append(flag)

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        self._pools[pool] = size

    def add_optimization_profile(self, profile: Profile) -> int:
        self._profiles.append(profile._shapes)
        return len(self._profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(self._trt, bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        object.__setattr__(self, "_cache", cache)
        return True


class HostMemory(bytes):
    """The serialized plan: JSON of what was built (bytes, so memoryview() works as on the real IHostMemory)."""

    @property
    def nbytes(self) -> int:
        return len(self)


class Builder(Strict):
    api_class = "Builder"

    def __init__(self, trt: FakeTrt, logger: Any) -> None:
        super().__init__(trt)

    def create_network(self, flags: int) -> Network:
        return Network(self._trt, flags)

    def create_builder_config(self) -> Config:
        return Config(self._trt)

    def create_optimization_profile(self) -> Profile:
        return Profile(self._trt)

    def build_serialized_network(self, network: Network, config: Config) -> HostMemory | None:
        if self._trt.fail_build:
            return None
        if config._cache is not None:
            config._cache._entries.add(Path(network._onnx).parent.name)
        plan = {"onnx": network._onnx, "network_flags": network._flags, "flags": config._flags,
                "pools": {str(k): v for k, v in config._pools.items()}, "profiles": config._profiles,
                "level": config.builder_optimization_level, "hardware": config.hardware_compatibility_level,
                "io": network._io}
        return HostMemory(json.dumps(plan).encode())


class FakeTrt(types.ModuleType):
    """``tensorrt`` as seen through one version's API surface."""

    def __init__(self, version: str = NEWEST) -> None:
        super().__init__("tensorrt")
        self.api = surface(version)
        self.version = self.__version__ = version
        self.fail_build = False
        self.engines: list[Any] = []
        self.deserialized = 0
        self.sent: dict[str, Any] = {}
        for name, members in self.api.items():
            if members is not None and any(m.isupper() for m in members):
                setattr(self, name, Enum(name, members))
        self.Builder = lambda logger: Builder(self, logger)
        self.OnnxParser = OnnxParser
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, severity=2: None})
        from fakes.tensorrt_runtime import install_runtime

        install_runtime(self)

    def __getattribute__(self, name: str) -> Any:
        public = not name.startswith("_") and name not in FAKE_FIELDS
        if public and name not in object.__getattribute__(self, "api"):
            raise AttributeError(f"TensorRT {object.__getattribute__(self, 'version')} has no {name!r}")
        return object.__getattribute__(self, name)

    def nptype(self, dtype: int) -> type:
        names = [m for m in self.api["DataType"] if m.isupper()]
        return NP[names[dtype]]


def copied_folder(source: Path, factory: pytest.TempPathFactory) -> Path:
    """A private copy of a compiled folder (engine builds add files next to the graphs of a shared folder)."""
    import shutil

    target = factory.mktemp("trt") / source.name
    shutil.copytree(source, target)
    return target


def fake_build_target(job: Any) -> dict[str, Any]:
    """The builder process's function in tests: tensorrt.build_plan against a fake TensorRT (spawned child)."""
    sys.modules["tensorrt"] = FakeTrt(job.extra.get("fake_version", NEWEST))
    from sdexport.engines.tensorrt.layer import build_plan

    return build_plan(job)


def install(monkeypatch: pytest.MonkeyPatch, version: str = NEWEST) -> FakeTrt:
    """Make ``import tensorrt`` return a fake of ``version`` for the rest of the test."""
    fake = FakeTrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake
