"""Old import path of DAKL (a public entry point): see pipeline.ensemble.dakl."""

from pipeline.ensemble.dakl import DAKLRegressor  # noqa: F401
