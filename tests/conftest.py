from hypothesis import settings

# Property tests print a `@reproduce_failure` blob with a falsifying example, so a failure in CI
# replays anywhere (the seed alone depends on the hypothesis version and database).
settings.register_profile("perennial", print_blob=True)
settings.load_profile("perennial")
