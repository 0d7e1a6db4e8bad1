"""Heroku's numbers for a dyno's life, defined once: the agent's defaults (agent.config) and the
rules that use them (agent.supervision.policy) both read them here (reference/heroku.md §1)."""

from typing import Final

# Cool-offs after the immediate first restart: 20, 40, 60, 180 and 320 minutes, the last one
# repeating forever (the Common Runtime's schedule).
HEROKU_SCHEDULE_S: Final = (1200.0, 2400.0, 3600.0, 10800.0, 19200.0)
RESET_AFTER_UP_S: Final = 600.0  # "starts correctly": up for 10 minutes
BOOT_TIMEOUT_S: Final = 60.0  # R10
STOP_TIMEOUT_S: Final = 30.0  # R12
SAMPLE_PERIOD_S: Final = 20.0  # runtime metrics, R14 at most once per period
CYCLE_BASE_S: Final = 86400.0  # daily cycling…
CYCLE_JITTER_S: Final = 216 * 60.0  # …plus up to 216 minutes
