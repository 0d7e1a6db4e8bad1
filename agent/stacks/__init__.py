"""Stacks: read-only root filesystems for dynos, built from Debian packages with mmdebstrap and
kept under `<state_dir>/stacks/NAME` (DESIGN §10).
"""
