"""Builds: an app's source compiled into a slug in an isolated build dyno, through Heroku's
buildpack API v2 (bin/detect, bin/compile, bin/release)."""

from agent.builds.builder import (
    Builder,
    BuildRequest,
    BuildResult,
    NothingDetected,
)
from agent.errors import BuildFailed

__all__ = ["BuildFailed", "BuildRequest", "BuildResult", "Builder", "NothingDetected"]
