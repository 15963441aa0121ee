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
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
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
	SizeMiB int       // workload footprint (default 256)
	NoSwap  bool      // skip the swap baseline
	Log     io.Writer // progress; nil discards
}

// Row is one workload at one local fraction.
type Row struct {
	Workload   string  `json:"workload"`
	LocalPct   int     `json:"local_pct"`
	Unit       string  `json:"unit"`
	Onebox     float64 `json:"onebox"`        // throughput under the pager
	VsAllLocal float64 `json:"vs_all_local"`  // Onebox / the 100% local run under the pager
	VsPlain    float64 `json:"vs_plain"`      // Onebox / the program without onebox
	Swap       float64 `json:"swap"`          // throughput with swap and a cgroup limit; 0: not run
	VsSwap     float64 `json:"vs_swap"`       // Onebox / Swap
	Evicted    uint64  `json:"evicted_pages"` // pages the pager evicted during the run
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
	Rows       []Row   `json:"rows"`
	Swap       string  `json:"swap"` // how the swap baseline ran, or why not
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
	rtt, err := e.rtt(4000)
	if err != nil {
		return nil, err
	}
	res.RTTP50us, res.RTTP99us = us(pct(rtt, 50)), us(pct(rtt, 99))
	load, err := e.poolLoad(ctx, 2000)
	if err != nil {
		return nil, err
	}
	res.LoadP50us, res.LoadP99us = us(pct(load, 50)), us(pct(load, 99))
	fault, _, err := e.run(ctx, "fault", min(64, o.SizeMiB), 1, 4<<20, "")
	if err != nil {
		return nil, err
	}
	res.FaultP50us, res.FaultP99us = fault.p50/1e3, fault.p99/1e3
	res.FaultVsRTT = res.FaultP50us / res.RTTP50us

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
		plain, _, err := e.run(ctx, w.mode, o.SizeMiB, w.passes, 0, "plain")
		if err != nil {
			return nil, err
		}
		var all float64
		for _, pct := range []int{100, 50, 25} {
			local := size * uint64(pct) / 100
			fmt.Fprintf(o.Log, "%s, %d%% local...\n", w.mode, pct)
			m, ev, err := e.run(ctx, w.mode, o.SizeMiB, w.passes, local, "")
			if err != nil {
				return nil, err
			}
			if m.sum != plain.sum {
				return nil, errorf("%s at %d%% local computed %s, plainly %s: wrong data", w.mode, pct, m.sum, plain.sum)
			}
			if pct == 100 {
				all = m.rate
			}
			row := Row{Workload: w.mode, LocalPct: pct, Unit: m.unit, Onebox: m.rate, VsAllLocal: m.rate / all,
				VsPlain: m.rate / plain.rate, Evicted: ev}
			if swapOK {
				s, err := e.runSwap(ctx, sw, w.mode, o.SizeMiB, w.passes, local+4<<20)
				if err != nil {
					return nil, err
				}
				if s.sum != plain.sum {
					return nil, errorf("%s under swap computed %s, plainly %s", w.mode, s.sum, plain.sum)
				}
				row.Swap, row.VsSwap = s.rate, m.rate/s.rate
			}
			res.Rows = append(res.Rows, row)
		}
	}
	return res, nil
}

func us(d time.Duration) float64 { return float64(d) / 1e3 }

func pct(d []time.Duration, p int) time.Duration {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[min(len(d)-1, len(d)*p/100)]
}

func (e *env) rtt(n int) ([]time.Duration, error) {
	buf := make([]byte, 4096)
	for range 200 { // warm up
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

// poolLoad times Loads of one stored page from the cluster pool.
func (e *env) poolLoad(ctx context.Context, n int) ([]time.Duration, error) {
	r := pool.Region{Owner: "bench-load", ID: 1}
	page := make([]byte, pool.PageSize)
	if err := e.pool.Reserve(ctx, r.Owner, pool.PageSize); err != nil {
		return nil, err
	}
	defer e.pool.Release(r.Owner, pool.PageSize)
	if err := e.pool.Store(ctx, r, 0, page); err != nil {
		return nil, err
	}
	defer e.pool.Drop(ctx, r, 0, pool.PageSize)
	d := make([]time.Duration, n)
	for i := -200; i < n; i++ {
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
	rate     float64
	unit     string
	sum      string
	p50, p99 float64 // ns (fault)
}

func parse(out string) (measure, error) {
	f := strings.Fields(out)
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
// onebox). It returns the measure and the pages evicted.
func (e *env) run(ctx context.Context, mode string, mib, n int, local uint64, plain string) (measure, uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.memwork, mode, strconv.Itoa(mib), strconv.Itoa(n))
	var p *pager.Pager
	if plain == "" {
		var err error
		p, err = pager.New(pager.Config{Pool: e.pool, Owner: "bench"})
		if err != nil {
			return measure{}, 0, err
		}
		sock := filepath.Join(e.dir, "pager.sock")
		os.Remove(sock)
		l, err := pager.Listen(sock)
		if err != nil {
			return measure{}, 0, err
		}
		go p.Serve(l, local)
		defer p.Close()
		cmd.Env = append(os.Environ(), "LD_PRELOAD="+e.shim, "ONEBOX_PAGER_SOCK="+sock)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return measure{}, 0, errorf("memwork %s: %v: %s", mode, err, stderr.String())
	}
	m, err := parse(string(out))
	var ev uint64
	if p != nil {
		ev = p.Stats().Evicted
	}
	return m, ev, err
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
