package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	loadbal "github.com/onebox-project/onebox/proc/balance"
	"github.com/onebox-project/onebox/proc/manager"
)

// Load balancing and drain (issue 4).
//
// Every agent runs a balancer (proc/balance) for the processes it runs:
// it samples their runnable threads every second, and every 2 s, if the
// node is overloaded, asks up to maxBalancePeers other alive, schedulable
// members for their load (GET /v1/balance?scope=node over mutual TLS) and
// may move one process by migration. There is no leader; a node moves one
// process at a time. Load is only that of onebox-managed processes: the
// load average would count every program of the machine (and of every
// node of a test cluster sharing one machine) and react in minutes.
//
// Cordon state belongs to the node: 'onebox drain NODE' and 'onebox
// cordon NODE' are forwarded to NODE's agent, which keeps the mark in
// DATA_DIR/cordoned (so it survives restarts) and gossips it as the tag
// membership.TagCordon, so every member sees it without asking ('onebox
// nodes' shows it; run --best and the balancers skip the node). A drain is
// run by the drained node itself: it moves its processes one by one to the
// least loaded schedulable nodes.

// BalanceConfig configures the load balancer. Embedded in Config.
type BalanceConfig struct {
	// NoBalance: this agent never moves processes by itself (it still
	// reports its load, takes processes from others and drains).
	NoBalance bool `json:"no_balance"`
	// BalanceThreshold is the least difference of load per CPU (runnable
	// threads of onebox processes per CPU) between this node and another
	// for a move. Default 0.5.
	BalanceThreshold float64 `json:"balance_threshold"`
	// BalanceInterval is the time between decisions (flags only). Default 2s.
	BalanceInterval time.Duration `json:"-"`
	// BalanceCooldown: a process that arrived by migration, or whose move
	// failed, stays at least this long (flags only). Default 30s.
	BalanceCooldown time.Duration `json:"-"`
}

func (c *BalanceConfig) balanceConfig() loadbal.Config {
	return loadbal.Config{Threshold: c.BalanceThreshold, Interval: c.BalanceInterval, Cooldown: c.BalanceCooldown}.WithDefaults()
}

func (c *BalanceConfig) validate() error {
	if c.BalanceThreshold < 0 || c.BalanceInterval < 0 || c.BalanceCooldown < 0 {
		return errors.New("--balance-threshold, --balance-interval and --balance-cooldown must not be negative")
	}
	return c.balanceConfig().Validate()
}

// API paths of the balancer.
const (
	pathBalance  = "/v1/balance"
	pathCordon   = "/v1/balance/cordon"
	pathUncordon = "/v1/balance/uncordon"
	pathDrain    = "/v1/balance/drain"
)

// Bounds.
const (
	maxBalancePeers     = 8                // peers asked for their load in one round
	DefaultDrainTimeout = 10 * time.Minute // a whole drain, unless the caller says otherwise
	maxDrainTimeout     = 24 * time.Hour
	cordonFile          = "cordoned" // in the data directory
)

// CordonResult answers cordon and uncordon.
type CordonResult struct {
	Node     string `json:"node"`
	Cordoned bool   `json:"cordoned"`
}

// DrainResult answers a drain: what moved where, and what is left with
// the reason.
type DrainResult struct {
	Node      string      `json:"node"`
	Cordoned  bool        `json:"cordoned"`
	Moved     []DrainProc `json:"moved"`
	Remaining []DrainProc `json:"remaining"`
}

// DrainProc is one process of a drain.
type DrainProc struct {
	GID     string   `json:"gid"`
	Command []string `json:"command"`
	To      string   `json:"to,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// balanceState is the agent's balancer, its cordon mark and its drains.
type balanceState struct {
	a      *Agent
	b      *loadbal.Balancer
	cancel context.CancelFunc
	done   chan struct{}
	moves  *prometheus.CounterVec

	drainMu  sync.Mutex // one drain at a time
	cordonMu sync.Mutex // one cordon change at a time (file, then gossip)

	mu       sync.Mutex
	cordoned bool // guarded by mu; what the file says
}

// balances maps an *Agent to its *balanceState, so the balancer's state
// needs no field in the Agent struct that other slices edit too.
var balances sync.Map

func (a *Agent) balanceState() *balanceState {
	v, ok := balances.Load(a)
	if !ok {
		return nil
	}
	return v.(*balanceState)
}

func (a *Agent) startBalance(_ context.Context) error {
	s := &balanceState{a: a, done: make(chan struct{}),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "onebox_balance_migrations_total", Help: "Processes this node moved away, by why (balance, drain) and result (ok, error).",
		}, []string{"why", "result"})}
	if _, err := os.Stat(filepath.Join(a.cfg.DataDir, cordonFile)); err == nil {
		s.cordoned = true
		if err := a.members.SetTag(membership.TagCordon, "1"); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		a.log.Info("this node is cordoned: it takes no new or moved processes ('onebox uncordon " + a.id.Node + "' ends that)")
	}
	cfg := a.cfg.balanceConfig()
	s.b = loadbal.New(cfg, loadbal.Env{
		Node:    a.id.Node,
		Sample:  s.sample,
		Peers:   func(ctx context.Context) []loadbal.PeerLoad { return s.peerLoads(ctx, maxBalancePeers) },
		Migrate: s.migrate,
		Enabled: func() bool { return !a.cfg.NoBalance },
		Logger:  a.log.With("component", "balance"),
	})
	a.metrics.reg.MustRegister(s.moves,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "onebox_balance_load", Help: "Smoothed runnable threads of this node's onebox processes (the balancer's load)."},
			func() float64 { return s.b.Self().Load }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "onebox_node_cordoned", Help: "1 if this node takes no new or moved processes (onebox drain/cordon)."},
			func() float64 {
				if s.isCordoned() {
					return 1
				}
				return 0
			}))
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	balances.Store(a, s)
	go func() {
		defer close(s.done)
		s.b.Run(ctx)
	}()
	if a.cfg.NoBalance {
		a.log.Info("load balancing is off on this node (--no-balance): it measures its load but moves nothing by itself")
	}
	return nil
}

// closeBalance stops the balancer; a migration in progress is cancelled
// (a failed migration leaves the process where it was).
func (a *Agent) closeBalance() error {
	s := a.balanceState()
	if s == nil {
		return nil
	}
	s.cancel()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		a.log.Warn("balance: a migration was still running at shutdown")
	}
	balances.Delete(a)
	return nil
}

// schedulable reports whether new and moved processes may be placed on
// node (false for a drained, cordoned node). This node's own mark is
// known at once; other nodes' come by gossip.
func (a *Agent) schedulable(node string) bool {
	if s := a.balanceState(); s != nil && node == a.id.Node {
		return !s.isCordoned()
	}
	if a.members == nil {
		return true
	}
	for _, m := range a.members.Members() {
		if m.Name == node {
			return !m.Cordoned
		}
	}
	return true
}

func (s *balanceState) isCordoned() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cordoned
}

// setCordon marks or unmarks this node: the file first (the truth across
// restarts, and what this node goes by at once), then the gossip tag.
// The tag's broadcast may take seconds on a busy node: s.mu is not held
// meanwhile, so placement and metrics are not held up.
func (s *balanceState) setCordon(on bool) error {
	s.cordonMu.Lock()
	defer s.cordonMu.Unlock()
	p := filepath.Join(s.a.cfg.DataDir, cordonFile)
	if on {
		tmp := p + ".tmp"
		b, _ := json.Marshal(map[string]time.Time{"since": time.Now().UTC()})
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			return fmt.Errorf("keep the cordon mark: %w", err)
		}
		if err := os.Rename(tmp, p); err != nil {
			return fmt.Errorf("keep the cordon mark: %w", err)
		}
	} else if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the cordon mark: %w", err)
	}
	s.mu.Lock()
	changed := s.cordoned != on
	s.cordoned = on
	s.mu.Unlock()
	if changed {
		s.a.log.Info("cordon changed", "cordoned", on)
	}
	val := ""
	if on {
		val = "1"
	}
	return s.a.members.SetTag(membership.TagCordon, val)
}

// sample reads this node's running onebox processes: the runnable
// threads of each one's process group, from /proc.
func (s *balanceState) sample() (int, []loadbal.Sample, error) {
	s.a.resMu.Lock()
	cpus := s.a.res.CPUs
	s.a.resMu.Unlock()
	if s.a.proc == nil {
		return cpus, nil, nil
	}
	byGroup := map[int]*loadbal.Sample{}
	var out []*loadbal.Sample
	for _, i := range s.a.proc.mgr.List() {
		if i.State != manager.StateRunning {
			continue
		}
		smp := &loadbal.Sample{GID: i.GID, RSS: i.RSSBytes, Started: i.Started, Balance: i.Balance,
			Arrived: strings.Contains(i.Note, "migrated")}
		byGroup[i.PID] = smp // programs lead their own process group
		out = append(out, smp)
	}
	if len(out) > 0 {
		if err := countRunnable(byGroup); err != nil {
			return 0, nil, err
		}
	}
	samples := make([]loadbal.Sample, len(out))
	for k, p := range out {
		samples[k] = *p
	}
	return cpus, samples, nil
}

// countRunnable adds to each sample the threads in state R of the
// processes of its group (byGroup is keyed by the program's PID, which is
// its group's id).
func countRunnable(byGroup map[int]*loadbal.Sample) error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone meanwhile
		}
		st, err := loadbal.ParseStat(string(b))
		if err != nil {
			continue
		}
		smp := byGroup[st.PGID]
		if smp == nil {
			// A program restored by migration may not lead its group
			// as seen from here: count the program itself.
			if smp = byGroup[pid]; smp == nil {
				continue
			}
		}
		if st.Threads <= 1 {
			if st.State == 'R' {
				smp.Runnable++
			}
			continue
		}
		tasks, err := os.ReadDir("/proc/" + e.Name() + "/task")
		if err != nil {
			continue
		}
		for _, t := range tasks {
			b, err := os.ReadFile("/proc/" + e.Name() + "/task/" + t.Name() + "/stat")
			if err != nil {
				continue
			}
			if ts, err := loadbal.ParseStat(string(b)); err == nil && ts.State == 'R' {
				smp.Runnable++
			}
		}
	}
	return nil
}

func (s *balanceState) migrate(ctx context.Context, gid, to, reason string) error {
	why := "balance"
	if strings.HasPrefix(reason, "drain") {
		why = "drain"
	}
	err := s.a.proc.migrate(ctx, gid, to, reason)
	result := "ok"
	if err != nil {
		result = "error"
	}
	s.moves.WithLabelValues(why, result).Inc()
	return err
}

// report is this node's balancer state.
func (s *balanceState) report() loadbal.Report {
	r := s.b.Report()
	r.Cordoned = s.isCordoned()
	r.Balancing = !s.a.cfg.NoBalance
	return r
}

// targets are the alive, schedulable members other than this node, in
// random order, at most limit of them (0: all).
func (s *balanceState) targets(limit int) []membership.Member {
	var out []membership.Member
	for _, m := range s.a.members.Members() {
		if m.Name == s.a.id.Node || m.Status != membership.StatusAlive || m.Cordoned || m.FabricAddr == "" {
			continue
		}
		out = append(out, m)
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	if limit > 0 && len(out) > limit {
		out = out[:limit]
	}
	return out
}

// peerLoads asks (up to limit) alive, schedulable members for their load,
// in parallel, each bounded by PeerTimeout. Those that do not answer, or
// answer that they are cordoned, are left out.
func (s *balanceState) peerLoads(ctx context.Context, limit int) []loadbal.PeerLoad {
	ms := s.targets(limit)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var out []loadbal.PeerLoad
	for _, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := s.fetchReport(ctx, m)
			if err != nil {
				s.a.log.Debug("balance: no load from peer", "peer", m.Name, "err", err)
				return
			}
			if r.Cordoned {
				return
			}
			pl := loadbal.PeerLoad{NodeLoad: loadbal.NodeLoad{Name: r.Node, CPUs: r.CPUs, Load: r.Load}}
			for _, p := range r.Procs {
				pl.GIDs = append(pl.GIDs, p.GID)
			}
			mu.Lock()
			out = append(out, pl)
			mu.Unlock()
		}()
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// fetchReport asks one member for its balancer report over mutual TLS.
func (s *balanceState) fetchReport(ctx context.Context, m membership.Member) (loadbal.Report, error) {
	ctx, cancel := context.WithTimeout(ctx, s.a.cfg.PeerTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+m.FabricAddr+pathBalance+"?scope=node", nil)
	if err != nil {
		return loadbal.Report{}, err
	}
	resp, err := s.a.peers.hc.Do(req)
	if err != nil {
		return loadbal.Report{}, err
	}
	defer resp.Body.Close()
	if resp.TLS == nil || pki.PeerName(*resp.TLS) != m.Name {
		return loadbal.Report{}, fmt.Errorf("the node at %s is not %s", m.FabricAddr, m.Name)
	}
	if resp.StatusCode != http.StatusOK {
		return loadbal.Report{}, fmt.Errorf("HTTP %d (an agent without a balancer?)", resp.StatusCode)
	}
	r, err := loadbal.DecodeReport(resp.Body)
	if err != nil {
		return r, err
	}
	if r.Node != m.Name {
		return loadbal.Report{}, fmt.Errorf("node %s reports the load of %q", m.Name, r.Node)
	}
	return r, nil
}

// drain cordons this node and moves every running process off it, one at
// a time, each to the least loaded schedulable node (counting what the
// drain already sent there). Processes that cannot move are listed with
// the reason.
func (s *balanceState) drain(ctx context.Context) (DrainResult, error) {
	self := s.a.id.Node
	if !s.drainMu.TryLock() {
		return DrainResult{}, &peerError{code: http.StatusConflict, msg: "a drain of " + self + " is already running"}
	}
	defer s.drainMu.Unlock()
	if err := s.setCordon(true); err != nil {
		return DrainResult{}, err
	}
	res := DrainResult{Node: self, Cordoned: true, Moved: []DrainProc{}, Remaining: []DrainProc{}}
	loads := s.peerLoads(ctx, 0)
	added := map[string]float64{}
	pick := func() string {
		best, bestPer := "", math.Inf(1)
		for _, l := range loads {
			if l.CPUs <= 0 || !s.a.schedulable(l.Name) {
				continue
			}
			if per := (l.Load + added[l.Name]) / float64(l.CPUs); per < bestPer {
				best, bestPer = l.Name, per
			}
		}
		return best
	}
	tried := map[string]bool{}
	// A program started here while the mark spread is caught by a second
	// pass; the passes are bounded.
	for range 3 {
		var todo []manager.Info
		for _, i := range s.a.proc.mgr.List() {
			if i.State == manager.StateRunning && !tried[i.GID] {
				todo = append(todo, i)
			}
		}
		if len(todo) == 0 {
			break
		}
		for _, i := range todo {
			tried[i.GID] = true
			dp := DrainProc{GID: i.GID, Command: i.Command}
			if err := ctx.Err(); err != nil {
				dp.Error = "the drain ran out of time before this process (" + err.Error() + ")"
				res.Remaining = append(res.Remaining, dp)
				continue
			}
			to := pick()
			if to == "" {
				dp.Error = "no other node is alive, schedulable and answering ('onebox nodes'; 'onebox uncordon NODE' or add a node)"
				res.Remaining = append(res.Remaining, dp)
				continue
			}
			d := s.b.Demand(i.GID)
			err := s.b.Migrate(ctx, i.GID, to, "drain: "+self+" drained")
			if err != nil {
				if p, ok := s.a.proc.mgr.Get(i.GID); ok && !ended(p) {
					dp.To, dp.Error = to, err.Error()
					res.Remaining = append(res.Remaining, dp)
				}
				continue
			}
			added[to] += d
			dp.To = to
			res.Moved = append(res.Moved, dp)
		}
	}
	return res, nil
}

func ended(p *manager.Proc) bool {
	select {
	case <-p.Done():
		return true
	default:
		return false
	}
}

// balanceRoutes registers the balancer's endpoints. The handlers find the
// balancer's state at request time (they are built before it starts).
func (a *Agent) balanceRoutes(mux *http.ServeMux, side string) {
	ready := func(w http.ResponseWriter) *balanceState {
		s := a.balanceState()
		if s == nil {
			replyJSON(w, http.StatusServiceUnavailable, api.ErrorBody{Error: "the agent is starting: try again"})
		}
		return s
	}
	mux.HandleFunc("GET "+pathBalance, func(w http.ResponseWriter, r *http.Request) {
		s := ready(w)
		if s == nil {
			return
		}
		start := time.Now()
		var v any
		if r.URL.Query().Get("scope") == "node" {
			v = s.report()
		} else {
			v = s.clusterReport(r.Context())
		}
		replyJSON(w, http.StatusOK, v)
		a.metrics.observeRequest(side, "balance", http.StatusOK, time.Since(start))
	})
	cordon := func(on bool, name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			s := ready(w)
			if s == nil {
				return
			}
			start := time.Now()
			code, v := s.forward(r, name, 2*a.cfg.PeerTimeout, func(context.Context) (any, error) {
				if err := s.setCordon(on); err != nil {
					return nil, err
				}
				return CordonResult{Node: a.id.Node, Cordoned: on}, nil
			}, func() any { return &CordonResult{} })
			replyJSON(w, code, v)
			a.metrics.observeRequest(side, name, code, time.Since(start))
		}
	}
	mux.HandleFunc("POST "+pathCordon, cordon(true, "cordon"))
	mux.HandleFunc("POST "+pathUncordon, cordon(false, "uncordon"))
	mux.HandleFunc("POST "+pathDrain, func(w http.ResponseWriter, r *http.Request) {
		s := ready(w)
		if s == nil {
			return
		}
		start := time.Now()
		timeout := DefaultDrainTimeout
		if t := r.URL.Query().Get("timeout"); t != "" {
			d, err := time.ParseDuration(t)
			if err != nil || d < time.Second || d > maxDrainTimeout {
				replyJSON(w, http.StatusBadRequest, api.ErrorBody{Error: fmt.Sprintf("timeout %q: want a duration between 1s and 24h, e.g. 10m", t)})
				return
			}
			timeout = d
		}
		// The forwarding side waits a little longer than the drain, so
		// the drained node's answer (with what remains) arrives.
		code, v := s.forward(r, "drain", timeout+5*time.Second, func(ctx context.Context) (any, error) {
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			return s.drain(ctx)
		}, func() any { return &DrainResult{} })
		replyJSON(w, code, v)
		a.metrics.observeRequest(side, "drain", code, time.Since(start))
	})
}

// forward runs a node-addressed request (?node=NAME): here if NAME is this
// node, else on NAME's agent over mutual TLS (bounded by timeout). local
// is the work; answer makes the value a forwarded answer decodes into.
func (s *balanceState) forward(r *http.Request, verb string, timeout time.Duration, local func(context.Context) (any, error), answer func() any) (int, any) {
	fail := func(code int, format string, args ...any) (int, any) {
		return code, api.ErrorBody{Error: fmt.Sprintf(format, args...)}
	}
	q := r.URL.Query()
	node := q.Get("node")
	if err := pki.ValidNodeName(node); err != nil {
		return fail(http.StatusBadRequest, "%s: %v", verb, err)
	}
	self := s.a.id.Node
	if node == self {
		v, err := local(r.Context())
		if err != nil {
			var pe *peerError
			if errors.As(err, &pe) {
				return fail(pe.code, "%s", pe.msg)
			}
			return fail(http.StatusInternalServerError, "%s %s: %v", verb, node, err)
		}
		return http.StatusOK, v
	}
	if q.Get("scope") == "node" {
		return fail(http.StatusBadRequest, "this is node %s, not %s", self, node)
	}
	m, ok := s.a.proc.member(node)
	if !ok {
		return fail(http.StatusNotFound, "no node %q in the cluster ('onebox nodes' lists them)", node)
	}
	if m.Status != membership.StatusAlive || m.FabricAddr == "" {
		return fail(http.StatusConflict, "node %s is %s: its agent must run to %s it (the mark is kept on the node itself)", node, m.Status, verb)
	}
	q.Set("scope", "node")
	v := answer()
	// Bounded by timeout, longer than PeerTimeout allows: a drain takes
	// as long as its migrations.
	if err := s.a.proc.peerCallTimeout(r.Context(), m, http.MethodPost, r.URL.Path+"?"+q.Encode(), timeout, v); err != nil {
		var pe *peerError
		if errors.As(err, &pe) {
			return fail(pe.code, "%s", pe.msg)
		}
		return fail(http.StatusBadGateway, "node %s did not answer the %s: %v", node, verb, err)
	}
	return http.StatusOK, v
}

// clusterReport asks every alive member for its balancer report.
func (s *balanceState) clusterReport(ctx context.Context) loadbal.ClusterReport {
	a := s.a
	out := loadbal.ClusterReport{Observer: a.id.Node, Nodes: []loadbal.Report{s.report()}}
	var mu sync.Mutex
	out.Unreachable = a.askPeers(func(m membership.Member) error {
		r, err := s.fetchReport(ctx, m)
		if err == nil {
			mu.Lock()
			out.Nodes = append(out.Nodes, r)
			mu.Unlock()
		}
		return err
	})
	sort.Slice(out.Nodes, func(i, j int) bool { return out.Nodes[i].Node < out.Nodes[j].Node })
	sort.Slice(out.Unreachable, func(i, j int) bool { return out.Unreachable[i].Node < out.Unreachable[j].Node })
	return out
}
