"""The Definitions object: every asset, check, resource (and, later, schedules and sensors)."""

from __future__ import annotations

import dagster as dg

from assets.common import SETTINGS
from assets.data import DATA_ASSETS, DATA_CHECKS
from resources import build_resources

ALL_ASSETS = [*DATA_ASSETS]
ALL_CHECKS = [*DATA_CHECKS]

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    resources=build_resources(SETTINGS),
)
