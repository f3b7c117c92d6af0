"""Tests of the green twins (csrc/twins/): libc's results, errno and timeouts, against libc itself."""
