"""reranker-operator: runs reranking servers on Kubernetes as `RerankerDeployment` fleets.

Layers, from pure to effectful (a module only imports the ones above it):

- `spec`: the typed view of a RerankerDeployment spec, with the CRD's defaults.
- `manifests`: pure builders of every child object (ConfigMap, Deployment, Service, HPA, PDB,
  ServiceMonitor, managed Redis) from a spec.
- `drift`: pure comparison of a desired child with the live one (is a write needed?).
- `status`: pure builder of the status (conditions, replicas, selector) from what is observed.
- `kube`: the few Kubernetes API calls the operator makes (server-side apply, delete, status).
- `reconcile`: one pass for one RerankerDeployment: build, compare, apply, report.
- `handlers`: the thin Kopf handlers that call `reconcile`.
- `settings`, `main`: operator configuration and the `reranker-operator` entry point.

The operator never imports torch or the server; names shared with the server come from
`reranker.contract`.
"""

__version__ = "0.1.0"
