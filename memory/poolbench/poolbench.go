// Package poolbench measures the memory pool ('onebox bench pool'): page
// loads and stores through the replicated pool (memory/cluster) against
// raw 4 KiB round trips over plain TCP and TLS measured in the same run,
// batched throughput, and the re-replication rate after a node loss. Page
// servers run in this process on loopback behind real fabric muxes.
package poolbench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/memory/cluster"
	"github.com/onebox-project/onebox/memory/cluster/clustertest"
	"github.com/onebox-project/onebox/memory/pool"
)

// Options of a run.
type Options struct {
	Rounds      int           // round trips per latency measure (default 5000)
	RepairBytes uint64        // stored before a node is killed (default 256 MiB)
	Conns       int           // connections per node for throughput; 0 compares 1 and 2
	TPRounds    int           // interleaved rounds of throughput measures (default 3)
	TPTime      time.Duration // per throughput measure and round (default 1s)
	CutEpisodes int           // holders cut for the hedged load figure (default 5)
	Log         io.Writer
}

// Latency is one latency measure.
type Latency struct {
	Name     string  `json:"name"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	VsTCP    float64 `json:"p50_vs_tcp_rtt"`
	VsTLS    float64 `json:"p50_vs_tls_rtt"`
	Baseline bool    `json:"baseline,omitempty"`
}

// Throughput is one throughput measure.
type Throughput struct {
	Name     string  `json:"name"`
	Batch    int     `json:"batch_bytes"`
	InFlight int     `json:"in_flight"`
	Conns    int     `json:"conns_per_node"`
	GBps     float64 `json:"gb_per_s"`
	VsRaw    float64 `json:"vs_raw_tls"` // ratio to the raw TLS fetch of the same batch
	Baseline bool    `json:"baseline,omitempty"`
}

// Result of a run.
type Result struct {
	Latencies   []Latency    `json:"latencies"`
	Throughputs []Throughput `json:"throughputs"`
	// Repair: bytes re-replicated after a node holding copies was killed,
	// and the rate from the kill until every page had 2 copies again.
	RepairBytes   uint64  `json:"repair_bytes"`
	RepairSeconds float64 `json:"repair_seconds"`
	RepairGBps    float64 `json:"repair_gb_per_s"`
	RepairVsRaw   float64 `json:"repair_vs_raw_tls"` // ratio to the raw TLS fetch of 2 MiB
	// Loads while a holder is cut off: how many, how many waited for the
	// request timeout (1 s), and their p99 over the TLS round trip's p50.
	CutLoads         int     `json:"cut_loads"`
	CutLoadsTimedOut int     `json:"cut_loads_timed_out"`
	CutP99VsTLS      float64 `json:"cut_p99_vs_tls_rtt"`
	// Chunk reads of the throughput measures, and how many of them were
	// hedged (asked of a second holder after the delay).
	TPLoadPieces uint64 `json:"throughput_load_pieces"`
	TPHedged     uint64 `json:"throughput_hedged"`
}

func (o *Options) logf(format string, args ...any) {
	if o.Log != nil {
		fmt.Fprintf(o.Log, format+"\n", args...)
	}
}

// Run measures.
func Run(ctx context.Context, opts Options) (*Result, error) {
	if opts.Rounds == 0 {
		opts.Rounds = 5000
	}
	if opts.RepairBytes == 0 {
		opts.RepairBytes = 256 << 20
	}
	if opts.TPRounds == 0 {
		opts.TPRounds = 3
	}
	if opts.TPTime == 0 {
		opts.TPTime = time.Second
	}
	if opts.CutEpisodes == 0 {
		opts.CutEpisodes = 5
	}
	res := &Result{}
	c, err := clustertest.Start([]string{"n1", "n2", "n3"}, 8<<30)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	plain, err := clustertest.StartPlain([]string{"n1", "n2", "n3"}, 8<<30)
	if err != nil {
		return nil, err
	}
	defer plain.Close()
	// Baselines: a 64-byte request answered by 4 KiB, one connection.
	opts.logf("raw round trips (tcp, tls)")
	tcpRTT, err := rawLatency(ctx, nil, opts.Rounds)
	if err != nil {
		return nil, err
	}
	tlsRTT, err := rawLatency(ctx, c, opts.Rounds)
	if err != nil {
		return nil, err
	}
	tcpL := latency("tcp round trip 4KiB", tcpRTT)
	tlsL := latency("tls round trip 4KiB", tlsRTT)
	tcpL.Baseline, tlsL.Baseline = true, true
	res.Latencies = append(res.Latencies, tcpL, tlsL)

	for _, v := range []struct {
		name string
		c    *clustertest.Cluster
	}{{"pool load 4KiB (tls)", c}, {"pool load 4KiB (plain tcp)", plain}} {
		opts.logf("%s", v.name)
		load, store, err := poolLatency(ctx, v.c, opts.Rounds)
		if err != nil {
			return nil, err
		}
		res.Latencies = append(res.Latencies, latency(v.name, load))
		if v.c == c {
			res.Latencies = append(res.Latencies, latency("pool store 4KiB, 2 copies (tls)", store))
		}
	}
	opts.logf("pool loads with a holder cut off (%d episodes)", opts.CutEpisodes)
	cut, slow, err := cutLatency(ctx, c, opts.CutEpisodes)
	if err != nil {
		return nil, err
	}
	res.CutLoads, res.CutLoadsTimedOut = len(cut), slow
	cl := latency("pool load 4KiB, a holder cut (tls)", cut)
	res.CutP99VsTLS = cl.P99us / tlsL.P50us
	res.Latencies = append(res.Latencies, cl)
	for i := range res.Latencies {
		l := &res.Latencies[i]
		l.VsTCP, l.VsTLS = l.P50us/tcpL.P50us, l.P50us/tlsL.P50us
	}

	// Throughput: raw fetches, then pool loads and stores, in rounds
	// that interleave every measure (the machine's load drifts); each
	// figure is the median of its rounds, each ratio the median of the
	// ratios to the raw TLS fetch of the same round.
	conns := []int{1, 2}
	if opts.Conns > 0 {
		conns = []int{opts.Conns}
	}
	pools := map[int]*benchPool{}
	for _, nc := range conns {
		bp, err := newBenchPool(ctx, c, nc)
		if err != nil {
			return nil, err
		}
		defer bp.close()
		pools[nc] = bp
	}
	type measure struct {
		Throughput
		raw    *clustertest.Cluster // raw fetch: nil for tcp
		gbps   []float64
		ratios []float64
	}
	var ms []*measure
	for _, batch := range []int{64 << 10, 2 << 20} {
		ms = append(ms,
			&measure{Throughput: Throughput{Name: "raw tcp fetch", Batch: batch, InFlight: 1, Conns: 1, Baseline: true}},
			&measure{Throughput: Throughput{Name: "raw tls fetch", Batch: batch, InFlight: 1, Conns: 1, Baseline: true}, raw: c})
		for _, nc := range conns {
			for _, inflight := range []int{1, 4} {
				for _, op := range []string{"load", "store"} {
					ms = append(ms, &measure{Throughput: Throughput{Name: "pool " + op, Batch: batch, InFlight: inflight, Conns: nc}})
				}
			}
		}
	}
	for round := range opts.TPRounds {
		opts.logf("throughput, round %d of %d", round+1, opts.TPRounds)
		rawTLS := map[int]float64{}
		for _, m := range ms {
			var gbps float64
			var err error
			if m.Baseline {
				gbps, err = rawThroughput(ctx, m.raw, m.Batch, opts.TPTime)
				if m.raw != nil {
					rawTLS[m.Batch] = gbps
				}
			} else {
				gbps, err = pools[m.Conns].run(ctx, strings.TrimPrefix(m.Name, "pool "), m.Batch, m.InFlight, opts.TPTime)
			}
			if err != nil {
				return nil, err
			}
			m.gbps = append(m.gbps, gbps)
		}
		for _, m := range ms {
			if r := rawTLS[m.Batch]; r > 0 {
				m.ratios = append(m.ratios, m.gbps[len(m.gbps)-1]/r)
			}
		}
	}
	for _, m := range ms {
		m.GBps, m.VsRaw = median(m.gbps), median(m.ratios)
		res.Throughputs = append(res.Throughputs, m.Throughput)
	}
	for _, bp := range pools {
		st := bp.p.Stats()
		res.TPLoadPieces += st.LoadPieces
		res.TPHedged += st.HedgedLoads
	}

	opts.logf("repair after a node loss (%d MiB stored in 2 copies on 4 nodes)", opts.RepairBytes>>20)
	if err := repairRate(ctx, opts.RepairBytes, res); err != nil {
		return nil, err
	}
	for _, t := range res.Throughputs {
		if t.Name == "raw tls fetch" && t.Batch == 2<<20 && t.GBps > 0 {
			res.RepairVsRaw = res.RepairGBps / t.GBps
		}
	}
	return res, nil
}

func latency(name string, d []time.Duration) Latency {
	slices.Sort(d)
	us := func(q float64) float64 { return float64(d[int(q*float64(len(d)-1))]) / 1e3 }
	return Latency{Name: name, P50us: us(0.5), P99us: us(0.99)}
}

// rawServer answers each 64-byte request (its first 8 bytes: the size
// wanted) with that many bytes.
func rawServer(ln net.Listener, cfg *tls.Config) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if cfg != nil {
			c = tls.Server(c, cfg)
		}
		go func() {
			defer c.Close()
			var req [64]byte
			var out []byte
			for {
				if _, err := io.ReadFull(c, req[:]); err != nil {
					return
				}
				n := binary.BigEndian.Uint64(req[:])
				if n > 16<<20 {
					return
				}
				if uint64(cap(out)) < n {
					out = make([]byte, n)
				}
				if _, err := c.Write(out[:n]); err != nil {
					return
				}
			}
		}()
	}
}

// rawConn starts a raw server (TLS when c is not nil, with the cluster's
// certificates) and dials it.
func rawConn(c *clustertest.Cluster) (net.Conn, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	var scfg, ccfg *tls.Config
	if c != nil {
		cert, err := clustertest.NodeCert(c.CA, "raw")
		if err != nil {
			ln.Close()
			return nil, nil, err
		}
		scfg = pki.ServerTLS(cert, c.CA.Cert)
		if ccfg, err = c.ClientTLS("client"); err != nil {
			ln.Close()
			return nil, nil, err
		}
	}
	go rawServer(ln, scfg)
	var conn net.Conn
	if ccfg != nil {
		conn, err = tls.Dial("tcp", ln.Addr().String(), ccfg)
	} else {
		conn, err = net.Dial("tcp", ln.Addr().String())
	}
	if err != nil {
		ln.Close()
		return nil, nil, err
	}
	return conn, func() { conn.Close(); ln.Close() }, nil
}

func rawLatency(ctx context.Context, c *clustertest.Cluster, rounds int) ([]time.Duration, error) {
	conn, done, err := rawConn(c)
	if err != nil {
		return nil, err
	}
	defer done()
	conn.SetDeadline(time.Now().Add(5 * time.Minute))
	var req [64]byte
	binary.BigEndian.PutUint64(req[:], pool.PageSize)
	buf := make([]byte, pool.PageSize)
	out := make([]time.Duration, 0, rounds)
	for i := range rounds + rounds/10 {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		t := time.Now()
		if _, err := conn.Write(req[:]); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			return nil, err
		}
		if i >= rounds/10 { // the first tenth warms up
			out = append(out, time.Since(t))
		}
	}
	return out, nil
}

func rawThroughput(ctx context.Context, c *clustertest.Cluster, batch int, d time.Duration) (float64, error) {
	conn, done, err := rawConn(c)
	if err != nil {
		return 0, err
	}
	defer done()
	conn.SetDeadline(time.Now().Add(d + time.Minute))
	var req [64]byte
	binary.BigEndian.PutUint64(req[:], uint64(batch))
	buf := make([]byte, batch)
	fetch := func() error {
		if _, err := conn.Write(req[:]); err != nil {
			return err
		}
		_, err := io.ReadFull(conn, buf)
		return err
	}
	for range 2 { // warm up
		if err := fetch(); err != nil {
			return 0, err
		}
	}
	total := uint64(0)
	start := time.Now()
	for time.Since(start) < d {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		if err := fetch(); err != nil {
			return 0, err
		}
		total += uint64(batch)
	}
	return float64(total) / time.Since(start).Seconds() / 1e9, nil
}

func poolLatency(ctx context.Context, c *clustertest.Cluster, rounds int) (load, store []time.Duration, err error) {
	p, err := c.NewPool(cluster.Options{})
	if err != nil {
		return nil, nil, err
	}
	defer p.Close()
	r := pool.Region{Owner: "bench/lat", ID: 1}
	defer p.DropOwner(context.Background(), r.Owner)
	const pages = 1024
	page := make([]byte, pool.PageSize)
	for i := range pages {
		page[0] = byte(i)
		t := time.Now()
		if err := p.Store(ctx, r, uint64(i)*pool.PageSize, page); err != nil {
			return nil, nil, err
		}
		store = append(store, time.Since(t))
	}
	for i := range rounds / 4 { // more stores, over the same pages
		t := time.Now()
		if err := p.Store(ctx, r, uint64(i%pages)*pool.PageSize, page); err != nil {
			return nil, nil, err
		}
		store = append(store, time.Since(t))
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range rounds + rounds/10 {
		off := uint64(rng.IntN(pages)) * pool.PageSize
		t := time.Now()
		if err := p.Load(ctx, r, off, page); err != nil {
			return nil, nil, err
		}
		if i >= rounds/10 {
			load = append(load, time.Since(t))
		}
	}
	return load, store, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

// benchPool is a pool with a 64 MiB region stored, to load and overwrite.
type benchPool struct {
	p    *cluster.Pool
	r    pool.Region
	data []byte
}

const benchSpan = 64 << 20

func newBenchPool(ctx context.Context, c *clustertest.Cluster, conns int) (*benchPool, error) {
	p, err := c.NewPool(cluster.Options{Self: fmt.Sprintf("client%d", conns), ConnsPerNode: conns})
	if err != nil {
		return nil, err
	}
	bp := &benchPool{p: p, r: pool.Region{Owner: "bench/tp", ID: 1}, data: make([]byte, benchSpan)}
	for i := range bp.data {
		bp.data[i] = byte(i * 7)
	}
	if err := p.Store(ctx, bp.r, 0, bp.data); err != nil {
		p.Close()
		return nil, err
	}
	return bp, nil
}

func (bp *benchPool) close() {
	bp.p.DropOwner(context.Background(), bp.r.Owner)
	bp.p.Close()
}

// run loads or stores batches over the region from inflight goroutines
// for d, and returns GB/s of pages (a store writes each in 2 copies).
func (bp *benchPool) run(ctx context.Context, op string, batch, inflight int, d time.Duration) (float64, error) {
	var mu sync.Mutex
	var total uint64
	var firstErr error
	start := time.Now()
	stop := start.Add(d)
	var wg sync.WaitGroup
	for g := range inflight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, batch)
			n := uint64(0)
			for i := g; time.Now().Before(stop); i += inflight {
				off := uint64(i*batch) % benchSpan
				var err error
				if op == "load" {
					err = bp.p.Load(ctx, bp.r, off, buf)
				} else {
					err = bp.p.Store(ctx, bp.r, off, bp.data[off:off+uint64(batch)])
				}
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
					return
				}
				n += uint64(batch)
			}
			mu.Lock()
			total += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	return float64(total) / time.Since(start).Seconds() / 1e9, nil
}

func repairRate(ctx context.Context, size uint64, res *Result) error {
	c, err := clustertest.Start([]string{"n1", "n2", "n3", "n4"}, 8<<30)
	if err != nil {
		return err
	}
	defer c.Close()
	p, err := c.NewPool(cluster.Options{RepairInterval: 10 * time.Millisecond})
	if err != nil {
		return err
	}
	defer p.Close()
	r := pool.Region{Owner: "bench/repair", ID: 1}
	buf := make([]byte, 2<<20)
	for i := range buf {
		buf[i] = byte(i * 13)
	}
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		if err := p.Store(ctx, r, off, buf[:min(uint64(len(buf)), size-off)]); err != nil {
			return err
		}
	}
	victim, most := "", uint64(0)
	for node, b := range p.Stats().NodeBytes {
		if b > most {
			victim, most = node, b
		}
	}
	before := p.Stats().RepairedBytes
	start := time.Now()
	c.Kill(victim)
	deadline := start.Add(10 * time.Minute)
	for {
		st := p.Stats()
		if st.RepairedBytes-before >= most && st.UnderReplicatedPages == 0 {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("poolbench: repair did not finish: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	res.RepairSeconds = time.Since(start).Seconds()
	res.RepairBytes = p.Stats().RepairedBytes - before
	res.RepairGBps = float64(res.RepairBytes) / res.RepairSeconds / 1e9
	return nil
}

// Print writes the result as tables.
func (r *Result) Print(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "LATENCY\tP50\tP99\tP50 / TCP RTT\tP50 / TLS RTT")
	for _, l := range r.Latencies {
		fmt.Fprintf(tw, "%s\t%.1f us\t%.1f us\t%.2fx\t%.2fx\n", l.Name, l.P50us, l.P99us, l.VsTCP, l.VsTLS)
	}
	tw.Flush()
	fmt.Fprintf(w, "CUT     %d loads with a holder cut off: %d waited for the %v timeout, p99 %.0fx the TLS round trip\n",
		r.CutLoads, r.CutLoadsTimedOut, cutTimeout, r.CutP99VsTLS)
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "THROUGHPUT\tBATCH\tIN FLIGHT\tCONNS/NODE\tGB/s\t/ RAW TLS")
	for _, t := range r.Throughputs {
		fmt.Fprintf(tw, "%s\t%d KiB\t%d\t%d\t%.2f\t%.2fx\n", t.Name, t.Batch>>10, t.InFlight, t.Conns, t.GBps, t.VsRaw)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintf(w, "HEDGED  %d of the %d chunk reads of the throughput measures (healthy holders)\n", r.TPHedged, r.TPLoadPieces)
	fmt.Fprintf(w, "REPAIR  %d MiB re-replicated in %.2f s after a node loss: %.2f GB/s (%.2fx the raw TLS fetch of 2 MiB)\n",
		r.RepairBytes>>20, r.RepairSeconds, r.RepairGBps, r.RepairVsRaw)
}
