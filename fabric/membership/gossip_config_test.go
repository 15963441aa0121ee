package membership

import (
	"io"
	"log/slog"
	"math"
	"testing"

	"github.com/hashicorp/memberlist"
)

// TestBroadcastRetransmits guards against the LAN default of 4 coming back:
// with it, each node passes a broadcast on 8 times in a cluster of 10 to 99
// nodes, a member misses a given join or leave with a probability of about
// e^-8, and at 50 nodes a third of the cluster formations (and one leave
// in 30) left one member without the news until the next push/pull, 60 s
// later (onebox bench membership --nodes 50). Whether a member misses a
// broadcast is chance, so this checks the configuration that sets the odds:
// at least 16 transmissions per node (miss probability about e^-16) for
// every size from 10 nodes up, and the rest of the LAN profile kept.
func TestBroadcastRetransmits(t *testing.T) {
	mc := memberlistConfig(Config{NodeName: "n", BindAddr: "127.0.0.1", GossipKey: make([]byte, 32),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	// memberlist's retransmitLimit (util.go), unexported.
	limit := func(n int) int { return mc.RetransmitMult * int(math.Ceil(math.Log10(float64(n+1)))) }
	for _, n := range []int{10, 50, 99, 100, 1000} {
		if got := limit(n); got < 16 {
			t.Errorf("a broadcast is passed on %d times per node at %d nodes, want >= 16 (RetransmitMult %d)", got, n, mc.RetransmitMult)
		}
	}
	lan := memberlist.DefaultLANConfig()
	if mc.ProbeInterval != lan.ProbeInterval || mc.ProbeTimeout != lan.ProbeTimeout || mc.SuspicionMult != lan.SuspicionMult ||
		mc.SuspicionMaxTimeoutMult != lan.SuspicionMaxTimeoutMult || mc.GossipInterval != lan.GossipInterval ||
		mc.GossipNodes != lan.GossipNodes || mc.PushPullInterval != lan.PushPullInterval || mc.GossipToTheDeadTime != lan.GossipToTheDeadTime {
		t.Errorf("failure detection or anti-entropy differs from memberlist's LAN profile: %+v", mc)
	}
	if len(mc.SecretKey) != 32 || !mc.GossipVerifyIncoming || !mc.GossipVerifyOutgoing {
		t.Error("gossip is not encrypted and verified both ways")
	}
}
