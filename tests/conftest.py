"""Shared fixtures: each concern lives in its own module of tests/support/."""
import pytest

pytest_plugins = ["tests.support.fixturelib", "tests.support.servers", "tests.support.compat",
                  "tests.support.protections"]

# The drivers' own suites copied into tests/driver_suites/ (psycopg 3's) run
# through `python -m tests.driver_suites.run`, each in its own interpreter.
collect_ignore = ["driver_suites"]


@pytest.fixture(scope="session")
def greenified():
    """greenify.greenify(), for tests of the green functions' waits."""
    import greenify
    greenify.greenify()


@pytest.fixture
def no_interruption_left_behind():
    """After the test: every interruption thrown into a green wait was delivered."""
    yield
    import gevent
    from tests.support.green_support import no_interruption_pending
    gevent.sleep(0.01)
    assert no_interruption_pending(), "an interruption was never delivered"


@pytest.fixture(autouse=True)
def fresh_loop_clock():
    """libev times timers from the clock it cached at its last iteration: after
    a test that kept the hub away (a subprocess, a native wait), a 0.2 s
    spawn_later would fire at once.  Each test starts with the clock read anew."""
    from gevent._hub_local import get_hub_if_exists
    hub = get_hub_if_exists()
    if hub is not None:
        hub.loop.update_now()
    yield
