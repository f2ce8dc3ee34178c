"""``python -m spike_audit.pipelines.cli``: the same as the ``spike-audit`` console script."""

import sys

from spike_audit.pipelines.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
