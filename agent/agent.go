// Package agent is the onebox node agent: the daemon that runs on every
// machine, holds the node's cluster identity, takes part in gossip
// membership, serves the fabric port (join and mutual-TLS control API) and
// the local API socket, and exports Prometheus metrics.
//
// Life cycle: Config → Validate → New (identity loaded or obtained by
// joining, listeners bound) → Run(ctx) (serves until ctx ends, then leaves
// the cluster gracefully) → Close (releases everything; see its doc for the
// order).
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/join"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/fabric/resources"
	"github.com/onebox-project/onebox/fabric/transport"
)

// maxDiscoveredJoins bounds the join attempts made to addresses found by
// LAN discovery (each attempt is bounded by join.Timeout).
const maxDiscoveredJoins = 4

// ReadyFile is written in the data directory once the agent serves, with
// the addresses it actually bound (useful with port -1), and removed on
// Close. Tools such as 'onebox dev' wait for it.
const ReadyFile = "agent.json"

// Ready is the content of ReadyFile.
type Ready struct {
	Name        string `json:"name"`
	PID         int    `json:"pid"`
	ClusterID   string `json:"cluster_id"`
	FabricAddr  string `json:"fabric_addr"`
	GossipAddr  string `json:"gossip_addr"`
	APISocket   string `json:"api_socket"`
	MetricsAddr string `json:"metrics_addr,omitempty"`
}

// Agent is a running node agent.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	id      *identity.Identity
	started time.Time
	metrics *metrics

	proc       *procState
	cfs        *cfsState
	mem        *memState
	svc        *svcState
	lock       *os.File // flock on DATA_DIR/lock: one agent per data directory
	mux        *transport.Mux
	controlLn  net.Listener // the mux's control-protocol connections
	fabricHTTP *http.Server
	localLn    net.Listener
	localHTTP  *http.Server
	metricsLn  net.Listener
	metricsSrv *http.Server
	members    *membership.Membership
	peers      *peerCache
	announcer  interface{ Close() error }

	gossipSeeds []string
	wroteReady  bool // only this instance's files are removed by Close

	resMu   sync.Mutex
	res     resources.Snapshot // guarded by resMu
	resTime time.Time          // guarded by resMu

	closeOnce sync.Once
	closeErr  error
	leaveOnce sync.Once
}

// New validates cfg, loads the node's identity from the data directory or
// obtains one by joining (the token and a member's address, from --join or
// LAN discovery), binds every listener and starts gossip. On error nothing
// is left running.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent: invalid configuration: %w", err)
	}
	a := &Agent{cfg: cfg, log: cfg.Logger.With("node", cfg.NodeName), started: time.Now().UTC()}
	a.metrics = newMetrics(a)
	ok := false
	defer func() {
		if !ok {
			a.Close()
		}
	}()
	if err := a.lockDataDir(); err != nil {
		return nil, err
	}
	if err := a.loadOrJoin(ctx); err != nil {
		return nil, err
	}
	a.refreshResources()
	if err := a.listen(); err != nil {
		return nil, err
	}
	if err := a.startGossip(ctx); err != nil {
		return nil, err
	}
	// Capabilities built on the fabric (each in its own file).
	if err := a.startProc(ctx); err != nil {
		return nil, err
	}
	if err := a.startCFS(ctx); err != nil {
		return nil, err
	}
	if err := a.startMem(ctx); err != nil {
		return nil, err
	}
	if err := a.startMemExpand(); err != nil {
		return nil, err
	}
	if err := a.startService(ctx); err != nil {
		return nil, err
	}
	if err := a.startBalance(ctx); err != nil {
		return nil, err
	}
	a.startDiscovery()
	ok = true
	return a, nil
}

// Identity returns the node's cluster identity.
func (a *Agent) Identity() *identity.Identity { return a.id }

// loadOrJoin loads the identity from the data directory, or joins.
func (a *Agent) loadOrJoin(ctx context.Context) error {
	cfg := &a.cfg
	id, err := identity.Load(cfg.DataDir)
	switch {
	case err == nil:
		if cfg.Token != "" {
			tok, _ := pki.ParseToken(cfg.Token)
			if tok.CAFingerprint != id.Token.CAFingerprint {
				return fmt.Errorf("agent: data dir %s belongs to cluster %s, but --token is for cluster %s: use a fresh --data-dir to join that cluster, or drop --token", cfg.DataDir, id.ClusterID, tok.ClusterID())
			}
		}
		if cfg.NodeName != id.Node {
			if cfg.nameFromFlag {
				return fmt.Errorf("agent: data dir %s belongs to node %q, not %q: use that name or another --data-dir", cfg.DataDir, id.Node, cfg.NodeName)
			}
			cfg.NodeName = id.Node
			a.log = cfg.Logger.With("node", id.Node)
		}
		a.id = id
		a.log.Info("identity loaded", "cluster", id.ClusterID, "data_dir", cfg.DataDir)
		return nil
	case !errors.Is(err, identity.ErrNoIdentity):
		return fmt.Errorf("agent: %w", err)
	}
	if cfg.Token == "" {
		return fmt.Errorf("agent: data dir %s holds no cluster identity: run 'onebox init --data-dir %s' to create a cluster, or pass --token (and --join) to join one", cfg.DataDir, cfg.DataDir)
	}
	tok, _ := pki.ParseToken(cfg.Token)
	addrs := cfg.Join
	if len(addrs) == 0 && !cfg.NoDiscover {
		found, err := discoverFabricAddrs(ctx, tok.ClusterID(), a.log)
		if err != nil {
			return fmt.Errorf("agent: no --join address given and LAN discovery failed: %w", err)
		}
		// Discovery answers are unauthenticated: try a few, in random
		// order, so spoofed answers cannot stall the start for long.
		rand.Shuffle(len(found), func(i, j int) { found[i], found[j] = found[j], found[i] })
		addrs = found[:min(len(found), maxDiscoveredJoins)]
	}
	if len(addrs) == 0 {
		return fmt.Errorf("agent: no member to join: pass --join ADDR (the fabric address of any member; 'onebox init' printed one)")
	}
	var errs []error
	ips := []net.IP{net.ParseIP(cfg.AdvertiseAddr)}
	for _, addr := range addrs {
		id, peers, err := join.Dial(ctx, addr, tok, cfg.NodeName, ips)
		if err != nil {
			var re *join.RefusedError
			if errors.As(err, &re) && (re.Code == join.CodeBadToken || re.Code == join.CodeNameTaken) {
				return fmt.Errorf("agent: %w", err) // another member would say the same
			}
			a.log.Warn("join attempt failed", "addr", addr, "err", err)
			errs = append(errs, err)
			continue
		}
		if err := id.Save(cfg.DataDir); err != nil {
			return fmt.Errorf("agent: save identity: %w", err)
		}
		a.id = id
		a.gossipSeeds = peers
		a.log.Info("joined cluster", "cluster", id.ClusterID, "via", addr)
		return nil
	}
	return fmt.Errorf("agent: could not join: %w", errors.Join(errs...))
}

func (a *Agent) listen() error {
	cfg := &a.cfg
	port := cfg.FabricPort
	if port < 0 {
		port = 0
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.BindAddr, strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("agent: fabric port: %w%s", err, inUseHint(err, "--fabric-port"))
	}
	a.mux = transport.NewMux(ln, a.id.ServerTLS(), a.log, func(reason string) {
		a.metrics.fabricRejected.WithLabelValues(reason).Inc()
	})
	js := &join.Server{
		Identity: a.id, Logger: a.log,
		NameTaken: a.nameTaken,
		Peers:     func() []string { return a.members.LiveGossipAddrs() },
		Result:    func(code string) { a.metrics.joins.WithLabelValues(code).Inc() },
	}
	a.mux.Handle(pki.ProtoJoin, js.ServeConn)
	// Registered before Run writes the ready file: a member that dials as
	// soon as the node is announced must find the control protocol served.
	a.controlLn = a.mux.Listener(pki.ProtoControl)
	a.fabricHTTP = &http.Server{Handler: a.handler("fabric"), ReadHeaderTimeout: 5 * time.Second, ErrorLog: slogErrorLog(a.log)}

	if err := removeStaleSocket(cfg.APISocket); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.APISocket), 0o700); err != nil {
		return fmt.Errorf("agent: API socket dir: %w", err)
	}
	old := umask(0o177)
	a.localLn, err = net.Listen("unix", cfg.APISocket)
	umask(old)
	if err != nil {
		return fmt.Errorf("agent: API socket: %w", err)
	}
	a.localHTTP = &http.Server{Handler: a.handler("local"), ReadHeaderTimeout: 5 * time.Second, ErrorLog: slogErrorLog(a.log)}

	if cfg.MetricsAddr != "" {
		a.metricsLn, err = net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("agent: metrics address: %w%s", err, inUseHint(err, "--metrics-addr"))
		}
		m := http.NewServeMux()
		m.Handle(api.PathMetrics, a.metrics.handler())
		a.metricsSrv = &http.Server{Handler: m, ReadHeaderTimeout: 5 * time.Second}
	}
	return nil
}

// removeStaleSocket removes a socket file left by an agent that was killed,
// and refuses to start when another agent is serving on it.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("agent: %s exists and is not a socket: choose another --api-socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("agent: another agent is already serving %s: stop it, or use another --data-dir", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("agent: remove stale socket: %w", err)
	}
	return nil
}

func (a *Agent) startGossip(ctx context.Context) error {
	cfg := &a.cfg
	port := cfg.GossipPort
	if port < 0 {
		port = 0
	}
	fabricPort := a.mux.Addr().(*net.TCPAddr).Port
	m, err := membership.New(membership.Config{
		NodeName: a.id.Node, BindAddr: cfg.BindAddr, BindPort: port,
		AdvertiseAddr: cfg.AdvertiseAddr,
		GossipKey:     a.id.GossipKey,
		FabricAddr:    net.JoinHostPort(cfg.AdvertiseAddr, strconv.Itoa(fabricPort)),
		ClusterID:     a.id.ClusterID, Version: cfg.Version,
		SnapshotPath: filepath.Join(cfg.DataDir, "serf.snapshot"),
		Reconnect:    cfg.ReconnectInterval,
		Logger:       a.log,
		OnEvent: func(kind string, _ membership.Member) {
			a.metrics.memberEvents.WithLabelValues(kind).Inc()
		},
	})
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	a.members = m
	a.peers = newPeerCache(a)
	seeds := a.gossipSeeds
	if len(seeds) == 0 && len(cfg.Join) > 0 {
		if seeds, err = a.gossipAddrsOf(ctx, cfg.Join); err != nil {
			return err
		}
	}
	if len(seeds) > 0 {
		if n, err := m.Join(seeds); err != nil {
			// Not fatal: the snapshot and reconnects may still bring us in;
			// the membership view shows the truth.
			a.log.Warn("gossip join failed", "err", err)
		} else {
			a.log.Info("gossip joined", "contacted", n)
		}
	}
	return nil
}

// gossipAddrsOf asks members, by their fabric address and over mutual TLS,
// for their gossip address. This is how a restarted node with an identity
// uses --join, and it checks those members are of our cluster: if every
// address answered with another cluster's certificate, starting is an
// error (the data directory or the address is wrong), while unreachable
// addresses are only warned about (the snapshot and reconnects may still
// bring the node in).
func (a *Agent) gossipAddrsOf(ctx context.Context, fabricAddrs []string) ([]string, error) {
	var out []string
	wrong := 0
	for _, fa := range fabricAddrs {
		info, err := a.peers.fetch(ctx, fa)
		if errors.Is(err, pki.ErrWrongCluster) {
			wrong++
			a.log.Error("--join peer is not of this node's cluster", "addr", fa, "cluster", a.id.ClusterID)
			continue
		}
		if err != nil {
			a.log.Warn("--join peer not reachable", "addr", fa, "err", err)
			continue
		}
		out = append(out, info.GossipAddr)
	}
	if wrong == len(fabricAddrs) {
		return nil, fmt.Errorf("agent: the --join peers (%s) are not members of cluster %s, which data dir %s belongs to: use that cluster's addresses, or a fresh --data-dir with this cluster's --token", strings.Join(fabricAddrs, ", "), a.id.ClusterID, a.cfg.DataDir)
	}
	return out, nil
}

func (a *Agent) nameTaken(node string) (string, bool) {
	for _, m := range a.members.Members() {
		if m.Name == node && (m.Status == membership.StatusAlive || m.Status == membership.StatusSuspect) {
			return m.GossipAddr, true
		}
	}
	return "", false
}

// Run serves until ctx is cancelled or a server fails, then leaves the
// cluster gracefully. It returns the first server error, or nil.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 4)
	serve := func(name string, f func() error) {
		go func() {
			if err := f(); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				errc <- fmt.Errorf("agent: %s: %w", name, err)
			}
		}()
	}
	serve("fabric", func() error { return a.mux.Serve(ctx) })
	serve("fabric API", func() error { return a.fabricHTTP.Serve(a.controlLn) })
	serve("local API", func() error { return a.localHTTP.Serve(a.localLn) })
	if a.metricsSrv != nil {
		serve("metrics", func() error { return a.metricsSrv.Serve(a.metricsLn) })
	}
	go a.refreshLoop(ctx)
	if err := a.writeReady(); err != nil {
		return err
	}
	a.log.Info("agent ready", "cluster", a.id.ClusterID, "fabric", a.mux.Addr().String(),
		"gossip", a.members.LocalAddr(), "api", a.cfg.APISocket)
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	a.Leave()
	return err
}

// Leave announces a graceful departure to the cluster (once).
func (a *Agent) Leave() {
	a.leaveOnce.Do(func() {
		if a.members == nil {
			return
		}
		a.log.Info("leaving the cluster")
		if err := a.members.Leave(); err != nil {
			a.log.Warn("leave", "err", err)
		}
	})
}

func (a *Agent) writeReady() error {
	r := Ready{
		Name: a.id.Node, PID: os.Getpid(), ClusterID: a.id.ClusterID,
		FabricAddr: a.fabricAddr(), GossipAddr: a.members.LocalAddr(), APISocket: a.cfg.APISocket,
	}
	if a.metricsLn != nil {
		r.MetricsAddr = a.metricsLn.Addr().String()
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	p := filepath.Join(a.cfg.DataDir, ReadyFile)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("agent: ready file: %w", err)
	}
	a.wroteReady = true
	return os.Rename(tmp, p)
}

func (a *Agent) fabricAddr() string {
	return net.JoinHostPort(a.cfg.AdvertiseAddr, strconv.Itoa(a.mux.Addr().(*net.TCPAddr).Port))
}

// Close releases everything, in this order:
//  1. stop the discovery announcer, so no new node is pointed here;
//     1b. stop the capabilities (filesystem, processes) while the fabric
//     still works, so they can hand off cleanly;
//  2. close the fabric port: no new joins or control connections (peers
//     may briefly see this node as suspect; it is leaving anyway);
//  3. leave the gossip cluster (if Run has not already) and stop gossip;
//  4. shut the HTTP servers down, letting in-flight requests finish (5 s),
//     then close what is left; drop idle connections to peers;
//  5. close the API socket and the metrics listener;
//  6. remove the ready file and the socket file, if this instance made
//     them, and release the data directory lock.
//
// It is safe to call more than once and after a failed New.
func (a *Agent) Close() error {
	a.closeOnce.Do(func() {
		var errs []error
		if a.announcer != nil {
			errs = append(errs, a.announcer.Close())
		}
		// The balancer first (it starts migrations), then programs: they
		// may still be writing files through the mount or faulting pages
		// from the pool; then the pager, the pool, services, the mount.
		errs = append(errs, a.closeBalance())
		errs = append(errs, a.closeProc())
		errs = append(errs, a.closeMemExpand())
		errs = append(errs, a.closeMem())
		errs = append(errs, a.closeService())
		errs = append(errs, a.closeCFS())
		if a.mux != nil {
			a.mux.Close()
		}
		if a.members != nil {
			a.Leave()
			errs = append(errs, a.members.Shutdown())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, s := range []*http.Server{a.fabricHTTP, a.localHTTP, a.metricsSrv} {
			if s != nil {
				if err := s.Shutdown(ctx); err != nil {
					s.Close()
				}
			}
		}
		if a.peers != nil {
			a.peers.hc.CloseIdleConnections()
		}
		for _, l := range []net.Listener{a.controlLn, a.localLn, a.metricsLn} {
			if l != nil {
				l.Close()
			}
		}
		if a.wroteReady {
			os.Remove(filepath.Join(a.cfg.DataDir, ReadyFile))
		}
		if a.localLn != nil {
			os.Remove(a.cfg.APISocket)
		}
		if a.lock != nil {
			a.lock.Close() // releases the flock
		}
		a.closeErr = errors.Join(errs...)
	})
	return a.closeErr
}

// lockDataDir takes an exclusive lock on the data directory, so two agents
// never share one identity and one gossip snapshot.
func (a *Agent) lockDataDir() error {
	if err := os.MkdirAll(a.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("agent: data dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(a.cfg.DataDir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("agent: data dir lock: %w", err)
	}
	if err := flock(f); err != nil {
		f.Close()
		return fmt.Errorf("agent: another agent is using data dir %s: stop it, or use another --data-dir", a.cfg.DataDir)
	}
	a.lock = f
	return nil
}

// inUseHint turns "address already in use" into advice.
func inUseHint(err error, flag string) string {
	if errors.Is(err, syscall.EADDRINUSE) {
		return fmt.Sprintf(" (another program, perhaps another onebox agent, has it: stop it or choose another %s)", flag)
	}
	return ""
}

// refreshLoop keeps the resource snapshot and gauges fresh.
func (a *Agent) refreshLoop(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			a.refreshResources()
		}
	}
}

func (a *Agent) refreshResources() resources.Snapshot {
	a.resMu.Lock()
	defer a.resMu.Unlock()
	if time.Since(a.resTime) < time.Second {
		return a.res
	}
	s, err := resources.Probe()
	if err != nil {
		a.log.Warn("resource probe", "err", err)
		return a.res
	}
	a.res, a.resTime = s, time.Now()
	return s
}

// Self is this node's own report.
func (a *Agent) Self() api.NodeInfo {
	exports := a.cfg.Exports
	if exports == nil {
		exports = []api.Export{}
	}
	return api.NodeInfo{
		Name: a.id.Node, ClusterID: a.id.ClusterID, Version: a.cfg.Version,
		FabricAddr: a.fabricAddr(), GossipAddr: a.members.LocalAddr(),
		Started: a.started, Resources: a.refreshResources(),
		Pool:    api.Pool{DonatedBytes: uint64(a.cfg.DonateMemory), UsedBytes: a.memUsed()},
		Exports: exports,
	}
}
