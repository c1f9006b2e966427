// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3),
// built from the Go module proxy for hack/cluster. It is the same entry
// point as the upstream etcd binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
