"""REVERSE_SD_IMAGES and REVERSE_SD_DIFFUSIONDB=none in the settings."""

from __future__ import annotations

import pytest

from resources.settings import SettingsError, check_source, load_settings


def test_settings_images_and_diffusiondb_none(tmp_path):
    settings = load_settings({"REVERSE_SD_IMAGES": str(tmp_path), "REVERSE_SD_HOME": str(tmp_path / "h")})
    assert settings.images == str(tmp_path) and settings.uses_diffusiondb
    alone = load_settings({"REVERSE_SD_IMAGES": str(tmp_path), "REVERSE_SD_DIFFUSIONDB": "none"})
    assert not alone.uses_diffusiondb
    check_source(alone)  # nothing to check for DiffusionDB
    with pytest.raises(SettingsError, match="REVERSE_SD_DIFFUSIONDB=none leaves nothing to train on"):
        load_settings({"REVERSE_SD_DIFFUSIONDB": "none"})
    with pytest.raises(SettingsError, match="REVERSE_SD_IMAGES=.* does not exist"):
        check_source(load_settings({"REVERSE_SD_IMAGES": str(tmp_path / "missing"), "REVERSE_SD_DIFFUSIONDB": "none"}))
