"""greenify-inspect recognises the clients that a patch does not help, and
says why and what to use instead (issue 27): librdkafka (confluent-kafka),
grpcio's core and libzmq (pyzmq) do their network I/O in threads of their
own; pyodbc's driver manager loads the driver and its client library only at
connect time.  None of them is recommended."""
from __future__ import annotations

import os

import pytest

from tests.support.servers import require_module
from tests.tools.test_inspect import inspect_json


@pytest.mark.parametrize("module, pypi, file_prefix, instead", [
    ("confluent_kafka", "confluent-kafka", "librdkafka", "aiokafka"),
    ("grpc", "grpcio", "cygrpc.", "grpc.experimental.gevent.init_gevent()"),
    ("zmq", "pyzmq", "libzmq", "zmq.green"),
    ("pyodbc", "pyodbc", "libodbc.so", 'greenify.patch_on_load("libmariadb", "libpq")'),
])
def test_inspect_names_what_to_use_instead_of_patching(module, pypi, file_prefix, instead):
    require_module(module, pypi)
    document = inspect_json("--import", module)
    known = [library for library in document["libraries"]
             if os.path.basename(library["path"]).startswith(file_prefix)]
    assert known, f"{file_prefix}* not listed for --import {module}: {[lib['path'] for lib in document['libraries']]}"
    assert not any(library["recommended"] for library in known), known
    assert instead in known[0]["note"], known[0]["note"]
    assert not any(name.startswith(file_prefix) for name in document["patch_library"]), document["patch_library"]
