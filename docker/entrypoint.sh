#!/bin/sh
# Entry point of the pgjournal image: runs `pgjournal ARGS...` (default CMD:
# a worker serving the demo's workflows).
#
# exec replaces the shell, so the SIGTERM of `docker stop` reaches the worker
# itself: it stops claiming, lets in-flight runs finish for its grace period,
# then releases the rest to other workers. SIGKILL (`docker kill`) is a crash:
# the runs' leases expire and the other workers take them over, replaying
# their journals.
set -eu
exec pgjournal "$@"
