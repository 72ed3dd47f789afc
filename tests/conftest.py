"""The suite's fixtures live in testkit/ (shared with bench/); they are registered here as plugins."""

pytest_plugins = ["testkit.fixtures", "testkit.redis_server", "testkit.redis_cluster", "testkit.stores"]
