"""Settings that used to pass validation and fail later (issues 27 and 29): cron expressions, storage URL
schemes, in-process storage, unreachable hub sources, unbounded numbers.  Each is one SettingsError line
naming the variable, raised by load_settings or the checks the CLI's materialize runs first, in process."""

from __future__ import annotations

import time

import pytest

from resources import SettingsError, load_settings
from resources.settings import (
    MAX_EPOCHS,
    MAX_LR,
    MAX_NPROC_PER_NODE,
    MAX_SAMPLE_IMAGES_PER_PART,
    MAX_SAMPLE_PARTS,
    MAX_SEED,
    available_cores,
    check_source,
    check_storage_root,
)


def _error(environ: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


# -- REVERSE_SD_OBSERVE_CRON ------------------------------------------------------------------------------

BAD_CRONS = [
    "a b c d e",
    "99 99 99 99 99",
    "0 24 * * *",
    "0 3 0 * *",
    "0 3 * 13 *",
    "0 3 * * 8",
    "*/0 * * * *",
    "5-1 * * * *",
    "0 3 30 2 *",
    "0 3 * * * *",
    "1,,2 * * * *",
    "@sometimes",
]
GOOD_CRONS = [
    "0 3 * * *",
    "*/15 * * * 1-5",
    "0 0 1 jan,jul *",
    "0 0 * * sun-sat",
    "5/15 * * * *",
    "0 0 ? * *",
    "0 0 29 2 *",
    "0 0 1-5/2 * mon-fri",
    "0 0 * * 7",
    "@daily",
    "@hourly",
]


@pytest.mark.parametrize("cron", BAD_CRONS)
def test_a_wrong_cron_expression_is_one_line_naming_the_variable(cron):
    message = _error({"REVERSE_SD_OBSERVE_CRON": cron})
    assert message.startswith(f"REVERSE_SD_OBSERVE_CRON={cron!r}"), message
    assert "minute 0-59" in message and "0 3 * * *" in message  # what is accepted


def test_the_issue_s_cron_expressions_say_what_is_wrong():
    assert "minute 'a' is not a number" in _error({"REVERSE_SD_OBSERVE_CRON": "a b c d e"})
    assert "minute 99 is out of 0-59" in _error({"REVERSE_SD_OBSERVE_CRON": "99 99 99 99 99"})


def test_every_cron_expression_the_settings_accept_dagster_accepts():
    """The settings' grammar is a subset of Dagster's: whatever passes here builds the schedule and the
    automation condition that use it; what the settings refuse, Dagster refuses too or never fires."""
    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    for cron in GOOD_CRONS:
        assert load_settings({"REVERSE_SD_OBSERVE_CRON": cron}).observe_cron == cron
        dg.ScheduleDefinition(name="observe", cron_schedule=cron, target="*")
        dg.AutomationCondition.cron_tick_passed(cron)
    for cron in ("a b c d e", "99 99 99 99 99", "0 3 30 2 *"):
        with pytest.raises(dg.DagsterInvalidDefinitionError):
            dg.ScheduleDefinition(name="observe", cron_schedule=cron, target="*")


# -- REVERSE_SD_HOME: scheme, in-process storage ------------------------------------------------------------


def test_an_unknown_storage_scheme_is_refused_naming_the_installed_ones():
    started = time.perf_counter()
    message = _error({"REVERSE_SD_HOME": "foo://bar"})
    assert time.perf_counter() - started < 10
    assert message.startswith("REVERSE_SD_HOME='foo://bar'") and "'foo'" in message
    installed = message.split("installed: ", 1)[1]
    assert "file" in installed and "memory" in installed


def test_in_process_storage_is_refused_by_the_materialize_check_only():
    """memory:// is refused where the CLI's materialize checks the root; load_settings and the storage resource
    keep serving it in process (tests and notebooks use it)."""
    from resources import StorageResource

    for home in ("memory://bucket/home", "simplecache::memory://bucket/home"):
        settings = load_settings({"REVERSE_SD_HOME": home})
        with pytest.raises(SettingsError) as raised:
            check_storage_root(settings)
        message = str(raised.value)
        assert "\n" not in message and message.startswith(f"REVERSE_SD_HOME={home!r}") and "memory" in message
    assert StorageResource(root="memory://bucket/home").path("x.parquet") == "memory://bucket/home/x.parquet"


def test_a_known_scheme_without_its_driver_names_the_package():
    import importlib.util

    # s3fs is a dependency (REVERSE_SD_HOME=s3://...): gcs:// stands for a known scheme whose driver is missing
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    settings = load_settings({"REVERSE_SD_HOME": "gcs://bucket/prefix"})  # known to fsspec: accepted
    with pytest.raises(
        SettingsError, match=r"REVERSE_SD_HOME='gcs://bucket/prefix': the 'gcs' filesystem is not .*gcsfs"
    ):
        check_storage_root(settings)


def test_a_dry_run_check_of_the_storage_root_creates_nothing(tmp_path):
    home = tmp_path / "new" / "home"
    check_storage_root(load_settings({"REVERSE_SD_HOME": str(home)}), create=False)
    assert not (tmp_path / "new").exists()
    check_storage_root(load_settings({"REVERSE_SD_HOME": str(home)}))
    assert home.is_dir()


# -- REVERSE_SD_DIFFUSIONDB: a hub id that cannot be reached --------------------------------------------------


def test_a_hub_source_offline_fails_at_once_naming_the_remedy():
    settings = load_settings({"REVERSE_SD_DIFFUSIONDB": "not/a-real-repo", "HF_HUB_OFFLINE": "1"})
    started = time.perf_counter()
    with pytest.raises(SettingsError) as raised:
        check_source(settings)
    assert time.perf_counter() - started < 1
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("REVERSE_SD_DIFFUSIONDB='not/a-real-repo'")
    assert "HF_HUB_OFFLINE" in message and "local DiffusionDB mirror directory" in message


def test_a_hub_source_with_no_network_fails_at_once(monkeypatch):
    """No network (here: a hub endpoint where nothing listens) is one line in well under a second, not
    retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    settings = load_settings({"REVERSE_SD_DIFFUSIONDB": "not/a-real-repo"})
    started = time.perf_counter()
    with pytest.raises(SettingsError) as raised:
        check_source(settings)
    assert time.perf_counter() - started < 5
    message = str(raised.value)
    assert "\n" not in message and "cannot be reached" in message and "local DiffusionDB mirror" in message


# -- bounded numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, bound, at_bound",
    [
        ("REVERSE_SD_TRAIN_VIT_LR", "1e308", f"{MAX_LR:g}", str(MAX_LR)),
        ("REVERSE_SD_TRAIN_CLIP_LR", "1e30", f"{MAX_LR:g}", str(MAX_LR)),
        (
            "REVERSE_SD_SAMPLE_IMAGES_PER_PART",
            str(10**12),
            f"{MAX_SAMPLE_IMAGES_PER_PART:,}",
            str(MAX_SAMPLE_IMAGES_PER_PART),
        ),
        ("REVERSE_SD_SAMPLE_PARTS", "1000000", f"{MAX_SAMPLE_PARTS:,}", str(MAX_SAMPLE_PARTS)),
        ("REVERSE_SD_SAMPLE_PARTS", "9" * 5000, f"{MAX_SAMPLE_PARTS}", str(MAX_SAMPLE_PARTS)),
        ("REVERSE_SD_TRAIN_EPOCHS", "100000000", f"{MAX_EPOCHS:,}", str(MAX_EPOCHS)),
        ("REVERSE_SD_TRAIN_SWIN_EPOCHS", "100000000", f"{MAX_EPOCHS:,}", str(MAX_EPOCHS)),
        ("REVERSE_SD_SPLIT_SEED", str(2**64), f"{MAX_SEED:,}", str(MAX_SEED)),
        ("REVERSE_SD_NPROC_PER_NODE", "99999999999", f"{MAX_NPROC_PER_NODE}", str(MAX_NPROC_PER_NODE)),
    ],
)
def test_every_number_is_bounded_with_the_bound_in_the_message(name, value, bound, at_bound):
    message = _error({name: value})
    assert message.startswith(f"{name}=") and bound in message, message
    load_settings({name: at_bound})  # the bound itself is accepted


def test_loader_workers_beyond_the_cores_are_refused_naming_them():
    cores = available_cores()
    assert load_settings({"REVERSE_SD_LOADER_WORKERS": str(cores)}).loader_workers == cores
    message = _error({"REVERSE_SD_LOADER_WORKERS": str(cores + 1)})
    assert message.startswith(f"REVERSE_SD_LOADER_WORKERS={cores + 1}")
    assert f"{cores} cores" in message and f"0 to {cores}" in message


def test_materialize_workers_are_capped_in_the_parser(capsys):
    from cli.main import MAX_WORKERS, build_parser

    parser = build_parser()
    assert parser.parse_args(["materialize", "--workers", str(MAX_WORKERS)]).workers == MAX_WORKERS
    with pytest.raises(SystemExit) as raised:
        parser.parse_args(["materialize", "--workers", "99999999999"])
    assert raised.value.code == 2
    assert f"at most {MAX_WORKERS}" in capsys.readouterr().err
