"""`python -m reranker` is the `reranker` console script."""

import sys

from .cli import main

sys.exit(main())
