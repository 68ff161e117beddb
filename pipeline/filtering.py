"""Old import path of the prompt filter (a public entry point): see pipeline.data.filtering."""

from pipeline.data.filtering import *  # noqa: F401,F403
from pipeline.data.filtering import assign_split, filter_prompts, filter_report  # noqa: F401
