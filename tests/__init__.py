"""greenify's test suite, in folders that mirror the layers; tests/support/ is its support package."""
