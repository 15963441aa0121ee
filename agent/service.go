package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/service"
	"github.com/onebox-project/onebox/service/balance"
	"github.com/onebox-project/onebox/service/proxy"
	"github.com/onebox-project/onebox/service/wire"
)

// Services (issue 5): a port of one node (the service address) whose
// connections are carried over the fabric to listeners on other nodes,
// balanced across them, OpenSSI's cluster virtual IP in user space.
//
// Where things live. A service belongs to the node whose port it is: that
// agent listens, balances, checks its targets' health and keeps the
// definitions in DATA_DIR/services.json, so they come back when it
// restarts. Any agent accepts 'expose' and 'unexpose' from its CLI and
// forwards them to the exposing node over mutual TLS (the control API);
// 'services' asks every live member for its own.
//
// Data path. The exposing agent keeps one session per target node: a
// fabric connection with ALPN onebox-svc/1 (mutual TLS: members only)
// carrying multiplexed streams (service/mux, opened by proxy.Sessions). Each client connection opens a
// stream and sends a wire header naming the port (and the process, for a
// GID target), and the target's agent connects to that port on itself
// only, 127.0.0.1 first and then its own advertised address, never to
// another host. A target on the exposing node itself is connected to
// directly.

// ServiceConfig configures exposed services. Embedded in Config, so its
// JSON keys sit at the top level of the config file.
type ServiceConfig struct {
	// ServiceBind is the IP address this node's service ports listen on;
	// default: the agent's bind address (all addresses for 0.0.0.0).
	ServiceBind string `json:"service_bind"`
}

func (c *ServiceConfig) validate() error {
	if c.ServiceBind != "" && net.ParseIP(c.ServiceBind) == nil {
		return fmt.Errorf("service bind address %q is not an IP address", c.ServiceBind)
	}
	return nil
}

// API paths of the services.
const (
	pathServices = "/v1/services"
	pathService  = "/v1/services/{name}"
)

// servicesFile, in the data directory, holds this node's service specs.
const servicesFile = "services.json"

// Bounds and periods of the data path.
const (
	svcCheckInterval = time.Second     // active health checks
	svcCheckTimeout  = 2 * time.Second // one check: fabric dial, header, local connect, reply
	svcDialTimeout   = 3 * time.Second // one target tried for a client connection
	svcRelisten      = 2 * time.Second // retry of a port that was taken when the agent started
	svcResolveTTL    = time.Second     // how long a GID's node is trusted without asking again
	svcSweep         = 2 * time.Second // sessions of nodes that left are closed this often
)

type svcState struct {
	a       *Agent
	path    string
	bind    string
	backend *proxy.Backend
	ctx     context.Context // cancelled by closeService
	cancel  context.CancelFunc

	conns  *prometheus.CounterVec
	bytes  *prometheus.CounterVec
	served *prometheus.CounterVec

	// mu serializes changes (expose, unexpose) and guards what follows.
	mu     sync.Mutex
	svcs   map[string]*exposed
	closed bool

	gidMu     sync.Mutex
	gids      map[string]gidLoc     // GID → node it runs on; guarded by gidMu
	gidLookup map[string]*gidLookup // GID → the cluster lookup in flight; guarded by gidMu

	// runsHere and listProcs find processes (this node's; the
	// cluster's): the agent's process manager, or a test's.
	runsHere  func(gid string) bool
	listProcs func(ctx context.Context) manager.ClusterList

	tlsOnce sync.Once
	tls     *tls.Config

	sessions *proxy.Sessions // one session (multiplexed streams) per target node
	sweepWG  sync.WaitGroup
}

type gidLoc struct {
	node string
	at   time.Time
}

// gidLookup is one cluster-wide search for a GID, shared by the client
// connections that need it meanwhile: a burst of connections (anyone who
// reaches the service port can make one) asks the members once, not once
// per connection.
type gidLookup struct {
	done chan struct{}
	node string // set before done is closed
	err  error
}

// exposed is one service of this node.
type exposed struct {
	// spec is written under both svcState.mu and mu, so either lock
	// reads it (statusOf and Collect take mu only).
	spec service.Spec
	pool *balance.Pool
	fe   *proxy.Frontend
	stop context.CancelFunc
	done chan struct{} // closed when its goroutines ended

	mu  sync.Mutex
	ln  net.Listener // nil while the port cannot be had; guarded by mu
	err string       // why not listening; guarded by mu

	failed, bytesIn, bytesOut atomic.Int64
}

func (a *Agent) startService(_ context.Context) error {
	ctx, cancel := context.WithCancel(context.Background())
	s := &svcState{
		a: a, path: filepath.Join(a.cfg.DataDir, servicesFile),
		bind: a.cfg.ServiceBind, ctx: ctx, cancel: cancel,
		svcs: map[string]*exposed{}, gids: map[string]gidLoc{}, gidLookup: map[string]*gidLookup{},
		runsHere: a.runsHere, listProcs: func(ctx context.Context) manager.ClusterList { return a.proc.list(ctx) },
		conns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_service_connections_total", Help: "Connections to this node's service addresses, by service, target and result (ok: carried; failed: the dial failed and another target was tried; no_target: no target took it; busy: refused, the service had too many connections).",
		}, []string{"service", "target", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_service_bytes_total", Help: "Bytes carried by this node's service addresses, by service and direction (in: client to target).",
		}, []string{"service", "direction"}),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_service_target_requests_total", Help: "Service protocol requests served as a target node, by kind (connect, check) and status.",
		}, []string{"kind", "status"}),
	}
	if s.bind == "" {
		s.bind = a.cfg.BindAddr
	}
	s.sessions = &proxy.Sessions{Dial: s.stream, DialTimeout: svcDialTimeout, Log: a.log}
	s.backend = &proxy.Backend{
		Local: s.local, Log: a.log,
		OnServe: func(k wire.Kind, st wire.Status) {
			kind := "connect"
			if k == wire.KindCheck {
				kind = "check"
			} else if k == wire.KindSession {
				kind = "session"
			} else if k == 0 {
				kind = "bad"
			}
			s.served.WithLabelValues(kind, st.String()).Inc()
		},
	}
	a.metrics.reg.MustRegister(s.conns, s.bytes, s.served, svcCollector{s})
	a.mux.Handle(pki.ProtoService, func(c net.Conn) {
		peer := ""
		if tc, ok := c.(*tls.Conn); ok {
			peer = pki.PeerName(tc.ConnectionState())
		}
		s.backend.ServeConn(c, peer)
	})
	a.svc = s
	specs, err := service.Load(s.path)
	if err != nil {
		return fmt.Errorf("agent: %w (fix or remove the file to start)", err)
	}
	s.sweepWG.Add(1)
	go s.sweep()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range specs {
		if sp.Node != a.id.Node {
			a.log.Warn("service defined for another node ignored", "service", sp.Name, "node", sp.Node)
			continue
		}
		e := s.newExposed(sp)
		if ln, err := s.listen(sp.Port); err != nil {
			e.err = err.Error()
			a.log.Error("service port not available; retrying", "service", sp.Name, "port", sp.Port, "err", err)
		} else {
			e.ln = ln
		}
		s.svcs[sp.Name] = e
		s.run(e)
	}
	return nil
}

// closeService stops accepting on every service address, ends the
// connections carried (both as exposing and as target node) and waits
// for the health checks.
func (a *Agent) closeService() error {
	s := a.svc
	if s == nil {
		return nil
	}
	s.mu.Lock()
	s.closed = true
	svcs := s.svcs
	s.svcs = map[string]*exposed{}
	s.mu.Unlock()
	s.cancel()
	for _, e := range svcs {
		e.close()
	}
	s.sessions.Close()
	err := s.backend.Close()
	s.sweepWG.Wait()
	return err
}

// sweep closes the sessions to and from nodes that left the cluster (or
// are no longer known), every svcSweep until the agent closes: their
// streams fail at once instead of waiting for keepalives. A node marked
// failed keeps its sessions: gossip can say so of a node that is only
// slow, and a session that is really dead ends by its keepalive.
func (s *svcState) sweep() {
	defer s.sweepWG.Done()
	t := time.NewTicker(svcSweep)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		for _, node := range s.sessions.Keys() {
			if s.gone(node, true) {
				s.a.log.Info("service session to a node that left closed", "node", node)
				s.sessions.Drop(node)
			}
		}
		for _, node := range s.backend.Peers() {
			if s.gone(node, false) {
				s.a.log.Info("service session from a node that left closed", "node", node)
				s.backend.DropPeer(node)
			}
		}
	}
}

func (s *svcState) newExposed(sp service.Spec) *exposed {
	pol, _ := balance.ParsePolicy(string(sp.Policy))
	sp.Policy = pol
	e := &exposed{spec: sp, done: make(chan struct{})}
	e.pool = balance.NewPool(pol, balance.Thresholds{}, targetKeys(sp.Targets)...)
	name := sp.Name
	e.fe = &proxy.Frontend{
		Pool: e.pool, DialTimeout: svcDialTimeout, Log: s.a.log.With("service", name),
		Dial: func(ctx context.Context, key string) (net.Conn, error) { return s.dial(ctx, key) },
		OnDial: func(key string, err error) {
			res := "ok"
			if err != nil {
				res = "failed"
			}
			s.conns.WithLabelValues(name, key, res).Inc()
		},
		OnDone: func(key string, in, out int64) {
			switch key {
			case "":
				e.failed.Add(1)
				s.conns.WithLabelValues(name, "", "no_target").Inc()
				return
			case proxy.Busy:
				e.failed.Add(1)
				s.conns.WithLabelValues(name, "", "busy").Inc()
				return
			}
			e.bytesIn.Add(in)
			e.bytesOut.Add(out)
			s.bytes.WithLabelValues(name, "in").Add(float64(in))
			s.bytes.WithLabelValues(name, "out").Add(float64(out))
		},
	}
	return e
}

// setSpec changes e's spec and its pool's targets together.
//
// Preconditions: s.mu held.
func (e *exposed) setSpec(sp service.Spec) {
	e.mu.Lock()
	e.spec = sp
	e.pool.SetTargets(targetKeys(sp.Targets))
	e.mu.Unlock()
}

func targetKeys(ts []service.Target) []string {
	keys := make([]string, len(ts))
	for i, t := range ts {
		keys[i] = t.String()
	}
	return keys
}

// run starts e's goroutines: serving its port (after taking it, if it was
// not free at start) and checking its targets.
//
// Preconditions: s.mu held.
func (s *svcState) run(e *exposed) {
	name, port := e.spec.Name, e.spec.Port
	ctx, cancel := context.WithCancel(s.ctx)
	e.stop = cancel
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		balance.RunChecks(ctx, e.pool, svcCheckInterval, svcCheckTimeout, s.check, func(key string, healthy bool, err error) {
			if healthy {
				s.a.log.Info("service target healthy again", "service", name, "target", key)
			} else {
				s.a.log.Warn("service target taken out", "service", name, "target", key, "err", err)
			}
		})
	}()
	go func() {
		defer wg.Done()
		for {
			e.mu.Lock()
			ln := e.ln
			e.mu.Unlock()
			if ln != nil {
				e.fe.Serve(ln)
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(svcRelisten):
			}
			ln, err := s.listen(port)
			e.mu.Lock()
			if err != nil {
				e.err = err.Error()
			} else if ctx.Err() != nil {
				ln.Close()
			} else {
				e.ln, e.err = ln, ""
				s.a.log.Info("service port taken", "service", name, "port", port)
			}
			e.mu.Unlock()
		}
	}()
	go func() { wg.Wait(); close(e.done) }()
}

func (e *exposed) close() {
	if e.stop != nil {
		e.stop()
	}
	e.fe.Close()
	e.mu.Lock()
	if e.ln != nil {
		e.ln.Close()
	}
	e.mu.Unlock()
	select {
	case <-e.done:
	case <-time.After(svcCheckTimeout + time.Second):
	}
}

// listen takes a service port on the service bind address.
func (s *svcState) listen(port int) (net.Listener, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(s.bind, strconv.Itoa(port)))
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("port %d on %s (%s) is in use by another program: choose another --port", port, s.a.id.Node, s.bind)
		}
		if errors.Is(err, syscall.EACCES) {
			return nil, fmt.Errorf("port %d on %s: permission denied (ports below 1024 need root)", port, s.a.id.Node)
		}
		return nil, fmt.Errorf("port %d on %s: %w", port, s.a.id.Node, err)
	}
	return ln, nil
}

// address is where clients reach a port of this node.
func (s *svcState) address(port int) string {
	host := s.bind
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = s.a.cfg.AdvertiseAddr
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}

// member finds a node that is a member and not gone.
func (s *svcState) member(node string) (membership.Member, error) {
	for _, m := range s.a.members.Members() {
		if m.Name != node {
			continue
		}
		switch {
		case m.Status == membership.StatusLeft || m.Status == membership.StatusLeaving:
			return m, fmt.Errorf("node %s has left the cluster", node)
		case m.Status == membership.StatusFailed:
			return m, fmt.Errorf("node %s is failed", node)
		case m.FabricAddr == "":
			return m, fmt.Errorf("node %s has no fabric address", node)
		}
		return m, nil
	}
	return membership.Member{}, fmt.Errorf("unknown node %q ('onebox nodes' lists them)", node)
}

// gone reports whether node left the cluster, or (if unknownGone) is not
// a member at all. A node that opened a session to this one may not be
// known here yet (gossip is still spreading its join), so for those
// sessions only an explicit leave counts.
func (s *svcState) gone(node string, unknownGone bool) bool {
	for _, m := range s.a.members.Members() {
		if m.Name == node {
			return m.Status == membership.StatusLeft || m.Status == membership.StatusLeaving
		}
	}
	return unknownGone
}

// runsHere reports whether process gid runs on this node.
func (a *Agent) runsHere(gid string) bool {
	if a.proc == nil {
		return false
	}
	p, ok := a.proc.mgr.Get(gid)
	if !ok {
		return false
	}
	select {
	case <-p.Done():
		return false
	default:
		return true
	}
}

// resolve finds the node a GID runs on: here, or as last found (if
// recent), or by asking every member (one search at a time per GID,
// shared by the callers that come meanwhile, unless fresh).
func (s *svcState) resolve(ctx context.Context, gid string, fresh bool) (string, error) {
	if s.runsHere(gid) {
		return s.a.id.Node, nil
	}
	s.gidMu.Lock()
	loc, ok := s.gids[gid]
	if ok && !fresh && time.Since(loc.at) < svcResolveTTL {
		s.gidMu.Unlock()
		return loc.node, nil
	}
	if f := s.gidLookup[gid]; f != nil && !fresh {
		s.gidMu.Unlock()
		select {
		case <-f.done:
			return f.node, f.err
		case <-ctx.Done():
			return "", fmt.Errorf("looking for process %s: %w", gid, ctx.Err())
		}
	}
	f := &gidLookup{done: make(chan struct{})}
	if !fresh {
		s.gidLookup[gid] = f
	}
	s.gidMu.Unlock()
	f.node, f.err = s.lookup(ctx, gid, loc, ok)
	s.gidMu.Lock()
	if s.gidLookup[gid] == f {
		delete(s.gidLookup, gid)
	}
	s.gidMu.Unlock()
	close(f.done)
	return f.node, f.err
}

// lookup asks every member where gid runs; last is where it was found
// before (if known).
func (s *svcState) lookup(ctx context.Context, gid string, last gidLoc, known bool) (string, error) {
	l := s.listProcs(ctx)
	// While it migrates a process may be listed by two nodes; the one
	// it runs on wins.
	var ended string
	for _, p := range l.Procs {
		if p.GID != gid {
			continue
		}
		if p.State != "running" {
			ended = fmt.Sprintf("process %s on %s is %s", gid, p.Node, p.State)
			continue
		}
		s.gidMu.Lock()
		if len(s.gids) > 10000 {
			clear(s.gids)
		}
		s.gids[gid] = gidLoc{node: p.Node, at: time.Now()}
		s.gidMu.Unlock()
		return p.Node, nil
	}
	if ended != "" {
		return "", errors.New(ended)
	}
	if known {
		for _, u := range l.Unreachable {
			if u.Node == last.node {
				return "", fmt.Errorf("process %s was last on %s, which cannot be reached (%s)", gid, last.node, u.Error)
			}
		}
	}
	return "", fmt.Errorf("no process %s in the cluster ('onebox ps' lists them)", gid)
}

func (s *svcState) forget(gid string) {
	s.gidMu.Lock()
	delete(s.gids, gid)
	s.gidMu.Unlock()
}

func (s *svcState) nodeOf(ctx context.Context, t service.Target, fresh bool) (string, error) {
	if t.GID == "" {
		return t.Node, nil
	}
	return s.resolve(ctx, t.GID, fresh)
}

// dial connects a client connection to target key (a Frontend's Dialer).
func (s *svcState) dial(ctx context.Context, key string) (net.Conn, error) {
	t, err := service.ParseTarget(key)
	if err != nil {
		return nil, err
	}
	return s.open(ctx, t, wire.KindConnect)
}

// check is the active health check of target key.
func (s *svcState) check(ctx context.Context, key string) error {
	t, err := service.ParseTarget(key)
	if err != nil {
		return err
	}
	c, err := s.open(ctx, t, wire.KindCheck)
	if c != nil {
		c.Close()
	}
	return err
}

// open reaches target t: directly when it is on this node, else through
// its node's agent on the fabric. For a GID target whose node says the
// process is not there (it moved or ended), the GID is looked up again
// and the dial retried once.
func (s *svcState) open(ctx context.Context, t service.Target, kind wire.Kind) (net.Conn, error) {
	req := wire.Request{Kind: kind, Port: uint16(t.Port), GID: t.GID}
	for attempt := 0; ; attempt++ {
		node, err := s.nodeOf(ctx, t, attempt > 0)
		if err != nil {
			return nil, err
		}
		var c net.Conn
		if node == s.a.id.Node {
			var rep wire.Reply
			c, rep = s.local(ctx, req)
			err = rep.Err()
		} else {
			c, err = s.fabric(ctx, node, req)
		}
		var re *wire.ReplyError
		if t.GID != "" && attempt == 0 && errors.As(err, &re) && re.Reply.Status == wire.StatusNoProcess {
			s.forget(t.GID)
			continue
		}
		if err != nil {
			if t.GID != "" {
				err = fmt.Errorf("on %s: %w", node, err)
			}
			return nil, err
		}
		return c, nil
	}
}

// fabric opens a stream of node's session and sends req on it.
func (s *svcState) fabric(ctx context.Context, node string, req wire.Request) (net.Conn, error) {
	return s.sessions.Open(ctx, node, req)
}

// stream dials node's fabric port for the service protocol (a session's
// connection) and checks the certificate names that node.
func (s *svcState) stream(ctx context.Context, node string) (net.Conn, error) {
	m, err := s.member(node)
	if err != nil {
		return nil, err
	}
	d := tls.Dialer{Config: s.tlsConfig(), NetDialer: &net.Dialer{KeepAliveConfig: net.KeepAliveConfig{
		Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}}}
	c, err := d.DialContext(ctx, "tcp", m.FabricAddr)
	if err != nil {
		return nil, fmt.Errorf("%s's agent: %w", node, err)
	}
	cs := c.(*tls.Conn).ConnectionState()
	if cs.NegotiatedProtocol != pki.ProtoService {
		c.Close()
		return nil, fmt.Errorf("%s does not serve %s (an older agent?)", node, pki.ProtoService)
	}
	if got := pki.PeerName(cs); got != node {
		c.Close()
		return nil, fmt.Errorf("%s presented the certificate of %q", m.FabricAddr, got)
	}
	return c, nil
}

// tlsConfig is the client configuration of service sessions.
func (s *svcState) tlsConfig() *tls.Config {
	s.tlsOnce.Do(func() {
		cfg := s.a.id.ClientTLS()
		cfg.NextProtos = []string{pki.ProtoService}
		s.tls = cfg
	})
	return s.tls
}

// local connects to a port of this node for a request (the target side):
// 127.0.0.1, then the node's advertised address (a server may listen on
// that address only), never another host. A GID must name a process
// running here.
func (s *svcState) local(ctx context.Context, req wire.Request) (net.Conn, wire.Reply) {
	if req.GID != "" {
		if !s.runsHere(req.GID) {
			return nil, wire.Reply{Status: wire.StatusNoProcess, Message: fmt.Sprintf("no process %s running on %s", req.GID, s.a.id.Node)}
		}
	}
	port := strconv.Itoa(int(req.Port))
	addrs := []string{net.JoinHostPort("127.0.0.1", port)}
	if adv := s.a.cfg.AdvertiseAddr; adv != "127.0.0.1" {
		addrs = append(addrs, net.JoinHostPort(adv, port))
	}
	var d net.Dialer
	var last error
	for _, addr := range addrs {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			return c, wire.Reply{}
		}
		last = err
		if ctx.Err() != nil {
			break
		}
	}
	st := wire.StatusRefused
	if ctx.Err() != nil {
		st = wire.StatusTimeout
	}
	var errno syscall.Errno
	if errors.As(last, &errno) {
		last = errno // "connection refused", without the dial's addresses
	}
	return nil, wire.Reply{Status: st, Message: fmt.Sprintf("nothing accepts connections on port %s of %s (%v)", port, s.a.id.Node, last)}
}

// statusOf reports e. Preconditions: none (reads e under its own lock).
func (s *svcState) statusOf(e *exposed) service.Status {
	e.mu.Lock()
	sp := e.spec
	sp.Targets = slices.Clone(sp.Targets)
	states := e.pool.States() // taken with the spec: the same targets
	listenErr := ""
	if e.ln == nil {
		listenErr = e.err
		if listenErr == "" {
			listenErr = "not listening"
		}
	}
	e.mu.Unlock()
	st := service.Status{Spec: sp, Listen: net.JoinHostPort(s.bind, strconv.Itoa(sp.Port)), Error: listenErr,
		Address: s.address(sp.Port), Failed: e.failed.Load(), BytesIn: e.bytesIn.Load(), BytesOut: e.bytesOut.Load()}
	for _, ts := range states {
		node := ""
		if t, err := service.ParseTarget(ts.Key); err == nil {
			node = t.Node
			if t.GID != "" {
				s.gidMu.Lock()
				node = s.gids[t.GID].node
				s.gidMu.Unlock()
				if s.runsHere(t.GID) {
					node = s.a.id.Node
				}
			}
		}
		st.State = append(st.State, service.TargetStatus{State: ts, Node: node})
		if ts.Healthy {
			st.Healthy++
		}
		st.Active += ts.Active
		st.Total += ts.Total
	}
	return st
}

func (s *svcState) localList() service.List {
	s.mu.Lock()
	es := make([]*exposed, 0, len(s.svcs))
	for _, e := range s.svcs {
		es = append(es, e)
	}
	s.mu.Unlock()
	l := service.List{Observer: s.a.id.Node, Services: []service.Status{}}
	for _, e := range es {
		l.Services = append(l.Services, s.statusOf(e))
	}
	sort.Slice(l.Services, func(i, j int) bool { return l.Services[i].Name < l.Services[j].Name })
	return l
}

// clusterList asks every live member for its services, in parallel, each
// bounded by PeerTimeout; members that do not answer are reported.
func (s *svcState) clusterList(ctx context.Context) service.List {
	out := s.localList()
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range s.a.members.Members() {
		if m.Name == s.a.id.Node || m.Status == membership.StatusLeft || m.Status == membership.StatusLeaving {
			continue
		}
		if m.Status != membership.StatusAlive || m.FabricAddr == "" {
			out.Unreachable = append(out.Unreachable, service.NodeError{Node: m.Name, Error: "node is " + string(m.Status)})
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var l service.List
			err := s.peerCall(ctx, m, http.MethodGet, pathServices+"?scope=node", nil, &l)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				out.Unreachable = append(out.Unreachable, service.NodeError{Node: m.Name, Error: err.Error()})
				return
			}
			for _, st := range l.Services {
				st.Node = m.Name // the certificate's name, checked by peerCall
				out.Services = append(out.Services, st)
			}
		}()
	}
	wg.Wait()
	sort.Slice(out.Services, func(i, j int) bool { return out.Services[i].Name < out.Services[j].Name })
	sort.Slice(out.Unreachable, func(i, j int) bool { return out.Unreachable[i].Node < out.Unreachable[j].Node })
	return out
}

// peerCall makes one control-API request to a member over mutual TLS,
// bounded by PeerTimeout (see Agent.callMember).
func (s *svcState) peerCall(ctx context.Context, m membership.Member, method, path string, body, v any) error {
	return s.a.callMember(ctx, m, method, path, s.a.cfg.PeerTimeout, body, v)
}

// httpError is a failure with the HTTP status to answer it with.
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func errf(code int, format string, args ...any) error {
	return &httpError{code: code, msg: fmt.Sprintf(format, args...)}
}

// parseTargets reads and checks targets against the cluster: nodes must
// be members, processes must run somewhere.
func (s *svcState) parseTargets(ctx context.Context, in []string) ([]service.Target, error) {
	var out []service.Target
	for _, raw := range in {
		t, err := service.ParseTarget(raw)
		if err != nil {
			return nil, errf(http.StatusBadRequest, "%v", err)
		}
		if t.GID != "" {
			if _, err := s.resolve(ctx, t.GID, true); err != nil {
				return nil, errf(http.StatusNotFound, "target %s: %v", t, err)
			}
		} else if t.Node != s.a.id.Node {
			if _, err := s.member(t.Node); err != nil {
				return nil, errf(http.StatusNotFound, "target %s: %v", t, err)
			}
		}
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	if len(out) == 0 {
		return nil, errf(http.StatusBadRequest, "no target: give --to NODE:PORT or --to GID:PORT")
	}
	return out, nil
}

// expose creates a service of this node, or adds targets to one.
func (s *svcState) expose(ctx context.Context, req service.ExposeRequest) (service.Status, error) {
	self := s.a.id.Node
	if req.Node == "" {
		req.Node = self
	}
	if req.Node != self {
		return service.Status{}, errf(http.StatusBadRequest, "this node is %s, not %s", self, req.Node)
	}
	if req.Name == "" {
		req.Name = service.DefaultName(self, req.Port)
	}
	if err := service.ValidName(req.Name); err != nil {
		return service.Status{}, errf(http.StatusBadRequest, "%v", err)
	}
	pol, err := balance.ParsePolicy(req.Policy)
	if err != nil {
		return service.Status{}, errf(http.StatusBadRequest, "%v", err)
	}
	targets, err := s.parseTargets(ctx, req.Targets)
	if err != nil {
		return service.Status{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return service.Status{}, errf(http.StatusServiceUnavailable, "the agent is shutting down")
	}
	if e, ok := s.svcs[req.Name]; ok {
		if req.Port != 0 && req.Port != e.spec.Port {
			return service.Status{}, errf(http.StatusConflict, "service %s already exists on %s:%d: give --port %d (or no --port) to add targets, or choose another --name", req.Name, self, e.spec.Port, e.spec.Port)
		}
		if req.Policy != "" && pol != e.spec.Policy {
			return service.Status{}, errf(http.StatusConflict, "service %s balances %s: unexpose it first to change the policy", req.Name, e.spec.Policy)
		}
		sp := e.spec
		sp.Targets = slices.Clone(sp.Targets)
		for _, t := range targets {
			if !slices.Contains(sp.Targets, t) {
				sp.Targets = append(sp.Targets, t)
			}
		}
		if err := s.saveLocked(req.Name, &sp); err != nil {
			return service.Status{}, err
		}
		e.setSpec(sp)
		s.a.log.Info("service targets added", "service", sp.Name, "targets", targetKeys(sp.Targets))
		return s.statusOf(e), nil
	}
	if req.Port == 0 {
		return service.Status{}, errf(http.StatusBadRequest, "no service %s: give --port (and --node) to create it", req.Name)
	}
	for _, e := range s.svcs {
		if e.spec.Port == req.Port {
			return service.Status{}, errf(http.StatusConflict, "port %d on %s already serves service %s: add targets to it with --name %s, or choose another --port", req.Port, self, e.spec.Name, e.spec.Name)
		}
	}
	ln, err := s.listen(req.Port)
	if err != nil {
		return service.Status{}, errf(http.StatusConflict, "%v", err)
	}
	sp := service.Spec{Name: req.Name, Node: self, Port: req.Port, Policy: pol, Targets: targets}
	if err := s.saveLocked(sp.Name, &sp); err != nil {
		ln.Close()
		return service.Status{}, err
	}
	e := s.newExposed(sp)
	e.ln = ln
	s.svcs[sp.Name] = e
	s.run(e)
	s.a.log.Info("service exposed", "service", sp.Name, "listen", ln.Addr().String(), "targets", targetKeys(sp.Targets), "policy", pol)
	return s.statusOf(e), nil
}

// unexpose removes a service of this node, or only one of its targets
// (target, as NODE:PORT or GID:PORT, if not empty).
func (s *svcState) unexpose(name, target string) (service.Status, error) {
	s.mu.Lock()
	e, ok := s.svcs[name]
	if !ok {
		s.mu.Unlock()
		return service.Status{}, errf(http.StatusNotFound, "no service %s on %s ('onebox services' lists them)", name, s.a.id.Node)
	}
	if target != "" {
		defer s.mu.Unlock()
		t, err := service.ParseTarget(target)
		if err != nil {
			return service.Status{}, errf(http.StatusBadRequest, "%v", err)
		}
		i := slices.Index(e.spec.Targets, t)
		if i < 0 {
			return service.Status{}, errf(http.StatusNotFound, "service %s has no target %s (its targets: %v)", name, t, targetKeys(e.spec.Targets))
		}
		if len(e.spec.Targets) == 1 {
			return service.Status{}, errf(http.StatusConflict, "%s is the last target of service %s: unexpose the service instead", t, name)
		}
		sp := e.spec
		sp.Targets = slices.Delete(slices.Clone(sp.Targets), i, i+1)
		if err := s.saveLocked(name, &sp); err != nil {
			return service.Status{}, err
		}
		// Connections already carried to the target go on; new ones do not.
		e.setSpec(sp)
		s.a.log.Info("service target removed", "service", name, "target", t.String())
		return s.statusOf(e), nil
	}
	if err := s.saveLocked(name, nil); err != nil {
		s.mu.Unlock()
		return service.Status{}, err
	}
	delete(s.svcs, name)
	s.mu.Unlock()
	st := s.statusOf(e)
	e.close()
	s.a.log.Info("service removed", "service", name)
	return st, nil
}

// saveLocked persists the specs with name set to sp (or removed, if nil).
//
// Preconditions: s.mu held.
func (s *svcState) saveLocked(name string, sp *service.Spec) error {
	var specs []service.Spec
	for n, e := range s.svcs {
		if n != name {
			specs = append(specs, e.spec)
		}
	}
	if sp != nil {
		specs = append(specs, *sp)
	}
	sort.Slice(specs, func(i, j int) bool { return specs[i].Name < specs[j].Name })
	if err := service.Save(s.path, specs); err != nil {
		return errf(http.StatusInternalServerError, "could not save the service definitions: %v", err)
	}
	return nil
}

// forwardExpose is 'expose' as any agent takes it from its CLI: it checks
// the name against the whole cluster, fills in the node and port of an
// existing service, and hands the request to the exposing node.
func (s *svcState) forwardExpose(ctx context.Context, req service.ExposeRequest) (service.Status, error) {
	if req.Name == "" && (req.Node == "" || req.Port == 0) {
		return service.Status{}, errf(http.StatusBadRequest, "give --node and --port for a new service, or --name of an existing one")
	}
	if req.Port < 0 || req.Port > 65535 {
		return service.Status{}, errf(http.StatusBadRequest, "port %d: want 1 to 65535", req.Port)
	}
	name := req.Name
	if name == "" {
		name = service.DefaultName(req.Node, req.Port)
	}
	l := s.clusterList(ctx)
	if st, ok := l.Find(name); ok {
		if (req.Node != "" && req.Node != st.Node) || (req.Port != 0 && req.Port != st.Port) {
			return service.Status{}, errf(http.StatusConflict, "service %s already exists on %s:%d: to add targets give --node %s --port %d (or neither); otherwise choose another --name", name, st.Node, st.Port, st.Node, st.Port)
		}
		req.Node, req.Port = st.Node, st.Port
	} else if req.Node == "" || req.Port == 0 {
		hint := ""
		if len(l.Unreachable) > 0 {
			hint = fmt.Sprintf(" (not asked: %d unreachable nodes)", len(l.Unreachable))
		}
		return service.Status{}, errf(http.StatusNotFound, "no service %s in the cluster%s: give --node and --port to create it", name, hint)
	}
	req.Name = name
	if req.Node == s.a.id.Node {
		return s.expose(ctx, req)
	}
	m, err := s.member(req.Node)
	if err != nil {
		return service.Status{}, errf(http.StatusNotFound, "--node: %v", err)
	}
	var st service.Status
	if err := s.peerCall(ctx, m, http.MethodPost, pathServices+"?scope=node", req, &st); err != nil {
		return st, forwarded(req.Node, err)
	}
	return st, nil
}

func forwarded(node string, err error) error {
	var pe *peerError
	if errors.As(err, &pe) {
		return errf(pe.code, "%s", pe.msg)
	}
	return errf(http.StatusBadGateway, "node %s did not answer: %v", node, err)
}

func (s *svcState) forwardUnexpose(ctx context.Context, name, target string) (service.Status, error) {
	s.mu.Lock()
	_, here := s.svcs[name]
	s.mu.Unlock()
	if here {
		return s.unexpose(name, target)
	}
	l := s.clusterList(ctx)
	st, ok := l.Find(name)
	if !ok {
		if len(l.Unreachable) > 0 {
			return st, errf(http.StatusNotFound, "no service %s on the nodes that answered; not asked: %v", name, l.Unreachable)
		}
		return st, errf(http.StatusNotFound, "no service %s ('onebox services' lists them)", name)
	}
	m, err := s.member(st.Node)
	if err != nil {
		return st, errf(http.StatusBadGateway, "service %s is on %s: %v", name, st.Node, err)
	}
	q := url.Values{"scope": {"node"}}
	if target != "" {
		q.Set("target", target)
	}
	var out service.Status
	if err := s.peerCall(ctx, m, http.MethodDelete, "/v1/services/"+url.PathEscape(name)+"?"+q.Encode(), nil, &out); err != nil {
		return out, forwarded(st.Node, err)
	}
	return out, nil
}

func (a *Agent) serviceRoutes(mux *http.ServeMux, side string) {
	ready := func(w http.ResponseWriter) *svcState {
		if a.svc == nil {
			replyJSON(w, http.StatusServiceUnavailable, api.ErrorBody{Error: "the agent is starting: try again"})
		}
		return a.svc
	}
	answer := func(w http.ResponseWriter, endpoint string, start time.Time, v any, err error) {
		code := http.StatusOK
		if err != nil {
			code = http.StatusInternalServerError
			var he *httpError
			if errors.As(err, &he) {
				code = he.code
			}
			v = api.ErrorBody{Error: err.Error()}
		}
		replyJSON(w, code, v)
		a.metrics.observeRequest(side, endpoint, code, time.Since(start))
	}
	mux.HandleFunc("GET "+pathServices, func(w http.ResponseWriter, r *http.Request) {
		s := ready(w)
		if s == nil {
			return
		}
		start := time.Now()
		if r.URL.Query().Get("scope") == "node" {
			answer(w, "services", start, s.localList(), nil)
			return
		}
		answer(w, "services", start, s.clusterList(r.Context()), nil)
	})
	mux.HandleFunc("POST "+pathServices, func(w http.ResponseWriter, r *http.Request) {
		s := ready(w)
		if s == nil {
			return
		}
		start := time.Now()
		var req service.ExposeRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			answer(w, "expose", start, nil, errf(http.StatusBadRequest, "bad expose request: %v", err))
			return
		}
		var st service.Status
		var err error
		if r.URL.Query().Get("scope") == "node" {
			st, err = s.expose(r.Context(), req)
		} else {
			st, err = s.forwardExpose(r.Context(), req)
		}
		answer(w, "expose", start, st, err)
	})
	mux.HandleFunc("DELETE "+pathService, func(w http.ResponseWriter, r *http.Request) {
		s := ready(w)
		if s == nil {
			return
		}
		start := time.Now()
		name, target := r.PathValue("name"), r.URL.Query().Get("target")
		var st service.Status
		var err error
		if r.URL.Query().Get("scope") == "node" {
			st, err = s.unexpose(name, target)
		} else {
			st, err = s.forwardUnexpose(r.Context(), name, target)
		}
		answer(w, "unexpose", start, st, err)
	})
}

// svcCollector reports target health and open connections at scrape time.
type svcCollector struct{ s *svcState }

var (
	descSvcHealthy = prometheus.NewDesc("onebox_service_target_healthy", "1 if the target is in rotation, 0 if health checks took it out.", []string{"service", "target"}, nil)
	descSvcActive  = prometheus.NewDesc("onebox_service_active_connections", "Connections open through the service address to the target.", []string{"service", "target"}, nil)
)

func (c svcCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSvcHealthy
	ch <- descSvcActive
}

func (c svcCollector) Collect(ch chan<- prometheus.Metric) {
	c.s.mu.Lock()
	es := make([]*exposed, 0, len(c.s.svcs))
	for _, e := range c.s.svcs {
		es = append(es, e)
	}
	c.s.mu.Unlock()
	for _, e := range es {
		e.mu.Lock()
		name := e.spec.Name
		e.mu.Unlock()
		for _, st := range e.pool.States() {
			h := 0.0
			if st.Healthy {
				h = 1
			}
			ch <- prometheus.MustNewConstMetric(descSvcHealthy, prometheus.GaugeValue, h, name, st.Key)
			ch <- prometheus.MustNewConstMetric(descSvcActive, prometheus.GaugeValue, float64(st.Active), name, st.Key)
		}
	}
}
