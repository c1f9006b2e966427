"""The development cluster behind `hack/cluster`, one module per component.

`cli` parses the command line; `cluster` orchestrates `up`/`down`/`status`; the components
each own one process or one piece of host state: `etcd`, `apiserver`, `controllers`
(controller-manager and scheduler), `node` (the machine-wide lock and the kubelet),
`containerd`, `network` (bridge, guard rules, CNI, kube-proxy), `dns` (CoreDNS), `images`
(the pause image and image import), `hoststate` (what the node changes on the host and
`down` puts back, and only that), `iptables` (the node's KUBE-* chains). `build` compiles the pinned binaries, `certs` issues the
certificates, `processes` starts and stops daemons by pid file. Only the Python standard
library is used, so `hack/cluster` runs before any virtualenv exists.
"""
