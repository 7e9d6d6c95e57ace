"""`python -m bench.experiment`: run the sparsity-curse experiment (see the package doc)."""

import sys

from bench.experiment.driver import main

sys.exit(main())
