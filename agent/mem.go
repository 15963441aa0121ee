package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/memory/cluster"
	"github.com/onebox-project/onebox/memory/pageproto"
	"github.com/onebox-project/onebox/memory/pageserver"
	"github.com/onebox-project/onebox/memory/pool"
)

// Memory pool (issue 3): the RAM this node donates (Config.DonateMemory),
// served to other nodes' pagers over the page protocol (ALPN
// onebox-page/1, mutual TLS), and the replicated pool this node's own
// pager stores pages in (memory/cluster). See docs/memory-pool.md.

// DefaultMemoryReplicas is how many copies of each pool page are kept.
const DefaultMemoryReplicas = 2

// MemoryConfig configures the memory pool. Embedded in Config (the
// donation itself is Config.DonateMemory).
type MemoryConfig struct {
	// MemoryReplicas is how many copies of each page the pool keeps, on
	// as many different nodes (default 2).
	MemoryReplicas int `json:"memory_replicas"`
}

func (c *MemoryConfig) validate() error {
	if c.MemoryReplicas == 0 {
		c.MemoryReplicas = DefaultMemoryReplicas
	}
	if c.MemoryReplicas < 1 || c.MemoryReplicas > 8 {
		return fmt.Errorf("--memory-replicas %d: want 1 to 8 copies", c.MemoryReplicas)
	}
	return nil
}

type memState struct {
	srv  *pageserver.Server
	pool *cluster.Pool

	served *prometheus.CounterVec
	stop   chan struct{}
	done   chan struct{}
}

func (a *Agent) startMem(_ context.Context) error {
	st := &memState{
		srv: pageserver.New(uint64(a.cfg.DonateMemory), a.log),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_pool_page_requests_total", Help: "Page protocol requests served to members, by op and status (ok, full, bad_frame, closing).",
		}, []string{"op", "status"}),
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	st.srv.Observe = func(op pageproto.Op, s pageproto.Status) { st.served.WithLabelValues(op.String(), s.String()).Inc() }
	p, err := cluster.New(cluster.Options{
		Self: a.id.Node, Replicas: a.cfg.MemoryReplicas,
		Dial: a.pageDial, Members: a.poolMembers, Logger: a.log,
	})
	if err != nil {
		return fmt.Errorf("agent: memory pool: %w", err)
	}
	st.pool = p
	a.metrics.reg.MustRegister(st.served, &memCollector{a: a})
	a.mem = st
	a.mux.Handle(pki.ProtoPage, st.srv.ServeConn)
	go a.memJanitor(st)
	return nil
}

// closeMem stops the pool client (its repair loop and connections), then
// the page server (other nodes' copies here are gone with this process).
func (a *Agent) closeMem() error {
	st := a.mem
	if st == nil {
		return nil
	}
	close(st.stop)
	<-st.done
	return errors.Join(st.pool.Close(), st.srv.Close())
}

// memPool is the cluster memory pool for this node's pager (nil before
// startMem). Regions' owners must be unique in the cluster: start them
// with this node's name.
func (a *Agent) memPool() pool.Pages {
	if a.mem == nil {
		return nil
	}
	return a.mem.pool
}

// memUsed is the bytes of other nodes' pages held here.
func (a *Agent) memUsed() uint64 {
	if a.mem == nil {
		return 0
	}
	return a.mem.srv.Stat().Used
}

// memJanitor forgets the pages of nodes that left the cluster for good,
// or that membership no longer lists at all (reaped after failing); a
// failed node may come back, so its pages are kept until then.
func (a *Agent) memJanitor(st *memState) {
	defer close(st.done)
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	// Greet the members each tick: a member this node has no connection
	// to yet (it just joined, or this node restarted, or they were apart)
	// gets a hello, and drops what a previous run of this node stored
	// there. Members already connected cost nothing.
	// A node that just joined may store here before gossip lists it:
	// unlisted peers are dropped only after 3 ticks in a row.
	unlisted := map[string]int{}
	for {
		select {
		case <-st.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st.pool.Greet(ctx)
		cancel()
		status := map[string]membership.Status{}
		for _, m := range a.members.Members() {
			status[m.Name] = m.Status
		}
		for _, peer := range st.srv.Peers() {
			s, listed := status[peer]
			if listed {
				delete(unlisted, peer)
			} else if unlisted[peer]++; unlisted[peer] < 3 {
				continue
			}
			if !listed || s == membership.StatusLeft {
				delete(unlisted, peer)
				a.log.Info("memory pool: dropping the pages of a node that left", "node", peer)
				st.srv.DropPeer(peer)
			}
		}
	}
}

// poolMembers is the membership as the pool sees it: alive (or suspect)
// nodes may hold pages; failed, leaving and left ones may not.
func (a *Agent) poolMembers() []cluster.Member {
	ms := a.members.Members()
	out := make([]cluster.Member, 0, len(ms))
	for _, m := range ms {
		out = append(out, cluster.Member{Name: m.Name, Alive: (m.Status == membership.StatusAlive || m.Status == membership.StatusSuspect) && m.FabricAddr != ""})
	}
	return out
}

// pageDial dials node's fabric port with ALPN onebox-page/1 and checks the
// certificate names that node.
func (a *Agent) pageDial(ctx context.Context, node string) (net.Conn, error) {
	var addr string
	for _, m := range a.members.Members() {
		if m.Name == node {
			addr = m.FabricAddr
		}
	}
	if addr == "" {
		return nil, fmt.Errorf("memory pool: node %s is not a member", node)
	}
	cfg := a.id.ClientTLS()
	cfg.NextProtos = []string{pki.ProtoPage}
	d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{KeepAliveConfig: net.KeepAliveConfig{
		Enable: true, Idle: 5 * time.Second, Interval: 2 * time.Second, Count: 3}}}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	cs := c.(*tls.Conn).ConnectionState()
	if cs.NegotiatedProtocol != pki.ProtoPage {
		c.Close()
		return nil, fmt.Errorf("memory pool: %s does not serve %s (an older agent?)", node, pki.ProtoPage)
	}
	if got := pki.PeerName(cs); got != node {
		c.Close()
		return nil, fmt.Errorf("memory pool: %s presented the certificate of %q", addr, got)
	}
	return c, nil
}

// memSelf is this node's part of 'onebox mem'.
func (a *Agent) memSelf() api.MemNode {
	n := api.MemNode{Name: a.id.Node, Status: string(membership.StatusAlive), DonatedBytes: uint64(a.cfg.DonateMemory),
		Replicas: a.cfg.MemoryReplicas, Pager: a.pagerStats()}
	if a.mem == nil {
		return n
	}
	s := a.mem.srv.Stat()
	n.UsedBytes, n.ReservedBytes = s.Used, s.Reserved
	ps := a.mem.pool.Stats()
	n.OwnedPages, n.UnderReplicatedPages, n.LostPages, n.RepairedBytes = ps.Pages, ps.UnderReplicatedPages, ps.LostPages, ps.RepairedBytes
	n.Placed = ps.NodeBytes
	return n
}

// memCluster asks every live member for its part, in parallel (bounded by
// PeerTimeout), like Nodes does.
func (a *Agent) memCluster(ctx context.Context) api.MemResponse {
	members := a.members.Members()
	nodes := make([]api.MemNode, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		switch {
		case m.Name == a.id.Node:
			nodes[i] = a.memSelf()
			continue
		case m.Status != membership.StatusAlive || m.FabricAddr == "":
			nodes[i] = api.MemNode{Name: m.Name, Status: string(m.Status)}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := a.fetchMemSelf(ctx, m)
			if err != nil {
				n = api.MemNode{Name: m.Name, Status: string(membership.StatusSuspect), Error: err.Error()}
			}
			nodes[i] = n
		}()
	}
	wg.Wait()
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	return api.MemOf(a.id.Node, a.cfg.MemoryReplicas, nodes)
}

func (a *Agent) fetchMemSelf(ctx context.Context, m membership.Member) (api.MemNode, error) {
	var n api.MemNode
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+m.FabricAddr+api.PathMemSelf, nil)
	if err != nil {
		return n, err
	}
	resp, err := a.peers.hc.Do(req)
	if err != nil {
		return n, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return n, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	if resp.TLS == nil || pki.PeerName(*resp.TLS) != m.Name {
		return n, fmt.Errorf("the node at %s is not %s", m.FabricAddr, m.Name)
	}
	if err := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 1<<20)).Decode(&n); err != nil {
		return n, fmt.Errorf("decode: %w", err)
	}
	n.Status = string(m.Status)
	return n, nil
}

func (a *Agent) memRoutes(mux *http.ServeMux, side string) {
	mux.HandleFunc("GET "+api.PathMem, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		replyJSON(w, http.StatusOK, a.memCluster(r.Context()))
		a.metrics.observeRequest(side, "mem", http.StatusOK, time.Since(start))
	})
	mux.HandleFunc("GET "+api.PathMemSelf, func(w http.ResponseWriter, _ *http.Request) {
		start := time.Now()
		replyJSON(w, http.StatusOK, a.memSelf())
		a.metrics.observeRequest(side, "mem_self", http.StatusOK, time.Since(start))
	})
	if side != "local" {
		return // the probe writes to the pool: this node's operator only
	}
	mux.HandleFunc("POST "+api.PathMemProbe, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var req api.MemProbe
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
			replyJSON(w, http.StatusBadRequest, api.ErrorBody{Error: "bad probe request: " + err.Error()})
			return
		}
		code, v := a.memProbe(r.Context(), req)
		replyJSON(w, code, v)
		a.metrics.observeRequest(side, "mem_probe", code, time.Since(start))
	})
}

// maxProbe bounds what one probe may write.
const maxProbe = 4 << 30

// memProbe writes a known pattern into the pool, reads it back and
// checks it, drops it, or reserves capacity, under an owner named after
// this node: an operator's check that the pool works end to end (and the
// integration tests' way in).
func (a *Agent) memProbe(ctx context.Context, req api.MemProbe) (int, any) {
	if a.mem == nil {
		return http.StatusServiceUnavailable, api.ErrorBody{Error: "the agent is starting: try again"}
	}
	if req.Size%pool.PageSize != 0 || req.Size > maxProbe || (req.Size == 0 && req.Op != "drop") {
		return http.StatusBadRequest, api.ErrorBody{Error: fmt.Sprintf("size %d: want a whole number of 4 KiB pages, up to %d", req.Size, maxProbe)}
	}
	if req.Name == "" || strings.ContainsAny(req.Name, "/\x00") || len(req.Name) > 64 {
		return http.StatusBadRequest, api.ErrorBody{Error: "name: want 1 to 64 characters, no '/'"}
	}
	p := a.mem.pool
	owner := a.id.Node + "/probe-" + req.Name
	r := pool.Region{Owner: owner, ID: 1}
	start := time.Now()
	res := api.MemProbeResult{Op: req.Op, Owner: owner, Bytes: req.Size}
	var err error
	switch req.Op {
	case "store", "verify":
		const batch = 256 << 10
		buf := make([]byte, batch)
		want := make([]byte, batch)
		for off := uint64(0); off < req.Size && err == nil; off += batch {
			n := min(batch, req.Size-off)
			probePattern(want[:n], req.Seed, off)
			if req.Op == "store" {
				err = p.Store(ctx, r, off, want[:n])
				continue
			}
			if err = p.Load(ctx, r, off, buf[:n]); err == nil && string(buf[:n]) != string(want[:n]) {
				err = fmt.Errorf("memory pool: wrong bytes read back in the 256 KiB at offset %d", off)
			}
		}
	case "drop":
		err = p.DropOwner(ctx, owner)
	case "reserve":
		err = p.Reserve(ctx, owner, req.Size)
	case "release":
		p.Release(owner, req.Size)
	default:
		return http.StatusBadRequest, api.ErrorBody{Error: fmt.Sprintf("op %q: want store, verify, drop, reserve or release", req.Op)}
	}
	res.Seconds = time.Since(start).Seconds()
	if err != nil {
		res.Error = err.Error()
		res.Full = errors.Is(err, pool.ErrFull)
		return http.StatusOK, res
	}
	return http.StatusOK, res
}

// probePattern fills b with bytes that depend on seed and each page's
// offset, so a page read from the wrong place is caught.
func probePattern(b []byte, seed, off uint64) {
	for i := 0; i < len(b); i += pool.PageSize {
		r := rand.New(rand.NewPCG(seed, off+uint64(i)))
		for j := i; j < i+pool.PageSize; j += 8 {
			v := r.Uint64()
			for k := range 8 {
				b[j+k] = byte(v >> (8 * k))
			}
		}
	}
}

// memCollector reads the pool's account at scrape time.
type memCollector struct{ a *Agent }

var (
	descPoolUnder    = prometheus.NewDesc("onebox_pool_under_replicated_pages", "Pages of this node's programs with fewer copies than memory_replicas.", nil, nil)
	descPoolLost     = prometheus.NewDesc("onebox_pool_lost_pages", "Pages of this node's programs with no copy left.", nil, nil)
	descPoolRepaired = prometheus.NewDesc("onebox_pool_repaired_bytes_total", "Bytes re-replicated after node losses.", nil, nil)
	descPoolOwned    = prometheus.NewDesc("onebox_pool_owned_pages", "Pages of this node's programs held in the pool (one copy counted).", nil, nil)
	descPoolReserved = prometheus.NewDesc("onebox_pool_reserved_bytes", "Bytes of this node's donation reserved by owners.", nil, nil)
	descPoolHedged   = prometheus.NewDesc("onebox_pool_hedged_loads_total", "Loads asked of a second holder because the first was slow; won: the second answered first.", []string{"result"}, nil)
	descPoolFailover = prometheus.NewDesc("onebox_pool_load_failovers_total", "Loads whose first holder failed (an error or a timeout) before another was asked.", nil, nil)
	descPoolReclaim  = prometheus.NewDesc("onebox_pool_reclaimed_chunks_total", "Stale chunk copies dropped from nodes that came back after being passed over.", nil, nil)
)

func (c *memCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPoolUnder, descPoolLost, descPoolRepaired, descPoolOwned, descPoolReserved, descPoolHedged, descPoolFailover, descPoolReclaim} {
		ch <- d
	}
}

func (c *memCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.a.mem
	if st == nil {
		return
	}
	ps := st.pool.Stats()
	ch <- prometheus.MustNewConstMetric(descPoolUnder, prometheus.GaugeValue, float64(ps.UnderReplicatedPages))
	ch <- prometheus.MustNewConstMetric(descPoolLost, prometheus.GaugeValue, float64(ps.LostPages))
	ch <- prometheus.MustNewConstMetric(descPoolRepaired, prometheus.CounterValue, float64(ps.RepairedBytes))
	ch <- prometheus.MustNewConstMetric(descPoolOwned, prometheus.GaugeValue, float64(ps.Pages))
	ch <- prometheus.MustNewConstMetric(descPoolReserved, prometheus.GaugeValue, float64(st.srv.Stat().Reserved))
	ch <- prometheus.MustNewConstMetric(descPoolHedged, prometheus.CounterValue, float64(ps.HedgeWins), "won")
	ch <- prometheus.MustNewConstMetric(descPoolHedged, prometheus.CounterValue, float64(ps.HedgedLoads-min(ps.HedgedLoads, ps.HedgeWins)), "lost")
	ch <- prometheus.MustNewConstMetric(descPoolFailover, prometheus.CounterValue, float64(ps.LoadFailovers))
	ch <- prometheus.MustNewConstMetric(descPoolReclaim, prometheus.CounterValue, float64(ps.ReclaimedChunks))
}
