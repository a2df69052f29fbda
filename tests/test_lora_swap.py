"""LoRA hot swap on CPU: fused weights match diffusers' load_lora_weights + fuse_lora, ORT sessions with the
overrides match the fused torch modules, A -> B -> A and [] restore exactly, and bad files are refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file

from sdexport.engines.artifacts import load_manifest
from sdexport.engines.lora import LoraSwapper, LoraTerm, fuse, ort_session
from sdexport.engines.onnx_weights import patched_model, read_initializers
from sdexport.engines.ort import session_options
from sdexport.errors import SourceError
from sdexport.export.load import inspect_source, load_source
from sdexport.export.onnx import dummy_inputs, torch_outputs
from sdexport.export.wrappers import wrap
from sdexport.specs import ModelSpec

PRESET = "tiny-sdxl"
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEIGHTS = (0.7, -0.4)  # A and B, fused together in the parity test
FUSE_ATOL = 1e-6  # fused weights vs torch's fused parameters (both fp32)


def _make_lora(pipe: Any, out: Path, seed: int, unet_alpha: int) -> Path:
    """A random (non-zero) LoRA on the UNet (linear + conv) and both text encoders, saved the diffusers way."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    ucfg = LoraConfig(r=4, lora_alpha=unet_alpha, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"])
    tcfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "out_proj"])
    layers, meta = {}, {}
    for name, cfg in (("unet", ucfg), ("text_encoder", tcfg), ("text_encoder_2", tcfg)):
        module = getattr(pipe, name)
        inject_adapter_in_model(cfg, module, adapter_name=f"make{seed}")
        layers[name] = get_peft_model_state_dict(module, adapter_name=f"make{seed}")
        meta[name] = cfg.to_dict()
    type(pipe).save_lora_weights(
        str(out), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=meta["unet"],
        text_encoder_lora_adapter_metadata=meta["text_encoder"],
        text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"], weight_name=f"lora{seed}.safetensors")
    return out / f"lora{seed}.safetensors"


_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}


def _sgm(module: str, per: int) -> str:
    """diffusers UNet module -> original SDXL (SGM) naming, for the attention / resnet modules the test uses."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", module)
    if m:
        block, layer = int(m[2]), int(m[4])
        index = 1 + block * per + layer if m[1] == "down" else block * per + layer
        head = f"{'input' if m[1] == 'down' else 'output'}_blocks.{index}.{0 if m[3] == 'resnets' else 1}"
        rest = m[5]
    else:
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", module)
        head = f"middle_block.{ {('resnets', '0'): 0, ('attentions', '0'): 1, ('resnets', '1'): 2}[(m[1], m[2])]}"
        rest = m[3]
    return f"{head}.{_SGM_RESNET.get(rest, rest)}"


def _to_kohya(src: Path, dst: Path, sgm: bool) -> Path:
    """Rewrite a diffusers LoRA file in kohya's format (alpha keys, lora_unet_ / lora_te1_ / lora_te2_)."""
    from safetensors import safe_open

    with safe_open(str(src), "np") as f:
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
    out = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, kind = re.match(r"(.*)\.lora_([AB])\.weight$", rest).groups()
        if component == "unet":
            name = "lora_unet_" + (_sgm(module, 2) if sgm else module).replace(".", "_")
            alpha = 8.0
        else:
            module = module if module.startswith("text_model.") else "text_model." + module
            name = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + module.replace(".", "_")
            alpha = 4.0
        out[f"{name}.lora_{'down' if kind == 'A' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(out, str(dst))
    return dst


@pytest.fixture(scope="module")
def setup(tiny_folder: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    folder = tiny_folder(PRESET)  # the session's shared folder (conftest), only read here
    info = inspect_source(PRESET)
    maker = load_source(info).pipe
    a = _make_lora(maker, root, seed=1, unet_alpha=8)
    b = _make_lora(maker, root, seed=2, unet_alpha=2)
    return {"folder": folder, "manifest": load_manifest(folder), "info": info, "a": a, "b": b, "root": root}


def _fused_pipe(setup: dict[str, Any], loras: list[tuple[Path, float]]) -> Any:
    """The torch oracle: diffusers' load_lora_weights + set_adapters + fuse_lora on a fresh source pipeline."""
    pipe = load_source(setup["info"]).pipe
    names = []
    for index, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"x{index}")
        names.append(f"x{index}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(components=list(LORA_COMPONENTS), lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe


def _run(graph: Path, overrides: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of an ONNX Runtime session (sdexport's default options: every optimisation on) with overrides."""
    return ort_session(graph, overrides, session_options()).run(None, feeds)


def _check_against_torch(setup: dict[str, Any], loras: list[tuple[Path, float]]) -> Any:
    base = load_source(setup["info"]).pipe
    pipe = _fused_pipe(setup, loras)
    swapper = LoraSwapper(setup["folder"], setup["manifest"])
    update = swapper.update(loras)
    for component in LORA_COMPONENTS:
        params = swapper.maps[component].params
        fused = dict(getattr(pipe, component).named_parameters())
        before = dict(getattr(base, component).named_parameters())
        changed = {p for p in params if not torch.equal(fused[p], before[p])}
        assert changed, component
        ours = update.overrides[component]
        assert {params[p] for p in changed} == set(ours), component  # exactly the weights torch changed
        for param in changed:
            np.testing.assert_allclose(ours[params[param]], fused[param].detach().numpy(), rtol=0, atol=FUSE_ATOL)
    return pipe


def test_two_diffusers_loras_fuse_like_diffusers_and_ort_matches_torch(setup: dict[str, Any]) -> None:
    loras = [(setup["a"], WEIGHTS[0]), (setup["b"], WEIGHTS[1])]
    pipe = _check_against_torch(setup, loras)
    swapper = LoraSwapper(setup["folder"], setup["manifest"])
    overrides = swapper.update(loras).overrides
    spec = ModelSpec.from_dict(setup["manifest"]["model"])
    for name in ("unet", "text_encoder_2"):
        component = spec.components[name]
        env = {"batch": 2, "latent_height": 8, "latent_width": 8, "sequence": 77}
        feeds = dummy_inputs(component, env, seed=3)
        graph = setup["folder"] / setup["manifest"]["components"][name]["graph"]
        got = _run(graph, overrides[name], feeds)
        want = torch_outputs(wrap(pipe, spec, component), component, feeds)
        base = _run(graph, {}, feeds)
        tol = component.tolerance("fp32")
        for out, ref, plain in zip(got, want, base, strict=True):
            np.testing.assert_allclose(out, ref, atol=tol.atol, rtol=tol.rtol)
            assert np.abs(plain - ref).max() > 10 * tol.atol  # the LoRA really changes the output


@pytest.mark.parametrize("sgm", [False, True], ids=["kohya-diffusers-names", "kohya-sgm-names"])
def test_kohya_files_fuse_like_diffusers(setup: dict[str, Any], sgm: bool) -> None:
    path = _to_kohya(setup["a"], setup["root"] / f"kohya_{sgm}.safetensors", sgm)
    _check_against_torch(setup, [(path, 0.9)])


def test_swap_a_b_a_and_back_to_base_restore_exactly(setup: dict[str, Any]) -> None:
    swapper = LoraSwapper(setup["folder"], setup["manifest"])
    base_values = {c: swapper.base(c, list(swapper.maps[c].params.values())) for c in swapper.maps}
    engine_state = {c: {k: v.copy() for k, v in vals.items()} for c, vals in base_values.items()}

    def apply(update: Any) -> None:  # what a TensorRT refit does to the engine's weights
        for component, weights in update.refit.items():
            engine_state[component].update({k: v.copy() for k, v in weights.items()})

    first = swapper.update([(setup["a"], 1.0)])
    apply(first)
    snapshot_a = {c: {k: v.copy() for k, v in s.items()} for c, s in engine_state.items()}
    apply(swapper.update([(setup["b"], 0.5)]))
    again = swapper.update([(setup["a"], 1.0)])
    apply(again)
    for component in swapper.maps:
        assert again.overrides[component].keys() == first.overrides[component].keys()
        for name, value in first.overrides[component].items():
            assert np.array_equal(again.overrides[component][name], value)
        for name, value in snapshot_a[component].items():
            assert np.array_equal(engine_state[component][name], value), (component, name)
    back = swapper.update([])
    apply(back)
    assert back.overrides == {c: {} for c in swapper.maps}
    assert set(back.changed) == set(swapper.maps)
    for component, values in base_values.items():
        for name, value in values.items():
            assert np.array_equal(engine_state[component][name], value)


def test_overrides_hold_under_every_ort_optimisation_inline_and_external(setup: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    import onnxruntime as ort

    graph = setup["folder"] / setup["manifest"]["components"]["unet"]["graph"]
    model = onnx.load(str(graph))
    halved = {i.name: numpy_helper.to_array(i) * np.float32(0.5) for i in model.graph.initializer
              if i.name.endswith(".weight")}
    for init in model.graph.initializer:
        if init.name in halved:
            init.CopyFrom(numpy_helper.from_array(halved[init.name], init.name))
    spec = ModelSpec.from_dict(setup["manifest"]["model"])
    feeds = dummy_inputs(spec.components["unet"], {"batch": 2, "latent_height": 8, "latent_width": 8,
                                                    "sequence": 77}, seed=5)
    truth = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(graph)), str(external), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    model_bytes, kept_external = patched_model(external, halved)
    assert model_bytes is not None and kept_external  # both paths are exercised
    for source in (graph, external):
        np.testing.assert_array_equal(_run(source, halved, feeds)[0], truth[0])


def test_ort_session_a_b_a_gives_identical_outputs(setup: dict[str, Any]) -> None:
    spec = ModelSpec.from_dict(setup["manifest"]["model"])
    component = spec.components["text_encoder_2"]
    graph = setup["folder"] / setup["manifest"]["components"]["text_encoder_2"]["graph"]
    feeds = dummy_inputs(component, {"batch": 2}, seed=4)
    swapper = LoraSwapper(setup["folder"], setup["manifest"])

    def run(loras: list[tuple[Path, float]]) -> list[np.ndarray]:
        return _run(graph, swapper.update(loras).overrides["text_encoder_2"], feeds)

    base, a, b = run([]), run([(setup["a"], 1.0)]), run([(setup["b"], 1.0)])
    a_again, base_again = run([(setup["a"], 1.0)]), run([])
    for index in range(len(base)):
        assert not np.array_equal(a[index], b[index])
        assert np.array_equal(a[index], a_again[index])
        assert np.array_equal(base[index], base_again[index])


def test_refused_files_say_why(setup: dict[str, Any], tmp_path: Path) -> None:
    swapper = LoraSwapper(setup["folder"], setup["manifest"])
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = tmp_path / "other_model.safetensors"
    save_file({f"unet.{module}.lora_A.weight": np.ones((4, 999), np.float32),
               f"unet.{module}.lora_B.weight": np.ones((32, 4), np.float32)}, str(wrong))
    with pytest.raises(SourceError, match="another model"):
        swapper.update([(wrong, 1.0)])
    dora = tmp_path / "dora.safetensors"
    save_file({f"lora_unet_{module.replace('.', '_')}.dora_scale": np.ones((1, 32), np.float32)}, str(dora))
    with pytest.raises(SourceError, match="DoRA"):
        swapper.update([(dora, 1.0)])
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"unet.nothing.here.lora_A.weight": np.ones((1, 2), np.float32)}, str(unrelated))
    with pytest.raises(SourceError, match="matched no layer"):
        swapper.update([(unrelated, 1.0)])
    with pytest.raises(SourceError, match="safetensors"):
        swapper.update([(tmp_path / "lora.ckpt", 1.0)])
    assert swapper.applied == {c: {} for c in swapper.maps}  # a refused swap changes nothing


def test_initializer_reader_matches_onnx_inline_external_and_int32_fp16(setup: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    graph = setup["folder"] / setup["manifest"]["components"]["unet"]["graph"]
    model = onnx.load(str(graph))
    want = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    got = read_initializers(graph, want)
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in want.items())
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(model, str(external), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    got = read_initializers(external, want)
    assert all(np.array_equal(got[k], v) for k, v in want.items())
    half = np.arange(6, dtype=np.float16).reshape(2, 3) / 7
    tensor = onnx.helper.make_tensor("h", onnx.TensorProto.FLOAT16, [2, 3], half.flatten().tolist())
    assert tensor.int32_data and not tensor.raw_data  # the bit patterns sit in int32_data
    small = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[tensor]))
    onnx.save_model(small, str(tmp_path / "half.onnx"))
    assert np.array_equal(read_initializers(tmp_path / "half.onnx", ["h"])["h"], half)
    with pytest.raises(Exception, match="no initializer"):
        read_initializers(tmp_path / "half.onnx", ["missing"])


def test_fuse_accumulates_in_fp32_in_order_and_keeps_the_base_dtype() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 5)).astype(np.float16)
    conv = LoraTerm("w", rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((6, 2)), 0.5)
    fused = fuse(base, [(0.7, conv), (-1.0, conv)])
    product = conv.up.astype(np.float32) @ conv.down
    want = base.astype(np.float32) + product * np.float32(0.7 * 0.5)
    want += product * np.float32(-1.0 * 0.5)
    assert fused.dtype == np.float16
    np.testing.assert_array_equal(fused, want.astype(np.float16))
    kernel = LoraTerm("c", rng.standard_normal((3, 4, 3, 3)).astype(np.float32),
                      rng.standard_normal((8, 3, 1, 1)).astype(np.float32), 2.0)
    delta = kernel.delta(0.5)
    assert delta.shape == (8, 4, 3, 3)
    np.testing.assert_allclose(delta, np.einsum("or,rikl->oikl", kernel.up[:, :, 0, 0], kernel.down), rtol=1e-5)


def test_pipeline_set_loras_matches_a_folder_built_with_the_lora(setup: dict[str, Any]) -> None:
    """Hot swap on a loaded Pipeline gives the images of a folder with the LoRA fused at build time; A->B->A and
    back to [] restore exactly."""
    from sdexport import Pipeline
    from sdexport.export.build import BuildConfig, build
    from sdexport.export.lora import LoraSpec

    fused_folder = setup["root"] / "fused-a"
    build(BuildConfig(model=PRESET, out=fused_folder, loras=[LoraSpec(setup["a"], 0.8)]))
    args = {"prompt": "a red circle", "num_inference_steps": 3, "height": 64, "width": 64, "seed": 5,
            "output_type": "latent"}
    pipe = Pipeline.load(setup["folder"])
    base = pipe(**args).images
    first = pipe.set_loras([(setup["a"], 0.8)])
    assert sorted(first["changed"]) == ["text_encoder", "text_encoder_2", "unet"]
    with_a = pipe(**args).images
    expected = Pipeline.load(fused_folder)(**args).images
    # fusion in torch at build time vs numpy at run time: fp32 rounding only
    np.testing.assert_allclose(with_a, expected, atol=1e-4)
    assert np.abs(with_a - base).max() > 1e-3
    pipe.set_loras([(setup["b"], 0.5)])
    assert np.abs(pipe(**args).images - with_a).max() > 1e-3
    pipe.set_loras([(setup["a"], 0.8)])
    np.testing.assert_array_equal(pipe(**args).images, with_a)
    pipe.set_loras([])
    np.testing.assert_array_equal(pipe(**args).images, base)
