package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/memory/pager"
	"github.com/onebox-project/onebox/memory/shim"
	"github.com/onebox-project/onebox/proc/stream"
)

// Memory expansion of one program (issue 3): 'onebox run --memory-expand'
// starts the program with the LD_PRELOAD shim, connected to this agent's
// pager on a socket of its own (DATA_DIR/pager/N.sock, in a 0700
// directory), which keeps at most --local-memory of each of its processes'
// large blocks resident here and the rest in the cluster memory pool.

// mxState is the agent's pager. It lives in mxStates rather than in Agent
// (agent.go belongs to the fabric) and is set once by startMemExpand.
type mxState struct {
	pager *pager.Pager
	dir   string // DATA_DIR/pager: sockets and the built shim

	mu      sync.Mutex
	next    int  // guarded by mu
	running int  // programs with a socket open; guarded by mu
	closed  bool // guarded by mu
	shimErr error
	shimLib string // built on first use; guarded by mu
}

var mxStates sync.Map // *Agent -> *mxState

func (a *Agent) mx() *mxState {
	v, _ := mxStates.Load(a)
	s, _ := v.(*mxState)
	return s
}

func (a *Agent) startMemExpand() error {
	dir := filepath.Join(a.cfg.DataDir, "pager")
	// Sockets of a previous run are stale: their programs were stopped
	// by their shim's watchdog when that agent went away.
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("memory expansion: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("memory expansion: %w", err)
	}
	// Evicted pages go to the cluster pool (agent/mem.go), which startMem
	// set up: there is no unbounded in-process fallback.
	pl := a.memPool()
	if pl == nil {
		return errors.New("memory expansion: the memory pool is not started")
	}
	log := a.log.With("component", "pager")
	p, err := pager.New(pager.Config{
		Pool:  pl,
		Owner: a.id.Node,
		Logf:  func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) },
	})
	if err != nil {
		return fmt.Errorf("memory expansion: %w", err)
	}
	s := &mxState{pager: p, dir: dir}
	mxStates.Store(a, s)
	a.metrics.reg.MustRegister(&pagerCollector{s: s})
	return nil
}

// closeMemExpand stops the pager: programs still running with
// --memory-expand are stopped by their shim with a message.
func (a *Agent) closeMemExpand() error {
	s := a.mx()
	if s == nil {
		return nil
	}
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	err := s.pager.Close()
	mxStates.Delete(a)
	return err
}

// memoryExpand prepares a program started with --memory-expand: it
// returns environment entries to add (the shim, the pager socket) and a
// release func to call once the program has ended.
func (a *Agent) memoryExpand(spec stream.Spec) (env []string, release func(), err error) {
	if !spec.MemoryExpand {
		return nil, func() {}, nil
	}
	s := a.mx()
	if s == nil {
		return nil, nil, errors.New("memory expansion is not running on this node")
	}
	if err := uffdUsable(); err != nil {
		return nil, nil, err
	}
	lib, err := s.shim()
	if err != nil {
		return nil, nil, err
	}
	local := spec.LocalMemory
	if local == 0 {
		local = defaultLocalMemory()
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, nil, errors.New("memory expansion: the agent is shutting down")
	}
	s.next++
	sock := filepath.Join(s.dir, strconv.Itoa(s.next)+".sock")
	s.mu.Unlock()
	if len(sock) >= 108 {
		return nil, nil, fmt.Errorf("memory expansion: pager socket path %s is too long for a unix socket: use a shorter --data-dir", sock)
	}
	l, err := pager.Listen(sock)
	if err != nil {
		return nil, nil, fmt.Errorf("memory expansion: %w", err)
	}
	s.mu.Lock()
	s.running++
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.pager.Serve(l, local)
	}()
	var once sync.Once
	release = func() {
		once.Do(func() {
			// Processes still connected (children that outlived the
			// program) keep their connection; nothing new can attach.
			l.Close()
			<-done
			os.Remove(sock)
			s.mu.Lock()
			s.running--
			s.mu.Unlock()
		})
	}
	preload := lib
	for _, e := range spec.Env {
		if v, ok := strings.CutPrefix(e, "LD_PRELOAD="); ok && v != "" {
			preload = lib + ":" + v
		}
	}
	env = []string{"LD_PRELOAD=" + preload, "ONEBOX_PAGER_SOCK=" + sock}
	return env, release, nil
}

// shim builds the shim library once (cc, cached in the data directory).
func (s *mxState) shim() (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shimLib == "" && s.shimErr == nil {
		s.shimLib, s.shimErr = shim.Build(s.dir)
	}
	if s.shimErr != nil {
		return "", fmt.Errorf("memory expansion: %w", s.shimErr)
	}
	return s.shimLib, nil
}

// uffdUsable tells whether this process may create a userfaultfd on
// behalf of its programs (they run as the agent's user).
func uffdUsable() error {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if e != 0 {
		return fmt.Errorf("memory expansion needs userfaultfd, which this node refuses (%v): run the agent as root or set vm.unprivileged_userfaultfd=1", e)
	}
	unix.Close(int(fd))
	return nil
}

// defaultLocalMemory is the local limit of a program run without
// --local-memory: half of what the node has available now.
func defaultLocalMemory() uint64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
				if kb, err := strconv.ParseUint(f[1], 10, 64); err == nil {
					return kb << 10 / 2
				}
			}
		}
	}
	return 1 << 30
}

// pagerStats returns the local pager's counters (for 'onebox mem').
func (a *Agent) pagerStats() api.PagerStats {
	s := a.mx()
	if s == nil {
		return api.PagerStats{}
	}
	st := s.pager.Stats()
	s.mu.Lock()
	running := s.running
	s.mu.Unlock()
	ps := uint64(pager.PageSize)
	return api.PagerStats{
		Programs:      running,
		ResidentBytes: st.Resident * ps,
		PoolBytes:     st.Pooled * ps,
		Faults:        st.Faults + st.WPFaults,
		RemoteFaults:  st.Remote,
		Evictions:     st.Stored,
	}
}

// pagerCollector exports the pager's counters at scrape time.
type pagerCollector struct{ s *mxState }

var (
	descPagerPages  = prometheus.NewDesc("onebox_pager_pages", "Pages of memory-expanded programs' blocks, by where they are (resident, pool).", []string{"where"}, nil)
	descPagerEvents = prometheus.NewDesc("onebox_pager_events_total", "Pager events: faults (missing, wp), pages filled (copied, loaded, prefetched), evicted, stored, discarded, forks, denied (pool full).", []string{"kind"}, nil)
	descPagerProcs  = prometheus.NewDesc("onebox_pager_processes", "Processes connected to the pager.", nil, nil)
)

func (c *pagerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPagerPages
	ch <- descPagerEvents
	ch <- descPagerProcs
}

func (c *pagerCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.pager.Stats()
	ch <- prometheus.MustNewConstMetric(descPagerPages, prometheus.GaugeValue, float64(st.Resident), "resident")
	ch <- prometheus.MustNewConstMetric(descPagerPages, prometheus.GaugeValue, float64(st.Pooled), "pool")
	ch <- prometheus.MustNewConstMetric(descPagerProcs, prometheus.GaugeValue, float64(st.Live))
	for k, v := range map[string]uint64{"missing": st.Faults, "wp": st.WPFaults, "copied": st.Copies,
		"loaded": st.Loaded, "prefetched": st.Prefetch, "remote": st.Remote, "evicted": st.Evicted,
		"stored": st.Stored, "discarded": st.Discarded, "forks": st.Forks, "denied": st.Denied} {
		ch <- prometheus.MustNewConstMetric(descPagerEvents, prometheus.CounterValue, float64(v), k)
	}
}
