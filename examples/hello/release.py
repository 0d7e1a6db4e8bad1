"""The hello app's release phase: runs once before the formation starts (nothing to migrate)."""

import os

print(f"release phase of {os.environ.get('DYNO', 'release.?')}: nothing to migrate")
