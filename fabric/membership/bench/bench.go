// Package bench measures how fast gossip membership converges at scale: forming, joining, failing and leaving.
//
// Every agent is an in-process membership.Membership (serf over memberlist,
// LAN profile, gossip encrypted with one shared key, as in production),
// bound to its own port on 127.0.0.1. For each cluster size N, Run
//
//   - form:  starts N members and has members 1..N-1 join member 0; it
//     measures from the first Join call until every member lists N alive
//     members;
//   - join:  starts one more member, joins it to member 0 and measures until
//     all N+1 list N+1 alive members;
//   - fail:  shuts one member down without leaving (a crash) and measures
//     until the first remaining member sees it suspect or failed
//     (FailFirst) and until every remaining member reports it failed
//     (FailAll);
//   - leave: has another member Leave and then Shutdown (as an agent
//     does) and measures from the Leave call until every remaining member
//     reports it left;
//
// then shuts everything down and waits for the goroutines and sockets to go
// away before the next size. Views are polled every 20 ms, so figures are
// accurate to about that much (plus the time one polling round takes).
//
// The failure figures are to be read against SWIM's promise as memberlist
// implements it: a node that misses a probe is suspected, and declared dead
// when its suspicion timer fires. That timer starts at
// SuspicionMaxTimeoutMult*min and shrinks towards
//
//	min = SuspicionMult * max(1, log10(max(1, n))) * ProbeInterval
//
// as other members independently confirm the suspicion (n is the number of
// nodes memberlist knows, N+1 at the moment of the crash). Result carries
// both bounds and FailAll as a multiple of min.
//
// Durations in JSON are nanoseconds, like every time.Duration in onebox's
// JSON.
package bench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/onebox-project/onebox/fabric/membership"
)

// Bounds and cadence of the measurements.
const (
	// PollInterval is the pause between two polling rounds over the
	// members' views.
	PollInterval = 20 * time.Millisecond
	// PhaseTimeout bounds every wait; a phase that takes longer is reported
	// as a timeout rather than hanging the run.
	PhaseTimeout = 120 * time.Second
	// shutdownTimeout bounds stopping all members of one size.
	shutdownTimeout = 30 * time.Second
	// drainTimeout bounds the wait for goroutines and sockets to go away.
	drainTimeout = 20 * time.Second
	// joinParallelism is how many Join calls run at once while forming:
	// agents of a real cluster start at about the same time, but not
	// all within the same millisecond.
	joinParallelism = 8
)

// Phase names, as used in Result.Timeouts.
const (
	PhaseForm      = "form"
	PhaseJoin      = "join"
	PhaseFailFirst = "fail-first"
	PhaseFailAll   = "fail-all"
	PhaseLeave     = "leave"
)

// Result is what one cluster size measured. A phase that timed out is
// listed in Timeouts and its duration is the bound it hit.
type Result struct {
	N         int           `json:"n"`
	Form      time.Duration `json:"form"`       // first Join call until all N list N alive
	Join      time.Duration `json:"join"`       // Join of member N+1 until all N+1 list N+1 alive
	FailFirst time.Duration `json:"fail_first"` // crash until the first member sees it suspect or failed
	FailAll   time.Duration `json:"fail_all"`   // crash until every remaining member sees it failed
	Leave     time.Duration `json:"leave"`      // Leave call until every remaining member sees it left

	// FormJoinCalls is how long the N-1 Join calls took (part of Form).
	FormJoinCalls time.Duration `json:"form_join_calls"`
	// ClusterAtFailure is how many nodes memberlist knew when the member
	// crashed (N+1); the suspicion bounds are computed for it.
	ClusterAtFailure int `json:"cluster_at_failure"`
	// SuspicionMin and SuspicionMax bound memberlist's suspicion timeout
	// for ClusterAtFailure nodes (see the package comment).
	SuspicionMin time.Duration `json:"suspicion_min"`
	SuspicionMax time.Duration `json:"suspicion_max"`
	// FailAllRatio is FailAll / SuspicionMin.
	FailAllRatio float64 `json:"fail_all_ratio"`
	// Confirmations is how many peer confirmations the first suspicion
	// timer to fire had (its timeout shrinks from SuspicionMax to
	// SuspicionMin with them); -1 if none fired (all learnt of the death
	// otherwise).
	Confirmations int `json:"confirmations"`

	// Timeouts lists the phases that hit PhaseTimeout.
	Timeouts []string `json:"timeouts,omitempty"`

	// Wall and CPU are the elapsed and process CPU (user+system) time of
	// the whole size, set-up and tear-down included; CPU/Wall is how many
	// cores the run kept busy.
	Wall time.Duration `json:"wall"`
	CPU  time.Duration `json:"cpu"`
	// Leftover is set if goroutines or file descriptors were still around
	// after tear-down (they are waited for up to 20 s).
	Leftover string `json:"leftover,omitempty"`
}

// TimedOut tells whether phase hit the bound.
func (r Result) TimedOut(phase string) bool {
	for _, p := range r.Timeouts {
		if p == phase {
			return true
		}
	}
	return false
}

// Profile is the part of a memberlist configuration that failure detection
// depends on.
type Profile struct {
	ProbeInterval           time.Duration
	ProbeTimeout            time.Duration
	GossipInterval          time.Duration
	SuspicionMult           int
	SuspicionMaxTimeoutMult int
}

// Baseline is memberlist's LAN profile, the one membership uses.
var Baseline = func() Profile {
	c := memberlist.DefaultLANConfig()
	return Profile{c.ProbeInterval, c.ProbeTimeout, c.GossipInterval, c.SuspicionMult, c.SuspicionMaxTimeoutMult}
}()

// SuspicionTimeout is memberlist's minimum and maximum suspicion timeout for
// a cluster of n nodes in the LAN profile: min = SuspicionMult *
// max(1, log10(max(1, n))) * ProbeInterval and max = SuspicionMaxTimeoutMult
// * min (the same arithmetic as memberlist's suspicionTimeout).
func SuspicionTimeout(n int) (lo, hi time.Duration) {
	scale := math.Max(1, math.Log10(math.Max(1, float64(n))))
	lo = time.Duration(Baseline.SuspicionMult) * time.Duration(scale*1000) * Baseline.ProbeInterval / 1000
	return lo, time.Duration(Baseline.SuspicionMaxTimeoutMult) * lo
}

// Run measures every size in turn. Progress lines go to progress (may be
// nil). It returns the results of the sizes measured so far; the error is
// set if a size could not be measured at all (members would not start) or
// ctx ended. Phases that time out do not make Run fail: they are marked in
// the Result.
func Run(ctx context.Context, sizes []int, progress io.Writer) ([]Result, error) {
	if progress == nil {
		progress = io.Discard
	}
	for _, n := range sizes {
		if n < 2 {
			return nil, fmt.Errorf("bench: cluster size %d: need at least 2", n)
		}
	}
	raiseFileLimit(progress)
	var out []Result
	for _, n := range sizes {
		r, err := runSize(ctx, n, progress)
		if err != nil {
			return out, fmt.Errorf("bench: N=%d: %w", n, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// raiseFileLimit lifts the soft open-files limit to the hard one: every
// member holds a UDP and a TCP socket plus short-lived TCP connections.
func raiseFileLimit(progress io.Writer) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if lim.Cur < lim.Max {
		old := lim.Cur
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
			fmt.Fprintf(progress, "bench: open files limit raised from %d to %d\n", old, lim.Cur)
		}
	}
}

type cluster struct {
	key    []byte
	logger *slog.Logger
	nodes  []*node
}

// suspectLog sees memberlist's own log of a failed probe. membership's
// Members() cannot show suspicion: memberlist's public Node.State is never
// filled in (the state lives in an unexported field that shadows it), so
// the status it reports for a suspect node is "alive". The prober's log line
// "Suspect X has failed, no acks received" is the first sign of a failure
// anywhere in the cluster (members that suspect X only from gossip learn it
// later), so its time is when the first member noticed.
type suspectLog struct {
	mu    sync.Mutex
	first map[string]time.Time
	// confirmations is, per node, how many peer confirmations the first
	// suspicion timer that fired had collected.
	confirmations map[string]int
}

const (
	suspectPrefix = "memberlist: Suspect "
	timeoutPrefix = "memberlist: Marking "
	timeoutInfix  = " as failed, suspect timeout reached ("
)

func (l *suspectLog) Enabled(_ context.Context, lvl slog.Level) bool { return lvl == slog.LevelInfo }
func (l *suspectLog) WithAttrs([]slog.Attr) slog.Handler             { return l }
func (l *suspectLog) WithGroup(string) slog.Handler                  { return l }

func (l *suspectLog) Handle(_ context.Context, r slog.Record) error {
	if rest, ok := strings.CutPrefix(r.Message, timeoutPrefix); ok {
		name, rest, ok := strings.Cut(rest, timeoutInfix)
		if !ok {
			return nil
		}
		k, err := strconv.Atoi(strings.TrimSuffix(rest, " peer confirmations)"))
		if err != nil {
			return nil
		}
		l.mu.Lock()
		if _, seen := l.confirmations[name]; !seen {
			l.confirmations[name] = k
		}
		l.mu.Unlock()
		return nil
	}
	rest, ok := strings.CutPrefix(r.Message, suspectPrefix)
	if !ok {
		return nil
	}
	name, _, ok := strings.Cut(rest, " has failed")
	if !ok {
		return nil
	}
	now := time.Now()
	l.mu.Lock()
	if _, seen := l.first[name]; !seen {
		l.first[name] = now
	}
	l.mu.Unlock()
	return nil
}

// firstSuspected is when a member first suspected name, zero if none did.
func (l *suspectLog) firstSuspected(name string) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first[name]
}

type node struct {
	name string
	m    *membership.Membership
	down bool // shut down (crashed or left)
}

func (c *cluster) start(name string) (*node, error) {
	m, err := membership.New(membership.Config{
		NodeName:      name,
		BindAddr:      "127.0.0.1",
		BindPort:      0,
		AdvertiseAddr: "127.0.0.1",
		GossipKey:     c.key,
		FabricAddr:    "127.0.0.1:1",
		ClusterID:     "abcd",
		Version:       "bench",
		Logger:        c.logger,
		// Retrying the crashed member is not what is measured; keep the
		// production default.
		Reconnect: 5 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	n := &node{name: name, m: m}
	c.nodes = append(c.nodes, n)
	return n, nil
}

func (c *cluster) live() []*node {
	var out []*node
	for _, n := range c.nodes {
		if !n.down {
			out = append(out, n)
		}
	}
	return out
}

// shutdown stops every member still running, all at once, bounded.
func (c *cluster) shutdown() error {
	var wg sync.WaitGroup
	for _, n := range c.live() {
		n.down = true
		wg.Add(1)
		go func(m *membership.Membership) {
			defer wg.Done()
			_ = m.Shutdown()
		}(n.m)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(shutdownTimeout):
		return fmt.Errorf("members still shutting down after %v", shutdownTimeout)
	}
}

func runSize(ctx context.Context, n int, progress io.Writer) (res Result, err error) {
	res.N = n
	logf := func(format string, a ...any) {
		fmt.Fprintf(progress, "bench: N=%d: "+format+"\n", append([]any{n}, a...)...)
	}
	baseG, baseFD := runtime.NumGoroutine(), openFDs()
	t0, cpu0 := time.Now(), cpuTime()

	sl := &suspectLog{first: map[string]time.Time{}, confirmations: map[string]int{}}
	c := &cluster{key: make([]byte, 32), logger: slog.New(sl)}
	if _, err := rand.Read(c.key); err != nil {
		return res, err
	}
	defer func() {
		if serr := c.shutdown(); serr != nil && err == nil {
			err = serr
		}
		res.Leftover = drain(baseG, baseFD)
		res.Wall, res.CPU = time.Since(t0), cpuTime()-cpu0
		if res.Leftover != "" {
			logf("after shutdown: %s", res.Leftover)
		}
		logf("done in %v (CPU %v, %.2f cores)", res.Wall.Round(time.Millisecond), res.CPU.Round(time.Millisecond), float64(res.CPU)/float64(res.Wall))
	}()

	// form
	for i := 0; i < n; i++ {
		if _, err := c.start(fmt.Sprintf("bench-%03d", i)); err != nil {
			return res, fmt.Errorf("start member %d: %w", i, err)
		}
	}
	seed := c.nodes[0].m.LocalAddr()
	logf("%d members started, joining them to %s", n, seed)
	start := time.Now()
	joinErr := joinAll(ctx, c.nodes[1:], seed, start.Add(PhaseTimeout))
	res.FormJoinCalls = time.Since(start)
	if joinErr != nil {
		return res, joinErr
	}
	var ok bool
	res.Form, ok, err = c.waitAll(ctx, PhaseForm, logf, start, c.nodes, func(ms []membership.Member) bool { return countAlive(ms) == n })
	if err != nil {
		return res, err
	}
	if !ok {
		res.Timeouts = append(res.Timeouts, PhaseForm)
	}
	logf("form: %v (join calls %v)", show(res.Form, ok), res.FormJoinCalls.Round(time.Millisecond))

	// join
	joiner, err := c.start(fmt.Sprintf("bench-%03d", n))
	if err != nil {
		return res, fmt.Errorf("start member %d: %w", n, err)
	}
	start = time.Now()
	if err := joinAll(ctx, []*node{joiner}, seed, start.Add(PhaseTimeout)); err != nil {
		return res, err
	}
	res.Join, ok, err = c.waitAll(ctx, PhaseJoin, logf, start, c.nodes, func(ms []membership.Member) bool { return countAlive(ms) == n+1 })
	if err != nil {
		return res, err
	}
	if !ok {
		res.Timeouts = append(res.Timeouts, PhaseJoin)
	}
	logf("join: %v", show(res.Join, ok))

	// failure: crash a member that is neither the seed nor the joiner.
	victim := c.nodes[n/2]
	res.ClusterAtFailure = len(c.nodes)
	res.SuspicionMin, res.SuspicionMax = SuspicionTimeout(res.ClusterAtFailure)
	start = time.Now()
	victim.down = true
	if err := victim.m.Shutdown(); err != nil {
		logf("shutdown of %s: %v", victim.name, err)
	}
	rest := c.live()
	var firstOK bool
	res.FailFirst, res.FailAll, firstOK, ok, err = waitFailed(ctx, start, rest, victim.name, sl)
	if err != nil {
		return res, err
	}
	if !firstOK {
		res.Timeouts = append(res.Timeouts, PhaseFailFirst)
	}
	if !ok {
		res.Timeouts = append(res.Timeouts, PhaseFailAll)
	}
	sl.mu.Lock()
	if k, seen := sl.confirmations[victim.name]; seen {
		res.Confirmations = k
	} else {
		res.Confirmations = -1
	}
	sl.mu.Unlock()
	if res.SuspicionMin > 0 {
		res.FailAllRatio = float64(res.FailAll) / float64(res.SuspicionMin)
	}
	logf("fail: first %v, all %v (suspicion timeout %v..%v, first timer fired with %d confirmations)", show(res.FailFirst, firstOK), show(res.FailAll, ok), res.SuspicionMin, res.SuspicionMax, res.Confirmations)

	// leave: a member that is neither the seed nor the victim (nor, but
	// for N=2, the joiner).
	leaver := c.nodes[n-1]
	if leaver == victim {
		leaver = joiner
	}
	rest = nil
	for _, x := range c.live() {
		if x != leaver {
			rest = append(rest, x)
		}
	}
	start = time.Now()
	// Leave blocks until the intent is broadcast and then sleeps serf's
	// LeavePropagateDelay (1 s); others see it meanwhile, so poll while it
	// runs. Then the leaver stops, as an agent does (Close: Leave, then
	// Shutdown): a left member that keeps running still answers probes, so
	// a member that missed the leave broadcast could not fail it and would
	// list it as leaving until a push/pull, or for ever.
	left := make(chan error, 1)
	go func() {
		err := leaver.m.Leave()
		if serr := leaver.m.Shutdown(); err == nil {
			err = serr
		}
		left <- err
	}()
	res.Leave, ok, err = c.waitAll(ctx, PhaseLeave, logf, start, rest, func(ms []membership.Member) bool { return statusOf(ms, leaver.name) == membership.StatusLeft })
	if err != nil {
		return res, err
	}
	if !ok {
		res.Timeouts = append(res.Timeouts, PhaseLeave)
	}
	logf("leave: %v", show(res.Leave, ok))
	select {
	case lerr := <-left:
		leaver.down = true
		if lerr != nil {
			logf("leave of %s: %v", leaver.name, lerr)
		}
	case <-time.After(shutdownTimeout):
		// The deferred shutdown stops it with the rest.
		logf("leave of %s still running after %v", leaver.name, shutdownTimeout)
	}
	return res, nil
}

// joinAll has every node join seed, a few at a time, retrying until
// deadline (a busy seed may time a join out).
func joinAll(ctx context.Context, nodes []*node, seed string, deadline time.Time) error {
	sem := make(chan struct{}, joinParallelism)
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, nd := range nodes {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			for {
				_, err := nd.m.Join([]string{seed})
				if err == nil {
					return
				}
				if ctx.Err() != nil || time.Now().After(deadline) {
					errs[i] = fmt.Errorf("join %s to %s: %w", nd.name, seed, err)
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.Join(errs...)
}

// waitAll polls until cond holds for the view of every node at once, and
// returns the time since start at which it was seen to. To keep polling
// light at N=100 on small machines, a round only asks the nodes not yet
// satisfied; once all are, one full round confirms before it counts.
// ok is false on timeout (d is then the bound). Every slowReport it logs
// who is still waiting and for what.
func (c *cluster) waitAll(ctx context.Context, phase string, logf func(string, ...any), start time.Time, nodes []*node, cond func([]membership.Member) bool) (d time.Duration, ok bool, err error) {
	pending := append([]*node(nil), nodes...)
	deadline := start.Add(PhaseTimeout)
	nextReport := start.Add(slowReport)
	for {
		var still []*node
		for _, nd := range pending {
			if !cond(nd.m.Members()) {
				still = append(still, nd)
			}
		}
		if len(still) == 0 {
			at := time.Since(start)
			for _, nd := range nodes {
				if !cond(nd.m.Members()) {
					still = append(still, nd)
				}
			}
			if len(still) == 0 {
				return at, true, nil
			}
		}
		pending = still
		now := time.Now()
		if now.After(nextReport) {
			nextReport = now.Add(slowReport)
			logf("%s: after %v, %d of %d members still disagree; %s", phase, now.Sub(start).Round(time.Second), len(pending), len(nodes), c.describe(pending, 3))
		}
		if now.After(deadline) {
			return PhaseTimeout, false, nil
		}
		select {
		case <-ctx.Done():
			return 0, false, ctx.Err()
		case <-time.After(PollInterval):
		}
	}
}

// slowReport is how often a slow wait says what it is waiting for.
const slowReport = 10 * time.Second

// describe says, for up to max of nodes, which members their view does not
// show alive.
func (c *cluster) describe(nodes []*node, max int) string {
	var parts []string
	for i, nd := range nodes {
		if i == max {
			parts = append(parts, fmt.Sprintf("and %d more", len(nodes)-max))
			break
		}
		seen := map[string]membership.Status{}
		for _, m := range nd.m.Members() {
			seen[m.Name] = m.Status
		}
		var odd []string
		for _, other := range c.nodes {
			st, ok := seen[other.name]
			switch {
			case !ok:
				odd = append(odd, other.name+" unknown")
			case st != membership.StatusAlive:
				odd = append(odd, other.name+" "+string(st))
			}
		}
		if len(odd) > 5 {
			odd = append(odd[:5], fmt.Sprintf("+%d", len(odd)-5))
		}
		parts = append(parts, fmt.Sprintf("%s sees %s", nd.name, strings.Join(odd, ", ")))
	}
	return strings.Join(parts, "; ")
}

// waitFailed polls the remaining nodes after name crashed: first is when
// any of them first saw it suspect or failed (by its view or, more
// precisely, by memberlist's log of the failed probe), all when every one
// of them reports it failed.
func waitFailed(ctx context.Context, start time.Time, nodes []*node, name string, sl *suspectLog) (first, all time.Duration, firstOK, allOK bool, err error) {
	pending := append([]*node(nil), nodes...)
	deadline := start.Add(PhaseTimeout)
	for {
		var still []*node
		for _, nd := range pending {
			st := statusOf(nd.m.Members(), name)
			if t := sl.firstSuspected(name); !t.IsZero() && (!firstOK || t.Sub(start) < first) {
				first, firstOK = t.Sub(start), true
			}
			if !firstOK && (st == membership.StatusSuspect || st == membership.StatusFailed) {
				first, firstOK = time.Since(start), true
			}
			if st != membership.StatusFailed {
				still = append(still, nd)
			}
		}
		if len(still) == 0 {
			// Failed is final for a crashed node (it cannot refute), but
			// confirm the way waitAll does.
			at := time.Since(start)
			for _, nd := range nodes {
				if statusOf(nd.m.Members(), name) != membership.StatusFailed {
					still = append(still, nd)
				}
			}
			if len(still) == 0 {
				return first, at, firstOK, true, nil
			}
		}
		pending = still
		if time.Now().After(deadline) {
			if !firstOK {
				first = PhaseTimeout
			}
			return first, PhaseTimeout, firstOK, false, nil
		}
		select {
		case <-ctx.Done():
			return first, 0, firstOK, false, ctx.Err()
		case <-time.After(PollInterval):
		}
	}
}

func countAlive(ms []membership.Member) int {
	k := 0
	for _, m := range ms {
		if m.Status == membership.StatusAlive {
			k++
		}
	}
	return k
}

func statusOf(ms []membership.Member, name string) membership.Status {
	for _, m := range ms {
		if m.Name == name {
			return m.Status
		}
	}
	return ""
}

// drain waits for the goroutines and file descriptors of a size to go
// away and says what is left over if they do not.
func drain(baseG, baseFD int) string {
	deadline := time.Now().Add(drainTimeout)
	for {
		g, fd := runtime.NumGoroutine(), openFDs()
		// A few goroutines of the runtime and of timers may come and go.
		if g <= baseG+2 && (fd < 0 || fd <= baseFD) {
			return ""
		}
		if time.Now().After(deadline) {
			return fmt.Sprintf("%d goroutines (was %d), %d open files (was %d)", g, baseG, fd, baseFD)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// openFDs counts the process's open file descriptors, -1 if unknown.
func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func show(d time.Duration, ok bool) string {
	if !ok {
		return "timeout"
	}
	return d.Round(time.Millisecond).String()
}

// PrintTable writes rs as a table, with the suspicion timeout each size's
// failure figures are to be read against.
func PrintTable(w io.Writer, rs []Result) {
	b := Baseline
	fmt.Fprintln(w, "membership convergence, in-process serf agents on loopback (gossip encrypted), memberlist LAN profile")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "N\tform\tjoin\tfail-first\tfail-all\tleave\tsuspicion timeout\tfail-all/timeout\tconfirmations\tcpu")
	for _, r := range rs {
		cell := func(phase string, d time.Duration) string {
			if r.TimedOut(phase) {
				return "timeout"
			}
			return secs(d)
		}
		ratio := "-"
		if !r.TimedOut(PhaseFailAll) && r.SuspicionMin > 0 {
			ratio = fmt.Sprintf("%.2fx", r.FailAllRatio)
		}
		cores := "-"
		if r.Wall > 0 {
			cores = fmt.Sprintf("%.2f cores", float64(r.CPU)/float64(r.Wall))
		}
		conf := "-"
		if r.Confirmations >= 0 {
			conf = strconv.Itoa(r.Confirmations)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s..%s (n=%d)\t%s\t%s\t%s\n", r.N,
			cell(PhaseForm, r.Form), cell(PhaseJoin, r.Join), cell(PhaseFailFirst, r.FailFirst),
			cell(PhaseFailAll, r.FailAll), cell(PhaseLeave, r.Leave),
			secs(r.SuspicionMin), secs(r.SuspicionMax), r.ClusterAtFailure, ratio, conf, cores)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "baseline: memberlist probe interval %v (probe timeout %v, gossip interval %v); suspicion timeout for n nodes = %d*max(1,log10(n))*%v,\n",
		b.ProbeInterval, b.ProbeTimeout, b.GossipInterval, b.SuspicionMult, b.ProbeInterval)
	fmt.Fprintf(w, "  starting at %dx that and shrinking to it as other members confirm the suspicion; n = N+1 at the crash.\n", b.SuspicionMaxTimeoutMult)
	var lines []string
	for _, r := range rs {
		lo, hi := SuspicionTimeout(r.N)
		lines = append(lines, fmt.Sprintf("N=%d: %s..%s", r.N, secs(lo), secs(hi)))
	}
	if len(lines) > 0 {
		fmt.Fprintf(w, "  for n = N: %s\n", strings.Join(lines, ", "))
	}
	fmt.Fprintf(w, "form: first Join until all N see N alive; join: until all N+1 see N+1 alive; fail: crash (Shutdown, no Leave) until the first\n")
	fmt.Fprintf(w, "  member suspects it (memberlist's failed-probe log) and until all see it failed; leave: Leave call until all see it left.\n")
	fmt.Fprintf(w, "  Views polled every %v. confirmations: peer confirmations of the first suspicion timer that fired (expected: %d).\n", PollInterval, b.SuspicionMult-2)
	for _, r := range rs {
		if r.Leftover != "" {
			fmt.Fprintf(w, "N=%d: left over after shutdown: %s\n", r.N, r.Leftover)
		}
	}
}

// secs formats d in seconds, with two decimals below 10 s and one above.
func secs(d time.Duration) string {
	s := d.Seconds()
	if s < 10 {
		return strconv.FormatFloat(s, 'f', 2, 64) + "s"
	}
	return strconv.FormatFloat(s, 'f', 1, 64) + "s"
}
