import os

from hypothesis import settings

# Property tests print a `@reproduce_failure` blob with a falsifying example, so a failure in CI
# replays anywhere (the seed alone depends on the hypothesis version and database).
settings.register_profile("perennial", print_blob=True)
settings.load_profile("perennial")

# Under pytest-xdist (`make test` runs two workers) each worker's jobs keep their shared memory
# under a base of their own: a test comparing the base before and after sees only its own runs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("PERENNIAL_SHM_BASE",
                          f"/dev/shm/perennial-{os.environ['PYTEST_XDIST_WORKER']}")
