package cluster_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/memory/cluster"
	"github.com/onebox-project/onebox/memory/cluster/clustertest"
	"github.com/onebox-project/onebox/memory/pageproto"
	"github.com/onebox-project/onebox/memory/pool"
)

func start(t *testing.T, nodes int, capacity uint64, opts cluster.Options) (*clustertest.Cluster, *cluster.Pool) {
	t.Helper()
	names := make([]string, nodes)
	for i := range names {
		names[i] = fmt.Sprintf("n%d", i+1)
	}
	c, err := clustertest.Start(names, capacity)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	p, err := c.NewPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return c, p
}

func random(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func used(c *clustertest.Cluster, skip ...string) (total uint64, holders int) {
	for _, n := range c.Nodes {
		if len(skip) > 0 && n.Name == skip[0] {
			continue
		}
		if u := n.Server.Stat().Used; u > 0 {
			total += u
			holders++
		}
	}
	return
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Pages stored through the pool read back the same, in 2 copies on 2
// different nodes; what was never stored or was dropped reads as zeros.
func TestStoreLoadTwoCopies(t *testing.T) {
	c, p := start(t, 3, 64<<20, cluster.Options{})
	ctx := context.Background()
	r := pool.Region{Owner: "n9/1", ID: 7}
	data := random(1<<20+3*pool.PageSize, 1)
	off := uint64(cluster.ChunkSize - 2*pool.PageSize) // spans 6 chunks, unaligned
	if err := p.Store(ctx, r, off, data); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := p.Load(ctx, r, off, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load: %v, equal %v", err, bytes.Equal(got, data))
	}
	if total, _ := used(c); total != 2*uint64(len(data)) {
		t.Fatalf("servers hold %d bytes, want 2 copies of %d", total, len(data))
	}
	st := p.Stats()
	for node, b := range st.NodeBytes {
		if b > uint64(len(data)) {
			t.Fatalf("node %s holds %d bytes of %d: two copies on one node", node, b, len(data))
		}
	}
	if st.Pages != uint64(len(data))/pool.PageSize || st.UnderReplicatedPages != 0 {
		t.Fatalf("stats %+v", st)
	}
	// A page in the middle, unaligned to chunks; then zeros elsewhere.
	one := make([]byte, pool.PageSize)
	if err := p.Load(ctx, r, off+cluster.ChunkSize, one); err != nil || !bytes.Equal(one, data[cluster.ChunkSize:cluster.ChunkSize+pool.PageSize]) {
		t.Fatalf("one page: %v", err)
	}
	if err := p.Load(ctx, pool.Region{Owner: "n9/1", ID: 8}, 0, one); err != nil || !bytes.Equal(one, make([]byte, pool.PageSize)) {
		t.Fatalf("never stored: %v, not zeros", err)
	}
	// Drop two pages inside; they read as zeros, the rest stays.
	if err := p.Drop(ctx, r, off+pool.PageSize, 2*pool.PageSize); err != nil {
		t.Fatal(err)
	}
	if err := p.Load(ctx, r, off, got); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	clear(want[pool.PageSize : 3*pool.PageSize])
	if !bytes.Equal(got, want) {
		t.Fatal("after drop: wrong bytes")
	}
	if total, _ := used(c); total != 2*uint64(len(data)-2*pool.PageSize) {
		t.Fatalf("after drop servers hold %d bytes", total)
	}
	if err := p.DropOwner(ctx, "n9/1"); err != nil {
		t.Fatal(err)
	}
	if total, _ := used(c); total != 0 {
		t.Fatalf("after DropOwner servers hold %d bytes", total)
	}
	if err := p.Load(ctx, r, off, got); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("after DropOwner: not zeros")
	}
}

// Bad arguments are refused before anything is sent.
func TestBadArguments(t *testing.T) {
	_, p := start(t, 2, 1<<20, cluster.Options{})
	ctx := context.Background()
	for name, err := range map[string]error{
		"unaligned offset": p.Store(ctx, pool.Region{Owner: "o"}, 100, make([]byte, pool.PageSize)),
		"partial page":     p.Load(ctx, pool.Region{Owner: "o"}, 0, make([]byte, 100)),
		"no owner":         p.Store(ctx, pool.Region{}, 0, make([]byte, pool.PageSize)),
		"huge drop":        p.Drop(ctx, pool.Region{Owner: "o"}, 0, 1<<62),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// With 2 nodes and 2 replicas, losing one leaves every page with one
// copy: loads go on from the survivor, and the pages are counted as
// under-replicated since no node can take the second copy.
func TestNodeLossUnderReplicated(t *testing.T) {
	c, p := start(t, 2, 64<<20, cluster.Options{RepairInterval: 50 * time.Millisecond})
	ctx := context.Background()
	r := pool.Region{Owner: "o", ID: 1}
	data := random(512<<10, 2)
	if err := p.Store(ctx, r, 0, data); err != nil {
		t.Fatal(err)
	}
	c.Kill("n1")
	got := make([]byte, len(data))
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after losing n1: %v", err)
	}
	waitFor(t, "under-replicated pages counted", func() bool { return p.Under() == uint64(len(data))/pool.PageSize })
	// A store still succeeds on the one copy left.
	if err := p.Store(ctx, r, 0, data[:pool.PageSize]); err != nil {
		t.Fatal(err)
	}
	c.Kill("n2")
	waitFor(t, "lost pages counted", func() bool { return p.Stats().LostPages == uint64(len(data))/pool.PageSize })
	if err := p.Load(ctx, r, 0, got); err == nil {
		t.Fatal("load with every copy gone: no error")
	}
}

// Losing a node of 4: loads go on, and the repair loop copies what it
// held from the survivors to the others until every page has 2 copies.
func TestNodeLossRepaired(t *testing.T) {
	c, p := start(t, 4, 64<<20, cluster.Options{RepairInterval: 50 * time.Millisecond})
	ctx := context.Background()
	r := pool.Region{Owner: "o", ID: 1}
	data := random(4<<20, 3)
	if err := p.Store(ctx, r, 0, data); err != nil {
		t.Fatal(err)
	}
	victim := ""
	for node, b := range p.Stats().NodeBytes {
		if victim == "" || b > p.Stats().NodeBytes[victim] {
			victim = node
		}
	}
	held := c.Node(victim).Server.Stat().Used
	c.Kill(victim)
	got := make([]byte, len(data))
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after losing %s: %v", victim, err)
	}
	waitFor(t, "repair", func() bool {
		total, _ := used(c, victim)
		return p.Under() == 0 && total == 2*uint64(len(data)) && p.Stats().NodeBytes[victim] == 0
	})
	st := p.Stats()
	if st.RepairedBytes < held || st.NodeBytes[victim] != 0 {
		t.Fatalf("repaired %d bytes, %s held %d; stats %+v", st.RepairedBytes, victim, held, st)
	}
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after repair: %v", err)
	}
	// Lose another: still everything readable, repaired again.
	for node := range st.NodeBytes {
		c.Kill(node)
		break
	}
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after the second loss: %v", err)
	}
}

// Reservations beyond the donated capacity fail with pool.ErrFull, as do
// stores beyond it; released capacity can be reserved again.
func TestFull(t *testing.T) {
	c, p := start(t, 2, 1<<20, cluster.Options{})
	ctx := context.Background()
	if err := p.Reserve(ctx, "a", 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := p.Reserve(ctx, "b", pool.PageSize); !errors.Is(err, pool.ErrFull) {
		t.Fatalf("reserve beyond capacity: %v, want ErrFull", err)
	}
	p.Release("a", 512<<10)
	if err := p.Reserve(ctx, "b", 512<<10); err != nil {
		t.Fatalf("reserve after release: %v", err)
	}
	if err := p.DropOwner(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		if st := n.Server.Stat(); st.Reserved != 512<<10 {
			t.Fatalf("%s: %d reserved, want 512 KiB", n.Name, st.Reserved)
		}
	}
	r := pool.Region{Owner: "a", ID: 1}
	if err := p.Store(ctx, r, 0, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	err := p.Store(ctx, r, 1<<20, make([]byte, pool.PageSize))
	if !errors.Is(err, pool.ErrFull) {
		t.Fatalf("store beyond capacity: %v, want ErrFull", err)
	}
	if total, _ := used(c); total != 2<<20 {
		t.Fatalf("servers hold %d bytes after a refused store", total)
	}
}

// Many goroutines on one pipelined connection per node get their own
// pages back.
func TestConcurrentPipelined(t *testing.T) {
	_, p := start(t, 3, 256<<20, cluster.Options{})
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := pool.Region{Owner: "o", ID: uint64(g % 4)}
			for i := range 50 {
				off := uint64(g*1000+i) * pool.PageSize
				data := random(pool.PageSize*(1+i%3), uint64(g*1000+i))
				if err := p.Store(ctx, r, off, data); err != nil {
					errs <- err
					return
				}
				got := make([]byte, len(data))
				if err := p.Load(ctx, r, off, got); err != nil || !bytes.Equal(got, data) {
					errs <- fmt.Errorf("goroutine %d load %d: %v, equal %v", g, i, err, bytes.Equal(got, data))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// Garbage, truncated and oversized frames on the page port are answered
// with StatusBadFrame and the connection is closed; a client of another
// cluster never gets that far.
func TestGarbageFrames(t *testing.T) {
	c, _ := start(t, 1, 1<<20, cluster.Options{})
	cfg, err := c.ClientTLS("intruder")
	if err != nil {
		t.Fatal(err)
	}
	hello := pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpHello, ID: 1, Arg: 5}, "", nil)
	big := pageproto.Header{Op: pageproto.OpStore, ID: 2}
	bigHdr := make([]byte, pageproto.HeaderSize)
	big.OwnerLen, big.Length = 1, pageproto.MaxPayload+1
	big.Put(bigHdr)
	trunc := pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpStore, ID: 2}, "o", make([]byte, pageproto.PageSize))
	for name, send := range map[string][]byte{
		"garbage":          []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n" + string(make([]byte, 64))),
		"no hello":         pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpLoad, ID: 1, Arg: pageproto.PageSize}, "o", nil),
		"oversized":        append(bytes.Clone(hello), bigHdr...),
		"truncated":        append(bytes.Clone(hello), trunc[:len(trunc)-100]...),
		"truncated header": append(bytes.Clone(hello), trunc[:20]...),
		"unaligned":        append(bytes.Clone(hello), pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpLoad, ID: 2, Offset: 5, Arg: pageproto.PageSize}, "o", nil)...),
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := tls.Dial("tcp", c.Nodes[0].Addr, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err := conn.Write(send); err != nil {
				t.Fatal(err)
			}
			conn.CloseWrite()
			var st pageproto.Status
			var msg []byte
			for {
				h, p, err := pageproto.ReadFrame(conn, nil)
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("reading responses: %v", err)
				}
				st, msg = pageproto.Status(h.Arg), p
			}
			if st != pageproto.StatusBadFrame || !bytes.Contains(msg, []byte("bad frame")) {
				t.Fatalf("last response %v %q, want bad_frame then the connection closed", st, msg)
			}
			t.Logf("%s: %s", name, msg)
		})
	}
	// Another cluster's certificate: refused in the handshake.
	other, err := pki.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := clustertest.NodeCert(other, "n1")
	if err != nil {
		t.Fatal(err)
	}
	bad := pki.ClientTLS(cert, other.Cert)
	bad.NextProtos = []string{pki.ProtoPage}
	bad.InsecureSkipVerify, bad.VerifyPeerCertificate = true, nil
	if conn, err := tls.Dial("tcp", c.Nodes[0].Addr, bad); err == nil {
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		conn.Write(hello)
		if _, _, err := pageproto.ReadFrame(conn, nil); err == nil {
			t.Fatal("a client of another cluster was served")
		}
		conn.Close()
	}
}

// A holder that restarts (same name, same address, alive all along) has
// lost its copies: loads must not take its zeros, and the pool copies the
// chunks again.
func TestHolderRestarted(t *testing.T) {
	c, p := start(t, 4, 64<<20, cluster.Options{RepairInterval: 50 * time.Millisecond})
	ctx := context.Background()
	r := pool.Region{Owner: "o", ID: 1}
	data := random(2<<20, 4)
	if err := p.Store(ctx, r, 0, data); err != nil {
		t.Fatal(err)
	}
	for node := range p.Stats().NodeBytes {
		if err := c.Restart(node); err != nil {
			t.Fatal(err)
		}
		break
	}
	got := make([]byte, len(data))
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after a holder restarted: %v, equal %v", err, bytes.Equal(got, data))
	}
	waitFor(t, "copies made again", func() bool {
		total, _ := used(c)
		return p.Under() == 0 && total == 2*uint64(len(data))
	})
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after repair: %v", err)
	}
}

// A holder whose link is cut (alive to membership, answering nothing)
// costs at most about one Timeout, not one per request: loads go to the
// other copy, stores pass over it, queued dials fail at once.
func TestCutHolderBounded(t *testing.T) {
	const timeout = time.Second
	c, p := start(t, 3, 64<<20, cluster.Options{Timeout: timeout, RepairInterval: time.Hour})
	ctx := context.Background()
	r := pool.Region{Owner: "o", ID: 1}
	data := random(16*cluster.ChunkSize, 5)
	if err := p.Store(ctx, r, 0, data); err != nil {
		t.Fatal(err)
	}
	// Cut the node holding the most chunks (every chunk is on 2 of 3).
	victim, most := "", uint64(0)
	for n, b := range p.Stats().NodeBytes {
		if b > most {
			victim, most = n, b
		}
	}
	c.Cut(victim)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	// Loads first: those that try the cut node find the connection dead
	// after Timeout and read the other copy.
	for i := range 16 {
		wg.Add(1)
		off := uint64(i) * cluster.ChunkSize
		go func() {
			defer wg.Done()
			got := make([]byte, cluster.ChunkSize)
			if err := p.Load(ctx, r, off, got); err != nil || !bytes.Equal(got, data[off:off+cluster.ChunkSize]) {
				errs <- fmt.Errorf("load at %d: %v", off, err)
			}
		}()
	}
	wg.Wait()
	// Then stores: they must not each wait a dial Timeout for the cut
	// node (one at a time, under its lock, that would be ~10 timeouts).
	for i := range 16 {
		wg.Add(1)
		off := uint64(i) * cluster.ChunkSize
		go func() {
			defer wg.Done()
			if err := p.Store(ctx, r, off, data[off:off+pool.PageSize]); err != nil {
				errs <- fmt.Errorf("store at %d: %v", off, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// One Timeout per request, in series, would be 32 s; a generous bound
	// well under that, so a loaded machine does not fail the test.
	if d := time.Since(start); d > 16*timeout {
		t.Fatalf("32 requests with a holder cut off took %v (Timeout %v)", d, timeout)
	}
	c.Heal(victim)
	got := make([]byte, len(data))
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load after heal: %v", err)
	}
}

// Random stores, loads and drops against pool.Local as the model, while
// nodes are killed and restarted one at a time (each loss repaired before
// the next): every load returns what the model says.
func TestAgainstModel(t *testing.T) {
	var logs bytes.Buffer
	var logMu sync.Mutex
	c, p := start(t, 5, 256<<20, cluster.Options{RepairInterval: 20 * time.Millisecond, Timeout: 300 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(lockedWriter{&logMu, &logs}, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	t.Cleanup(func() {
		if t.Failed() {
			logMu.Lock()
			var keep []string
			for _, l := range strings.Split(logs.String(), "\n") {
				if !strings.Contains(l, "level=DEBUG") {
					keep = append(keep, l)
				}
			}
			logMu.Unlock()
			t.Logf("pool log, test steps (last 60 lines):\n%s", strings.Join(keep[max(0, len(keep)-60):], "\n"))
		}
	})
	ctx := context.Background()
	note := func(format string, args ...any) {
		logMu.Lock()
		fmt.Fprintf(&logs, "TEST "+format+"\n", args...)
		logMu.Unlock()
	}
	model := pool.NewLocal(0)
	rng := rand.New(rand.NewPCG(7, 7))
	regions := []pool.Region{{Owner: "a", ID: 1}, {Owner: "a", ID: 2}, {Owner: "b", ID: 1}}
	const span = 4 << 20
	alive := []string{"n1", "n2", "n3", "n4", "n5"}
	check := func(step int, r pool.Region, off uint64, n int) {
		t.Helper()
		got, want := make([]byte, n), make([]byte, n)
		if err := p.Load(ctx, r, off, got); err != nil {
			t.Fatalf("step %d: load %v+%d: %v", step, off, n, err)
		}
		model.Load(ctx, r, off, want)
		if !bytes.Equal(got, want) {
			t.Fatalf("step %d: load %s/%d at %d+%d differs from the model", step, r.Owner, r.ID, off, n)
		}
	}
	// settle waits for two repair passes begun after a change, the last
	// finding nothing to repair (a second loss before that would be a
	// double failure, which 2 copies do not survive).
	settle := func(what string) {
		t.Helper()
		n := p.Passes()
		deadline := time.Now().Add(20 * time.Second)
		for !(p.Passes() >= n+2 && p.Under() == 0 && p.Stats().LostPages == 0) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s: %d passes, stats %+v, members %+v", what, p.Passes()-n, p.Stats(), c.Members())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	cut, cutUntil := "", 0
	for step := range 400 {
		if cut != "" && step >= cutUntil {
			c.Heal(cut)
			note("step %d: heal %s", step, cut)
			cut = ""
			settle("repair after a cut")
		}
		r := regions[rng.IntN(len(regions))]
		off := uint64(rng.IntN(span/pool.PageSize)) * pool.PageSize
		n := (1 + rng.IntN(min(96, int(span-off)/pool.PageSize))) * pool.PageSize
		switch x := rng.IntN(100); {
		case x < 40:
			data := random(n, uint64(step))
			if err := p.Store(ctx, r, off, data); err != nil {
				t.Fatalf("step %d: store: %v", step, err)
			}
			if off/cluster.ChunkSize <= 1 && (off+uint64(n)-1)/cluster.ChunkSize >= 1 {
				note("step %d: store %s/%d chunk 1: holders %v", step, r.Owner, r.ID, p.Stats().NodeBytes)
			}
			model.Store(ctx, r, off, data)
		case x < 80:
			check(step, r, off, n)
		case x < 90:
			p.Drop(ctx, r, off, uint64(n))
			model.Drop(ctx, r, off, uint64(n))
		case x < 92:
			note("step %d: drop owner %s: %v", step, r.Owner, p.DropOwner(ctx, r.Owner))
			model.DropOwner(ctx, r.Owner)
		case x < 94 && cut == "":
			// A cut link, healed a few steps later: the node stays a
			// member; stores pass it over, loads read the other copy.
			cut = alive[rng.IntN(len(alive))]
			c.Cut(cut)
			note("step %d: cut %s", step, cut)
			cutUntil = step + 5 + rng.IntN(20)
		case x < 94:
		case cut != "":
			// No kill or restart while a link is cut: that would be a
			// second failure.
		case x < 97 && len(alive) > 3:
			i := rng.IntN(len(alive))
			c.Kill(alive[i])
			note("step %d: kill %s", step, alive[i])
			alive = append(alive[:i], alive[i+1:]...)
			settle("repair after a kill")
		default:
			victim := alive[rng.IntN(len(alive))]
			if err := c.Restart(victim); err != nil {
				t.Fatal(err)
			}
			note("step %d: restart %s", step, victim)
			// Loads right away must not take the restarted node's zeros.
			check(step, r, off, n)
			settle("repair after a restart")
		}
	}
	for _, r := range regions {
		check(-1, r, 0, span)
	}
	if cut != "" {
		c.Heal(cut)
	}
	// No copy left behind: the live servers hold exactly the copies the
	// pool maps (stale ones from cuts and drops that missed reclaimed,
	// extra ones trimmed).
	var held, placed uint64
	deadline := time.Now().Add(20 * time.Second)
	for {
		held, placed = 0, 0
		hn, pn := map[string]uint64{}, p.Stats().NodeBytes
		for _, n := range alive {
			hn[n] = c.Node(n).Server.Stat().Used
			held += hn[n]
		}
		for _, b := range pn {
			placed += b
		}
		if held == placed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("servers hold %v, the pool maps %v", hn, pn)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d bytes of copies, %d stale chunks reclaimed", held, p.Stats().ReclaimedChunks)
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// A holder whose link is cut (alive to membership, answering nothing,
// its connection still open) does not make loads wait for Timeout: after
// the hedge delay the second holder is asked too and answers. Counted,
// not timed: every load returns the right bytes and none had to wait for
// its first holder to fail.
func TestCutHolderHedged(t *testing.T) {
	c, p := start(t, 3, 64<<20, cluster.Options{Timeout: 20 * time.Second, RepairInterval: time.Hour})
	ctx := context.Background()
	r := pool.Region{Owner: "o", ID: 1}
	const chunks = 16
	data := random(chunks*cluster.ChunkSize, 6)
	if err := p.Store(ctx, r, 0, data); err != nil {
		t.Fatal(err)
	}
	// No load before the cut: on a loaded machine a hedge then could mark
	// the victim as read-last already (the stores made the connections).
	got := make([]byte, len(data))
	victim, most := "", uint64(0)
	for n, b := range p.Stats().NodeBytes {
		if b > most {
			victim, most = n, b
		}
	}
	c.Cut(victim)
	defer c.Heal(victim)
	var wg sync.WaitGroup
	errs := make(chan error, 4*chunks)
	for round := range 2 {
		for i := range chunks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// One page per load, in another place each round.
				off := uint64(i)*cluster.ChunkSize + uint64(round)*pool.PageSize
				one := make([]byte, pool.PageSize)
				if err := p.Load(ctx, r, off, one); err != nil || !bytes.Equal(one, data[off:off+pool.PageSize]) {
					errs <- fmt.Errorf("load at %d: %v", off, err)
				}
			}()
		}
		wg.Wait()
	}
	// A whole-region load: its pieces on the cut node are hedged too.
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, data) {
		errs <- fmt.Errorf("load of the region: %v", err)
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	st := p.Stats()
	t.Logf("victim %s: %d loads hedged, %d answered by the second holder, %d failed over", victim, st.HedgedLoads, st.HedgeWins, st.LoadFailovers)
	if st.LoadFailovers != 0 {
		t.Errorf("%d loads waited for the cut holder to fail (want 0: hedged instead)", st.LoadFailovers)
	}
	if st.HedgeWins == 0 {
		t.Errorf("no load was answered by a second holder, though %s holds %d bytes of first copies and is cut", victim, most)
	}
}

// A holder declared failed that comes back as the same instance (a healed
// partition, a stopped agent continued) still holds its old copies: the
// pool re-replicated them meanwhile, and drops them there once the node
// is alive again, chunks dropped while it was away included. What the
// node holds again afterwards is kept.
func TestReturningHolderReclaimed(t *testing.T) {
	c, p := start(t, 4, 64<<20, cluster.Options{RepairInterval: 20 * time.Millisecond})
	ctx := context.Background()
	r := pool.Region{Owner: "o", ID: 1}
	data := random(4<<20, 8)
	if err := p.Store(ctx, r, 0, data); err != nil {
		t.Fatal(err)
	}
	victim, most := "", uint64(0)
	for n, b := range p.Stats().NodeBytes {
		if b > most {
			victim, most = n, b
		}
	}
	c.SetAlive(victim, false) // declared failed; its server keeps running
	waitFor(t, "re-replication without "+victim, func() bool {
		total, _ := used(c, victim)
		return p.Under() == 0 && p.Stats().NodeBytes[victim] == 0 && total == 2*uint64(len(data))
	})
	if held := c.Node(victim).Server.Stat().Used; held != most {
		t.Fatalf("%s holds %d bytes while away, want its %d", victim, held, most)
	}
	// Drop the first 1 MiB while it is away: those chunks are gone from
	// the pool's table, their copies on the victim are not.
	if err := p.Drop(ctx, r, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if p.Orphans() == 0 {
		t.Fatal("no stale copy remembered")
	}
	c.SetAlive(victim, true)
	waitFor(t, "stale copies on "+victim+" reclaimed", func() bool {
		return c.Node(victim).Server.Stat().Used == 0 && p.Orphans() == 0
	})
	want := bytes.Clone(data)
	clear(want[:1<<20])
	got := make([]byte, len(data))
	if err := p.Load(ctx, r, 0, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("load after reclaim: %v, equal %v", err, bytes.Equal(got, want))
	}
	// New chunks go to the victim again, and stay there.
	r2 := pool.Region{Owner: "o", ID: 2}
	if err := p.Store(ctx, r2, 0, data); err != nil {
		t.Fatal(err)
	}
	n := p.Passes()
	waitFor(t, "two repair passes", func() bool { return p.Passes() >= n+2 })
	if held, placed := c.Node(victim).Server.Stat().Used, p.Stats().NodeBytes[victim]; held != placed || held == 0 {
		t.Fatalf("%s holds %d bytes, the pool placed %d there", victim, held, placed)
	}
	if err := p.Load(ctx, r2, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("load of new pages: %v", err)
	}
	t.Logf("%s: %d stale chunks reclaimed", victim, p.Stats().ReclaimedChunks)
}
