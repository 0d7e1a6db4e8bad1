# Sourced before every command of a dyno, after the config vars are set.
export PROFILE_GREETING="hello from .profile.d, on $DYNO"
