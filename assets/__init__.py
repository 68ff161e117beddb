"""reverse-sd's Dagster definitions: assets, checks, jobs, schedules and sensors by domain.

The Beta/Preview APIs used here (observable source assets, backfill policies, partitioned checks, the
multi-to-single partition mapping) are chosen on purpose; their warnings would otherwise be printed by the
code server and again by every run worker, so they are silenced here, once, for this package's imports.
"""

import warnings

import dagster as dg

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
