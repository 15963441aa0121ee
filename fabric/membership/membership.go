// Package membership tells every agent which nodes are in the cluster and
// which of them are alive. It wraps HashiCorp serf (SWIM gossip over
// memberlist): failure detection, suspicion, join and graceful leave, and
// reconnection after a partition heals all come from there. Gossip is
// encrypted with the cluster's gossip key (AES-256-GCM), which only nodes
// that joined with the token ever receive.
package membership

import (
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/serf/serf"

	"github.com/onebox-project/onebox/internal/stdlog"
)

// Status of a member as seen by this node.
type Status string

// Member statuses. Gossip yields alive, failed, leaving and left. Suspect
// is set by the agent for a node that gossip still lists as alive but that
// did not answer the observer directly: memberlist keeps its own SWIM
// suspicion in an unexported field (the exported Node.State is never
// filled in, memberlist v0.7.0), so it cannot be read from here.
const (
	StatusAlive   Status = "alive"
	StatusSuspect Status = "suspect"
	StatusFailed  Status = "failed"
	StatusLeaving Status = "leaving"
	StatusLeft    Status = "left"
)

// Tag keys gossiped with every member. Serf limits all tags of a node to
// 512 bytes, so only what is needed to reach the node travels by gossip;
// everything else is asked of the node over mTLS.
const (
	TagFabric  = "fabric"
	TagCluster = "cid"
	TagVersion = "v"
	// TagCordon is "1" on a node that takes no new or moved processes
	// ('onebox drain', 'onebox cordon'); absent otherwise.
	TagCordon = "cordon"
)

// Member is one node of the cluster.
type Member struct {
	Name       string `json:"name"`
	GossipAddr string `json:"gossip_addr"`
	FabricAddr string `json:"fabric_addr"`
	ClusterID  string `json:"cluster_id"`
	Version    string `json:"version"`
	Status     Status `json:"status"`
	// Cordoned: the node takes no new or moved processes (TagCordon).
	Cordoned bool `json:"cordoned,omitempty"`
}

// Config of the membership layer.
type Config struct {
	NodeName      string
	BindAddr      string // IP to bind gossip to
	BindPort      int    // 0: pick a free port
	AdvertiseAddr string // IP others reach us at; empty: derived from BindAddr
	AdvertisePort int    // 0: same as the bound port
	GossipKey     []byte // 32 bytes
	FabricAddr    string // host:port of our fabric port, gossiped as a tag
	ClusterID     string
	Version       string
	SnapshotPath  string        // remembers peers across restarts; empty: none
	Reconnect     time.Duration // how often to retry failed members; default 5s
	Logger        *slog.Logger
	// OnEvent is called, from one goroutine, for every membership change.
	OnEvent func(kind string, m Member)
}

// Membership is a running gossip member.
type Membership struct {
	cfg    Config
	serf   *serf.Serf
	events chan serf.Event
	done   chan struct{}
	stop   sync.Once // closes done; Shutdown may be called more than once, concurrently
	wg     sync.WaitGroup
	tagMu  sync.Mutex // serialises SetTag's read-modify-write of the tags
}

// New starts gossiping. The node is alone until Join is called (or the
// snapshot brings it back to its previous peers).
func New(cfg Config) (*Membership, error) {
	if len(cfg.GossipKey) != 32 {
		return nil, errors.New("membership: gossip key must be 32 bytes")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Reconnect == 0 {
		cfg.Reconnect = 5 * time.Second
	}
	sc := serf.DefaultConfig()
	sc.NodeName = cfg.NodeName
	sc.Tags = map[string]string{TagFabric: cfg.FabricAddr, TagCluster: cfg.ClusterID, TagVersion: cfg.Version}
	sc.SnapshotPath = cfg.SnapshotPath
	sc.RejoinAfterLeave = true
	sc.ReconnectInterval = cfg.Reconnect
	sc.ValidateNodeNames = true
	sc.EnableNameConflictResolution = true
	sc.Logger = newStdLogger(cfg.Logger.With("component", "serf"))
	events := make(chan serf.Event, 256)
	sc.EventCh = events

	sc.MemberlistConfig = memberlistConfig(cfg)

	s, err := serf.Create(sc)
	if err != nil {
		return nil, fmt.Errorf("membership: start gossip on %s:%d: %w", cfg.BindAddr, cfg.BindPort, err)
	}
	m := &Membership{cfg: cfg, serf: s, events: events, done: make(chan struct{})}
	m.wg.Add(1)
	go m.loop()
	return m, nil
}

// broadcastRetransmitMult is memberlist's RetransmitMult: every node that
// learns a broadcast (a join, a graceful leave, a suspicion) passes it on
// RetransmitMult*ceil(log10(n+1)) times, each time to a random member, and
// serf sends its join and leave intents the same way. A member that misses
// every copy learns the news only from the next push/pull, 30 s apart (60 s
// above 32 nodes); until then it lists a node that joined as unknown, or one
// that left as leaving (or failed, if it missed serf's intent instead).
// With the LAN default of 4, a 10 to 99 node cluster sends 8 copies per
// node and a member misses a given broadcast with a probability of about
// e^-8 (1 in 3000): at 50 nodes, one of the ~1200 member/broadcast pairs of
// forming the cluster missed in a third of the runs, and one member in 30
// graceful leaves. 8 makes that about e^-16 (1 in 9 million), for twice the
// gossip packets while members change and none more when they do not.
// Failure detection (probes, suspicion, its timeouts) is unchanged.
const broadcastRetransmitMult = 8

// memberlistConfig is the gossip configuration of a member: memberlist's
// LAN profile, encrypted, with more retransmissions per broadcast.
func memberlistConfig(cfg Config) *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.BindAddr = cfg.BindAddr
	mc.BindPort = cfg.BindPort
	if cfg.AdvertiseAddr != "" {
		mc.AdvertiseAddr = cfg.AdvertiseAddr
		// With BindPort 0 memberlist replaces this with the port it picked.
		mc.AdvertisePort = cfg.AdvertisePort
		if mc.AdvertisePort == 0 {
			mc.AdvertisePort = cfg.BindPort
		}
	}
	// A crashed node restarted with other ports (or a new DHCP address)
	// may take its name back once it has been dead this long. Only members
	// hold the gossip key, so only members can claim a name.
	mc.DeadNodeReclaimTime = 2 * time.Second
	mc.RetransmitMult = broadcastRetransmitMult
	mc.SecretKey = cfg.GossipKey
	mc.GossipVerifyIncoming = true
	mc.GossipVerifyOutgoing = true
	mc.Logger = newStdLogger(cfg.Logger.With("component", "memberlist"))
	return mc
}

func (m *Membership) loop() {
	defer m.wg.Done()
	for {
		select {
		case <-m.done:
			return
		case e := <-m.events:
			me, ok := e.(serf.MemberEvent)
			if !ok {
				continue
			}
			kind := strings.TrimPrefix(me.Type.String(), "member-")
			for _, sm := range me.Members {
				mem := fromSerf(sm)
				m.cfg.Logger.Info("member "+kind, "member", mem.Name, "addr", mem.GossipAddr)
				if m.cfg.OnEvent != nil {
					m.cfg.OnEvent(kind, mem)
				}
			}
		}
	}
}

// Join contacts the given gossip addresses (host:port) and returns how many
// answered.
func (m *Membership) Join(addrs []string) (int, error) {
	if len(addrs) == 0 {
		return 0, nil
	}
	n, err := m.serf.Join(addrs, true)
	if n > 0 {
		return n, nil
	}
	return 0, fmt.Errorf("membership: no gossip peer answered (%s): %w", strings.Join(addrs, ", "), err)
}

// LocalAddr is the gossip address this node advertises.
func (m *Membership) LocalAddr() string {
	lm := m.serf.LocalMember()
	return net.JoinHostPort(lm.Addr.String(), strconv.Itoa(int(lm.Port)))
}

// Members returns every node this member knows of, sorted by name.
func (m *Membership) Members() []Member {
	var out []Member
	for _, sm := range m.serf.Members() {
		out = append(out, fromSerf(sm))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// LiveGossipAddrs lists the gossip addresses of alive members, for handing
// to a node that joins.
func (m *Membership) LiveGossipAddrs() []string {
	var out []string
	for _, mem := range m.Members() {
		if mem.Status == StatusAlive || mem.Status == StatusSuspect {
			out = append(out, mem.GossipAddr)
		}
	}
	return out
}

func fromSerf(sm serf.Member) Member {
	var st Status
	switch sm.Status {
	case serf.StatusAlive:
		st = StatusAlive
	case serf.StatusLeaving:
		st = StatusLeaving
	case serf.StatusLeft:
		st = StatusLeft
	case serf.StatusFailed:
		st = StatusFailed
	default:
		st = Status(sm.Status.String())
	}
	t := ParseTags(sm.Tags)
	return Member{
		Name:       sm.Name,
		GossipAddr: net.JoinHostPort(sm.Addr.String(), strconv.Itoa(int(sm.Port))),
		FabricAddr: t.FabricAddr, ClusterID: t.ClusterID, Version: t.Version,
		Status: st, Cordoned: t.Cordoned,
	}
}

// Tags are the decoded gossip tags of a member.
type Tags struct {
	FabricAddr, ClusterID, Version string
	Cordoned                       bool
}

// ParseTags decodes the tags a member gossiped. Tags come from the network
// (from members, but a buggy or older member must not confuse us), so bad
// values are dropped rather than trusted: a member whose fabric address
// does not parse is shown without one and is simply not asked for details.
func ParseTags(tags map[string]string) Tags {
	var t Tags
	if a := tags[TagFabric]; a != "" {
		if host, port, err := net.SplitHostPort(a); err == nil && net.ParseIP(host) != nil {
			if p, err := strconv.Atoi(port); err == nil && p > 0 && p < 65536 {
				t.FabricAddr = a
			}
		}
	}
	if c := tags[TagCluster]; len(c) <= 64 && isHex(c) {
		t.ClusterID = c
	}
	if v := tags[TagVersion]; len(v) <= 64 && printable(v) {
		t.Version = v
	}
	t.Cordoned = tags[TagCordon] == "1"
	return t
}

// SetTag sets one of this node's gossiped tags (an empty value removes
// it) and gossips the change; the other members see it within a second or
// so. Serf limits all tags of a node to 512 bytes.
func (m *Membership) SetTag(key, value string) error {
	m.tagMu.Lock()
	defer m.tagMu.Unlock()
	tags := map[string]string{}
	for k, v := range m.serf.LocalMember().Tags {
		tags[k] = v
	}
	if value == "" {
		delete(tags, key)
	} else {
		tags[key] = value
	}
	if err := m.serf.SetTags(tags); err != nil {
		return fmt.Errorf("membership: set tag %s: %w", key, err)
	}
	return nil
}

func isHex(s string) bool {
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return false
		}
	}
	return true
}

func printable(s string) bool {
	for _, r := range s {
		if r < 0x21 || r > 0x7e {
			return false
		}
	}
	return true
}

// Leave announces a graceful departure and waits (bounded by serf's
// broadcast timeout) for it to propagate. Call Shutdown next: a member that
// left but keeps running still answers probes, so a peer that missed the
// leave cannot detect it gone and lists it as leaving until a push/pull, or
// for good once the others have forgotten it (memberlist drops left nodes
// after 30 s); then that peer's push/pull even brings it back as alive.
func (m *Membership) Leave() error { return m.serf.Leave() }

// Shutdown stops gossiping without leaving: peers will detect this node as
// failed. Call Leave first for a graceful exit.
func (m *Membership) Shutdown() error {
	err := m.serf.Shutdown()
	m.stop.Do(func() { close(m.done) })
	m.wg.Wait()
	return err
}

// newStdLogger routes serf's and memberlist's log lines to slog, keeping
// their levels. Serf logs every member event at info; the agent logs those
// itself, so serf's copies go to debug.
func newStdLogger(l *slog.Logger) *log.Logger {
	return stdlog.New(l, stdlog.Options{Demote: func(m string) bool { return strings.Contains(m, "EventMember") }})
}
