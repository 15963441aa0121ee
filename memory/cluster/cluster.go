// Package cluster is the memory pool spread over the cluster: it
// implements pool.Pages on top of other nodes' page servers
// (memory/pageserver), reached over the page protocol (memory/pageproto).
//
// The owner side decides and remembers where pages live. A region is cut
// into chunks of ChunkSize; the first store into a chunk places it on
// Replicas live nodes chosen by rendezvous hashing of (owner, region,
// chunk) (never this node, never a failed one), and later stores go to
// the same nodes. Loads read one copy and fall back to the others. A
// background loop drops copies on nodes that failed, left or restarted,
// and copies each under-replicated chunk from a survivor to a new node
// until every chunk has Replicas copies again.
package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/bits"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
	"github.com/onebox-project/onebox/memory/pool"
)

// ChunkPages is how many pages a chunk holds: the unit of placement and
// repair (its pages are tracked in one 64-bit mask).
const ChunkPages = 64

// ChunkSize is the bytes of a chunk.
const ChunkSize = ChunkPages * pool.PageSize

// Member is a node as the membership layer sees it.
type Member struct {
	Name  string
	Alive bool // alive or suspect; failed, leaving and left nodes are not
}

// Options configure a Pool.
type Options struct {
	// Self is this node's name: its own pages are not placed on it
	// (a copy there dies with the program), unless IncludeSelf.
	Self        string
	IncludeSelf bool
	// Replicas is how many copies of each page to keep (default 2).
	Replicas int
	// Dial opens a connection to node's page server (mutual TLS, ALPN
	// onebox-page/1, the certificate checked to be node's).
	Dial func(ctx context.Context, node string) (net.Conn, error)
	// Members lists the cluster's nodes.
	Members func() []Member
	// ConnsPerNode is how many pipelined connections to keep per node
	// (default 1; see docs/memory-pool.md for the measurement).
	ConnsPerNode int
	// Timeout bounds each dial and each request's wait (default 3s).
	Timeout time.Duration
	// RepairInterval is how often placements are checked (default 500ms).
	RepairInterval time.Duration
	Logger         *slog.Logger
}

// holder is one copy of a chunk: the node and the server instance that
// took it (a restarted server lost it).
type holder struct {
	node     string
	instance uint64
}

type chunk struct {
	mu      sync.RWMutex
	holders []holder      // guarded by mu
	pages   atomic.Uint64 // bit i: page i stored
	dead    atomic.Bool   // removed from the table by the reclaimer (set under mu)
	// Nodes a stale copy is being dropped from: no target meanwhile
	// (reclaim.go); guarded by mu.
	reclaiming []string
}

type nodeClient struct {
	name string

	mu       sync.Mutex
	conns    []*conn // guarded by mu
	next     int     // guarded by mu
	instance uint64  // the server's instance last seen; guarded by mu
	capacity uint64  // guarded by mu
	// The last dial that failed (Unix ns) and why; guarded by mu.
	dialFailedAt int64
	dialErr      error

	failedAt atomic.Int64 // last dial or connection failure (Unix ns); not under mu, which a dial holds
	slowAt   atomic.Int64 // last time a hedged load was answered by another holder first (Unix ns)
	// live is a copy of conns for readers that must not wait for mu (a
	// dial holds it): loads look for a connection that works now.
	live  atomic.Pointer[[]*conn]
	lnext atomic.Uint32
}

// Pool is the replicated cluster pool. Safe for concurrent use.
type Pool struct {
	opts     Options
	instance uint64
	log      *slog.Logger

	mu      sync.Mutex
	nodes   map[string]*nodeClient            // guarded by mu
	regions map[pool.Region]map[uint64]*chunk // chunks by index; guarded by mu
	res     map[string]map[string]uint64      // reserved bytes by owner, node; guarded by mu
	closed  bool                              // guarded by mu

	under    atomic.Uint64 // pages with fewer copies than Replicas
	lost     atomic.Uint64 // pages with no copy left
	repaired atomic.Uint64 // bytes copied by repair
	passes   atomic.Uint64 // repair passes done

	lat       [3]latencies  // recent loads by sizeClass: the hedge delays
	hedges    budget        // hedges allowed
	pieces    atomic.Uint64 // chunk reads sent to a first holder
	hedged    atomic.Uint64 // loads asked of a second holder
	hedgeWins atomic.Uint64 // ... that it answered first
	failovers atomic.Uint64 // loads whose first holder failed, read from another
	reclaimed atomic.Uint64 // stale copies dropped (reclaim.go)

	omu         sync.Mutex
	orphans     map[string]map[chunkRef]struct{} // stale copies by node (reclaim.go); guarded by omu
	orphansFull bool                             // guarded by omu

	kick    chan struct{}
	stop    chan struct{}
	closed2 chan struct{}
}

var _ pool.Pages = (*Pool)(nil)

// New starts a Pool and its repair loop.
func New(opts Options) (*Pool, error) {
	if opts.Dial == nil || opts.Members == nil {
		return nil, errors.New("cluster: Dial and Members are required")
	}
	if opts.Replicas == 0 {
		opts.Replicas = 2
	}
	if opts.Replicas < 1 || opts.Replicas > 16 {
		return nil, fmt.Errorf("cluster: %d replicas: want 1 to 16", opts.Replicas)
	}
	if opts.ConnsPerNode <= 0 {
		opts.ConnsPerNode = 1
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 3 * time.Second
	}
	if opts.RepairInterval <= 0 {
		opts.RepairInterval = 500 * time.Millisecond
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	p := &Pool{opts: opts, instance: rand.Uint64() | 1, log: opts.Logger,
		nodes: map[string]*nodeClient{}, regions: map[pool.Region]map[uint64]*chunk{}, res: map[string]map[string]uint64{},
		orphans: map[string]map[chunkRef]struct{}{},
		kick:    make(chan struct{}, 1), stop: make(chan struct{}), closed2: make(chan struct{})}
	p.hedges.tokens.Store(hedgeBurst * hedgeRatio)
	go p.repairLoop()
	return p, nil
}

// Close stops the repair loop and closes every connection. Pages stay on
// the servers (DropOwner forgets them).
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	nodes := p.nodes
	p.mu.Unlock()
	close(p.stop)
	<-p.closed2
	for _, nc := range nodes {
		nc.mu.Lock()
		for _, c := range nc.conns {
			if c != nil {
				c.close(errors.New("pool closed"))
			}
		}
		nc.mu.Unlock()
	}
	return nil
}

// Replicas is the configured number of copies.
func (p *Pool) Replicas() int { return p.opts.Replicas }

func (p *Pool) node(name string) *nodeClient {
	p.mu.Lock()
	defer p.mu.Unlock()
	nc := p.nodes[name]
	if nc == nil {
		nc = &nodeClient{name: name, conns: make([]*conn, p.opts.ConnsPerNode)}
		p.nodes[name] = nc
	}
	return nc
}

// conn returns a working connection to node, dialing if needed.
func (p *Pool) conn(ctx context.Context, node string) (*conn, error) {
	nc := p.node(node)
	nc.mu.Lock()
	defer nc.mu.Unlock()
	i := nc.next % len(nc.conns)
	nc.next++
	if c := nc.conns[i]; c != nil && c.broken() == nil {
		return c, nil
	}
	// Callers queued behind a dial that failed (a cut link makes each
	// take Timeout) fail at once instead of dialing in turn.
	if since := time.Duration(time.Now().UnixNano() - nc.dialFailedAt); since < redialAfter {
		return nil, fmt.Errorf("cluster: node %s unreachable (a dial failed %v ago): %w", node, since.Round(time.Millisecond), nc.dialErr)
	}
	dctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	dialStart := time.Now()
	raw, err := p.opts.Dial(dctx, node)
	if err == nil {
		var c *conn
		if c, err = dialConn(dctx, node, raw, p.instance, p.opts.Timeout); err == nil {
			if nc.instance != 0 && nc.instance != c.stat.Instance {
				p.log.Info("memory pool: page server restarted; its copies are gone", "node", node)
				p.forgetOrphans(node)
				p.kickRepair()
			}
			nc.instance, nc.capacity = c.stat.Instance, c.stat.Capacity
			nc.conns[i] = c
			live := slices.Clone(nc.conns)
			nc.live.Store(&live)
			return c, nil
		}
	} else {
		err = fmt.Errorf("cluster: dial %s: %w", node, err)
	}
	now := time.Now()
	nc.failedAt.Store(now.UnixNano())
	// Only a slow failure (a dial into a cut link waits for Timeout) is
	// worth not repeating; a refused one is cheap and may be a restart.
	if ctx.Err() == nil && now.Sub(dialStart) > slowDial {
		nc.dialFailedAt, nc.dialErr = now.UnixNano(), err
	}
	return nil, err
}

// redialAfter is how long after a slow failed dial a node is not dialed
// again; slowDial is what counts as slow.
const (
	redialAfter = time.Second
	slowDial    = 100 * time.Millisecond
)

// stale reports whether err is a used connection found broken: the
// request is worth one retry on a new connection.
func stale(c *conn, err error) bool {
	return c != nil && c.used.Load() && errors.Is(err, ErrConnClosed)
}

// do sends one request to node and waits for the answer, on a new
// connection if the one it had turned out stale. With inst not 0, a
// server of another instance (it restarted) is an error. It returns the
// answer's payload and the instance of the server that gave it.
func (p *Pool) do(ctx context.Context, node string, inst uint64, h pageproto.Header, owner string, data, dst []byte) ([]byte, uint64, error) {
	for attempt := 0; ; attempt++ {
		c, err := p.conn(ctx, node)
		if err == nil && inst != 0 && c.stat.Instance != inst {
			err = fmt.Errorf("%w: %s", errRestarted, node)
		}
		if err != nil {
			return nil, 0, err
		}
		_, msg, err := c.do(ctx, h, owner, data, dst)
		if err != nil && attempt == 0 && stale(c, err) {
			continue
		}
		return msg, c.stat.Instance, err
	}
}

// errRestarted: the node's server is a new instance, without the copies
// its previous one held (the node itself is fine).
var errRestarted = errors.New("cluster: node restarted since it took the chunk")

func (p *Pool) noteFailure(node string, err error) {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return
	}
	if errors.Is(err, errRestarted) {
		p.kickRepair()
		return
	}
	var se *StatusError
	if errors.As(err, &se) {
		return // the node answered
	}
	p.node(node).failedAt.Store(time.Now().UnixNano())
	p.kickRepair()
}

// shaky: the node failed lately and has no working connection (or is
// being dialed again): a request to it would likely wait for Timeout.
func (p *Pool) shaky(node string) bool {
	if !p.failedRecently(node) {
		return false
	}
	nc := p.node(node)
	if !nc.mu.TryLock() {
		return true // a dial is under way
	}
	defer nc.mu.Unlock()
	for _, c := range nc.conns {
		if c != nil && c.broken() == nil {
			return false
		}
	}
	return true
}

// failedFor is how long a node that failed a request or a dial is tried
// last for loads, passed over for stores and placement.
const failedFor = 5 * time.Second

// failedRecently is a node to try last and not to place on.
func (p *Pool) failedRecently(node string) bool {
	return time.Now().UnixNano()-p.node(node).failedAt.Load() < int64(failedFor)
}

func (p *Pool) kickRepair() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// rendezvous orders candidate nodes for a chunk (highest score first).
func rendezvous(r pool.Region, idx uint64, nodes []string) []string {
	h := fnv.New64a()
	h.Write([]byte(r.Owner))
	var b [16]byte
	for i := range 8 {
		b[i], b[8+i] = byte(r.ID>>(8*i)), byte(idx>>(8*i))
	}
	h.Write(b[:])
	base := h.Sum64()
	type scored struct {
		n string
		s uint64
	}
	sc := make([]scored, len(nodes))
	for i, n := range nodes {
		hn := fnv.New64a()
		hn.Write([]byte(n))
		sc[i] = scored{n, mix(base ^ hn.Sum64())}
	}
	slices.SortFunc(sc, func(a, b scored) int { return cmp.Compare(b.s, a.s) })
	out := make([]string, len(sc))
	for i, s := range sc {
		out[i] = s.n
	}
	return out
}

// mix is splitmix64's finaliser.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// candidates are the nodes pages may be placed on now: alive, not this
// node (unless IncludeSelf), not known to donate nothing.
func (p *Pool) candidates() []string {
	var out []string
	for _, m := range p.opts.Members() {
		if !m.Alive || (m.Name == p.opts.Self && !p.opts.IncludeSelf) || p.donatesNothing(m.Name) {
			continue
		}
		out = append(out, m.Name)
	}
	return out
}

// donatesNothing: the node said hello with a capacity of 0.
func (p *Pool) donatesNothing(node string) bool {
	p.mu.Lock()
	nc := p.nodes[node]
	p.mu.Unlock()
	if nc == nil || !nc.mu.TryLock() { // being dialed: not known yet
		return false
	}
	defer nc.mu.Unlock()
	return nc.instance != 0 && nc.capacity == 0
}

func (p *Pool) aliveSet() map[string]bool {
	alive := map[string]bool{}
	for _, m := range p.opts.Members() {
		if m.Alive {
			alive[m.Name] = true
		}
	}
	return alive
}

func checkPages(off uint64, n int) error {
	if off%pool.PageSize != 0 || n%pool.PageSize != 0 {
		return fmt.Errorf("cluster: offset %d or length %d is not a whole number of pages", off, n)
	}
	if len := uint64(n); off+len < off || off+len > pageproto.MaxDrop {
		return fmt.Errorf("cluster: range %d+%d is beyond the largest region (%d bytes)", off, n, uint64(pageproto.MaxDrop))
	}
	return nil
}

func checkOwner(o string) error {
	if o == "" || len(o) > pageproto.MaxOwner {
		return fmt.Errorf("cluster: owner %q: want 1 to %d bytes", o, pageproto.MaxOwner)
	}
	return nil
}

// piece is the part of a request inside one chunk.
type piece struct {
	idx  uint64
	off  uint64 // in the region
	data []byte
	mask uint64 // its pages in the chunk's mask
}

func pieces(off uint64, data []byte) []piece {
	var out []piece
	for len(data) > 0 {
		idx := off / ChunkSize
		n := min(uint64(len(data)), (idx+1)*ChunkSize-off)
		first := (off % ChunkSize) / pool.PageSize
		np := n / pool.PageSize
		mask := ^uint64(0)
		if np < 64 {
			mask = (uint64(1)<<np - 1) << first
		}
		out = append(out, piece{idx: idx, off: off, data: data[:n], mask: mask})
		off += n
		data = data[n:]
	}
	return out
}

// each runs f on every piece, concurrently when there are several.
func each(ps []piece, f func(piece) error) error {
	if len(ps) == 1 {
		return f(ps[0])
	}
	errs := make([]error, len(ps))
	var wg sync.WaitGroup
	for i := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(ps[i])
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (p *Pool) chunk(r pool.Region, idx uint64, create bool) *chunk {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.regions[r]
	if m == nil {
		if !create {
			return nil
		}
		m = map[uint64]*chunk{}
		p.regions[r] = m
	}
	ch := m[idx]
	if ch == nil && create {
		ch = &chunk{}
		m[idx] = ch
	}
	return ch
}

// Store implements pool.Pages. It returns once every current holder of the
// pages took them, or, if some could not, once at least one did (the
// repair loop then restores the other copies).
func (p *Pool) Store(ctx context.Context, r pool.Region, off uint64, data []byte) error {
	if err := checkPages(off, len(data)); err != nil {
		return err
	}
	if err := checkOwner(r.Owner); err != nil {
		return err
	}
	return each(pieces(off, data), func(pc piece) error { return p.storePiece(ctx, r, pc) })
}

func (p *Pool) storePiece(ctx context.Context, r pool.Region, pc piece) error {
	ref := chunkRef{r, pc.idx}
	for {
		ch := p.chunk(r, pc.idx, true)
		ch.mu.RLock()
		if ch.dead.Load() {
			ch.mu.RUnlock()
			continue // removed by the reclaimer meanwhile: look it up again
		}
		if len(ch.holders) == 0 {
			ch.mu.RUnlock()
			ch.mu.Lock()
			if ch.dead.Load() {
				ch.mu.Unlock()
				continue
			}
			var err error
			if len(ch.holders) == 0 {
				err = p.place(ctx, r, pc, ch)
			} else {
				var stale []holder
				stale, err = p.storeHolders(ctx, r, pc, ch)
				p.dropHolders(ref, ch, stale)
			}
			ch.mu.Unlock()
			return err
		}
		stale, err := p.storeHolders(ctx, r, pc, ch)
		ch.mu.RUnlock()
		if len(stale) > 0 {
			// Holders that missed this store must not serve the chunk again.
			ch.mu.Lock()
			p.dropHolders(ref, ch, stale)
			ch.mu.Unlock()
		}
		return err
	}
}

// dropHolders removes hs from ch's holders; the older copies they may
// still hold are reclaimed once they answer again.
// Preconditions: ch.mu is held for writing.
func (p *Pool) dropHolders(ref chunkRef, ch *chunk, hs []holder) {
	if len(hs) == 0 {
		return
	}
	ch.holders = slices.DeleteFunc(ch.holders, func(h holder) bool { return slices.Contains(hs, h) })
	for _, h := range hs {
		p.orphan(h.node, ref)
	}
}

// storeHolders writes pc to every holder of ch. It returns the holders
// that missed it, unless all did (then every holder still has the same
// older contents, so all are kept and the store fails).
// Preconditions: ch.mu is held (read or write).
func (p *Pool) storeHolders(ctx context.Context, r pool.Region, pc piece, ch *chunk) ([]holder, error) {
	hs := ch.holders
	errs := make([]error, len(hs))
	// All requests go out, then the answers are collected: the copies are
	// written in parallel without a goroutine per copy.
	type sent struct {
		c  *conn
		cl *call
	}
	out := make([]sent, len(hs))
	// A holder that failed in the last seconds (a cut link) is passed over
	// when another can take the store, rather than awaited for Timeout on
	// every store: it becomes stale and repair makes a new copy.
	healthy := 0
	shaky := make([]bool, len(hs))
	for i, h := range hs {
		if shaky[i] = p.shaky(h.node); !shaky[i] {
			healthy++
		}
	}
	skipped := make([]bool, len(hs))
	for i, h := range hs {
		if healthy > 0 && shaky[i] {
			errs[i] = fmt.Errorf("cluster: node %s failed in the last %v", h.node, failedFor)
			skipped[i] = true
			continue
		}
		c, err := p.conn(ctx, h.node)
		if err == nil && c.stat.Instance != h.instance {
			err = fmt.Errorf("%w: %s", errRestarted, h.node)
		}
		if err != nil {
			errs[i] = err
			continue
		}
		out[i] = sent{c, c.start(pageproto.Header{Op: pageproto.OpStore, Region: r.ID, Offset: pc.off}, r.Owner, pc.data, nil)}
	}
	for i, o := range out {
		if o.c == nil {
			continue
		}
		_, _, err := o.c.finish(ctx, o.cl)
		if stale(o.c, err) {
			_, _, err = p.do(ctx, hs[i].node, hs[i].instance, pageproto.Header{Op: pageproto.OpStore, Region: r.ID, Offset: pc.off}, r.Owner, pc.data, nil)
		}
		errs[i] = err
	}
	for i, err := range errs {
		if err != nil && !skipped[i] {
			p.noteFailure(hs[i].node, err)
		}
	}
	var stale []holder
	for i, err := range errs {
		if err != nil {
			stale = append(stale, hs[i])
		}
	}
	if len(stale) == len(hs) {
		err := fmt.Errorf("cluster: store of %d bytes at %d of %s/%d: %w", len(pc.data), pc.off, r.Owner, r.ID, errors.Join(errs...))
		if allFull(errs) {
			err = fmt.Errorf("%w: %w", pool.ErrFull, err)
		}
		return nil, err
	}
	ch.pages.Or(pc.mask)
	if len(stale) > 0 {
		p.kickRepair()
	}
	return stale, nil
}

// place chooses ch's holders and stores pc on them.
// Preconditions: ch.mu is held for writing and ch has no holders.
func (p *Pool) place(ctx context.Context, r pool.Region, pc piece, ch *chunk) error {
	// Nodes that failed lately come last: used only if the others
	// cannot take the copies.
	var cands, later []string
	for _, n := range rendezvous(r, pc.idx, p.candidates()) {
		if slices.Contains(ch.reclaiming, n) {
			continue
		}
		if p.failedRecently(n) {
			later = append(later, n)
		} else {
			cands = append(cands, n)
		}
	}
	cands = append(cands, later...)
	var errs []error
	var got []holder
	for len(cands) > 0 && len(got) < p.opts.Replicas {
		try := cands[:min(len(cands), p.opts.Replicas-len(got))]
		cands = cands[len(try):]
		res := make([]holder, len(try))
		es := make([]error, len(try))
		var wg sync.WaitGroup
		for i, n := range try {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, inst, err := p.do(ctx, n, 0, pageproto.Header{Op: pageproto.OpStore, Region: r.ID, Offset: pc.off}, r.Owner, pc.data, nil)
				if err != nil {
					p.noteFailure(n, err)
					es[i] = err
					return
				}
				res[i] = holder{n, inst}
			}()
		}
		wg.Wait()
		for i := range try {
			if es[i] == nil {
				got = append(got, res[i])
			} else {
				errs = append(errs, es[i])
			}
		}
	}
	if len(got) == 0 {
		if len(errs) == 0 {
			return fmt.Errorf("%w: no live node donates memory to the pool", pool.ErrFull)
		}
		if allFull(errs) {
			return fmt.Errorf("%w: %w", pool.ErrFull, errors.Join(errs...))
		}
		return fmt.Errorf("cluster: no node took the pages: %w", errors.Join(errs...))
	}
	ch.holders = got
	ch.pages.Or(pc.mask)
	if len(got) < p.opts.Replicas {
		p.kickRepair()
	}
	return nil
}

func allFull(errs []error) bool {
	for _, err := range errs {
		var se *StatusError
		if !errors.As(err, &se) || se.Status != pageproto.StatusFull {
			return false
		}
	}
	return true
}

// Load implements pool.Pages. The pieces of a request that spans chunks
// are asked of their first holders all at once; a piece whose holder
// fails is then read from its other holders.
func (p *Pool) Load(ctx context.Context, r pool.Region, off uint64, data []byte) error {
	if err := checkPages(off, len(data)); err != nil {
		return err
	}
	if err := checkOwner(r.Owner); err != nil {
		return err
	}
	ps := pieces(off, data)
	class := sizeClass(len(data))
	pend := make([]pendingLoad, 0, len(ps))
	var errs []error
	for _, pc := range ps {
		hs, err := p.loadPlan(r, pc)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(hs) == 0 {
			continue // never stored: zeros
		}
		pd := pendingLoad{pc: pc, hs: hs}
		// Without a working connection to the first holder (a dial may
		// wait for Timeout), the piece goes the hedged slow way.
		if c := p.readyConn(hs[0]); c != nil {
			pd.c = c
			pd.cl = c.start(loadHeader(r, pc), r.Owner, nil, pc.data)
		}
		pend = append(pend, pd)
	}
	for i := range pend {
		pd := &pend[i]
		rest := pd.hs
		if pd.c != nil {
			ok, next := p.finishLoad(ctx, r, class, pd)
			if ok {
				continue
			}
			rest = next
		}
		if err := p.loadFrom(ctx, r, class, pd.pc, rest, pd.errs); err != nil {
			errs = append(errs, err)
		}
	}
	// Pages dropped (or never stored) read as zeros whatever a holder
	// sent: a drop that could not reach a holder left old bytes there.
	for _, pd := range pend {
		if ch := p.chunk(r, pd.pc.idx, false); ch != nil {
			zeroAbsent(pd.pc, ch.pages.Load())
		} else {
			clear(pd.pc.data)
		}
	}
	return errors.Join(errs...)
}

// zeroAbsent clears the pages of pc whose bit in mask is not set.
func zeroAbsent(pc piece, mask uint64) {
	if pc.mask&^mask == 0 {
		return
	}
	first := int((pc.off % ChunkSize) / pool.PageSize)
	for i := 0; i*pool.PageSize < len(pc.data); i++ {
		if mask&(1<<(first+i)) == 0 {
			clear(pc.data[i*pool.PageSize : (i+1)*pool.PageSize])
		}
	}
}

func loadHeader(r pool.Region, pc piece) pageproto.Header {
	return pageproto.Header{Op: pageproto.OpLoad, Region: r.ID, Offset: pc.off, Arg: uint64(len(pc.data))}
}

// loadPlan returns the holders to read pc from, best first, or none (and
// zeros in pc.data) when none of its pages was ever stored.
func (p *Pool) loadPlan(r pool.Region, pc piece) ([]holder, error) {
	ch := p.chunk(r, pc.idx, false)
	if ch == nil || ch.pages.Load()&pc.mask == 0 {
		clear(pc.data)
		return nil, nil
	}
	ch.mu.RLock()
	hs := slices.Clone(ch.holders)
	ch.mu.RUnlock()
	if len(hs) == 0 {
		return nil, fmt.Errorf("cluster: pages at %d of %s/%d are lost: every node that held them failed", pc.off, r.Owner, r.ID)
	}
	if len(hs) > 1 {
		ranks := make([]int, len(hs))
		for i, h := range hs {
			ranks[i] = p.loadRank(h.node)
		}
		if slices.ContainsFunc(ranks, func(k int) bool { return k > 0 }) {
			idx := make([]int, len(hs))
			for i := range idx {
				idx[i] = i
			}
			slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(ranks[a], ranks[b]) })
			sorted := make([]holder, len(hs))
			for i, j := range idx {
				sorted[i] = hs[j]
			}
			hs = sorted
		}
	}
	return hs, nil
}

// loadRank orders holders for a load: 0 first; 1 for a node without a
// working connection now (a dial into a cut link would wait for Timeout
// before anything could be hedged); 2 for a node that failed a request or
// lost a hedged load lately.
func (p *Pool) loadRank(node string) int {
	nc := p.node(node)
	now := time.Now().UnixNano()
	if now-nc.failedAt.Load() < int64(failedFor) || now-nc.slowAt.Load() < int64(failedFor) {
		return 2
	}
	if live := nc.live.Load(); live != nil {
		for _, c := range *live {
			if c != nil && c.broken() == nil {
				return 0
			}
		}
	}
	return 1
}

// readyConn returns a working connection to h's server instance, without
// dialing or waiting for a dial, or nil.
func (p *Pool) readyConn(h holder) *conn {
	nc := p.node(h.node)
	live := nc.live.Load()
	if live == nil {
		return nil
	}
	cs := *live
	start := int(nc.lnext.Add(1))
	for k := range cs {
		if c := cs[(start+k)%len(cs)]; c != nil && c.stat.Instance == h.instance && c.broken() == nil {
			return c
		}
	}
	return nil
}

// loadFrom reads pc from the first of hs that answers. Each holder is
// asked when the one before it failed or has not answered within the
// hedge delay (a dial into a cut link waits for Timeout); the first
// answer wins and the other requests are cancelled.
func (p *Pool) loadFrom(ctx context.Context, r pool.Region, class int, pc piece, hs []holder, errs []error) error {
	fail := func() error {
		return fmt.Errorf("cluster: load of %d bytes at %d of %s/%d: no copy answered: %w", len(pc.data), pc.off, r.Owner, r.ID, errors.Join(errs...))
	}
	if len(hs) == 1 && ctx.Err() == nil {
		_, _, err := p.do(ctx, hs[0].node, hs[0].instance, loadHeader(r, pc), r.Owner, nil, pc.data)
		if err == nil {
			return nil
		}
		p.noteFailure(hs[0].node, err)
		errs = append(errs, err)
	}
	if len(hs) <= 1 || ctx.Err() != nil {
		return fail()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		i   int
		err error
	}
	results := make(chan result, len(hs))
	bufs := make([][]byte, len(hs))
	hedge := make([]bool, len(hs)) // asked because the one before was slow
	next, inflight := 0, 0
	launch := func() {
		i := next
		next++
		inflight++
		bufs[i] = make([]byte, len(pc.data))
		go func() {
			_, _, err := p.do(ctx, hs[i].node, hs[i].instance, loadHeader(r, pc), r.Owner, nil, bufs[i])
			results <- result{i, err}
		}()
	}
	delay := p.lat[class].get(p.opts.Timeout)
	timer := time.NewTimer(delay)
	defer timer.Stop()
	launch()
	for inflight > 0 {
		select {
		case res := <-results:
			inflight--
			if res.err == nil {
				copy(pc.data, bufs[res.i])
				if hedge[res.i] {
					p.hedgeWins.Add(1)
				}
				return nil
			}
			p.noteFailure(hs[res.i].node, res.err)
			errs = append(errs, res.err)
			if next < len(hs) && ctx.Err() == nil {
				launch()
				timer.Reset(delay)
			}
		case <-timer.C:
			if next < len(hs) && p.hedges.spend() {
				p.hedged.Add(1)
				hedge[next] = true
				launch()
				timer.Reset(delay)
			}
		}
	}
	return fail()
}

// Drop implements pool.Pages.
func (p *Pool) Drop(ctx context.Context, r pool.Region, off, n uint64) error {
	if err := checkPages(off, int(n)); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	first, last := off/ChunkSize, (off+n-1)/ChunkSize
	nodes := map[string]bool{}
	var touched []*chunk
	var refs []chunkRef
	p.mu.Lock()
	m := p.regions[r]
	for idx, ch := range m {
		if idx < first || idx > last {
			continue
		}
		lo, hi := max(off, idx*ChunkSize), min(off+n, (idx+1)*ChunkSize)
		np := (hi - lo) / pool.PageSize
		mask := ^uint64(0)
		if np < 64 {
			mask = (uint64(1)<<np - 1) << ((lo % ChunkSize) / pool.PageSize)
		}
		touched = append(touched, ch)
		refs = append(refs, chunkRef{r, idx})
		if ch.pages.And(^mask)&^mask == 0 {
			delete(m, idx)
		}
	}
	if len(m) == 0 {
		delete(p.regions, r)
	}
	p.mu.Unlock()
	// Holders are read outside p.mu: a chunk under repair is locked for
	// network round trips, and p.mu must never wait for those.
	held := p.heldBy(touched, refs, nodes)
	missed, err := p.toNodes(ctx, nodes, pageproto.Header{Op: pageproto.OpDrop, Region: r.ID, Offset: off, Arg: n}, r.Owner)
	p.orphanMissed(held, missed)
	return err
}

// heldBy adds the holders of chunks to nodes and returns the chunks each
// holds (read outside p.mu: a chunk under repair is locked for network
// round trips, and p.mu must never wait for those).
func (p *Pool) heldBy(chunks []*chunk, refs []chunkRef, nodes map[string]bool) map[string][]chunkRef {
	held := map[string][]chunkRef{}
	for i, ch := range chunks {
		ch.mu.RLock()
		for _, h := range ch.holders {
			nodes[h.node] = true
			held[h.node] = append(held[h.node], refs[i])
		}
		ch.mu.RUnlock()
	}
	return held
}

// orphanMissed records the chunks of nodes a drop did not reach: they
// are dropped there when the node answers again.
func (p *Pool) orphanMissed(held map[string][]chunkRef, missed []string) {
	for _, n := range missed {
		for _, ref := range held[n] {
			p.orphan(n, ref)
		}
	}
}

// toNodes sends one request to each node, concurrently. Nodes that are
// not alive are skipped (what they held is gone with them, dropped when
// they come back as a new instance, or reclaimed if they come back as
// the same one); they and the nodes that failed are returned as missed.
func (p *Pool) toNodes(ctx context.Context, nodes map[string]bool, h pageproto.Header, owner string) ([]string, error) {
	alive := p.aliveSet()
	var mu sync.Mutex
	var errs []error
	var missed []string
	var wg sync.WaitGroup
	for n := range nodes {
		if !alive[n] {
			missed = append(missed, n)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := p.do(ctx, n, 0, h, owner, nil, nil); err != nil {
				mu.Lock()
				errs = append(errs, err)
				missed = append(missed, n)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return missed, errors.Join(errs...)
}

// DropOwner implements pool.Pages.
func (p *Pool) DropOwner(ctx context.Context, owner string) error {
	if err := checkOwner(owner); err != nil {
		return err
	}
	// Every live node, not only the holders known now: a node dropped as
	// a holder (it missed a store) may still have some of the pages.
	nodes := map[string]bool{}
	for _, n := range p.candidates() {
		nodes[n] = true
	}
	var touched []*chunk
	var refs []chunkRef
	p.mu.Lock()
	for r, m := range p.regions {
		if r.Owner != owner {
			continue
		}
		for idx, ch := range m {
			touched = append(touched, ch)
			refs = append(refs, chunkRef{r, idx})
		}
		delete(p.regions, r)
	}
	for n := range p.res[owner] {
		nodes[n] = true
	}
	delete(p.res, owner)
	p.mu.Unlock()
	held := p.heldBy(touched, refs, nodes)
	missed, err := p.toNodes(ctx, nodes, pageproto.Header{Op: pageproto.OpDropOwner}, owner)
	p.orphanMissed(held, missed)
	return err
}

// Greet makes sure there is a connection to every live node (a hello on
// a new one). A node that restarted is known by its new instance: servers
// drop what its previous incarnation stored (whose programs are gone) at
// the first hello, so an agent calls Greet periodically rather than
// waiting for its first store to each node.
func (p *Pool) Greet(ctx context.Context) {
	var wg sync.WaitGroup
	for _, n := range p.candidates() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.conn(ctx, n); err != nil {
				p.log.Debug("memory pool: hello", "node", n, "err", err)
			}
		}()
	}
	wg.Wait()
}

// Stat asks node for its account.
func (p *Pool) Stat(ctx context.Context, node string) (pageproto.Stat, error) {
	msg, _, err := p.do(ctx, node, 0, pageproto.Header{Op: pageproto.OpStat}, "", nil, nil)
	if err != nil {
		return pageproto.Stat{}, err
	}
	return pageproto.ParseStat(msg)
}

// Reserve implements pool.Pages: it reserves n bytes on each of
// min(Replicas, live nodes) distinct nodes' worth of capacity, spread
// over the nodes with the most room, or fails with pool.ErrFull.
func (p *Pool) Reserve(ctx context.Context, owner string, n uint64) error {
	if err := checkOwner(owner); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	type room struct {
		node  string
		free  uint64
		donor bool
	}
	cands := p.candidates()
	rooms := make([]room, len(cands))
	var wg sync.WaitGroup
	for i, node := range cands {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rooms[i].node = node
			if st, err := p.Stat(ctx, node); err == nil && st.Capacity > 0 {
				rooms[i].donor = true
				rooms[i].free = st.Capacity - min(st.Capacity, st.Reserved)
			}
		}()
	}
	wg.Wait()
	// Copies go on distinct nodes: as many as there are nodes donating
	// memory, up to Replicas (full ones count: they make the pool full).
	donors := 0
	for _, r := range rooms {
		if r.donor {
			donors++
		}
	}
	rooms = slices.DeleteFunc(rooms, func(r room) bool { return r.free == 0 })
	slices.SortFunc(rooms, func(a, b room) int { return cmp.Compare(b.free, a.free) })
	copies := uint64(min(p.opts.Replicas, donors))
	var total uint64
	for _, r := range rooms {
		total += min(r.free, n)
	}
	if copies == 0 || total < n*copies {
		return fmt.Errorf("%w: %d bytes in %d copies asked, %d bytes free on %d nodes", pool.ErrFull, n, p.opts.Replicas, total, len(rooms))
	}
	// Each node holds at most one copy of a page, so at most n of it.
	need := n * copies
	plan := map[string]uint64{}
	for _, r := range rooms {
		take := min(r.free, n, need)
		if take > 0 {
			plan[r.node] = take
			need -= take
		}
	}
	done := map[string]uint64{}
	var err error
	for node, b := range plan {
		if _, _, err = p.do(ctx, node, 0, pageproto.Header{Op: pageproto.OpReserve, Arg: b}, owner, nil, nil); err != nil {
			break
		}
		done[node] = b
	}
	if err != nil {
		for node, b := range done {
			p.releaseOn(node, owner, b)
		}
		return fmt.Errorf("%w: %w", pool.ErrFull, err)
	}
	p.mu.Lock()
	if p.res[owner] == nil {
		p.res[owner] = map[string]uint64{}
	}
	for node, b := range done {
		p.res[owner][node] += b
	}
	p.mu.Unlock()
	return nil
}

// Release implements pool.Pages (n bytes of one copy's worth, as
// reserved).
func (p *Pool) Release(owner string, n uint64) {
	p.mu.Lock()
	need := n * uint64(p.opts.Replicas)
	plan := map[string]uint64{}
	for node, b := range p.res[owner] {
		take := min(b, need, n) // as reserved: at most one copy per node
		if take == 0 {
			continue
		}
		plan[node] = take
		need -= take
		if p.res[owner][node] -= take; p.res[owner][node] == 0 {
			delete(p.res[owner], node)
		}
	}
	if len(p.res[owner]) == 0 {
		delete(p.res, owner)
	}
	p.mu.Unlock()
	for node, b := range plan {
		p.releaseOn(node, owner, b)
	}
}

func (p *Pool) releaseOn(node, owner string, b uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
	defer cancel()
	if _, _, err := p.do(ctx, node, 0, pageproto.Header{Op: pageproto.OpRelease, Arg: b}, owner, nil, nil); err != nil {
		p.log.Debug("memory pool: release", "node", node, "owner", owner, "err", err)
	}
}

// Stats is the owner side's account.
type Stats struct {
	Replicas             int
	Chunks               int
	Pages                uint64            // distinct pages stored by this node's owners
	UnderReplicatedPages uint64            // pages with fewer copies than Replicas
	LostPages            uint64            // pages with no copy left
	RepairedBytes        uint64            // copied by repair since start
	ReservedBytes        uint64            // reserved by this node's owners, all copies
	NodeBytes            map[string]uint64 // bytes of copies placed per node
	LoadPieces           uint64            // chunk reads sent to a first holder
	HedgedLoads          uint64            // ... asked of a second holder too, the first being slow
	HedgeWins            uint64            // ... that the second holder answered first
	LoadFailovers        uint64            // loads whose first holder failed (an error or a timeout), read from another
	ReclaimedChunks      uint64            // stale copies dropped from nodes that came back
}

// Stats returns the owner side's account.
func (p *Pool) Stats() Stats {
	s := Stats{Replicas: p.opts.Replicas, UnderReplicatedPages: p.under.Load(), LostPages: p.lost.Load(),
		RepairedBytes: p.repaired.Load(), NodeBytes: map[string]uint64{},
		LoadPieces: p.pieces.Load(), HedgedLoads: p.hedged.Load(), HedgeWins: p.hedgeWins.Load(), LoadFailovers: p.failovers.Load(), ReclaimedChunks: p.reclaimed.Load()}
	for _, ch := range p.allChunks() {
		np := uint64(bits.OnesCount64(ch.pages.Load()))
		s.Chunks++
		s.Pages += np
		ch.mu.RLock()
		for _, h := range ch.holders {
			s.NodeBytes[h.node] += np * pool.PageSize
		}
		ch.mu.RUnlock()
	}
	p.mu.Lock()
	for _, m := range p.res {
		for _, b := range m {
			s.ReservedBytes += b
		}
	}
	p.mu.Unlock()
	return s
}

func (p *Pool) allChunks() []*chunk {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*chunk
	for _, m := range p.regions {
		for _, ch := range m {
			out = append(out, ch)
		}
	}
	return out
}
