"""VM tier: boots a pure cgroup v2 kernel under qemu and runs the cgroup tests inside it."""
