"""Public import path of DAKL, kept stable: the implementation lives in pipeline.ensemble.dakl."""

from pipeline.ensemble.dakl import DAKLRegressor, cosine_normalise, dense_reference_predict

__all__ = ["DAKLRegressor", "cosine_normalise", "dense_reference_predict"]
