package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/internal/stdlog"
)

// handler serves the control API. side is "local" (unix socket) or
// "fabric" (mutual TLS; the handshake already proved membership).
func (a *Agent) handler(side string) http.Handler {
	mux := http.NewServeMux()
	route := func(pattern, name string, h func(*http.Request) any) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			code := http.StatusOK
			v := h(r)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(code)
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			_ = enc.Encode(v)
			a.metrics.observeRequest(side, name, code, time.Since(start))
		})
	}
	route("GET "+api.PathSelf, "self", func(*http.Request) any { return a.Self() })
	route("GET "+api.PathNodes, "nodes", func(r *http.Request) any { return a.Nodes(r.Context()) })
	route("GET "+api.PathStatus, "status", func(r *http.Request) any { return api.StatusOf(a.Nodes(r.Context())) })
	route("GET "+api.PathHealth, "health", func(*http.Request) any {
		return map[string]string{"status": "ok", "node": a.id.Node}
	})
	mux.Handle("GET "+api.PathMetrics, a.metrics.handler())
	a.procRoutes(mux, side)
	a.cfsRoutes(mux, side)
	a.memRoutes(mux, side)
	a.serviceRoutes(mux, side)
	a.balanceRoutes(mux, side)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(api.ErrorBody{Error: fmt.Sprintf("no such endpoint %s %s", r.Method, r.URL.Path)})
		a.metrics.observeRequest(side, "unknown", http.StatusNotFound, 0)
	})
	return mux
}

// Nodes builds the cluster view: the membership list from gossip, with each
// live node's details asked of it over mutual TLS in parallel (bounded by
// PeerTimeout), falling back to the last details known.
func (a *Agent) Nodes(ctx context.Context) api.NodesResponse {
	members := a.members.Members()
	nodes := make([]api.Node, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		nodes[i] = api.Node{Member: m}
		if m.Name == a.id.Node {
			self := a.Self()
			nodes[i].Info = &self
			continue
		}
		live := m.Status == membership.StatusAlive || m.Status == membership.StatusSuspect
		if !live || m.FabricAddr == "" {
			a.peers.fillCached(&nodes[i])
			continue
		}
		wg.Add(1)
		go func(n *api.Node) {
			defer wg.Done()
			a.peers.fill(ctx, n)
		}(&nodes[i])
	}
	wg.Wait()
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	return api.NodesResponse{ClusterID: a.id.ClusterID, Observer: a.id.Node, Nodes: nodes, Totals: api.Sum(nodes)}
}

// peerCache asks members for their details and remembers the last answer.
type peerCache struct {
	a  *Agent
	hc *http.Client

	mu   sync.Mutex
	last map[string]cachedInfo // by node name; guarded by mu
}

type cachedInfo struct {
	info api.NodeInfo
	at   time.Time
}

func newPeerCache(a *Agent) *peerCache {
	tr := &http.Transport{TLSClientConfig: a.id.ClientTLS(), MaxIdleConnsPerHost: 2, IdleConnTimeout: 30 * time.Second}
	return &peerCache{a: a, hc: &http.Client{Transport: tr, Timeout: a.cfg.PeerTimeout}, last: map[string]cachedInfo{}}
}

func (p *peerCache) fetch(ctx context.Context, fabricAddr string) (api.NodeInfo, error) {
	start := time.Now()
	var info api.NodeInfo
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+fabricAddr+api.PathSelf, nil)
	if err != nil {
		return info, err
	}
	info, err = p.do(req)
	result := "ok"
	if err != nil {
		result = "error"
	}
	p.a.metrics.peerFetch.WithLabelValues(result).Observe(time.Since(start).Seconds())
	return info, err
}

func (p *peerCache) do(req *http.Request) (api.NodeInfo, error) {
	var info api.NodeInfo
	resp, err := p.hc.Do(req)
	if err != nil {
		return info, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return info, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	if resp.TLS == nil || pki.PeerName(*resp.TLS) == "" {
		return info, fmt.Errorf("peer presented no certificate")
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 4<<20))
	if err := dec.Decode(&info); err != nil {
		return info, fmt.Errorf("decode peer details: %w", err)
	}
	if got := pki.PeerName(*resp.TLS); got != info.Name {
		return info, fmt.Errorf("peer certificate is for %q but it reports being %q", got, info.Name)
	}
	return info, nil
}

func (p *peerCache) fill(ctx context.Context, n *api.Node) {
	info, err := p.fetch(ctx, n.FabricAddr)
	if err == nil && info.Name != n.Name {
		err = fmt.Errorf("node at %s is %q, gossip says %q", n.FabricAddr, info.Name, n.Name)
	}
	if err != nil {
		// Gossip says alive but it does not answer us: suspect, as SWIM
		// would say, until gossip decides (failed) or it answers again.
		if n.Status == membership.StatusAlive {
			n.Status = membership.StatusSuspect
		}
		n.Error = err.Error()
		p.fillCached(n)
		return
	}
	p.mu.Lock()
	p.last[n.Name] = cachedInfo{info: info, at: time.Now()}
	p.mu.Unlock()
	n.Info = &info
}

// maxInfoAge is how long a node's last details stand in for it; older
// ones are dropped, so a long-gone node's resources stop being shown.
const maxInfoAge = 5 * time.Minute

func (p *peerCache) fillCached(n *api.Node) {
	p.mu.Lock()
	c, ok := p.last[n.Name]
	if ok && time.Since(c.at) > maxInfoAge {
		delete(p.last, n.Name)
		ok = false
	}
	p.mu.Unlock()
	if ok {
		info := c.info
		n.Info = &info
		n.Stale = true
		n.InfoAge = time.Since(c.at).Round(time.Second).String()
	}
}

// slogErrorLog routes net/http's internal errors (bad requests, TLS
// failures) to the structured log at debug level: garbage on a port is
// counted in metrics, not shouted in the log.
func slogErrorLog(l *slog.Logger) *log.Logger {
	return stdlog.New(l, stdlog.Options{Max: stdlog.Debug, Prefix: "http: "})
}

func umask(m int) int { return unix.Umask(m) }

// flock takes an exclusive, non-blocking lock on f (released when f closes
// or the process dies, so a killed agent never leaves a stale lock).
func flock(f *os.File) error { return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) }

// callMember makes one control-API request to member m over mutual TLS,
// bounded by timeout: body (if not nil) is sent as JSON, the answer is
// decoded into v. It checks the answer comes from m (the certificate's
// name), and turns an error answer into a *peerError with its status.
func (a *Agent) callMember(ctx context.Context, m membership.Member, method, path string, timeout time.Duration, body, v any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "https://"+m.FabricAddr+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	hc := &http.Client{Transport: a.peers.hc.Transport} // bounded by ctx, which may exceed PeerTimeout
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.TLS == nil || pki.PeerName(*resp.TLS) != m.Name {
		return fmt.Errorf("the node at %s is not %s", m.FabricAddr, m.Name)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var eb api.ErrorBody
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			return &peerError{code: resp.StatusCode, msg: eb.Error}
		}
		return &peerError{code: resp.StatusCode, msg: fmt.Sprintf("HTTP %d", resp.StatusCode)}
	}
	return json.Unmarshal(b, v)
}
