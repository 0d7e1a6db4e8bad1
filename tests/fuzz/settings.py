"""The fuzz tier's knobs, read once per run: FUZZ_SEED (default: random, printed so that a
failure can be replayed), FUZZ_BUDGET_S (seconds of fuzzing per fuzzer; `make fuzz` raises
it) and FUZZ_MASS_DYNOS (dynos in the coordinator fuzzer's mass removal)."""

from __future__ import annotations

import os
import secrets

SEED = int(os.environ.get("FUZZ_SEED") or secrets.randbelow(2**32))
# Two fuzzers of 40 s plus their agents' start and clean-up: under two minutes in all.
BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S") or 40)
MASS_DYNOS = int(os.environ.get("FUZZ_MASS_DYNOS") or 10)
# pytest's per-test timeout: the budget, plus the agent's start, the required steps that
# outlast the budget (a mass removal, 32 MiB frames) and the clean-up.
TEST_TIMEOUT_S = BUDGET_S + 240
