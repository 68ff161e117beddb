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
from resources.tables import Table, TableInputManager, Tables, directory_in, table_in, with_tables

__all__ = [
    "ComputeResource",
    "DiffusionDBResource",
    "ImagesResource",
    "ProfileConfig",
    "SentenceEncoderResource",
    "Settings",
    "SettingsError",
    "StorageResource",
    "Table",
    "TableInputManager",
    "Tables",
    "build_resources",
    "directory_in",
    "load_settings",
    "profile_config",
    "table_in",
    "with_tables",
]
