package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/fusefs"
	"github.com/onebox-project/onebox/cfs/proto"
	"github.com/onebox-project/onebox/cfs/server"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
)

// I/O aggregation (issue 5): the cluster filesystem. The agent serves its
// exports to members on the fabric port (ALPN onebox-fs/1, mutual TLS like
// every member protocol) and mounts the namespace MOUNT/<node>/<export>/...
// with FUSE, at DefaultMount unless told otherwise (docs/filesystem.md).

// DefaultMount is where an agent mounts the cluster filesystem when no
// --mount is given: the same path on every node, so a program (or a
// migrated process) names a node's files the same way everywhere.
const DefaultMount = "/onebox"

type cfsState struct {
	srv   *server.Server
	mount *fusefs.Mount

	served  *prometheus.CounterVec
	latency *prometheus.HistogramVec

	mu      sync.Mutex
	clients map[string]*client.Client // by node name; guarded by mu
	closed  bool                      // guarded by mu
}

func (a *Agent) startCFS(ctx context.Context) error {
	exports := make([]server.Export, 0, len(a.cfg.Exports))
	for _, e := range a.cfg.Exports {
		exports = append(exports, server.Export{Name: e.Name, Path: e.Path, ReadOnly: e.ReadOnly, RootSquash: e.RootSquash})
	}
	srv, err := server.New(exports, a.log)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	st := &cfsState{srv: srv, clients: map[string]*client.Client{},
		served: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_cfs_served_requests_total", Help: "Cluster filesystem requests served to members, by op and result (ok or the errno).",
		}, []string{"op", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "onebox_cfs_request_duration_seconds", Help: "Cluster filesystem requests to members (this node's mount), by op and result (ok or the errno).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}, []string{"op", "result"}),
	}
	a.metrics.reg.MustRegister(st.served, st.latency)
	srv.Observe = func(op proto.Op, errno unix.Errno) { st.served.WithLabelValues(op.String(), errnoLabel(errno)).Inc() }
	a.cfs = st
	a.mux.Handle(proto.ALPN, srv.ServeConn)
	if a.cfg.Mount == "" {
		return nil
	}
	// The default mount point is taken only if it is free; a mount asked
	// for explicitly that cannot be made stops the agent.
	notMounted := func(err error) error {
		if a.cfg.MountOptional {
			a.log.Warn("cluster filesystem not mounted: the agent serves its exports but this node has no "+a.cfg.Mount+
				" (give --mount PATH to mount elsewhere, or --mount none to say it is not wanted)", "err", err)
			return nil
		}
		return fmt.Errorf("agent: %w (give another --mount PATH, or --mount none)", err)
	}
	if err := fusefs.CanMount(); err != nil {
		return notMounted(err)
	}
	if a.cfg.MountOptional {
		if err := fusefs.InUse(a.cfg.Mount); err != nil {
			return notMounted(err)
		}
	}
	// The unmount watchdog is this binary run with a hidden verb; a test
	// binary running an agent in-process has no such verb.
	watchdog := "/proc/self/exe"
	if exe, err := os.Executable(); err != nil || strings.HasSuffix(exe, ".test") {
		watchdog = ""
	}
	m, err := fusefs.New(fusefs.Options{
		Mountpoint: a.cfg.Mount,
		Nodes:      a.cfsNodes,
		Client:     a.cfsClient,
		Logger:     a.log,
		Executable: watchdog,
	})
	if err != nil {
		return notMounted(err)
	}
	st.mount = m
	a.log.Info("cluster filesystem mounted", "mount", a.cfg.Mount)
	return nil
}

// closeCFS unmounts first (no new file operations), then drops the
// connections to peers, then stops serving exports.
func (a *Agent) closeCFS() error {
	st := a.cfs
	if st == nil {
		return nil
	}
	start := time.Now()
	var errs []error
	if st.mount != nil {
		errs = append(errs, st.mount.Close())
		a.log.Debug("cluster filesystem unmounted", "took", time.Since(start))
	}
	st.mu.Lock()
	st.closed = true
	for _, c := range st.clients {
		c.Close()
	}
	st.clients = nil
	st.mu.Unlock()
	errs = append(errs, st.srv.Close())
	a.log.Debug("cluster filesystem closed", "took", time.Since(start))
	return errors.Join(errs...)
}

func (a *Agent) cfsRoutes(mux *http.ServeMux, side string) {}

// cfsMember finds a node that has not left the cluster.
func (a *Agent) cfsMember(node string) (membership.Member, bool) {
	for _, m := range a.members.Members() {
		if m.Name == node && m.Status != membership.StatusLeft && m.FabricAddr != "" {
			return m, true
		}
	}
	return membership.Member{}, false
}

// cfsNodes lists the nodes under the mount: every member that has not
// left. A failed node stays listed, so its subtree answers ENOTCONN (not
// ENOENT) until it is back or gone for good.
func (a *Agent) cfsNodes() []string {
	var out []string
	for _, m := range a.members.Members() {
		if m.Status != membership.StatusLeft && m.FabricAddr != "" {
			out = append(out, m.Name)
		}
	}
	return out
}

func (a *Agent) cfsClient(node string) *client.Client {
	if _, ok := a.cfsMember(node); !ok {
		return nil
	}
	st := a.cfs
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return nil
	}
	c := st.clients[node]
	if c == nil {
		c = client.New(a.cfsDialer(node), 0)
		c.Observe = func(op proto.Op, errno syscall.Errno, d time.Duration) {
			st.latency.WithLabelValues(op.String(), errnoLabel(errno)).Observe(d.Seconds())
		}
		st.clients[node] = c
	}
	return c
}

func errnoLabel(e syscall.Errno) string {
	if e == 0 {
		return "ok"
	}
	if n := unix.ErrnoName(e); n != "" {
		return n
	}
	return "errno_" + strconv.Itoa(int(e))
}

// cfsDialer dials node's fabric port (its current address, from gossip)
// with ALPN onebox-fs/1 and checks the certificate names that node.
func (a *Agent) cfsDialer(node string) client.Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		m, ok := a.cfsMember(node)
		if !ok {
			return nil, fmt.Errorf("cfs: node %s is not a member", node)
		}
		cfg := a.id.ClientTLS()
		cfg.NextProtos = []string{proto.ALPN}
		d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{KeepAliveConfig: net.KeepAliveConfig{
			Enable: true, Idle: 5 * time.Second, Interval: 2 * time.Second, Count: 3}}}
		c, err := d.DialContext(ctx, "tcp", m.FabricAddr)
		if err != nil {
			return nil, err
		}
		cs := c.(*tls.Conn).ConnectionState()
		if cs.NegotiatedProtocol != proto.ALPN {
			c.Close()
			return nil, fmt.Errorf("cfs: %s does not serve %s", node, proto.ALPN)
		}
		if got := pki.PeerName(cs); got != node {
			c.Close()
			return nil, fmt.Errorf("cfs: %s presented the certificate of %q", m.FabricAddr, got)
		}
		return c, nil
	}
}
