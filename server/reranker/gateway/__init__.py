"""The reranker gateway: one door to every fleet.

An async proxy in front of the RerankerDeployments' servers. It reads each request with the
server's own schemas (so every dialect's ``model`` is found the same way), routes it to the fleet
serving that model, picks an endpoint by load and query affinity, fans large requests out across
replicas, and holds requests for a fleet scaled to zero while it wakes. Where fleets come from is a
:class:`~reranker.gateway.directory.Directory`: Kubernetes (``kube.py``) or a static list.
"""
