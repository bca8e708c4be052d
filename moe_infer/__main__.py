"""`python -m moe_infer`: the command line (`moe_infer.cli`)."""

import sys

from moe_infer.cli import main

sys.exit(main())
