"""`python -m reranker.gateway`: the same as `reranker-gateway`."""

from .main import main

main()
