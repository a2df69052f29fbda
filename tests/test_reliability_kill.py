"""A build SIGKILLed at the two moments that matter resumes to a folder whose images equal an uninterrupted build's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sdexport.engines.artifacts import BUILD_DIR, MANIFEST
from sdexport.errors import ArtifactError
from sdexport.export.build import BuildConfig, build
from sdexport.runtime.pipeline import Pipeline

PRESET = "tiny-sd15"
ROOT = Path(__file__).resolve().parents[1]

# Runs a build in a child process whose atomic writes are patched to SIGKILL the process at ``moment``:
# "record": right before the first component record (.build/<component>.json) is written;
# "manifest": during the manifest write, with half of its bytes in the temporary file.
KILLER = textwrap.dedent("""
    import os, signal, sys, tempfile
    from pathlib import Path
    from sdexport.engines import artifacts
    from sdexport.export.build import BuildConfig, build

    out, moment = Path(sys.argv[1]), sys.argv[2]
    write_bytes = artifacts.atomic_write_bytes

    def killing(path, data):
        path = Path(path)
        if moment == "record" and path.parent.name == artifacts.BUILD_DIR and path.stem != "loras":
            os.kill(os.getpid(), signal.SIGKILL)
        if moment == "manifest" and path.name == artifacts.MANIFEST:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        write_bytes(path, data)

    artifacts.atomic_write_bytes = killing
    build(BuildConfig(model=sys.argv[3], out=out))
""")


def images(folder: Path) -> np.ndarray:
    """Two seeded generations of the folder, as uint8 arrays."""
    pipe = Pipeline.load(folder)
    return np.stack([pipe("a red cube", num_inference_steps=3, seed=seed, output_type="np").images
                     for seed in (1, 2)])


@pytest.mark.parametrize("moment", ["record", "manifest"])
def test_killed_build_resumes_to_identical_images(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                  moment: str) -> None:
    out = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLER, str(out), moment, PRESET], cwd=ROOT, capture_output=True,
                           timeout=600)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert not (out / MANIFEST).exists()  # an unfinished build has no manifest, whatever was killed
    with pytest.raises(ArtifactError, match="manifest"):
        Pipeline.load(out)
    records = sorted(p.stem for p in (out / BUILD_DIR).glob("*.json") if p.stem != "loras")
    assert records == ([] if moment == "record" else sorted(Pipeline.load(tiny_folder(PRESET)).components))

    resumed = build(BuildConfig(model=PRESET, out=out))
    components = sorted(resumed.manifest["components"])
    if moment == "manifest":  # every finished component kept; only the manifest is written again
        assert resumed.built == [] and sorted(resumed.reused) == components
    else:  # killed before any component was finished: all are built
        assert sorted(resumed.built) == components and resumed.reused == []
    np.testing.assert_array_equal(images(out), images(tiny_folder(PRESET)))
