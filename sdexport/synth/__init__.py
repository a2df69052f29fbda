"""Batch data synthesis: a prompt table in, a Hugging Face imagefolder or WebDataset out; resumable, Ray optional."""

from sdexport.synth.config import RayOptions, Summary, SynthConfig
from sdexport.synth.rows import Defaults
from sdexport.synth.run import synthesize
from sdexport.synth.table import SynthError

__all__ = ["Defaults", "RayOptions", "Summary", "SynthConfig", "SynthError", "synthesize"]
