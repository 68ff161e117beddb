"""One settings module: every REVERSE_SD_* variable read once by load_settings(environ) and validated up front."""

from __future__ import annotations

import pytest

from resources import SettingsError, load_settings, profile_config
from resources.settings import check_storage_root, ensure_dagster_home


@pytest.mark.parametrize(
    "environ, words",
    [
        ({"REVERSE_SD_TRAIN_VIT_LR": "abc"}, ["REVERSE_SD_TRAIN_VIT_LR", "not a number"]),
        ({"REVERSE_SD_TRAIN_VIT_LR": "inf"}, ["REVERSE_SD_TRAIN_VIT_LR", "finite"]),
        ({"REVERSE_SD_TRAIN_VIT_LR": "nan"}, ["REVERSE_SD_TRAIN_VIT_LR", "finite"]),
        ({"REVERSE_SD_TRAIN_SWIN_LR": "-1e-3"}, ["REVERSE_SD_TRAIN_SWIN_LR", "positive"]),
        ({"REVERSE_SD_TRAIN_UNET_EPOCHS": "0"}, ["REVERSE_SD_TRAIN_UNET_EPOCHS", "at least 1"]),
        ({"REVERSE_SD_TRAIN_RESNET_EPOCHS": "3"}, ["REVERSE_SD_TRAIN_RESNET_EPOCHS", "vit, swin, clip, unet"]),
        ({"REVERSE_SD_SAMPLE_PARTS": "two"}, ["REVERSE_SD_SAMPLE_PARTS", "not an integer"]),
        ({"REVERSE_SD_SPLIT_SEED": "-1"}, ["REVERSE_SD_SPLIT_SEED", "at least 0"]),
        ({"REVERSE_SD_NPROC_PER_NODE": "all"}, ["REVERSE_SD_NPROC_PER_NODE", "gpus"]),
        ({"REVERSE_SD_DEVICE": "gpu0"}, ["REVERSE_SD_DEVICE", "cuda:N"]),
        ({"REVERSE_SD_BASELINE_CHECK": "off"}, ["REVERSE_SD_BASELINE_CHECK", "block or warn"]),
        ({"REVERSE_SD_LOADER_WORKERS": "many"}, ["REVERSE_SD_LOADER_WORKERS"]),
        ({"REVERSE_SD_OBSERVE_CRON": "daily"}, ["REVERSE_SD_OBSERVE_CRON", "five fields"]),
        ({"REVERSE_SD_PROFILE": "nosuch"}, ["REVERSE_SD_PROFILE", "sample, diffusiondb"]),
    ],
)
def test_a_wrong_value_is_one_error_naming_the_variable(environ, words):
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_per_backbone_overrides_change_only_that_backbone():
    config = profile_config(load_settings({"REVERSE_SD_TRAIN_VIT_LR": "0.5", "REVERSE_SD_TRAIN_UNET_EPOCHS": "2"}))
    plain = profile_config(load_settings({}))
    assert (
        config.training_for("vit").lr == 0.5 and config.training_for("vit").epochs == plain.training_for("vit").epochs
    )
    assert config.training_for("unet").epochs == 2 and config.training_for("unet").lr == plain.training_for("unet").lr
    assert config.training_for("swin") == plain.training_for("swin")
    # the profile's own departure (the sample's unet stops at 4 epochs) stays unless the user overrides it
    assert plain.training_for("unet").epochs == 4


def test_profile_config_reads_nothing_from_the_environment(monkeypatch):
    settings = load_settings({"REVERSE_SD_SAMPLE_PARTS": "2", "REVERSE_SD_TRAIN_EPOCHS": "3"})
    monkeypatch.setenv("REVERSE_SD_SAMPLE_PARTS", "9")
    monkeypatch.setenv("REVERSE_SD_TRAIN_EPOCHS", "9")
    config = profile_config(settings)
    assert config.sample.n_parts == 2 and config.training.epochs == 3


def test_devices_default_to_auto_in_every_profile():
    from resources import build_resources

    for profile in ("sample", "diffusiondb"):
        settings = load_settings({"REVERSE_SD_PROFILE": profile})
        assert settings.device == "auto"
        resources = build_resources(settings)
        assert resources["compute"].device == "auto" and resources["sentence_encoder"].device == "auto"
    real = build_resources(load_settings({"REVERSE_SD_PROFILE": "diffusiondb"}))["compute"]
    assert 0 <= real.num_workers <= 8
    chosen = build_resources(load_settings({"REVERSE_SD_LOADER_WORKERS": "1"}))["compute"]
    assert chosen.num_workers == 1


def test_homes_that_are_files_are_named(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SettingsError, match="REVERSE_SD_HOME=.* is a file, not a directory"):
        check_storage_root(load_settings({"REVERSE_SD_HOME": str(a_file)}))
    with pytest.raises(SettingsError, match="DAGSTER_HOME=.* is a file, not a directory"):
        ensure_dagster_home(load_settings({"DAGSTER_HOME": str(a_file)}))


def test_no_module_but_the_settings_module_reads_reverse_sd_variables():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    readers = []
    for path in [*root.glob("assets/*.py"), *root.glob("resources/*.py"), *root.glob("pipeline/**/*.py")]:
        text = path.read_text()
        if re.search(r"(environ(\.get)?\(|getenv\()\s*[\"']REVERSE_SD_", text) or re.search(
            r"environ\[[\"']REVERSE_SD_", text
        ):
            readers.append(path.relative_to(root).as_posix())
    assert readers == [], readers
