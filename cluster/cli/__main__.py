"""`python -m cluster.cli ...` is `moectl ...`."""
import sys

from cluster.cli.main import main

sys.exit(main())
