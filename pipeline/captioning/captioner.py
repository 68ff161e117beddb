"""The captioning package's old import path, kept as a re-export: resources, the predictor and the CLI
import from here.  The code lives in the modules of pipeline/captioning/ (see its __init__)."""

from pipeline.captioning import *  # noqa: F403
from pipeline.captioning import __all__  # noqa: F401
