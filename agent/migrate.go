package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/proc/criu"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/proc/migrate"
	"github.com/onebox-project/onebox/proc/stream"
)

// Migration (issue 4): 'onebox migrate GID NODE' moves a running program
// with CRIU, post-copy (see proc/migrate and docs/processes.md).
//
// The node that runs the program drives: it dumps all but the memory
// (criu dump --lazy-pages, its page server on a socketpair), sends the
// image files to the target's agent on a stream connection (ALPN
// onebox-proc/1, mutual TLS), and tunnels the page-server bytes on the
// same connection. The target restores at once (criu lazy-pages on the
// other socketpair, criu restore --lazy-pages under a holder process) and
// answers Restored: that is the point of no return. Before it, any
// failure kills the source's CRIU, which resumes the program where it
// was. After it, the source serves the remaining pages (CRIU pushes them
// in the background) and its CRIU kills the frozen original once the last
// page left.
//
// The caller's stream follows the program: the source sends Moved to the
// caller's agent, which attaches to the target and goes on relaying; if
// the caller's CLI was connected to the source itself, the source relays.

const (
	pathMigrate = "/v1/procs/{gid}/migrate"

	migrateReadyTimeout   = 2 * time.Minute  // dump to images written
	checkpointTimeout     = 10 * time.Minute // a checkpoint's dump, memory included
	migrateRestoreTimeout = 2 * time.Minute  // images sent to Restored
	migratePagesTimeout   = 30 * time.Minute // Restored to the last page
	migrateFrameTimeout   = time.Minute      // between two frames of the image phase
	attachTimeout         = time.Minute      // restored program waits this long for its caller
	maxImageBytes         = 1 << 30          // non-memory images; the memory never goes through files
	movedMemory           = 10 * time.Minute // how long a finished migration is remembered
)

// migration is an outgoing migration of one program.
type migration struct {
	pr     *manager.Proc // the program as it ran here
	target string        // the node it is moving to
	done   chan struct{} // closed when it succeeded or failed
	to     string        // the node it moved to, once Restored; guarded by procState.mu
}

// waitingStdio is a program restored here whose caller has not attached.
type waitingStdio struct {
	pr    *manager.Proc
	stdio *manager.Stdio
	timer *time.Timer
}

// migrateMetrics are the migration's Prometheus metrics.
type migrateMetrics struct {
	moves    *prometheus.CounterVec // direction (out, in), result (ok, error)
	downtime prometheus.Histogram   // outgoing, seconds
}

func (p *procState) registerMigrateMetrics() {
	p.mm = &migrateMetrics{
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "onebox_migrations_total",
			Help: "Process migrations by direction (out, in) and result (ok, error)."}, []string{"direction", "result"}),
		downtime: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "onebox_migration_downtime_seconds",
			Help:    "Freeze to running on the target, of migrations from this node.",
			Buckets: []float64{.025, .05, .1, .2, .4, .8, 1.6, 3.2, 6.4}}),
	}
	p.a.metrics.reg.MustRegister(p.mm.moves, p.mm.downtime)
}

func (p *procState) countMove(direction string, err error) {
	if p.mm == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	p.mm.moves.WithLabelValues(direction, result).Inc()
}

var (
	criuMu  sync.Mutex
	criuBin criu.Binary // guarded by criuMu
)

// criuBinary finds CRIU once (and again after a failure).
func criuBinary() (criu.Binary, error) {
	criuMu.Lock()
	defer criuMu.Unlock()
	if criuBin.Path != "" {
		return criuBin, nil
	}
	b, err := criu.Find()
	if err != nil {
		return b, err
	}
	criuBin = b
	return b, nil
}

// primeCRIU writes CRIU's kernel cache if this boot has none yet
// (criu.PrimeKdat): every later CRIU start, two of them inside a
// migration's downtime, is 20-40 ms shorter. Without CRIU, or when it
// fails, nothing changes but speed.
func (a *Agent) primeCRIU() {
	exe, err := os.Executable()
	if err != nil || strings.HasSuffix(exe, ".test") {
		return // an in-process test agent: no onebox binary to run
	}
	b, err := criuBinary()
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	start := time.Now()
	wrote, err := b.PrimeKdat(ctx, exe)
	switch {
	case err != nil:
		a.log.Warn("cannot write CRIU's kernel cache; every CRIU start probes the kernel again", "path", criu.KdatCache, "err", err)
	case wrote:
		a.log.Info("wrote CRIU's kernel cache", "path", criu.KdatCache, "took", time.Since(start).Round(time.Millisecond))
	}
}

// migrate moves the running process gid to node target (by CRIU). reason
// says why ("user", "balance", "drain"), shown in 'onebox ps'.
func (p *procState) migrate(ctx context.Context, gid, target, reason string) error {
	_, err := p.migrateOut(ctx, gid, target, reason, "")
	return err
}

// movedTo returns the node the program gid migrated to, waiting for a
// migration in progress to end (bounded); "" if it did not move.
func (p *procState) movedTo(pr *manager.Proc) string {
	p.mu.Lock()
	m := p.migrating[pr.GID]
	p.mu.Unlock()
	if m == nil || m.pr != pr {
		return ""
	}
	select {
	case <-m.done:
	case <-time.After(migrateRestoreTimeout + time.Minute):
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return m.to
}

func migrateErr(code int, format string, args ...any) error {
	return &peerError{code: code, msg: fmt.Sprintf(format, args...)}
}

// migrateOut migrates a program of this node to target ("home": its home
// node). checkpointDir, if set, makes it a checkpoint instead (see
// checkpoint.go): no target.
func (p *procState) migrateOut(ctx context.Context, gid, target, reason, _ string) (res migrate.Result, err error) {
	defer func() {
		p.countMove("out", err)
		if err == nil && p.mm != nil {
			p.mm.downtime.Observe(res.DowntimeMS / 1000)
		}
	}()
	return p.migrateOutLocked(ctx, gid, target, reason)
}

func (p *procState) migrateOutLocked(ctx context.Context, gid, target, reason string) (migrate.Result, error) {
	begin := time.Now()
	self := p.a.id.Node
	res := migrate.Result{GID: gid, From: self}
	pr, ok := p.mgr.Get(gid)
	if !ok {
		return res, migrateErr(http.StatusNotFound, "no process %s on node %s", gid, self)
	}
	if ended(pr) {
		return res, migrateErr(http.StatusConflict, "process %s has ended", gid)
	}
	if target == "home" {
		target = pr.Home
	}
	res.To = target
	if target == self {
		return res, migrateErr(http.StatusBadRequest, "process %s already runs on %s", gid, self)
	}
	m, ok := p.member(target)
	switch {
	case !ok:
		return res, migrateErr(http.StatusNotFound, "no node %q in the cluster ('onebox nodes' lists them)", target)
	case m.Status != membership.StatusAlive || m.FabricAddr == "":
		return res, migrateErr(http.StatusConflict, "node %s is %s: cannot migrate there ('onebox nodes' shows which nodes are alive)", target, m.Status)
	case !p.a.schedulable(target):
		return res, migrateErr(http.StatusConflict, "node %s is cordoned: it takes no moved processes ('onebox uncordon %s')", target, target)
	}
	if why := migrate.Check(pr.PID); why != "" {
		return res, migrateErr(http.StatusConflict, "process %s cannot migrate: it %s", gid, why)
	}
	b, err := criuBinary()
	if err != nil {
		return res, migrateErr(http.StatusServiceUnavailable, "node %s cannot checkpoint: %v", self, err)
	}
	spec := migrate.Spec{GID: gid, Home: pr.Home, Argv: pr.Argv, Started: pr.Started, Detached: pr.Detached,
		Balance: pr.Balance, From: self, Reason: reason, PID: migrate.InnerPID(pr.PID)}
	for fd := 0; fd < 3; fd++ {
		k, err := migrate.PipeKey(pr.PID, fd)
		if err != nil {
			return res, migrateErr(http.StatusConflict, "process %s cannot migrate: %v", gid, err)
		}
		spec.Stdio[fd] = k
	}

	mig := &migration{pr: pr, target: target, done: make(chan struct{})}
	p.mu.Lock()
	if old := p.migrating[gid]; old != nil {
		select {
		case <-old.done:
		default:
			p.mu.Unlock()
			return res, migrateErr(http.StatusConflict, "process %s is already migrating", gid)
		}
	}
	p.migrating[gid] = mig
	p.mu.Unlock()
	defer func() {
		close(mig.done)
		time.AfterFunc(movedMemory, func() {
			p.mu.Lock()
			if p.migrating[gid] == mig {
				delete(p.migrating, gid)
			}
			p.mu.Unlock()
		})
	}()
	note := p.mgr.Note(pr)
	p.mgr.SetNote(pr, "migrating to "+target)
	failed := func(err error) (migrate.Result, error) {
		p.mgr.SetNote(pr, note)
		var pe *peerError
		if errors.As(err, &pe) {
			pe.msg = fmt.Sprintf("migration of %s to %s failed, it goes on running on %s: %s", gid, target, self, pe.msg)
			return res, pe
		}
		return res, migrateErr(http.StatusBadGateway, "migration of %s to %s failed, it goes on running on %s: %v", gid, target, self, err)
	}

	conn, err := p.dial(m)
	if err != nil {
		return failed(fmt.Errorf("cannot reach node %s: %w", target, err))
	}
	if !p.track(conn, true) {
		return failed(errors.New("the agent is shutting down"))
	}
	defer p.untrack(conn)
	sc := memberConn(conn)
	if err := sc.WriteJSON(stream.Migrate, spec); err != nil {
		return failed(err)
	}
	dir := p.imageDir(gid+".out", true)
	_ = os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return failed(err)
	}
	defer os.RemoveAll(dir)
	ours, theirs, err := migrate.SocketPair()
	if err != nil {
		return failed(err)
	}
	defer ours.Close()

	dumpStart := time.Now()
	args := []string{"dump", "-t", strconv.Itoa(spec.PID), "-j", "--lazy-pages", "--ps-socket", "3"}
	dump, err := b.Start(context.Background(), dir, "dump.log", []*os.File{theirs}, args, enterNamespaces(pr.PID, spec.PID))
	theirs.Close()
	if err != nil {
		return failed(err)
	}
	// The downtime starts when CRIU stops the program, not when CRIU
	// starts: watch for the stop (1 ms resolution).
	frozenAt := make(chan time.Time, 1)
	stopWatch := make(chan struct{})
	var stopOnce sync.Once
	endWatch := func() { stopOnce.Do(func() { close(stopWatch) }) }
	defer endWatch()
	go func() {
		tk := time.NewTicker(time.Millisecond)
		defer tk.Stop()
		for {
			if stopped(pr.PID) {
				frozenAt <- time.Now()
				return
			}
			select {
			case <-tk.C:
			case <-stopWatch:
				frozenAt <- dumpStart
				return
			}
		}
	}()
	// Before the point of no return, killing the dump resumes the program.
	abort := func(err error) (migrate.Result, error) {
		dump.Kill()
		<-dump.Done()
		_ = sc.WriteError(fmt.Errorf("node %s: %v", self, err))
		return failed(err)
	}
	if err := dump.Ready(migrateReadyTimeout); err != nil {
		dump.Kill()
		<-dump.Done()
		return failed(fmt.Errorf("criu dump: %w (%s)", err, dump.Tail()))
	}
	endWatch()
	freeze := <-frozenAt
	res.FreezeMS = ms(time.Since(freeze))
	t := time.Now()
	n, err := migrate.SendFiles(sc, dir) // each frame bounded (memberConn)
	res.ImageBytes = n
	res.ImagesMS = ms(time.Since(t))
	if err != nil {
		// The target may have said why it stopped taking them.
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		for {
			f, rerr := sc.Read()
			if rerr != nil {
				break
			}
			if f.Type == stream.Error {
				err = errors.New(string(f.Payload))
				break
			}
		}
		_ = conn.SetReadDeadline(time.Time{})
		return abort(fmt.Errorf("send the images to %s: %w", target, err))
	}

	tun := &migrate.Tunnel{Local: ours, C: sc}
	go func() { _ = tun.Pump() }()
	restored := make(chan migrate.Restored, 1)
	doneC := make(chan migrate.Done, 1)
	rerr := make(chan error, 1)
	go func() {
		buf := make([]byte, 512<<10)
		for {
			f, err := sc.ReadInto(buf)
			if err != nil {
				rerr <- fmt.Errorf("lost node %s: %w", target, err)
				return
			}
			switch f.Type {
			case stream.Pages, stream.PagesEOF:
				_ = tun.Deliver(f)
			case stream.Restored:
				var r migrate.Restored
				if json.Unmarshal(f.Payload, &r) != nil {
					rerr <- fmt.Errorf("node %s sent a bad restored frame", target)
					return
				}
				restored <- r
			case stream.Done:
				var d migrate.Done
				_ = json.Unmarshal(f.Payload, &d)
				doneC <- d
				return
			case stream.Error:
				rerr <- errors.New(string(f.Payload))
				return
			default:
				rerr <- fmt.Errorf("node %s sent an unexpected %s frame", target, f.Type)
				return
			}
		}
	}()
	var r migrate.Restored
	dumpDone := dump.Done()
	var dumpErr error
	dumpEnded := false
	select {
	case r = <-restored:
	case err := <-rerr:
		return abort(err)
	case dumpErr = <-dumpDone:
		dumpEnded = true
		if dumpErr != nil {
			return failed(fmt.Errorf("criu dump: %v (%s)", dumpErr, dump.Tail()))
		}
		// Every page left: the target restored; its word is on the way.
		select {
		case r = <-restored:
		case err := <-rerr:
			return res, migrateErr(http.StatusBadGateway, "migration of %s to %s: every page was sent but the target did not confirm (%v): the process is lost", gid, target, err)
		case <-time.After(migrateRestoreTimeout):
			return res, migrateErr(http.StatusGatewayTimeout, "migration of %s to %s: every page was sent but the target did not confirm: the process is lost", gid, target)
		}
	case <-time.After(migrateRestoreTimeout):
		return abort(fmt.Errorf("node %s did not restore within %v", target, migrateRestoreTimeout))
	case <-ctx.Done():
		return abort(ctx.Err())
	}
	// Point of no return: the program runs on the target.
	res.DowntimeMS = ms(time.Since(freeze))
	res.RestoreMS, res.PID, res.PIDNS = r.RestoreMS, r.PID, r.PIDNS
	p.mu.Lock()
	mig.to = target
	p.mu.Unlock()
	p.remember(gid, target)
	p.a.log.Info("process migrated", "gid", gid, "to", target, "downtime_ms", res.DowntimeMS, "reason", reason)
	if !dumpEnded {
		select {
		case dumpErr = <-dumpDone:
		case err := <-rerr:
			// The target went away before its last page: the copy
			// there dies without its pages; the frozen original must
			// not run on as well (both would have run).
			_ = syscall.Kill(-pr.PID, syscall.SIGKILL)
			dump.Kill()
			<-dumpDone
			return res, migrateErr(http.StatusBadGateway, "migration of %s to %s: the target was lost after the restore, before every page arrived (%v): the process is lost", gid, target, err)
		case <-time.After(migratePagesTimeout):
			_ = syscall.Kill(-pr.PID, syscall.SIGKILL)
			dump.Kill()
			<-dumpDone
			return res, migrateErr(http.StatusGatewayTimeout, "migration of %s to %s: pages not all sent after %v: the process is lost", gid, target, migratePagesTimeout)
		}
	}
	if dumpErr != nil {
		p.a.log.Warn("criu dump ended with an error after the restore", "gid", gid, "err", dumpErr, "log", dump.Tail())
		_ = syscall.Kill(-pr.PID, syscall.SIGKILL)
	}
	res.SourceDoneMS = ms(time.Since(begin))
	select {
	case d := <-doneC:
		res.PagesMS = d.PagesMS
	case err := <-rerr:
		p.a.log.Info("no done from the target", "gid", gid, "err", err)
	case <-time.After(time.Minute):
	}
	res.PageBytes = tun.Sent()
	res.TotalMS = ms(time.Since(begin))
	// Failpoint for tests: the source dies once every page has left,
	// before it tells the caller's agent where the program went.
	if failpoint("migrate-out-crash", self) {
		p.a.log.Warn("failpoint migrate-out-crash: killing this agent")
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
	res.Note = fmt.Sprintf("migrated from %s: %s", self, reason)
	select {
	case <-pr.Done():
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-pr.PID, syscall.SIGKILL)
	}
	p.mgr.Remove(pr)
	return res, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// failpoint reports whether ONEBOX_FAILPOINT (a comma-separated list of
// NAME@NODE) names this failure for this node: tests inject faults into
// the real code paths this way, as etcd's gofail does.
func failpoint(name, node string) bool {
	v := os.Getenv("ONEBOX_FAILPOINT")
	if v == "" {
		return false
	}
	for _, f := range strings.Split(v, ",") {
		if f == name+"@"+node {
			return true
		}
	}
	return false
}

// imageDir is where a migration keeps its images (name: GID.out or
// GID.in). With inMemory, a tmpfs: DATA_DIR/proc/migrate if it is one
// (an operator may mount one there, of the size they choose), else
// /dev/shm (shmImagePrefix), else DATA_DIR/proc/migrate on disk. CRIU
// writes the images and reads them back inside the program's downtime;
// on ext4 their creation and the target's writes cost several ms.
func (p *procState) imageDir(name string, inMemory bool) string {
	base := filepath.Join(p.a.cfg.DataDir, "proc", "migrate")
	if inMemory && !onTmpfs(base) && onTmpfs(shmDir) {
		return shmImagePrefix(p.a.cfg.DataDir) + name
	}
	return filepath.Join(base, name)
}

const (
	shmDir = "/dev/shm"
	// shmStale: an image directory in /dev/shm this old belongs to no
	// migration (they are bounded well below), but to an agent that died.
	shmStale = 2 * (migrateReadyTimeout + migrateRestoreTimeout + migratePagesTimeout)
)

// shmImagePrefix starts the names of the agent's image directories in
// /dev/shm: one directory per migration, named after the agent's data
// directory (an agent that starts again removes its predecessor's), so
// that none stays behind once its migration ended.
func shmImagePrefix(dataDir string) string {
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		abs = dataDir
	}
	h := sha256.Sum256([]byte(abs))
	return filepath.Join(shmDir, "onebox-migrate-"+hex.EncodeToString(h[:6])+"-")
}

// removeStaleImages removes the image directories an earlier agent with
// this data directory left (it died mid-migration), and those in /dev/shm
// of any agent that are older than any migration can be.
func removeStaleImages(dataDir string) error {
	var errs []error
	dirs := []string{filepath.Join(dataDir, "proc", "migrate")}
	own, _ := filepath.Glob(shmImagePrefix(dataDir) + "*")
	dirs = append(dirs, own...)
	all, _ := filepath.Glob(filepath.Join(shmDir, "onebox-migrate-*"))
	for _, d := range all {
		if fi, err := os.Lstat(d); err == nil && fi.IsDir() && time.Since(fi.ModTime()) > shmStale {
			dirs = append(dirs, d)
		}
	}
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// onTmpfs reports whether path, or the nearest directory above it that
// exists, is on a tmpfs.
func onTmpfs(path string) bool {
	for {
		var st unix.Statfs_t
		err := unix.Statfs(path, &st)
		if err == nil {
			return st.Type == unix.TMPFS_MAGIC
		}
		up := filepath.Dir(path)
		if !errors.Is(err, unix.ENOENT) || up == path {
			return false
		}
		path = up
	}
}

// stopped reports whether pid is stopped or traced (CRIU has seized it),
// or gone.
func stopped(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	switch b[i+2] {
	case 't', 'T', 'Z', 'X':
		return true
	}
	return false
}

// enterNamespaces returns a start function that runs CRIU in the PID and
// mount namespaces of pid (where it has the PID inner) when the program
// was restored into a fresh PID namespace, or nil.
func enterNamespaces(pid, inner int) func(*exec.Cmd) error {
	if pid == inner {
		return nil
	}
	return func(c *exec.Cmd) error {
		nsenter, err := exec.LookPath("nsenter")
		if err != nil {
			return fmt.Errorf("the program runs in a PID namespace and nsenter is missing: %w", err)
		}
		c.Args = append([]string{"nsenter", "-t", strconv.Itoa(pid), "-p", "-m", "--"}, c.Args...)
		c.Path = nsenter
		return c.Start()
	}
}

// migrateIn restores a program migrating here from node from.
func (p *procState) migrateIn(c net.Conn, sc *stream.Conn, spec migrate.Spec, from string) {
	self := p.a.id.Node
	log := p.a.log.With("gid", spec.GID, "from", from)
	fail := func(format string, args ...any) {
		err := fmt.Errorf("node %s: "+format, append([]any{self}, args...)...)
		log.Warn("incoming migration failed", "err", err)
		p.countMove("in", err)
		_ = sc.WriteError(err)
	}
	if _, ok := p.mgr.Get(spec.GID); ok {
		fail("process %s is already here", spec.GID)
		return
	}
	// One restore of a GID at a time: its image directory is named after
	// it (a retry must not remove the images a lingering one still uses).
	p.mu.Lock()
	busy := p.incoming[spec.GID]
	p.incoming[spec.GID] = true
	p.mu.Unlock()
	if busy {
		fail("process %s is already migrating here: try again once that migration ended", spec.GID)
		return
	}
	defer func() {
		p.mu.Lock()
		delete(p.incoming, spec.GID)
		p.mu.Unlock()
	}()
	if !spec.Checkpoint && !p.a.schedulable(self) {
		fail("this node is cordoned: it takes no moved processes")
		return
	}
	b, err := criuBinary()
	if err != nil {
		fail("cannot restore: %v", err)
		return
	}
	// A checkpoint's images hold all its memory: on disk. A migration's
	// are tens of KiB: in memory, off the downtime's disk writes.
	dir := p.imageDir(spec.GID+".in", !spec.Checkpoint)
	_ = os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail("cannot store the checkpoint images: %v", err)
		return
	}
	cleanup := true
	defer func() {
		if cleanup {
			os.RemoveAll(dir)
		}
	}()
	// The holder starts now, while the source dumps, and restores when
	// told: its start-up is off the program's downtime.
	type restored struct {
		pr    *manager.Proc
		stdio *manager.Stdio
		pidns bool
		err   error
	}
	var gw *os.File
	restoreRes := make(chan restored, 1)
	if !spec.Checkpoint {
		gr, w, err := os.Pipe()
		if err != nil {
			fail("%v", err)
			return
		}
		gw = w
		go func() {
			pr, stdio, pidns, err := p.restore(b, dir, spec, true, fmt.Sprintf("migrated from %s: %s", from, spec.Reason), gr)
			gr.Close()
			restoreRes <- restored{pr, stdio, pidns, err}
		}()
		defer func() {
			if gw != nil { // not started: cancel
				gw.Close()
				if r := <-restoreRes; r.err == nil {
					_ = p.mgr.SignalProc(r.pr, syscall.SIGKILL)
				}
			}
		}()
	}
	sink := &migrate.FileSink{Dir: dir, Max: maxImageBytes}
	for {
		_ = c.SetReadDeadline(time.Now().Add(migrateFrameTimeout))
		f, err := sc.Read()
		if err != nil {
			sink.Close()
			log.Info("incoming migration: source gone", "err", err)
			return
		}
		if f.Type == stream.FilesDone {
			break
		}
		if f.Type != stream.File {
			sink.Close()
			fail("expected a file frame, got %s", f.Type)
			return
		}
		if err := sink.Write(f.Payload); err != nil {
			sink.Close()
			fail("cannot store the checkpoint images in %s: %v", dir, err)
			return
		}
	}
	_ = c.SetReadDeadline(time.Time{})
	if err := sink.Close(); err != nil {
		fail("cannot store the checkpoint images in %s: %v", dir, err)
		return
	}

	// Failpoint for tests (as etcd's gofail): the agent dies between
	// receiving the images and restoring.
	if failpoint("migrate-in-crash", self) {
		log.Warn("failpoint migrate-in-crash: killing this agent")
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
	if spec.Checkpoint {
		p.restoreCheckpoint(sc, b, dir, spec, from)
		return
	}
	ours, theirs, err := migrate.SocketPair()
	if err != nil {
		fail("%v", err)
		return
	}
	lazy, err := b.Start(context.Background(), dir, "lazy-pages.log", []*os.File{theirs},
		[]string{"lazy-pages", "--page-server", "--ps-socket", "3"}, nil)
	theirs.Close()
	if err != nil {
		ours.Close()
		fail("%v", err)
		return
	}
	if err := lazy.Ready(30 * time.Second); err != nil {
		ours.Close()
		lazy.Kill()
		<-lazy.Done()
		fail("criu lazy-pages: %v", err)
		return
	}
	tun := &migrate.Tunnel{Local: ours, C: sc}
	go func() { _ = tun.Pump() }()
	rerr := make(chan error, 1)
	go func() {
		buf := make([]byte, 512<<10)
		for {
			f, err := sc.ReadInto(buf)
			if err != nil {
				rerr <- err
				return
			}
			switch f.Type {
			case stream.Pages, stream.PagesEOF:
				if err := tun.Deliver(f); err != nil && f.Type == stream.Pages {
					log.Debug("deliver pages", "err", err)
				}
			case stream.Error:
				rerr <- errors.New(string(f.Payload))
				return
			default:
				rerr <- fmt.Errorf("unexpected %s frame", f.Type)
				return
			}
		}
	}()
	stopLazy := func() {
		ours.Close()
		lazy.Kill()
		<-lazy.Done()
	}

	start := time.Now()
	_, err = gw.Write([]byte{1})
	gw.Close()
	gw = nil
	r := <-restoreRes
	pr, stdio, pidns := r.pr, r.stdio, r.pidns
	if r.err != nil {
		err = r.err // the holder's own word, rather than a broken gate pipe
	}
	if err != nil {
		stopLazy()
		if os.Getenv("ONEBOX_KEEP_MIGRATE_IMAGES") != "" {
			cleanup = false
		}
		fail("restore failed: %v", err)
		return
	}
	restoreMS := ms(time.Since(start))
	if stdio != nil {
		p.await(pr, stdio)
	}
	p.remember(spec.GID, self)
	if err := sc.WriteJSON(stream.Restored, migrate.Restored{Node: self, PID: pr.PID, RestoreMS: restoreMS, PIDNS: pidns}); err != nil {
		log.Warn("cannot confirm the restore", "err", err)
	}
	log.Info("process restored from a migration", "pid", pr.PID, "restore_ms", restoreMS, "pidns", pidns)
	p.countMove("in", nil)
	select {
	case err := <-lazy.Done():
		if err != nil {
			// Pages are missing: the program must not go on with
			// zero-filled memory.
			_ = p.mgr.SignalProc(pr, syscall.SIGKILL)
			log.Warn("lazy pages failed: the restored program is stopped", "err", err, "log", lazy.Tail())
			ours.Close()
			return
		}
		_ = sc.WriteJSON(stream.Done, migrate.Done{PagesMS: ms(time.Since(start))})
		ours.Close()
	case err := <-rerr:
		// The source is gone before the last page: stop the program
		// before its pager goes (it would read zeroes).
		_ = p.mgr.SignalProc(pr, syscall.SIGKILL)
		stopLazy()
		log.Warn("source lost before every page arrived: the restored program is stopped", "err", err)
	case <-time.After(migratePagesTimeout):
		_ = p.mgr.SignalProc(pr, syscall.SIGKILL)
		stopLazy()
	}
	// Linger until the source closes (bounded).
	select {
	case <-rerr:
	case <-time.After(drainTimeout):
	}
}

// restore restores the program in dir under a holder (in a fresh PID
// namespace if its PID is taken here) with new stdio: pipes (returned) for
// an attached program, a new log file for a detached one.
// gate, if not nil, is the read end of a pipe: the holder starts at once
// and restores when a byte arrives there (EOF cancels).
func (p *procState) restore(b criu.Binary, dir string, spec migrate.Spec, lazy bool, note string, gate *os.File) (*manager.Proc, *manager.Stdio, bool, error) {
	var closeLater []*os.File
	defer func() {
		for _, f := range closeLater {
			f.Close()
		}
	}()
	var extra []*os.File // the holder's fds 4.. (CRIU's 3..)
	var inherit []criu.Inherit
	var stdio *manager.Stdio
	logPath := ""
	if spec.Detached {
		if err := os.MkdirAll(filepath.Join(p.a.cfg.DataDir, "proc", "logs"), 0o700); err != nil {
			return nil, nil, false, err
		}
		logPath = filepath.Join(p.a.cfg.DataDir, "proc", "logs", spec.GID+".log")
		lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, nil, false, err
		}
		closeLater = append(closeLater, lf)
		seen := map[string]bool{}
		if k := spec.Stdio[0]; k != "dev/null" {
			// A checkpoint of an attached program: its input is gone.
			null, err := os.Open(os.DevNull)
			if err != nil {
				return nil, nil, false, err
			}
			closeLater = append(closeLater, null)
			inherit = append(inherit, criu.Inherit{FD: 3 + len(extra), Key: k})
			extra = append(extra, null)
			seen[k] = true
		}
		for fd := 1; fd < 3; fd++ {
			k := spec.Stdio[fd]
			if seen[k] || k == "dev/null" {
				continue
			}
			seen[k] = true
			inherit = append(inherit, criu.Inherit{FD: 3 + len(extra), Key: k})
			extra = append(extra, lf)
		}
	} else {
		var pipes [3][2]*os.File
		for i := range pipes {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, nil, false, err
			}
			pipes[i] = [2]*os.File{r, w}
		}
		for _, fd := range []int{1, 2} { // room for output while the caller switches over
			_, _ = unix.FcntlInt(pipes[fd][0].Fd(), unix.F_SETPIPE_SZ, 1<<20)
		}
		child := []*os.File{pipes[0][0], pipes[1][1], pipes[2][1]}
		for fd := 0; fd < 3; fd++ {
			inherit = append(inherit, criu.Inherit{FD: 3 + fd, Key: spec.Stdio[fd]})
			extra = append(extra, child[fd])
			closeLater = append(closeLater, child[fd])
		}
		stdio = &manager.Stdio{Stdin: pipes[0][1], Stdout: pipes[1][0], Stderr: pipes[2][0]}
	}
	closeStdio := func() {
		if stdio != nil {
			stdio.Stdin.Close()
			stdio.Stdout.Close()
			stdio.Stderr.Close()
		}
	}
	exe, err := os.Executable()
	if err != nil {
		closeStdio()
		return nil, nil, false, err
	}
	_, err = os.Stat("/proc/" + strconv.Itoa(spec.PID))
	pidns := err == nil // the PID is taken here
	args := []string{migrate.HolderCommand}
	if pidns {
		args = append(args, "--newpid")
	}
	if gate != nil {
		args = append(args, "--wait")
	}
	args = append(args, "--")
	args = append(args, b.Exec()...)
	args = append(args, criu.RestoreArgs(lazy, inherit)...)
	args = append(args, "-D", dir, "-o", "restore.log", criu.LogLevel)
	sr, sw, err := os.Pipe()
	if err != nil {
		closeStdio()
		return nil, nil, false, err
	}
	cmd := exec.Command(exe, args...)
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.ExtraFiles = append([]*os.File{sw}, extra...)
	if gate != nil {
		cmd.Stdin = gate
	}
	if hl, err := os.Create(filepath.Join(dir, "holder.log")); err == nil {
		cmd.Stderr = hl
		closeLater = append(closeLater, hl)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if pidns {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWPID | syscall.CLONE_NEWNS
	}
	// Adopt's bound runs from the holder's start: a gated holder starts
	// while the source dumps and sends the images, which the source
	// bounds by migrateReadyTimeout and migrateRestoreTimeout.
	timeout := migrateRestoreTimeout
	if gate != nil {
		timeout += migrateReadyTimeout + migrateRestoreTimeout
	}
	pr, err := p.mgr.Adopt(manager.AdoptOptions{GID: spec.GID, Home: spec.Home, Argv: spec.Argv, Started: spec.Started,
		Detached: spec.Detached, Log: logPath, Balance: spec.Balance, Note: note,
		Holder: cmd, Status: sr, Child: migrate.ChildOf, Timeout: timeout})
	sw.Close()
	if err != nil {
		closeStdio()
		tail := criu.LogTail(filepath.Join(dir, "restore.log"))
		if b, _ := os.ReadFile(filepath.Join(dir, "holder.log")); len(b) > 0 {
			tail += "; holder: " + strings.TrimSpace(string(b))
		}
		return nil, nil, false, fmt.Errorf("%v (%s)", err, tail)
	}
	return pr, stdio, pidns, nil
}

// await keeps a restored program's stdio until its caller attaches; if
// none comes in attachTimeout, the program gets SIGHUP, as when a caller
// hangs up.
func (p *procState) await(pr *manager.Proc, stdio *manager.Stdio) {
	w := &waitingStdio{pr: pr, stdio: stdio}
	p.mu.Lock()
	p.waiting[pr.GID] = w
	w.timer = time.AfterFunc(attachTimeout, func() {
		p.mu.Lock()
		if p.waiting[pr.GID] != w {
			p.mu.Unlock()
			return
		}
		delete(p.waiting, pr.GID)
		p.mu.Unlock()
		p.a.log.Info("no caller attached to the migrated program: SIGHUP", "gid", pr.GID)
		_ = p.mgr.SignalProc(pr, syscall.SIGHUP)
		stdio.Stdin.Close()
		stdio.Stdout.Close()
		stdio.Stderr.Close()
	})
	p.mu.Unlock()
}

// attach gives a migrated program's stdio to the caller that followed it.
func (p *procState) attach(sc *stream.Conn, gid string) {
	p.mu.Lock()
	w := p.waiting[gid]
	if w != nil {
		delete(p.waiting, gid)
		w.timer.Stop()
	}
	p.mu.Unlock()
	if w == nil {
		_ = sc.WriteError(fmt.Errorf("node %s has no migrated process %s waiting for its caller", p.a.id.Node, gid))
		return
	}
	p.streamProc(sc, w.pr, w.stdio, true)
}

// MigrateRequest answers POST /v1/procs/{gid}/migrate.
type MigrateRequest = migrate.Result

// migrateRoute serves 'onebox migrate': here if the program runs here,
// else forwarded to its node.
func (p *procState) migrateRoute(w http.ResponseWriter, r *http.Request) {
	gid := r.PathValue("gid")
	q := r.URL.Query()
	target := q.Get("node")
	if !manager.ValidGID(gid) {
		replyJSON(w, http.StatusNotFound, api.ErrorBody{Error: fmt.Sprintf("%q is not a process id (ids look like g0123456789ab: 'onebox ps' lists them)", gid)})
		return
	}
	if target == "" {
		replyJSON(w, http.StatusBadRequest, api.ErrorBody{Error: "say where to: a node name or 'home'"})
		return
	}
	reply := func(res migrate.Result, err error) { replyResult(w, res, err) }
	if _, ok := p.mgr.Get(gid); ok || q.Get("scope") == "node" {
		reply(p.migrateOut(r.Context(), gid, target, "user", ""))
		return
	}
	l := p.list(r.Context())
	for _, pi := range l.Procs {
		if pi.GID != gid || pi.State != manager.StateRunning {
			continue
		}
		m, ok := p.member(pi.Node)
		if !ok {
			break
		}
		var res migrate.Result
		q.Set("scope", "node")
		err := p.peerCallTimeout(r.Context(), m, http.MethodPost, "/v1/procs/"+url.PathEscape(gid)+"/migrate?"+q.Encode(),
			migrateRestoreTimeout+migratePagesTimeout, &res)
		var pe *peerError
		if err != nil && !errors.As(err, &pe) {
			err = migrateErr(http.StatusBadGateway, "node %s, which ran %s, stopped answering during the migration (%v): 'onebox ps' shows where the process is now", pi.Node, gid, err)
		}
		reply(res, err)
		return
	}
	replyJSON(w, http.StatusNotFound, api.ErrorBody{Error: fmt.Sprintf("no running process %s in the cluster ('onebox ps' lists them)", gid)})
}

// Checkpoint and restart (Kerrighed's): 'onebox checkpoint GID DIR' writes
// a complete CRIU image of the program into DIR on the node that runs it
// (the program goes on running unless --stop), with onebox's description
// in DIR/onebox-checkpoint.json; 'onebox restore DIR [--node NAME]'
// starts it again, from the images in DIR on the caller's node, on NAME,
// as a detached program with a new global id (the original may still run)
// whose output goes to a log file, as for 'onebox run --detach'.

const (
	pathCheckpoint = "/v1/procs/{gid}/checkpoint"
	pathRestore    = "/v1/procs/restore"
	checkpointMeta = "onebox-checkpoint.json"
)

// CheckpointResult answers a checkpoint.
type CheckpointResult struct {
	GID     string  `json:"gid"`
	Node    string  `json:"node"`
	Dir     string  `json:"dir"`
	Bytes   int64   `json:"bytes"`
	DumpMS  float64 `json:"dump_ms"`
	Stopped bool    `json:"stopped"`
}

// RestoreResult answers a restore.
type RestoreResult struct {
	GID       string  `json:"gid"`
	Node      string  `json:"node"`
	PID       int     `json:"pid"`
	Log       string  `json:"log"`
	RestoreMS float64 `json:"restore_ms"`
}

// checkpoint dumps a program of this node into dir.
func (p *procState) checkpoint(gid, dir string, stop bool) (CheckpointResult, error) {
	res := CheckpointResult{GID: gid, Node: p.a.id.Node, Dir: dir, Stopped: stop}
	pr, ok := p.mgr.Get(gid)
	if !ok || ended(pr) {
		return res, migrateErr(http.StatusNotFound, "no running process %s on node %s", gid, p.a.id.Node)
	}
	if !filepath.IsAbs(dir) {
		return res, migrateErr(http.StatusBadRequest, "checkpoint directory %q: give an absolute path", dir)
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return res, migrateErr(http.StatusConflict, "checkpoint directory %s on %s is not empty: give a new or empty one", dir, p.a.id.Node)
	}
	if why := migrate.Check(pr.PID); why != "" {
		return res, migrateErr(http.StatusConflict, "process %s cannot be checkpointed: it %s", gid, why)
	}
	b, err := criuBinary()
	if err != nil {
		return res, migrateErr(http.StatusServiceUnavailable, "node %s cannot checkpoint: %v", p.a.id.Node, err)
	}
	// Private, as the images hold the program's memory (CRIU writes them
	// 0644 under the usual umask): the directory was empty or new.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return res, migrateErr(http.StatusInternalServerError, "checkpoint directory: %v", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return res, migrateErr(http.StatusInternalServerError, "checkpoint directory: %v", err)
	}
	spec := migrate.Spec{GID: gid, Home: pr.Home, Argv: pr.Argv, Started: pr.Started, Detached: true,
		Balance: pr.Balance, From: p.a.id.Node, Reason: "restored from a checkpoint", PID: migrate.InnerPID(pr.PID), Checkpoint: true}
	for fd := 0; fd < 3; fd++ {
		k, err := migrate.PipeKey(pr.PID, fd)
		if err != nil {
			return res, migrateErr(http.StatusConflict, "process %s cannot be checkpointed: %v", gid, err)
		}
		spec.Stdio[fd] = k
	}
	args := []string{"dump", "-t", strconv.Itoa(spec.PID), "-j"}
	if !stop {
		args = append(args, "--leave-running")
	}
	start := time.Now()
	// Bounded: a CRIU that hangs would keep the program frozen; killing
	// it (with a wrapping nsenter, its process group) lets it run on.
	dump, err := b.Start(p.ctx, dir, "dump.log", nil, args, enterNamespaces(pr.PID, spec.PID))
	if err != nil {
		return res, migrateErr(http.StatusServiceUnavailable, "node %s cannot checkpoint: %v", p.a.id.Node, err)
	}
	if err := dump.WaitFor(checkpointTimeout); err != nil {
		return res, migrateErr(http.StatusInternalServerError, "criu dump: %v (%s) (the process goes on running)", err, dump.Tail())
	}
	res.DumpMS = ms(time.Since(start))
	meta, _ := json.MarshalIndent(spec, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, checkpointMeta), meta, 0o600); err != nil {
		return res, migrateErr(http.StatusInternalServerError, "checkpoint: %v", err)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			res.Bytes += fi.Size()
		}
	}
	if stop {
		select {
		case <-pr.Done():
		case <-time.After(10 * time.Second):
		}
	}
	return res, nil
}

// restoreFrom restores a checkpoint in dir (on this node) on node target.
func (p *procState) restoreFrom(ctx context.Context, dir, target string) (RestoreResult, error) {
	var res RestoreResult
	b, err := os.ReadFile(filepath.Join(dir, checkpointMeta))
	if err != nil {
		return res, migrateErr(http.StatusBadRequest, "%s on %s is not a onebox checkpoint: %v", dir, p.a.id.Node, err)
	}
	var spec migrate.Spec
	if err := json.Unmarshal(b, &spec); err != nil || spec.Validate() != nil {
		return res, migrateErr(http.StatusBadRequest, "%s: bad %s", dir, checkpointMeta)
	}
	spec.GID = manager.NewGID()
	spec.Checkpoint, spec.Detached = true, true
	spec.Home = p.a.id.Node
	if target == "" {
		target = p.a.id.Node
	}
	m, ok := p.member(target)
	if !ok || m.Status != membership.StatusAlive || m.FabricAddr == "" {
		return res, migrateErr(http.StatusConflict, "node %q is not an alive member ('onebox nodes')", target)
	}
	conn, err := p.dial(m)
	if err != nil {
		return res, migrateErr(http.StatusBadGateway, "cannot reach node %s: %v", target, err)
	}
	if !p.track(conn, true) {
		return res, errors.New("the agent is shutting down")
	}
	defer p.untrack(conn)
	// The caller's request bounds the transfer (a target that stops
	// reading would block the writes for good).
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	sc := memberConn(conn)
	if err := sc.WriteJSON(stream.Migrate, spec); err != nil {
		return res, err
	}
	if _, err := migrate.SendFiles(sc, dir); err != nil {
		return res, migrateErr(http.StatusBadGateway, "send the checkpoint to %s: %v", target, err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(migrateRestoreTimeout))
	f, err := sc.Read()
	switch {
	case err != nil:
		return res, migrateErr(http.StatusBadGateway, "node %s: %v", target, err)
	case f.Type == stream.Error:
		return res, migrateErr(http.StatusBadGateway, "%s", f.Payload)
	case f.Type != stream.Restored:
		return res, migrateErr(http.StatusBadGateway, "node %s sent %s", target, f.Type)
	}
	var r migrate.Restored
	_ = json.Unmarshal(f.Payload, &r)
	return RestoreResult{GID: spec.GID, Node: target, PID: r.PID, RestoreMS: r.RestoreMS,
		Log: filepath.Join("DATA_DIR", "proc", "logs", spec.GID+".log")}, nil
}

// restoreCheckpoint is the target's side of a restore from a checkpoint:
// complete images, no pages to follow.
func (p *procState) restoreCheckpoint(sc *stream.Conn, b criu.Binary, dir string, spec migrate.Spec, from string) {
	start := time.Now()
	pr, _, pidns, err := p.restore(b, dir, spec, false, "restored from a checkpoint on "+from, nil)
	if err != nil {
		_ = sc.WriteError(fmt.Errorf("node %s: restore failed: %v", p.a.id.Node, err))
		return
	}
	p.remember(spec.GID, p.a.id.Node)
	_ = sc.WriteJSON(stream.Restored, migrate.Restored{Node: p.a.id.Node, PID: pr.PID, RestoreMS: ms(time.Since(start)), PIDNS: pidns})
	// Until the caller, having read the answer, closes (bounded).
	if c, ok := sc.Underlying().(net.Conn); ok {
		_ = c.SetReadDeadline(time.Now().Add(drainTimeout))
	}
	_, _ = sc.Read()
}

// checkpointRoutes serves checkpoint (forwarded to the program's node) and
// restore (on this node's directory).
func (p *procState) checkpointRoute(w http.ResponseWriter, r *http.Request) {
	gid := r.PathValue("gid")
	q := r.URL.Query()
	dir, stop := q.Get("dir"), q.Get("stop") == "1"
	reply := func(v any, err error) { replyResult(w, v, err) }
	if !manager.ValidGID(gid) {
		reply(nil, migrateErr(http.StatusNotFound, "%q is not a process id ('onebox ps' lists them)", gid))
		return
	}
	if _, ok := p.mgr.Get(gid); ok || q.Get("scope") == "node" {
		reply(p.checkpoint(gid, dir, stop))
		return
	}
	for _, pi := range p.list(r.Context()).Procs {
		if pi.GID != gid || pi.State != manager.StateRunning {
			continue
		}
		m, ok := p.member(pi.Node)
		if !ok {
			break
		}
		var res CheckpointResult
		q.Set("scope", "node")
		err := p.peerCallTimeout(r.Context(), m, http.MethodPost, "/v1/procs/"+url.PathEscape(gid)+"/checkpoint?"+q.Encode(), checkpointTimeout+time.Minute, &res)
		reply(res, err)
		return
	}
	reply(nil, migrateErr(http.StatusNotFound, "no running process %s in the cluster ('onebox ps' lists them)", gid))
}

func (p *procState) restoreRoute(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	res, err := p.restoreFrom(r.Context(), q.Get("dir"), q.Get("node"))
	replyResult(w, res, err)
}

// replyResult answers v, or err with its status (a *peerError's, else
// 500).
func replyResult(w http.ResponseWriter, v any, err error) {
	if err == nil {
		replyJSON(w, http.StatusOK, v)
		return
	}
	var pe *peerError
	if errors.As(err, &pe) {
		replyJSON(w, pe.code, api.ErrorBody{Error: pe.msg})
		return
	}
	replyJSON(w, http.StatusInternalServerError, api.ErrorBody{Error: err.Error()})
}
