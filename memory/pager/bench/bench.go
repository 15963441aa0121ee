// Package bench is 'onebox bench mem': memory expansion measured against
// the same workloads all in local memory and against what a user would do
// instead, a swap file on local disk under a memory cgroup limit.
//
// Everything runs in one process on this machine: the pager (as in an
// agent), the cluster pool (memory/cluster) over two page servers on
// loopback behind mutual TLS, as agents run them (memory/cluster/
// clustertest), and the workloads (memwork.c, built with cc) under the
// LD_PRELOAD shim. Every figure is printed next to its baseline measured
// in the same run; the raw round trip is a plain TCP echo server.
package bench

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/memory/cluster"
	"github.com/onebox-project/onebox/memory/cluster/clustertest"
	"github.com/onebox-project/onebox/memory/pager"
	"github.com/onebox-project/onebox/memory/pool"
	"github.com/onebox-project/onebox/memory/shim"
)

//go:embed c/memwork.c
var memworkSource []byte

// Options configure Run.
type Options struct {
	SizeMiB int  // workload footprint (default 256)
	NoSwap  bool // skip the swap baseline
	// Workloads to run among seq, scan, rand (nil: all); the fault
	// latencies are always measured.
	Workloads []string
	Log       io.Writer // progress; nil discards
}

// Row is one workload at one local fraction.
type Row struct {
	Workload   string  `json:"workload"`
	LocalPct   int     `json:"local_pct"`
	Unit       string  `json:"unit"`
	Onebox     float64 `json:"onebox"`        // throughput under the pager
	VsAllLocal float64 `json:"vs_all_local"`  // Onebox / the 100% local run under the pager
	VsPlain    float64 `json:"vs_plain"`      // Onebox / the program without onebox
	Ceiling    float64 `json:"ceiling"`       // the best VsAllLocal this machine allows (see Result)
	Swap       float64 `json:"swap"`          // throughput with swap and a cgroup limit; 0: not run
	VsSwap     float64 `json:"vs_swap"`       // Onebox / Swap
	Evicted    uint64  `json:"evicted_pages"` // pages the pager evicted during the run
	// The timed part only: what the pager did and where its time went.
	Faults      uint64  `json:"timed_faults"`
	PoolMiB     float64 `json:"timed_pool_mib"`       // MiB loaded from the pool
	FaultLoadMs float64 `json:"timed_fault_load_ms"`  // pool Loads a fault waited for
	AheadLoadMs float64 `json:"timed_ahead_load_ms"`  // readahead Loads (in the background)
	CopyMs      float64 `json:"timed_copy_ms"`        // UFFDIO_COPY
	EvictMs     float64 `json:"timed_evict_ms"`       // evictions (stores included)
	TimedSec    float64 `json:"timed_sec"`            // the timed part's duration, from the rate
	CPUms       float64 `json:"timed_bench_cpu_ms"`   // CPU of this process (pager, pool, page servers) in it
	SwapIns     uint64  `json:"swap_ins"`             // pages swapped in during the swap run (pswpin)
	SwapPeakMiB float64 `json:"swap_cgroup_peak_mib"` // the cgroup's peak usage: the limit held
}

// Result is the whole benchmark.
type Result struct {
	SizeMiB    int     `json:"size_mib"`
	RTTP50us   float64 `json:"rtt_4k_p50_us"`   // raw 4 KiB TCP round trip on loopback
	RTTP99us   float64 `json:"rtt_4k_p99_us"`   //
	FaultP50us float64 `json:"fault_4k_p50_us"` // a page fault served from the pool
	FaultP99us float64 `json:"fault_4k_p99_us"` //
	FaultVsRTT float64 `json:"fault_vs_rtt_p50"`
	LoadP50us  float64 `json:"pool_load_4k_p50_us"` // the pool's Load of one page, no fault
	LoadP99us  float64 `json:"pool_load_4k_p99_us"`
	// One remote fault, means over the fault run's timed part: as the
	// program saw it, and the pager's own parts of it; the rest is the
	// kernel's delivery of the fault and the wake-up of the faulting thread.
	FaultMeanUs float64 `json:"fault_4k_mean_us"`
	// The same faults served from a pool in this process (a memory copy,
	// no network): the pager's and the kernel's part alone. The pool's
	// Load p50 plus this p50 is the floor of a remote fault with this pool.
	LocalFaultP50us float64 `json:"local_fault_4k_p50_us"`
	PagerLoadMeanUs float64 `json:"pager_load_mean_us"`
	PagerCopyMeanUs float64 `json:"pager_copy_mean_us"`
	PagerEvictUs    float64 `json:"pager_evict_mean_us"`
	// Bulk rates (MB/s): the raw TCP transfer of 1 MiB on loopback and the
	// cluster pool's Load of 1 MiB. The pool's rate bounds how fast pages
	// can come back: the ceilings of the rows are computed from it.
	RawBulkMBps  float64 `json:"raw_bulk_1m_mbps"`
	PoolBulkMBps float64 `json:"pool_load_1m_mbps"`
	// CPU time (both ends: pool client and page servers) per MiB the pool
	// Loads in bulk, and the vCPUs left when the workload takes one: the
	// pool cannot bring pages back faster than PoolCPUs / PoolCPUmsPerMiB.
	PoolCPUmsPerMiB float64 `json:"pool_load_cpu_ms_per_mib"`
	PoolCPUs        int     `json:"pool_cpus"`
	Rows            []Row   `json:"rows"`
	Swap            string  `json:"swap"` // how the swap baseline ran, or why not
}

type env struct {
	dir, shim, memwork string
	pool               pool.Pages // the cluster pool
	echo               *remote    // the raw round trip's client
	standin            *standin
	log                io.Writer
}

// Run runs the benchmark. It needs root (userfaultfd; swap and cgroups for
// the baseline) and cc.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.SizeMiB == 0 {
		o.SizeMiB = 256
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	for _, w := range o.Workloads {
		if w != "seq" && w != "scan" && w != "rand" {
			return nil, errorf("unknown workload %q: seq, scan or rand", w)
		}
	}
	dir, err := os.MkdirTemp("", "onebox-bench-mem-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	e := &env{dir: dir, log: o.Log}
	if e.shim, err = shim.Build(dir); err != nil {
		return nil, err
	}
	if e.memwork, err = BuildMemwork(ctx, dir); err != nil {
		return nil, err
	}
	if e.standin, err = startStandin(); err != nil {
		return nil, err
	}
	defer e.standin.Close()
	if e.echo, err = dialStandin(e.standin.ln.Addr().String()); err != nil {
		return nil, err
	}
	defer e.echo.Close()
	pages, err := clustertest.Start([]string{"n1", "n2"}, uint64(o.SizeMiB)<<21+256<<20)
	if err != nil {
		return nil, err
	}
	defer pages.Close()
	cp, err := pages.NewPool(cluster.Options{})
	if err != nil {
		return nil, err
	}
	defer cp.Close()
	e.pool = cp

	res := &Result{SizeMiB: o.SizeMiB}
	// Latency: the raw round trip, then faults served from the pool.
	fmt.Fprintln(o.Log, "measuring the raw 4 KiB round trip and remote faults...")
	rtt, err := e.rtt(4000, 4096)
	if err != nil {
		return nil, err
	}
	res.RTTP50us, res.RTTP99us = us(pct(rtt, 50)), us(pct(rtt, 99))
	load, err := e.poolLoad(ctx, 2000, pool.PageSize)
	if err != nil {
		return nil, err
	}
	res.LoadP50us, res.LoadP99us = us(pct(load, 50)), us(pct(load, 99))
	bulk, err := e.rtt(200, 1<<20)
	if err != nil {
		return nil, err
	}
	res.RawBulkMBps = (1 << 20) / float64(pct(bulk, 50).Nanoseconds()) * 1e3
	cpu0 := selfCPU()
	pbulk, err := e.poolLoad(ctx, 200, 1<<20)
	if err != nil {
		return nil, err
	}
	res.PoolCPUmsPerMiB = float64(selfCPU()-cpu0) / 1e6 / 402 // 400 Loads with the warm-up, one Store to 2 nodes
	res.PoolCPUs = max(1, runtime.NumCPU()-1)
	res.PoolBulkMBps = (1 << 20) / float64(pct(pbulk, 50).Nanoseconds()) * 1e3
	fault, err := e.run(ctx, "fault", min(64, o.SizeMiB), 1, 4<<20, "")
	if err != nil {
		return nil, err
	}
	res.FaultP50us, res.FaultP99us, res.FaultMeanUs = fault.p50/1e3, fault.p99/1e3, fault.mean/1e3
	res.FaultVsRTT = res.FaultP50us / res.RTTP50us
	lf, err := e.withPool(pool.NewLocal(0)).run(ctx, "fault", min(64, o.SizeMiB), 1, 4<<20, "")
	if err != nil {
		return nil, err
	}
	res.LocalFaultP50us = lf.p50 / 1e3
	if d := fault.timed; d.Remote > 0 {
		res.PagerLoadMeanUs = float64(d.FaultLoadNanos) / float64(d.Remote) / 1e3
		res.PagerCopyMeanUs = float64(d.CopyNanos) / float64(d.Faults) / 1e3
		res.PagerEvictUs = float64(d.EvictNanos) / float64(d.Faults) / 1e3
	}

	swapOK := !o.NoSwap
	res.Swap = "not run (--no-swap)"
	var sw *swap
	if swapOK {
		if sw, err = setupSwap(dir, uint64(o.SizeMiB)<<20+64<<20); err != nil {
			swapOK = false
			res.Swap = "not run: " + err.Error()
			fmt.Fprintln(o.Log, "swap baseline skipped:", err)
		} else {
			defer sw.remove()
			res.Swap = fmt.Sprintf("swap file %s on local disk, memory cgroup v1 limit = local size + 4 MiB", sw.file)
		}
	}
	size := uint64(o.SizeMiB) << 20
	for _, w := range []struct {
		mode   string
		passes int
	}{{"seq", 2}, {"scan", 3}, {"rand", 2}} {
		if o.Workloads != nil && !slices.Contains(o.Workloads, w.mode) {
			continue
		}
		// The baselines are the faster of two runs: on a shared machine a
		// slowed baseline would flatter every ratio to it.
		plain, err := e.best(ctx, w.mode, o.SizeMiB, w.passes, 0, "plain")
		if err != nil {
			return nil, err
		}
		var all float64
		for _, pct := range []int{100, 50, 25} {
			local := size * uint64(pct) / 100
			fmt.Fprintf(o.Log, "%s, %d%% local...\n", w.mode, pct)
			run := e.run
			if pct == 100 {
				run = e.best
			}
			m, err := run(ctx, w.mode, o.SizeMiB, w.passes, local, "")
			if err != nil {
				return nil, err
			}
			if m.sum != plain.sum {
				return nil, errorf("%s at %d%% local computed %s, plainly %s: wrong data", w.mode, pct, m.sum, plain.sum)
			}
			if pct == 100 {
				all = m.rate
			}
			d := m.timed
			row := Row{Workload: w.mode, LocalPct: pct, Unit: m.unit, Onebox: m.rate, VsAllLocal: m.rate / all,
				VsPlain: m.rate / plain.rate, Evicted: m.stats.Evicted, Faults: d.Faults,
				PoolMiB:     float64(d.Loaded) * float64(pool.PageSize) / (1 << 20),
				FaultLoadMs: ms(d.FaultLoadNanos), AheadLoadMs: ms(d.AheadLoadNanos), CopyMs: ms(d.CopyNanos),
				EvictMs: ms(d.EvictNanos), CPUms: float64(m.cpu) / 1e6}
			if m.unit == "MB/s" {
				row.TimedSec = float64(w.passes) * float64(size) / 1e6 / m.rate
			} else {
				row.TimedSec = float64(w.passes) * float64(size/uint64(pool.PageSize)) / m.rate
			}
			row.Ceiling = ceiling(w.mode, pct, all, size, res)
			if swapOK {
				s, err := e.runSwap(ctx, sw, w.mode, o.SizeMiB, w.passes, local+4<<20)
				if err != nil {
					return nil, err
				}
				if s.sum != plain.sum {
					return nil, errorf("%s under swap computed %s, plainly %s", w.mode, s.sum, plain.sum)
				}
				row.Swap, row.VsSwap = s.rate, m.rate/s.rate
				row.SwapIns, row.SwapPeakMiB = s.swapIns, float64(s.peak)/(1<<20)
			}
			res.Rows = append(res.Rows, row)
		}
	}
	return res, nil
}

// ceiling is the best ratio to the all-local run a workload can reach at
// pct local on this machine, whatever the pager does:
//   - seq, scan: a scan larger than memory brings at least (100-pct)% of
//     the footprint back from the pool each pass (the best policy keeps the
//     rest resident), at best at the pool's bulk Load rate, and with the CPU
//     the pool needs for it on the vCPUs the workload leaves, overlapped
//     with the program's own work: time per pass >= max(all-local time,
//     remote bytes / bulk rate, remote MiB x pool CPU per MiB / vCPUs left).
//   - rand: (100-pct)% of the accesses miss, each costing at least the raw
//     4 KiB round trip (a pager with zero overhead).
func ceiling(mode string, pct int, all float64, size uint64, r *Result) float64 {
	miss := float64(100-pct) / 100
	if miss == 0 || all <= 0 {
		return 1
	}
	switch mode {
	case "seq", "scan":
		if r.PoolBulkMBps <= 0 {
			return 0
		}
		local := float64(size) / 1e6 / all // seconds per pass, all local
		remote := miss * float64(size) / 1e6 / r.PoolBulkMBps
		cpu := miss * float64(size) / (1 << 20) * r.PoolCPUmsPerMiB / 1e3 / float64(max(1, r.PoolCPUs))
		return local / max(local, remote, cpu)
	default:
		perAccess := 1 / all
		return perAccess / (perAccess + miss*r.RTTP50us/1e6)
	}
}

func ms(ns uint64) float64 { return float64(ns) / 1e6 }

func us(d time.Duration) float64 { return float64(d) / 1e3 }

func pct(d []time.Duration, p int) time.Duration {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[min(len(d)-1, len(d)*p/100)]
}

// rtt times n raw round trips answering size bytes.
func (e *env) rtt(n, size int) ([]time.Duration, error) {
	buf := make([]byte, size)
	for range min(200, n) { // warm up
		if err := e.echo.echo(buf); err != nil {
			return nil, err
		}
	}
	d := make([]time.Duration, n)
	for i := range d {
		t := time.Now()
		if err := e.echo.echo(buf); err != nil {
			return nil, err
		}
		d[i] = time.Since(t)
	}
	return d, nil
}

// poolLoad times Loads of size stored bytes from the cluster pool.
func (e *env) poolLoad(ctx context.Context, n, size int) ([]time.Duration, error) {
	r := pool.Region{Owner: "bench-load", ID: 1}
	page := make([]byte, size)
	if err := e.pool.Reserve(ctx, r.Owner, uint64(size)); err != nil {
		return nil, err
	}
	defer e.pool.Release(r.Owner, uint64(size))
	if err := e.pool.Store(ctx, r, 0, page); err != nil {
		return nil, err
	}
	defer e.pool.Drop(ctx, r, 0, uint64(size))
	d := make([]time.Duration, n)
	for i := -min(200, n); i < n; i++ {
		t := time.Now()
		if err := e.pool.Load(ctx, r, 0, page); err != nil {
			return nil, err
		}
		if i >= 0 {
			d[i] = time.Since(t)
		}
	}
	return d, nil
}

// measure is one memwork output.
type measure struct {
	rate           float64
	unit           string
	sum            string
	p50, p99, mean float64 // ns (fault)

	stats pager.Stats   // the pager's counters at the end (under the pager)
	cpu   time.Duration // this process's CPU time during the timed part
	timed pager.Stats   // ... of the timed part only: the end minus the "timed" line

	swapIns uint64 // pswpin during a swap run
	peak    uint64 // the cgroup's peak usage in a swap run, bytes
}

// parse reads memwork's output: its last line is the result (a "timed"
// line comes first).
func parse(out string) (measure, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	f := strings.Fields(lines[len(lines)-1])
	var m measure
	var err error
	switch {
	case len(f) >= 6 && f[0] == "rate":
		m.rate, err = strconv.ParseFloat(f[1], 64)
		m.unit, m.sum = f[3], f[5]
	case len(f) >= 8 && f[0] == "p50_ns":
		m.p50, err = strconv.ParseFloat(f[1], 64)
		if err == nil {
			m.p99, err = strconv.ParseFloat(f[3], 64)
		}
		if err == nil && len(f) >= 10 && f[8] == "mean_ns" {
			m.mean, err = strconv.ParseFloat(f[9], 64)
		}
		m.sum = f[7]
	default:
		err = errors.New("unexpected output")
	}
	if err != nil {
		return m, errorf("memwork said %q: %v", out, err)
	}
	return m, nil
}

// run runs memwork under a pager with a local limit (plain != "": without
// onebox).
func (e *env) run(ctx context.Context, mode string, mib, n int, local uint64, plain string) (measure, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.memwork, mode, strconv.Itoa(mib), strconv.Itoa(n))
	var p *pager.Pager
	if plain == "" {
		var err error
		p, err = pager.New(pager.Config{Pool: e.pool, Owner: "bench"})
		if err != nil {
			return measure{}, err
		}
		sock := filepath.Join(e.dir, "pager.sock")
		os.Remove(sock)
		l, err := pager.Listen(sock)
		if err != nil {
			return measure{}, err
		}
		go p.Serve(l, local)
		defer p.Close()
		cmd.Env = append(os.Environ(), "LD_PRELOAD="+e.shim, "ONEBOX_PAGER_SOCK="+sock)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return measure{}, err
	}
	if err := cmd.Start(); err != nil {
		return measure{}, err
	}
	var out strings.Builder
	var at pager.Stats
	var cpu0 time.Duration
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if sc.Text() == "timed" && p != nil {
			at, cpu0 = p.Stats(), selfCPU()
		}
		out.WriteString(sc.Text() + "\n")
	}
	cpu1 := selfCPU()
	if err := cmd.Wait(); err != nil {
		return measure{}, errorf("memwork %s: %v: %s", mode, err, stderr.String())
	}
	m, err := parse(out.String())
	m.cpu = cpu1 - cpu0
	if p != nil {
		m.stats = p.Stats()
		m.timed = diff(m.stats, at)
	}
	return m, err
}

// best is the faster of two runs.
func (e *env) best(ctx context.Context, mode string, mib, n int, local uint64, plain string) (measure, error) {
	a, err := e.run(ctx, mode, mib, n, local, plain)
	if err != nil {
		return a, err
	}
	b, err := e.run(ctx, mode, mib, n, local, plain)
	if err != nil || b.rate <= a.rate {
		return a, err
	}
	return b, nil
}

// withPool is e with another pool for the pager.
func (e *env) withPool(p pool.Pages) *env {
	c := *e
	c.pool = p
	return &c
}

// selfCPU is this process's user and system CPU time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// diff is the counters of b minus those of a (the cumulative ones).
func diff(b, a pager.Stats) pager.Stats {
	return pager.Stats{Faults: b.Faults - a.Faults, Copies: b.Copies - a.Copies, Loaded: b.Loaded - a.Loaded,
		Prefetch: b.Prefetch - a.Prefetch, Remote: b.Remote - a.Remote, WPFaults: b.WPFaults - a.WPFaults,
		Evicted: b.Evicted - a.Evicted, Stored: b.Stored - a.Stored,
		FaultLoadNanos: b.FaultLoadNanos - a.FaultLoadNanos, AheadLoadNanos: b.AheadLoadNanos - a.AheadLoadNanos,
		CopyNanos: b.CopyNanos - a.CopyNanos, EvictNanos: b.EvictNanos - a.EvictNanos,
		StoreNanos: b.StoreNanos - a.StoreNanos}
}

// BuildMemwork compiles the benchmark's workload program into dir and
// returns its path (the demo runs it too).
func BuildMemwork(ctx context.Context, dir string) (string, error) {
	src := filepath.Join(dir, "memwork.c")
	bin := filepath.Join(dir, "memwork")
	if err := os.WriteFile(src, memworkSource, 0o600); err != nil {
		return "", err
	}
	if out, err := exec.CommandContext(ctx, "cc", "-O2", "-o", bin, src).CombinedOutput(); err != nil {
		return "", errorf("cc memwork: %v: %s", err, out)
	}
	return bin, nil
}
