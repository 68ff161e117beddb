"""Dagster resources: everything external to the method (data source, storage, encoder, compute)."""

from resources.core import (
    ComputeResource,
    DiffusionDBResource,
    ImagesResource,
    SentenceEncoderResource,
    StorageResource,
    build_resources,
)
from resources.profiles import ProfileConfig, profile_config
from resources.settings import Settings, SettingsError, load_settings

__all__ = [
    "ComputeResource",
    "DiffusionDBResource",
    "ImagesResource",
    "ProfileConfig",
    "SentenceEncoderResource",
    "Settings",
    "SettingsError",
    "StorageResource",
    "build_resources",
    "load_settings",
    "profile_config",
]
