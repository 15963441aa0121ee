package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/proc/migrate"
	"github.com/onebox-project/onebox/proc/stream"
)

// One process space (issue 4), first slice: run, ps, kill.
//
// Transport choice. A program's stdio between agents runs on its own ALPN
// protocol on the fabric port (stream.ALPN, "onebox-proc/1"), not as an
// HTTP upgrade of the control API: after the mutual-TLS handshake the
// bytes are frames and nothing else, so no HTTP server sits between the
// program and its caller (the control server's read-header timeouts,
// graceful Shutdown that ignores hijacked connections, and keep-alive
// handling do not apply to a stream that lives as long as the program),
// and it is the data-plane shape docs/ARCHITECTURE.md plans for pages.
// The CLI reaches its local agent by an HTTP upgrade on the unix socket
// (the same frames after a 101 answer), because the socket is an HTTP
// server and the CLI must never dial remote nodes itself: the local agent
// relays, frame by frame, to the agent that runs the program.
//
// Listing and signalling are plain JSON requests on the control API: the
// local agent asks every live member over mutual TLS (a.peers.hc, bounded
// by PeerTimeout) and reports those that do not answer.

// API paths of the process space.
const (
	pathProcs  = "/v1/procs"
	pathRun    = "/v1/procs/run"
	pathSignal = "/v1/procs/{gid}/signal"
)

// Bounds of a stream's set-up.
const (
	startFrameTimeout = 10 * time.Second // caller → first frame
	startedTimeout    = 15 * time.Second // relay ← runner's Started
	drainTimeout      = 5 * time.Second  // output still open after the program ended (a background child holds it)
	closeGrace        = 3 * time.Second  // SIGTERM → SIGKILL when the agent stops
)

// procState is the agent's process manager and its live streams.
type procState struct {
	a   *Agent
	mgr *manager.Manager

	ctx    context.Context // cancelled by closeProc
	cancel context.CancelFunc
	wg     sync.WaitGroup // stream goroutines

	mu     sync.Mutex
	conns  map[io.Closer]bool // live stream connections (true: dialed by us); guarded by mu
	closed bool               // guarded by mu
	where  map[string]seen    // GID → node it was last seen on; guarded by mu

	migrating map[string]*migration    // outgoing migrations by GID, kept a while after; guarded by mu
	waiting   map[string]*waitingStdio // restored here, stdio waiting for the caller; guarded by mu
	incoming  map[string]bool          // GIDs being restored here (their image directory in use); guarded by mu
	mm        *migrateMetrics          // set by startProc
}

type seen struct {
	node string
	at   time.Time
}

// maxWhere bounds the GID → node memory used to explain a kill of a
// process whose node is down.
const maxWhere = 10000

func (a *Agent) startProc(_ context.Context) error {
	pctx, cancel := context.WithCancel(context.Background())
	a.proc = &procState{
		a: a,
		mgr: manager.New(manager.Config{Node: a.id.Node, LogDir: filepath.Join(a.cfg.DataDir, "proc", "logs"),
			Logger: a.log.With("component", "proc")}),
		ctx: pctx, cancel: cancel,
		conns: map[io.Closer]bool{}, where: map[string]seen{},
		migrating: map[string]*migration{}, waiting: map[string]*waitingStdio{}, incoming: map[string]bool{},
	}
	a.proc.registerMigrateMetrics()
	// Images of migrations cut short by this agent's last death: no
	// migration outlives its agent (nor do its programs: closeProc).
	if err := removeStaleImages(a.cfg.DataDir); err != nil {
		a.log.Warn("cannot remove the images of earlier migrations", "err", err)
	}
	a.mux.Handle(stream.ALPN, a.proc.serveFabric)
	a.primeCRIU()
	return nil
}

// closeProc ends the streams and the processes: this slice does not keep
// programs across agent restarts (an agent that dies takes them with it,
// by Pdeathsig). Each program's group gets SIGTERM, then SIGKILL.
func (a *Agent) closeProc() error {
	p := a.proc
	if p == nil {
		return nil
	}
	p.mu.Lock()
	p.closed = true // no new streams
	// Relays to programs on other nodes: they hang up (those programs get
	// SIGHUP; their callers an error).
	for c, outgoing := range p.conns {
		if outgoing {
			c.Close()
		}
	}
	p.mu.Unlock()
	// The programs here end, so attached callers get their exit status
	// (killed SIGTERM) rather than a broken connection.
	p.mgr.Close(closeGrace)
	p.cancel() // streams stop lingering
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(drainTimeout):
	}
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	select {
	case <-done:
	case <-time.After(time.Second):
		a.log.Warn("process streams still running at shutdown")
	}
	return nil
}

// track registers a live stream connection, so closeProc can end it.
// It returns false (and closes c) when the agent is closing.
// outgoing marks connections this agent dialed (relays).
func (p *procState) track(c io.Closer, outgoing bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns[c] = outgoing
	p.wg.Add(1)
	return true
}

func (p *procState) closing() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

func (p *procState) untrack(c io.Closer) {
	c.Close()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.wg.Done()
}

func (p *procState) remember(gid, node string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.where) >= maxWhere {
		for g, s := range p.where {
			if time.Since(s.at) > time.Hour || len(p.where) >= maxWhere {
				delete(p.where, g)
			}
		}
	}
	p.where[gid] = seen{node: node, at: time.Now()}
}

func (p *procState) lastSeen(gid string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.where[gid]
	return s.node, ok
}

// procRoutes registers the process endpoints. The handlers are built in
// listen, before startProc: they find the process state at request time.
func (a *Agent) procRoutes(mux *http.ServeMux, side string) {
	ready := func(w http.ResponseWriter) *procState {
		if a.proc == nil {
			replyJSON(w, http.StatusServiceUnavailable, api.ErrorBody{Error: "the agent is starting: try again"})
		}
		return a.proc
	}
	mux.HandleFunc("GET "+pathProcs, func(w http.ResponseWriter, r *http.Request) {
		p := ready(w)
		if p == nil {
			return
		}
		start := time.Now()
		var v manager.ClusterList
		if r.URL.Query().Get("scope") == "node" {
			v = manager.ClusterList{Observer: a.id.Node, Procs: p.localList()}
		} else {
			v = p.list(r.Context())
		}
		replyJSON(w, http.StatusOK, v)
		a.metrics.observeRequest(side, "procs", http.StatusOK, time.Since(start))
	})
	mux.HandleFunc("POST "+pathSignal, func(w http.ResponseWriter, r *http.Request) {
		p := ready(w)
		if p == nil {
			return
		}
		start := time.Now()
		code, v := p.signal(r.Context(), r.PathValue("gid"), r.URL.Query().Get("signal"), r.URL.Query().Get("scope") == "node")
		replyJSON(w, code, v)
		a.metrics.observeRequest(side, "signal", code, time.Since(start))
	})
	mux.HandleFunc("POST "+pathMigrate, func(w http.ResponseWriter, r *http.Request) {
		p := ready(w)
		if p == nil {
			return
		}
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		p.migrateRoute(rec, r)
		a.metrics.observeRequest(side, "migrate", rec.code, time.Since(start))
	})
	mux.HandleFunc("POST "+pathCheckpoint, func(w http.ResponseWriter, r *http.Request) {
		if p := ready(w); p != nil {
			p.checkpointRoute(w, r)
		}
	})
	// A restore reads a directory of this node and sends it to any node:
	// this node's operator asks (the CLI on its control socket), no other
	// member (nothing forwards it).
	if side == "local" {
		mux.HandleFunc("POST "+pathRestore, func(w http.ResponseWriter, r *http.Request) {
			if p := ready(w); p != nil {
				p.restoreRoute(w, r)
			}
		})
	}
	mux.HandleFunc("POST "+pathRun, func(w http.ResponseWriter, r *http.Request) {
		p := ready(w)
		if p == nil {
			return
		}
		a.metrics.observeRequest(side, "run", http.StatusSwitchingProtocols, 0)
		p.serveUpgrade(w, r)
	})
}

func replyJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

// localList is this node's processes for 'onebox ps': programs that moved
// away (still frozen here while their pages leave) are left out, and a
// running program that cannot migrate says why in its note.
func (p *procState) localList() []manager.Info {
	all := p.mgr.List()
	var running []int
	for _, i := range all {
		if i.State == manager.StateRunning {
			running = append(running, i.PID)
		}
	}
	cannot := migrate.CheckAll(running)
	out := all[:0]
	for _, i := range all {
		cur, _ := p.mgr.Get(i.GID)
		p.mu.Lock()
		m := p.migrating[i.GID]
		if m != nil && m.pr != cur {
			m = nil // an earlier migration of the program, which came back
		}
		to, moving := "", ""
		if m != nil {
			to = m.to
			select {
			case <-m.done:
			default:
				moving = m.target
			}
		}
		p.mu.Unlock()
		if to != "" {
			continue
		}
		i.Migrating = moving
		if i.State == manager.StateRunning && m == nil {
			if why := cannot[i.PID]; why != "" {
				if i.Note != "" {
					i.Note += "; "
				}
				i.Note += "cannot migrate: it " + why
			}
		}
		out = append(out, i)
	}
	return out
}

// SignalResult is the answer of a signal request.
type SignalResult struct {
	GID    string `json:"gid"`
	Node   string `json:"node"`
	Signal string `json:"signal"`
}

// list asks every member for its processes, in parallel, each bounded by
// PeerTimeout. Members that do not answer, or are down, are reported.
// askPeers calls ask for every other live member, in parallel, and
// returns the members it could not ask (not alive) or whose ask failed.
func (a *Agent) askPeers(ask func(m membership.Member) error) []manager.NodeError {
	var bad []manager.NodeError
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range a.members.Members() {
		if m.Name == a.id.Node || m.Status == membership.StatusLeft || m.Status == membership.StatusLeaving {
			continue
		}
		if m.Status != membership.StatusAlive || m.FabricAddr == "" {
			bad = append(bad, manager.NodeError{Node: m.Name, Error: "node is " + string(m.Status)})
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := ask(m); err != nil {
				mu.Lock()
				bad = append(bad, manager.NodeError{Node: m.Name, Error: err.Error()})
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return bad
}

func (p *procState) list(ctx context.Context) manager.ClusterList {
	a := p.a
	out := manager.ClusterList{Observer: a.id.Node, Procs: p.localList()}
	var mu sync.Mutex
	out.Unreachable = a.askPeers(func(m membership.Member) error {
		procs, err := p.fetchList(ctx, m)
		if err == nil {
			mu.Lock()
			out.Procs = append(out.Procs, procs...)
			mu.Unlock()
		}
		return err
	})
	out.Procs = dedupe(out.Procs)
	for _, pi := range out.Procs {
		p.remember(pi.GID, pi.Node)
	}
	sort.Slice(out.Procs, func(i, j int) bool {
		if !out.Procs[i].Started.Equal(out.Procs[j].Started) {
			return out.Procs[i].Started.Before(out.Procs[j].Started)
		}
		return out.Procs[i].GID < out.Procs[j].GID
	})
	sort.Slice(out.Unreachable, func(i, j int) bool { return out.Unreachable[i].Node < out.Unreachable[j].Node })
	return out
}

// dedupe keeps one entry per global id. While a program migrates, its
// target may already list the restored copy while the source still lists
// the frozen original (marked Migrating) for a moment: the running entry
// that is not leaving wins, then any running entry, then the latest one.
func dedupe(procs []manager.Info) []manager.Info {
	rank := func(i manager.Info) int {
		switch {
		case i.State == manager.StateRunning && i.Migrating == "":
			return 2
		case i.State == manager.StateRunning:
			return 1
		}
		return 0
	}
	at := make(map[string]int, len(procs))
	out := procs[:0]
	for _, pi := range procs {
		k, seen := at[pi.GID]
		if !seen {
			at[pi.GID] = len(out)
			out = append(out, pi)
			continue
		}
		old := out[k]
		if r, ro := rank(pi), rank(old); r > ro || (r == ro && pi.Started.After(old.Started)) {
			out[k] = pi
		}
	}
	return out
}

// fetchList asks one member for its own processes.
func (p *procState) fetchList(ctx context.Context, m membership.Member) ([]manager.Info, error) {
	var l manager.ClusterList
	if err := p.peerCall(ctx, m, http.MethodGet, pathProcs+"?scope=node", &l); err != nil {
		return nil, err
	}
	for i := range l.Procs {
		l.Procs[i].Node = m.Name // the certificate's name, checked by peerCall
	}
	return l.Procs, nil
}

// peerCall makes one control-API request to a member over mutual TLS,
// bounded by PeerTimeout, and checks the answer comes from that member.
func (p *procState) peerCall(ctx context.Context, m membership.Member, method, path string, v any) error {
	return p.peerCallTimeout(ctx, m, method, path, p.a.cfg.PeerTimeout, v)
}

// peerCallTimeout is peerCall bounded by timeout instead.
func (p *procState) peerCallTimeout(ctx context.Context, m membership.Member, method, path string, timeout time.Duration, v any) error {
	return p.a.callMember(ctx, m, method, path, timeout, nil, v)
}

type peerError struct {
	code int
	msg  string
}

func (e *peerError) Error() string { return e.msg }

// signal sends a signal to a process: here if it runs here, else on the
// node that runs it (found by asking the members). local restricts the
// search to this node (the form members use among themselves).
func (p *procState) signal(ctx context.Context, gid, sigName string, local bool) (int, any) {
	fail := func(code int, format string, args ...any) (int, any) {
		return code, api.ErrorBody{Error: fmt.Sprintf(format, args...)}
	}
	if sigName == "" {
		sigName = "TERM"
	}
	sig, err := manager.ParseSignal(sigName)
	if err != nil {
		return fail(http.StatusBadRequest, "%v", err)
	}
	if !manager.ValidGID(gid) {
		return fail(http.StatusNotFound, "%q is not a process id (ids look like g0123456789ab: 'onebox ps' lists them)", gid)
	}
	self := p.a.id.Node
	if _, ok := p.mgr.Get(gid); ok || local {
		if err := p.mgr.Signal(gid, sig); err != nil {
			if errors.Is(err, manager.ErrNotFound) {
				return fail(http.StatusNotFound, "no process %s on node %s", gid, self)
			}
			return fail(http.StatusConflict, "%v", err)
		}
		return http.StatusOK, SignalResult{GID: gid, Node: self, Signal: manager.SignalName(sig)}
	}
	l := p.list(ctx)
	for _, pi := range l.Procs {
		if pi.GID != gid {
			continue
		}
		m, ok := p.member(pi.Node)
		if !ok {
			return fail(http.StatusBadGateway, "process %s is on node %s, which is no longer a member", gid, pi.Node)
		}
		var res SignalResult
		q := url.Values{"signal": {sigName}, "scope": {"node"}}
		if err := p.peerCall(ctx, m, http.MethodPost, "/v1/procs/"+gid+"/signal?"+q.Encode(), &res); err != nil {
			var pe *peerError
			if errors.As(err, &pe) {
				return fail(pe.code, "%s", pe.msg)
			}
			return fail(http.StatusBadGateway, "process %s is on node %s, which did not answer: %v", gid, pi.Node, err)
		}
		return http.StatusOK, res
	}
	if node, ok := p.lastSeen(gid); ok {
		for _, u := range l.Unreachable {
			if u.Node == node {
				return fail(http.StatusBadGateway, "process %s was last seen on node %s, which cannot be reached (%s)", gid, node, u.Error)
			}
		}
	}
	if len(l.Unreachable) > 0 {
		var names []string
		for _, u := range l.Unreachable {
			names = append(names, u.Node+" ("+u.Error+")")
		}
		return fail(http.StatusNotFound, "no process %s on the nodes that answered; not asked: %v ('onebox ps' lists the ids)", gid, names)
	}
	return fail(http.StatusNotFound, "no process %s in the cluster ('onebox ps' lists the ids)", gid)
}

func (p *procState) member(name string) (membership.Member, bool) {
	for _, m := range p.a.members.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return membership.Member{}, false
}

// serveUpgrade takes over an HTTP connection from the CLI (Upgrade:
// onebox-proc/1) and runs the stream on it.
func (p *procState) serveUpgrade(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != stream.Upgrade {
		replyJSON(w, http.StatusBadRequest, api.ErrorBody{Error: "this endpoint needs 'Connection: Upgrade' and 'Upgrade: " + stream.Upgrade + "'"})
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		replyJSON(w, http.StatusInternalServerError, api.ErrorBody{Error: "cannot take over the connection: " + err.Error()})
		return
	}
	if !p.track(conn, false) {
		return
	}
	defer p.untrack(conn)
	_ = conn.SetDeadline(time.Time{})
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + stream.Upgrade + "\r\n\r\n")
	if err := brw.Flush(); err != nil {
		return
	}
	sc := stream.NewConn(conn, brw.Reader)
	spec, err := readStart(conn, sc)
	if err != nil {
		_ = sc.WriteError(err)
		return
	}
	spec.Home = p.a.id.Node
	target, err := p.pickNode(r.Context(), spec)
	if err != nil {
		_ = sc.WriteError(err)
		return
	}
	if target.Name == p.a.id.Node {
		p.runHere(sc, spec, false)
		return
	}
	p.relay(sc, spec, target)
}

// memberWriteTimeout bounds each frame of a migration written to another
// agent: one that reads nothing for this long while the connection's
// buffers are full is taken as gone (the write fails and the migration
// ends as for a lost node), rather than holding the writing goroutine for
// good. A slow reader that keeps reading is not cut (the bound is per
// frame). Streams that carry a program's stdio have no such bound: there
// a reader that stops is backpressure (a caller paused in a pager, a
// program that does not read its stdin) and must not kill the program;
// a dead peer ends them by TCP keepalive or by the connection closing.
const memberWriteTimeout = time.Minute

// memberConn is a migration's stream on a connection with another agent.
func memberConn(c net.Conn) *stream.Conn {
	sc := stream.NewConn(c, nil)
	sc.SetWriteTimeout(memberWriteTimeout)
	return sc
}

// serveFabric serves a stream from another agent (ALPN stream.ALPN; the
// mux already checked the client's cluster certificate): a program to run
// (Start), a caller following a migrated program (Attach), or an incoming
// migration (Migrate).
func (p *procState) serveFabric(c net.Conn) {
	if !p.track(c, false) {
		return
	}
	defer p.untrack(c)
	sc := stream.NewConn(c, nil) // bounded below for a migration only
	peer := ""
	if tc, ok := c.(*tls.Conn); ok {
		peer = pki.PeerName(tc.ConnectionState())
	}
	_ = c.SetReadDeadline(time.Now().Add(startFrameTimeout))
	f, err := sc.Read()
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		_ = sc.WriteError(fmt.Errorf("read start frame: %w", err))
		return
	}
	decode := func(v any) error {
		dec := json.NewDecoder(bytes.NewReader(f.Payload))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return fmt.Errorf("bad %s frame: %w", f.Type, err)
		}
		return nil
	}
	switch f.Type {
	case stream.Start:
		var spec stream.Spec
		if err := decode(&spec); err != nil {
			_ = sc.WriteError(err)
			return
		}
		if err := spec.Validate(); err != nil {
			_ = sc.WriteError(err)
			return
		}
		if spec.Home == "" {
			spec.Home = peer
		}
		p.runHere(sc, spec, true)
	case stream.Attach:
		var ai stream.AttachInfo
		if err := decode(&ai); err != nil {
			_ = sc.WriteError(err)
			return
		}
		p.attach(sc, ai.GID)
	case stream.Migrate:
		var ms migrate.Spec
		if err := decode(&ms); err != nil {
			_ = sc.WriteError(err)
			return
		}
		if err := ms.Validate(); err != nil {
			_ = sc.WriteError(err)
			return
		}
		sc.SetWriteTimeout(memberWriteTimeout)
		p.migrateIn(c, sc, ms, peer)
	default:
		_ = sc.WriteError(fmt.Errorf("expected a start, attach or migrate frame, got %s", f.Type))
	}
}

// readStart reads and checks the Start frame, bounded by startFrameTimeout.
func readStart(c interface{ SetReadDeadline(time.Time) error }, sc *stream.Conn) (stream.Spec, error) {
	var spec stream.Spec
	_ = c.SetReadDeadline(time.Now().Add(startFrameTimeout))
	f, err := sc.Read()
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		return spec, fmt.Errorf("read start frame: %w", err)
	}
	if f.Type != stream.Start {
		return spec, fmt.Errorf("expected a start frame, got %s", f.Type)
	}
	dec := json.NewDecoder(bytes.NewReader(f.Payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return spec, fmt.Errorf("bad start frame: %w", err)
	}
	return spec, spec.Validate()
}

// pickNode chooses where to run: --node, --best, or here.
func (p *procState) pickNode(ctx context.Context, spec stream.Spec) (membership.Member, error) {
	self := membership.Member{Name: p.a.id.Node}
	switch {
	case spec.Best:
		ctx, cancel := context.WithTimeout(ctx, 2*p.a.cfg.PeerTimeout)
		defer cancel()
		nr := p.a.Nodes(ctx)
		best, bestScore := "", 0.0
		for _, n := range nr.Nodes {
			if n.Status != membership.StatusAlive || n.Info == nil || n.Stale || n.Info.Resources.CPUs <= 0 || !p.a.schedulable(n.Name) {
				continue
			}
			score := n.Info.Resources.Load1 / float64(n.Info.Resources.CPUs)
			if best == "" || score < bestScore {
				best, bestScore = n.Name, score
			}
		}
		if best == "" {
			return self, errors.New("no alive node answered: cannot choose the best one")
		}
		if best == self.Name {
			return self, nil
		}
		m, _ := p.member(best)
		return m, nil
	case spec.Node != "" && !p.a.schedulable(spec.Node):
		return self, fmt.Errorf("node %s is cordoned (drained): it takes no new processes; 'onebox uncordon %s' makes it schedulable again", spec.Node, spec.Node)
	case spec.Node == "" || spec.Node == self.Name:
		return self, nil
	}
	m, ok := p.member(spec.Node)
	if !ok {
		return m, fmt.Errorf("no node %q in the cluster ('onebox nodes' lists them)", spec.Node)
	}
	if m.Status != membership.StatusAlive {
		return m, fmt.Errorf("node %s is %s: cannot run there ('onebox nodes' shows which nodes are alive)", m.Name, m.Status)
	}
	return m, nil
}

// runHere starts the program on this node and streams its stdio on sc
// until it ends (attached), or answers with its id (detached). redirect:
// the caller is another agent, which understands Moved.
func (p *procState) runHere(sc *stream.Conn, spec stream.Spec, redirect bool) {
	memEnv, release, err := p.a.memoryExpand(spec)
	if err != nil {
		_ = sc.WriteError(fmt.Errorf("node %s: %w", p.a.id.Node, err))
		return
	}
	env := spec.Env
	if len(memEnv) > 0 {
		env = append(append([]string(nil), spec.Env...), memEnv...)
	}
	pr, stdio, err := p.mgr.Start(manager.StartOptions{Argv: spec.Argv, Env: env, Dir: spec.Dir, Home: spec.Home, Detach: spec.Detach,
		Balance: spec.Best && !spec.NoBalance})
	if err == nil {
		go func() { <-pr.Done(); release() }()
	} else {
		release()
	}
	if err != nil {
		if code := manager.StartCode(err); code != 0 {
			_ = sc.WriteJSON(stream.NotStarted, stream.NotStartedInfo{Error: fmt.Sprintf("node %s: %v", p.a.id.Node, err), Code: code})
			return
		}
		_ = sc.WriteError(fmt.Errorf("node %s: %w", p.a.id.Node, err))
		return
	}
	p.remember(pr.GID, p.a.id.Node)
	if err := sc.WriteJSON(stream.Started, stream.StartedInfo{GID: pr.GID, Node: p.a.id.Node, PID: pr.PID, Log: pr.Log}); err != nil {
		if !spec.Detach {
			_ = p.mgr.SignalProc(pr, syscall.SIGHUP)
			stdio.Stdin.Close()
			stdio.Stdout.Close()
			stdio.Stderr.Close()
		}
		return
	}
	if spec.Detach {
		return
	}
	p.streamProc(sc, pr, stdio, redirect)
}

// upFrame is one frame read from a caller, or the read's error.
type upFrame struct {
	f   stream.Frame
	err error
}

// readUp reads the caller's frames until the connection fails; the last
// item carries the error. A caller's frames are read by one goroutine for
// the stream's life, so that a program that migrates hands the same
// reader over to the relay that follows it.
// It stops when quit is closed (the stream is over).
func readUp(sc *stream.Conn, quit <-chan struct{}) <-chan upFrame {
	ch := make(chan upFrame, 16)
	go func() {
		defer close(ch)
		for {
			f, err := sc.Read()
			select {
			case ch <- upFrame{f, err}:
			case <-quit:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return ch
}

// streamProc streams a running program's stdio on sc until it ends, or
// until it migrated away: then a caller that is an agent (redirect) gets
// Moved and follows it itself; the CLI's own connection is relayed here
// to the program's new node.
func (p *procState) streamProc(sc *stream.Conn, pr *manager.Proc, stdio *manager.Stdio, redirect bool) {
	log := p.a.log.With("gid", pr.GID)
	quit := make(chan struct{}) // closed when streamProc returns
	defer close(quit)
	ended := make(chan struct{}) // closed when the program has ended

	// Output: stdout and stderr into frames until EOF.
	var pumps sync.WaitGroup
	pump := func(r io.ReadCloser, t stream.Type) {
		defer pumps.Done()
		_, _ = io.Copy(stream.ChunkWriter{C: sc, T: t}, r)
		r.Close()
	}
	pumps.Add(2)
	go pump(stdio.Stdout, stream.Stdout)
	go pump(stdio.Stderr, stream.Stderr)

	// Input: a writer goroutine, so a program that does not read its
	// stdin cannot block the reading of signal frames until the queue
	// (64 frames) is full.
	stdinq := make(chan []byte, 64)
	go func() {
		defer stdio.Stdin.Close()
		broken := false
		for {
			select {
			case b, ok := <-stdinq:
				if !ok {
					return
				}
				if broken {
					continue
				}
				if _, err := stdio.Stdin.Write(b); err != nil {
					// The program closed its stdin: drop the rest, as a
					// pipe would, but keep taking it so the reader of
					// signal frames never blocks.
					broken = true
					stdio.Stdin.Close()
				}
			case <-ended:
				return
			case <-quit:
				return
			}
		}
	}()
	// The caller's frames are taken until the program ends (or moves):
	// then the taker stops, and what follows (lingering until the caller
	// closes, or a relay to the program's new node) reads the rest.
	up := readUp(sc, quit)
	readerr := make(chan error, 1)
	takerDone := make(chan struct{})
	go func() {
		defer close(takerDone)
		eof := false
		for {
			var u upFrame
			var ok bool
			select {
			case u, ok = <-up:
			case <-ended:
				return
			case <-quit:
				return
			}
			if !ok {
				return
			}
			if u.err != nil {
				readerr <- u.err
				return
			}
			f := u.f
			switch f.Type {
			case stream.Stdin:
				if eof {
					readerr <- errors.New("stdin data after stdin-eof")
					return
				}
				select {
				case stdinq <- f.Payload:
				case <-ended:
				case <-quit:
				}
			case stream.StdinEOF:
				if !eof {
					eof = true
					close(stdinq)
				}
			case stream.Signal:
				if err := p.mgr.SignalProc(pr, syscall.Signal(f.Payload[0])); err != nil {
					log.Debug("forward signal", "err", err)
				}
			default:
				readerr <- fmt.Errorf("unexpected %s frame from the caller", f.Type)
				return
			}
		}
	}()

	select {
	case <-pr.Done():
	case err := <-readerr:
		// The caller hung up (or spoke nonsense): a terminal hangup.
		log.Info("caller gone: SIGHUP to the program", "err", err)
		_ = p.mgr.SignalProc(pr, syscall.SIGHUP)
		stdio.Stdin.Close()
		stdio.Stdout.Close()
		stdio.Stderr.Close()
		return
	case <-p.ctx.Done():
		_ = sc.WriteError(errors.New("the agent is shutting down"))
		return
	}
	close(ended)
	// The program ended: send what is left of its output, then its status.
	drained := make(chan struct{})
	go func() { pumps.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainTimeout):
		log.Info("output still open after the program ended (a background process holds it): closing it")
		stdio.Stdout.Close()
		stdio.Stderr.Close()
		<-drained
	}
	stdio.Stdin.Close()
	<-takerDone
	// If the program ended because it migrated, the caller follows it.
	if to := p.movedTo(pr); to != "" {
		if redirect {
			if sc.WriteJSON(stream.Moved, stream.MovedInfo{GID: pr.GID, Node: to}) != nil {
				return
			}
		} else {
			p.follow(sc, up, pr.GID, to)
			return
		}
	} else {
		st := p.mgr.Status(pr)
		if sc.Write(stream.Exit, stream.EncodeExit(stream.ExitStatus{Code: st.Code, Signal: st.Signal})) != nil {
			return
		}
	}
	// Linger until the caller, having read the last frame, closes (bounded).
	lingerUp(up, p.ctx)
}

// lingerUp drops the caller's frames until it closes (bounded), so the
// connection is not closed with unread data (a TCP reset could destroy
// the last frame in flight).
func lingerUp(up <-chan upFrame, ctx context.Context) {
	t := time.NewTimer(drainTimeout)
	defer t.Stop()
	for {
		select {
		case u, ok := <-up:
			if !ok || u.err != nil {
				return
			}
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// relay runs the program on another node: it dials that node's agent on
// the fabric port and passes frames both ways until the program ends or
// either side goes away.
func (p *procState) relay(sc *stream.Conn, spec stream.Spec, target membership.Member) {
	rc, err := p.dial(target)
	if err != nil {
		_ = sc.WriteError(fmt.Errorf("cannot reach node %s: %w", target.Name, err))
		return
	}
	if !p.track(rc, true) {
		return
	}
	remote := stream.NewConn(rc, nil) // stdio: no write bound (memberWriteTimeout)
	if err := remote.WriteJSON(stream.Start, spec); err != nil {
		p.untrack(rc)
		_ = sc.WriteError(fmt.Errorf("node %s: %w", target.Name, err))
		return
	}
	_ = rc.SetReadDeadline(time.Now().Add(startedTimeout))
	f, err := remote.Read()
	_ = rc.SetReadDeadline(time.Time{})
	var si stream.StartedInfo
	switch {
	case err != nil:
		_ = sc.WriteError(fmt.Errorf("node %s did not start the program: %w", target.Name, err))
	case f.Type == stream.Error || f.Type == stream.NotStarted:
		_ = sc.Write(f.Type, f.Payload)
	case f.Type != stream.Started:
		_ = sc.WriteError(fmt.Errorf("node %s answered %s instead of started", target.Name, f.Type))
	case json.Unmarshal(f.Payload, &si) != nil:
		_ = sc.WriteError(fmt.Errorf("node %s sent a bad started frame", target.Name))
	default:
		p.remember(si.GID, target.Name)
		if err := sc.Write(stream.Started, f.Payload); err != nil || spec.Detach {
			break
		}
		quit := make(chan struct{})
		defer close(quit)
		p.pipe(sc, readUp(sc, quit), rc, remote, target.Name, si.GID)
		return
	}
	p.untrack(rc)
}

// follow relays a caller's stream (whose frames come on up) to the node
// a program migrated to: it attaches there and pipes.
func (p *procState) follow(sc *stream.Conn, up <-chan upFrame, gid, node string) {
	rc, remote, err := p.attachTo(gid, node)
	if err != nil {
		_ = sc.WriteError(err)
		lingerUp(up, p.ctx)
		return
	}
	p.pipe(sc, up, rc, remote, node, gid)
}

// attachTo dials node and sends Attach for gid; the connection is tracked.
func (p *procState) attachTo(gid, node string) (net.Conn, *stream.Conn, error) {
	m, ok := p.member(node)
	if !ok {
		return nil, nil, fmt.Errorf("the program %s moved to node %s, which is not a member", gid, node)
	}
	rc, err := p.dial(m)
	if err != nil {
		return nil, nil, fmt.Errorf("the program %s moved to node %s, which cannot be reached: %w", gid, node, err)
	}
	if !p.track(rc, true) {
		return nil, nil, errors.New("the agent is shutting down")
	}
	remote := stream.NewConn(rc, nil) // stdio: no write bound (memberWriteTimeout)
	if err := remote.WriteJSON(stream.Attach, stream.AttachInfo{GID: gid}); err != nil {
		p.untrack(rc)
		return nil, nil, fmt.Errorf("the program %s moved to node %s: %w", gid, node, err)
	}
	p.remember(gid, node)
	return rc, remote, nil
}

// pipe passes frames between the caller (sc, its frames on up) and the
// runner (rc) until Exit or Error. On Moved it attaches to the program's
// new node and goes on: the caller never notices. rc is untracked when
// pipe returns.
func (p *procState) pipe(sc *stream.Conn, up <-chan upFrame, rc net.Conn, remote *stream.Conn, node, gid string) {
	// Caller → runner. When the caller goes, closing the runner's
	// connection tells the runner (which sends SIGHUP). Frames that come
	// while the program moves wait for the new node (at most 256).
	var mu sync.Mutex
	cur := remote // guarded by mu; nil while switching
	curRC := rc   // guarded by mu
	var held []stream.Frame
	upDone := make(chan struct{})
	go func() {
		defer close(upDone)
		for u := range up {
			if u.err != nil {
				break
			}
			if t := u.f.Type; t != stream.Stdin && t != stream.StdinEOF && t != stream.Signal {
				break
			}
			mu.Lock()
			if cur == nil {
				if len(held) < 256 {
					held = append(held, u.f)
				}
			} else if cur.Write(u.f.Type, u.f.Payload) != nil {
				// Keep reading (and dropping): the runner's last frames
				// may still be on their way.
			}
			mu.Unlock()
		}
		mu.Lock()
		if curRC != nil {
			curRC.Close()
		}
		mu.Unlock()
	}()
	// switchTo attaches to the program on node to and makes it the runner.
	switchTo := func(to string) error {
		mu.Lock()
		cur = nil
		mu.Unlock()
		p.untrack(rc)
		rc = nil
		nrc, nremote, err := p.attachTo(gid, to)
		if err != nil {
			return err
		}
		mu.Lock()
		for _, h := range held {
			_ = nremote.Write(h.Type, h.Payload)
		}
		held = nil
		cur, curRC = nremote, nrc
		mu.Unlock()
		rc, remote, node = nrc, nremote, to
		return nil
	}
	// Runner → caller, until Exit or Error.
	for {
		f, err := remote.Read()
		if err != nil && !p.closing() {
			// The runner's node may have died just after the program
			// left it (its Moved never came): find where it runs now.
			if to := p.movedElsewhere(gid, node); to != "" {
				p.a.log.Info("the program's node went away; it runs on another node: following it", "gid", gid, "lost", node, "to", to)
				if err := switchTo(to); err != nil {
					_ = sc.WriteError(err)
					break
				}
				continue
			}
		}
		if err != nil {
			if p.closing() {
				err = fmt.Errorf("the agent of node %s is shutting down: the program on %s gets SIGHUP", p.a.id.Node, node)
			} else {
				err = fmt.Errorf("lost the connection to node %s, where the program runs: %w", node, err)
			}
			_ = sc.WriteError(err)
			break
		}
		if f.Type == stream.Moved {
			var mi stream.MovedInfo
			if json.Unmarshal(f.Payload, &mi) != nil || mi.Node == "" {
				_ = sc.WriteError(fmt.Errorf("node %s sent a bad moved frame", node))
				break
			}
			gid = mi.GID
			if err := switchTo(mi.Node); err != nil {
				_ = sc.WriteError(err)
				break
			}
			continue
		}
		if f.Type != stream.Stdout && f.Type != stream.Stderr && f.Type != stream.Exit && f.Type != stream.Error {
			_ = sc.WriteError(fmt.Errorf("node %s sent an unexpected %s frame", node, f.Type))
			break
		}
		if sc.Write(f.Type, f.Payload) != nil || f.Type == stream.Exit || f.Type == stream.Error {
			break
		}
	}
	if rc != nil {
		rc.Close()
	}
	// Linger until the caller, having read the last frame, closes
	// (bounded), then end the reader above.
	select {
	case <-upDone:
	case <-time.After(drainTimeout):
	case <-p.ctx.Done():
	}
	sc.Close()
	<-upDone
	if rc != nil {
		p.untrack(rc)
	}
}

// movedElsewhere returns the node other than lost where the program gid
// now runs after a migration, if a member says so, or "".
func (p *procState) movedElsewhere(gid, lost string) string {
	if gid == "" {
		return ""
	}
	ctx, cancel := context.WithTimeout(p.ctx, 2*p.a.cfg.PeerTimeout)
	defer cancel()
	for _, pi := range p.list(ctx).Procs {
		if pi.GID == gid && pi.Node != lost && pi.State == manager.StateRunning && strings.Contains(pi.Note, "migrated from") {
			return pi.Node
		}
	}
	return ""
}

// dial opens a stream connection to a member's agent: mutual TLS, ALPN
// stream.ALPN, the peer's certificate must name the member. TCP keepalive
// notices a node that vanished while a program streams.
func (p *procState) dial(m membership.Member) (net.Conn, error) {
	if m.FabricAddr == "" {
		return nil, errors.New("no fabric address known")
	}
	cfg := p.a.id.ClientTLS()
	cfg.NextProtos = []string{stream.ALPN}
	d := tls.Dialer{
		NetDialer: &net.Dialer{Timeout: p.a.cfg.PeerTimeout,
			KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 5 * time.Second, Interval: 5 * time.Second, Count: 3}},
		Config: cfg,
	}
	ctx, cancel := context.WithTimeout(p.ctx, 2*p.a.cfg.PeerTimeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", m.FabricAddr)
	if err != nil {
		return nil, err
	}
	cs := c.(*tls.Conn).ConnectionState()
	if cs.NegotiatedProtocol != stream.ALPN {
		c.Close()
		return nil, errors.New("its agent does not serve processes (an older onebox?)")
	}
	if got := pki.PeerName(cs); got != m.Name {
		c.Close()
		return nil, fmt.Errorf("the node at %s is %q, not %s", m.FabricAddr, got, m.Name)
	}
	return c, nil
}
