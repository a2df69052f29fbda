"""Hybrid int8 quantisation for the OpenVINO backend: calibrate on a folder's own UNet inputs, write an IR beside it.

``sdexport quantize FOLDER`` runs the folder's f32 pipeline (OpenVINO) on calibration prompts, records every call of
the chosen components, and hands an evenly spread subset to nncf: convolutions are quantised (int8 weights and
activations, scales from the recorded calls), the other weighted layers keep f32 activations with int8 weights,
as optimum-intel's hybrid mode does. The IR is written under ``<component>/openvino-int8-hybrid/``, listed with its
hashes in the manifest (written last) and tied to the sha256 of the ONNX graph it was made from; the openvino
backend opens it with ``precision="hybrid"`` (f32 elsewhere) or ``"hybrid-bf16"`` (bf16 hint elsewhere).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines import artifacts
from sdexport.errors import ArtifactError

log = logging.getLogger(__name__)

KEY = artifacts.QUANTIZED
METHOD = "int8-hybrid"
SUBDIR = artifacts.QUANTIZED_DIR
PROMPTS = (
    "a photograph of an astronaut riding a horse", "a watercolour painting of a lighthouse at dawn",
    "a close-up portrait of an old fisherman, dramatic light", "a bowl of ramen on a wooden table, top view",
    "a futuristic city skyline at night, neon signs", "a red fox in a snowy forest",
    "an oil painting of sunflowers in a vase", "a cozy living room with a fireplace, interior design photo",
    "a mountain lake reflecting pine trees, golden hour", "a cartoon robot waving, flat colours",
    "a vintage car parked on a cobblestone street", "a macro photo of a dew drop on a leaf",
)
"""Calibration prompts when none are given: varied subjects and styles."""


@dataclass(frozen=True)
class QuantizeConfig:
    """What ``quantize_folder`` calibrates on and how many recorded calls nncf sees."""

    components: tuple[str, ...] = ("unet",)
    prompts: tuple[str, ...] = PROMPTS
    pictures: int = 8
    steps: int = 10
    guidance: float = 7.5
    samples: int = 32
    size: tuple[int, int] | None = None
    seed: int = 0
    threads: int | None = None
    log_every: Callable[[str], None] = field(default=log.info, compare=False)

    def check(self, folder_components: Sequence[str]) -> None:
        """Raise ValueError naming the first bad value."""
        unknown = [c for c in self.components if c not in folder_components]
        if unknown or not self.components:
            raise ValueError(f"quantize components {list(self.components)}: choose from {list(folder_components)}")
        for name in ("pictures", "steps", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"quantize {name}={getattr(self, name)!r} must be >= 1")
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ValueError("quantize prompts must be a non-empty list of non-empty prompts")


class Recorder:
    """Wraps an engine: every run's feeds are kept (copies), outputs pass through unchanged."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.on_cpu = getattr(engine, "on_cpu", True)
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Record ``feeds``, then run the wrapped engine."""
        self.calls.append({t.name: np.array(feeds[t.name], copy=True) for t in self.inputs})
        return self.engine.run(feeds)

    def release_memory(self) -> bool:
        """The wrapped engine's release_memory, where it has one."""
        release = getattr(self.engine, "release_memory", None)
        return bool(release()) if release else False


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items evenly spaced over ``items`` (all of them when there are no more than ``count``)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def record_calls(folder: Path, config: QuantizeConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every call of ``config.components`` while the folder's f32 OpenVINO pipeline draws the calibration pictures."""
    from sdexport import Pipeline

    options = {"precision": "f32", **({"threads": config.threads} if config.threads else {})}
    # verify=False: quantize_folder has just verified every hash under the folder's lock
    pipe = Pipeline.load(folder, backend="openvino", engine_options=options, verify=False)
    recorders = {name: Recorder(pipe.engines[name]) for name in config.components}
    for name, recorder in recorders.items():
        pipe.replace_engine(name, recorder)
    height, width = config.size or (None, None)
    t0 = time.perf_counter()
    for i in range(config.pictures):
        prompt = config.prompts[i % len(config.prompts)]
        pipe(prompt, num_inference_steps=config.steps, guidance_scale=config.guidance, height=height, width=width,
             seed=config.seed + i, output_type="np")
        config.log_every(f"calibration picture {i + 1}/{config.pictures} ({time.perf_counter() - t0:.0f} s)")
    return {name: recorder.calls for name, recorder in recorders.items()}


def weighted_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant (a linear layer's weight, maybe converted)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        source = op.input_value(1).get_node()
        while source.get_type_name() in ("Convert", "Transpose", "Reshape"):
            source = source.input_value(0).get_node()
        if source.get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names


@contextlib.contextmanager
def quiet_nncf() -> Iterator[None]:
    """nncf reports its tables at INFO and draws progress bars on stdout; keep both out of the caller's output."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_log.setLevel(level)


def hybrid_quantize(model: Any, samples: Sequence[Mapping[str, np.ndarray]]) -> Any:
    """``model`` with int8 weights everywhere and int8 activations in its convolutions, calibrated on ``samples``."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as Advanced
        from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters as SmoothQuant
    except ImportError:
        raise ValueError("sdexport quantize needs nncf: pip install 'sdexport[int8]'") from None
    linear = weighted_matmuls(model)
    with quiet_nncf():
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        return nncf.quantize(model, nncf.Dataset(list(samples)), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(samples), ignored_scope=nncf.IgnoredScope(names=linear, validate=False),
                             advanced_parameters=Advanced(smooth_quant_alphas=SmoothQuant(convolution=-1, matmul=-1)))


def _write_ir(folder: Path, name: str, model: Any) -> dict[str, dict[str, Any]]:
    """Save the IR into a temporary folder, then move its two files into place; their file records."""
    import openvino as ov

    target = folder / name / SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=folder / name) as scratch:
        ov.save_model(model, str(Path(scratch) / "model.xml"), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            os.replace(Path(scratch) / f"model{suffix}", target / f"model{suffix}")
    return {f"{name}/{SUBDIR}/model{s}": artifacts.file_record(folder, target / f"model{s}") for s in (".xml", ".bin")}


def _versions() -> dict[str, str]:
    import nncf
    import openvino as ov

    return {"nncf": nncf.__version__, "openvino": ov.__version__.split("-")[0]}


def quantize_folder(folder: str | os.PathLike[str], config: QuantizeConfig = QuantizeConfig()) -> dict[str, Any]:
    """Quantise ``config.components`` of a compiled folder (hybrid int8) and record the IRs in its manifest."""
    import openvino as ov

    root = Path(folder)
    with artifacts.build_lock(root):
        manifest = artifacts.load_manifest(root, verify=True)
        config.check(list(manifest["components"]))
        calls = record_calls(root, config)
        files = dict(manifest["files"])
        for name in config.components:
            record = manifest["components"][name]
            samples = spread(calls[name], config.samples)
            t0 = time.perf_counter()
            model = hybrid_quantize(ov.Core().read_model(str(artifacts.check_inside(root, record["graph"]))),
                                    samples)
            written = _write_ir(root, name, model)
            del model
            files.update(written)
            record[KEY] = {"graph": f"{name}/{SUBDIR}/model.xml", "method": METHOD,
                           "source_sha256": files[record["graph"]]["sha256"], "samples": len(samples),
                           "calls_recorded": len(calls[name]), "pictures": config.pictures, "steps": config.steps,
                           **_versions()}
            config.log_every(f"{name}: quantised on {len(samples)} calls in {time.perf_counter() - t0:.0f} s")
        manifest["files"] = dict(sorted(files.items()))
        artifacts.verify_files(root, manifest["files"], hashes=False)
        artifacts.write_manifest(root, manifest)
    return {name: manifest["components"][name][KEY] for name in config.components}


def quantized_graph(folder: Path | None, name: str, record: Mapping[str, Any]) -> Path:
    """The IR ``sdexport quantize`` wrote for component ``name`` (``load_manifest`` checked it is listed and made
    from the folder's current graph); ArtifactError naming the command when there is none."""
    entry = record.get(KEY)
    if folder is None or not isinstance(entry, Mapping):
        raise ArtifactError(f"{name} has no quantised graph; run `sdexport quantize {folder or 'FOLDER'} "
                            f"--component {name}` first, or choose precision f32 / bf16 / int8")
    return artifacts.check_inside(folder, str(entry["graph"]))


def carry_over(old: Mapping[str, Any] | None, new: dict[str, Any]) -> None:
    """Keep, in a rebuilt manifest, each quantised IR whose source graph is unchanged (same sha256) and still there."""
    if not old:
        return
    for name, record in new["components"].items():
        entry = old.get("components", {}).get(name, {}).get(KEY)
        graph = new["files"].get(record["graph"], {})
        if not isinstance(entry, dict) or entry.get("source_sha256") != graph.get("sha256"):
            continue
        kept = artifacts.quantized_files(old, name)
        if kept and entry["graph"] in kept:
            record[KEY] = entry
            new["files"] = dict(sorted({**new["files"], **kept}.items()))


def remove_stale(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Delete quantised IR folders the manifest no longer lists (their source graph was rebuilt)."""
    for name, record in manifest["components"].items():
        if KEY not in record and (folder / name / SUBDIR).is_dir():
            shutil.rmtree(folder / name / SUBDIR)
            log.info("removed %s (made from a graph since rebuilt)", folder / name / SUBDIR)
