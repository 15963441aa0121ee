package agent

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/onebox-project/onebox/fabric/discovery"
)

// discoverFabricAddrs looks for members of the cluster on the LAN by mDNS
// and returns their fabric addresses. Discovery only finds candidates: the
// join protocol pins the cluster CA, so a spoofed answer can only make a
// join attempt fail.
func discoverFabricAddrs(ctx context.Context, clusterID string, log *slog.Logger) ([]string, error) {
	log.Info("looking for cluster members on the LAN (mDNS)", "cluster", clusterID)
	peers, err := discovery.Browse(ctx, discovery.BrowseConfig{ClusterID: clusterID, Logger: log})
	if err != nil {
		return nil, err
	}
	if len(peers) == 0 {
		return nil, fmt.Errorf("no member of cluster %s answered on the LAN within %v: pass --join ADDR", clusterID, discovery.DefaultTimeout)
	}
	addrs := make([]string, 0, len(peers))
	for _, p := range peers {
		addrs = append(addrs, p.FabricAddr)
	}
	log.Info("found cluster members on the LAN", "addrs", addrs)
	return addrs, nil
}

// startDiscovery announces this agent on the LAN so nodes holding only the
// token can find the cluster. A failure is logged, not fatal: discovery is
// a convenience, --join always works.
func (a *Agent) startDiscovery() {
	if a.cfg.NoDiscover {
		return
	}
	ann, err := discovery.Announce(discovery.AnnounceConfig{
		Peer: discovery.Peer{
			Node: a.id.Node, ClusterID: a.id.ClusterID,
			FabricAddr: a.fabricAddr(), GossipAddr: a.members.LocalAddr(),
		},
		Logger: a.log,
	})
	if err != nil {
		a.log.Warn("LAN discovery announce failed; other nodes need --join", "err", err)
		return
	}
	a.announcer = ann
}
