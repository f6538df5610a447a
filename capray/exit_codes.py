"""The exit codes every `capray` command shares, so scripts and Kubernetes read one meaning per number."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # something went wrong while working (a failed identity, an unexpected error)
EXIT_USAGE = 2  # the input or the setup cannot work: nothing was done
EXIT_INPUT_FAILED = 3  # `capray protect`: every failure was the input's fault (see its exit codes)
