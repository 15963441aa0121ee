// Package manager is a node's table of onebox-managed processes: it starts
// programs (each in its own process group, as the agent's user), gives
// them cluster-unique global ids, reaps them, signals their process
// groups, and reports them with their CPU and memory use. Exited
// processes stay listed for a while so their exit status can be seen.
package manager

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults for how long exited processes stay listed.
const (
	DefaultKeepExited = 10 * time.Minute
	DefaultMaxExited  = 100
)

// States of a process.
const (
	StateRunning = "running"
	StateExited  = "exited"
	StateKilled  = "killed"
)

// ErrNotFound is returned for a GID this node does not hold.
var ErrNotFound = errors.New("manager: no such process")

// Start's errors for a program that is not there or cannot be run: a
// shell exits 127 and 126 for them.
var (
	ErrNoProgram     = errors.New("executable file not found")
	ErrNotExecutable = errors.New("not an executable file")
)

// StartCode is the exit status a shell gives when a program cannot be
// started with err: 127, 126, or 0 if err is neither.
func StartCode(err error) int {
	switch {
	case errors.Is(err, ErrNoProgram):
		return 127
	case errors.Is(err, ErrNotExecutable):
		return 126
	}
	return 0
}

// Info is one process as 'onebox ps' shows it.
type Info struct {
	GID        string     `json:"gid"`
	Node       string     `json:"node"`
	Home       string     `json:"home"`
	PID        int        `json:"pid"`
	Command    []string   `json:"command"`
	State      string     `json:"state"`               // running, exited or killed
	ExitCode   *int       `json:"exit_code,omitempty"` // state exited
	Signal     string     `json:"signal,omitempty"`    // state killed: e.g. SIGTERM
	CPUPercent float64    `json:"cpu_percent"`
	RSSBytes   uint64     `json:"rss_bytes"`
	Started    time.Time  `json:"started"`
	Ended      *time.Time `json:"ended,omitempty"`
	Detached   bool       `json:"detached"`
	// Log is the file on Node that holds a detached process's stdout and
	// stderr (kept as long as the process is listed).
	Log string `json:"log,omitempty"`
	// Balance: the load balancer may move the process (started with
	// --best and without --no-balance).
	Balance bool `json:"balance"`
	// Migrating names the node the process is moving to, while a
	// migration is under way (the entry is the frozen original).
	Migrating string `json:"migrating,omitempty"`
	// Note says where the process went and why ("migrated from n1:
	// balance"), or why it cannot migrate.
	Note string `json:"note,omitempty"`
}

// StateText is the STATE column: "running", "exited 3", "killed SIGTERM",
// "migrating to n2".
func (i Info) StateText() string {
	switch {
	case i.State == StateRunning && i.Migrating != "":
		return "migrating to " + i.Migrating
	case i.State == StateExited && i.ExitCode != nil:
		return fmt.Sprintf("exited %d", *i.ExitCode)
	case i.State == StateKilled:
		return "killed " + i.Signal
	}
	return i.State
}

// Config of a Manager.
type Config struct {
	Node       string // this node's name
	LogDir     string // where detached processes' logs go
	Logger     *slog.Logger
	KeepExited time.Duration // default DefaultKeepExited
	MaxExited  int           // default DefaultMaxExited
}

// Manager is the process table of one node.
type Manager struct {
	cfg Config

	// Programs are forked from one goroutine locked to its OS thread for
	// the manager's life: Pdeathsig fires when the thread that forked a
	// child exits, and Go ends threads whose locked goroutine returns, so
	// only a thread that lives as long as the manager makes Pdeathsig mean
	// "the agent died".
	forkc    chan forkReq
	stopFork chan struct{}
	forkDone chan struct{}

	mu     sync.Mutex
	procs  map[string]*Proc // by GID; guarded by mu
	closed bool             // guarded by mu
}

type forkReq struct {
	cmd *exec.Cmd
	err chan error
}

// forker starts the programs (see Manager.forkc). When the manager closes
// it returns, still locked, so its thread ends: any child still alive gets
// its Pdeathsig.
func (m *Manager) forker() {
	runtime.LockOSThread()
	defer close(m.forkDone)
	for {
		select {
		case r := <-m.forkc:
			r.err <- r.cmd.Start()
		case <-m.stopFork:
			return
		}
	}
}

func (m *Manager) fork(cmd *exec.Cmd) error {
	closeOnExec()
	r := forkReq{cmd: cmd, err: make(chan error, 1)}
	select {
	case m.forkc <- r:
		return <-r.err
	case <-m.stopFork:
		return errors.New("manager: the agent is shutting down")
	}
}

// closeOnExec marks every descriptor of the agent above stderr
// close-on-exec. Go opens its own files so, but libraries and inheritance
// leave some open across exec (a FUSE device's descriptor passed by
// fusermount, descriptors the agent inherited): a program must not get
// them (they are the agent's, and a device or socket among them would
// also keep the program from migrating).
func closeOnExec() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags|unix.FD_CLOEXEC)
		}
	}
}

// New returns an empty table.
func New(cfg Config) *Manager {
	if cfg.KeepExited == 0 {
		cfg.KeepExited = DefaultKeepExited
	}
	if cfg.MaxExited == 0 {
		cfg.MaxExited = DefaultMaxExited
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{cfg: cfg, procs: map[string]*Proc{},
		forkc: make(chan forkReq), stopFork: make(chan struct{}), forkDone: make(chan struct{})}
	go m.forker()
	return m
}

// Proc is a process started by the manager.
type Proc struct {
	GID      string
	Home     string
	Argv     []string
	PID      int
	Started  time.Time
	Detached bool
	Log      string
	Balance  bool

	done chan struct{} // closed once the process is reaped

	note string // guarded by the manager's mu

	// All guarded by the manager's mu.
	status    ExitStatus
	ended     time.Time
	sampleAt  time.Time // last CPU sample
	sampleCPU uint64    // clock ticks at sampleAt
	cpuPct    float64   // last computed CPU%
}

// ExitStatus is how a process ended: an exit code, or a signal (Signal > 0).
type ExitStatus struct {
	Code   int
	Signal int
}

// Done is closed when the process has ended and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Stdio are the caller's ends of an attached process's standard streams.
type Stdio struct {
	Stdin  io.WriteCloser
	Stdout io.ReadCloser
	Stderr io.ReadCloser
}

// StartOptions say what to run.
type StartOptions struct {
	Argv []string
	Env  []string // the program's whole environment
	Dir  string   // used if it is a directory here, else /
	Home string   // node where the run was issued
	// Detach: stdin is /dev/null, stdout and stderr go to a log file.
	Detach bool
	// Balance: the load balancer may move the process.
	Balance bool
}

// NewGID returns a fresh global id: "g" and 12 hex digits from crypto/rand
// (48 bits: a collision among a cluster's processes is negligible, and the
// table checks its own).
func NewGID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "g" + hex.EncodeToString(b[:])
}

// ValidGID reports whether s looks like a global id.
func ValidGID(s string) bool {
	if len(s) != 13 || s[0] != 'g' {
		return false
	}
	_, err := hex.DecodeString(s[1:])
	return err == nil
}

// Start starts a program. For an attached process it returns the caller's
// ends of its stdio pipes, which the caller must close.
func (m *Manager) Start(o StartOptions) (*Proc, *Stdio, error) {
	if len(o.Argv) == 0 {
		return nil, nil, errors.New("manager: no program to run")
	}
	path, err := lookPath(o.Argv[0], envValue(o.Env, "PATH"), o.Dir)
	if err != nil {
		return nil, nil, err
	}
	dir := o.Dir
	if fi, err := os.Stat(dir); dir == "" || err != nil || !fi.IsDir() {
		dir = "/"
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, nil, errors.New("manager: the agent is shutting down")
	}
	gid := NewGID()
	for m.procs[gid] != nil {
		gid = NewGID()
	}
	m.mu.Unlock()

	cmd := &exec.Cmd{Path: path, Args: o.Argv, Env: o.Env, Dir: dir}
	if cmd.Env == nil {
		cmd.Env = []string{}
	}
	// Own session (and so own process group): signals reach the whole
	// group, and CRIU finds the session leader inside the dumped tree. A
	// program left in the agent's session could not be dumped wherever
	// that session's leader lies outside the agent's PID namespace (a
	// container, a CI runner): CRIU refuses "a session leader ... outside
	// of its pid namespace". Pdeathsig: an agent that dies takes its
	// processes with it (nothing could manage them any more).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	p := &Proc{GID: gid, Home: o.Home, Argv: append([]string(nil), o.Argv...), Detached: o.Detach, Balance: o.Balance, done: make(chan struct{})}

	var stdio *Stdio
	var childEnds []*os.File
	closeAll := func(fs ...io.Closer) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	if o.Detach {
		if err := os.MkdirAll(m.cfg.LogDir, 0o700); err != nil {
			return nil, nil, fmt.Errorf("manager: log dir: %w", err)
		}
		p.Log = filepath.Join(m.cfg.LogDir, gid+".log")
		f, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("manager: log file: %w", err)
		}
		cmd.Stdout, cmd.Stderr = f, f
		childEnds = append(childEnds, f)
	} else {
		inR, inW, err := os.Pipe()
		if err != nil {
			return nil, nil, fmt.Errorf("manager: %w", err)
		}
		outR, outW, err := os.Pipe()
		if err != nil {
			closeAll(inR, inW)
			return nil, nil, fmt.Errorf("manager: %w", err)
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			closeAll(inR, inW, outR, outW)
			return nil, nil, fmt.Errorf("manager: %w", err)
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
		childEnds = append(childEnds, inR, outW, errW)
		stdio = &Stdio{Stdin: inW, Stdout: outR, Stderr: errR}
	}
	err = m.fork(cmd)
	for _, f := range childEnds {
		f.Close()
	}
	if err != nil {
		if stdio != nil {
			closeAll(stdio.Stdin, stdio.Stdout, stdio.Stderr)
		}
		if p.Log != "" {
			os.Remove(p.Log)
		}
		return nil, nil, fmt.Errorf("manager: start %s: %w", o.Argv[0], err)
	}
	p.PID = cmd.Process.Pid
	p.Started = time.Now().UTC()
	m.mu.Lock()
	m.procs[gid] = p
	if m.closed { // Close ran while we started: it did not see p
		_ = syscall.Kill(-p.PID, syscall.SIGKILL)
	}
	m.mu.Unlock()
	m.cfg.Logger.Info("process started", "gid", gid, "pid", p.PID, "home", o.Home, "argv0", o.Argv[0], "detached", o.Detach)
	go m.reap(p, cmd)
	return p, stdio, nil
}

func (m *Manager) reap(p *Proc, cmd *exec.Cmd) {
	err := cmd.Wait()
	var st ExitStatus
	if ps := cmd.ProcessState; ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			st.Signal = int(ws.Signal())
		} else {
			st.Code = ps.ExitCode()
		}
	} else if err != nil {
		st.Code = 255
	}
	m.mu.Lock()
	p.status = st
	p.ended = time.Now().UTC()
	if ps := cmd.ProcessState; ps != nil {
		// Over the whole life: /proc is gone once the process is reaped.
		if life := p.ended.Sub(p.Started).Seconds(); life > 0 {
			p.cpuPct = (ps.UserTime() + ps.SystemTime()).Seconds() / life * 100
		}
	}
	close(p.done)
	m.pruneLocked(time.Now())
	m.mu.Unlock()
	m.cfg.Logger.Info("process ended", "gid", p.GID, "pid", p.PID, "code", st.Code, "signal", st.Signal)
}

// SetNote sets what 'onebox ps' says about where the process went and
// why, or why it cannot migrate.
func (m *Manager) SetNote(p *Proc, note string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p.note = note
}

// Note returns the process's note.
func (m *Manager) Note(p *Proc) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return p.note
}

// Remove drops a process from the table (it moved to another node). Its
// log file stays.
func (m *Manager) Remove(p *Proc) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.procs[p.GID] == p {
		delete(m.procs, p.GID)
	}
}

// AdoptOptions describe a program restored by a holder process (see
// proc/migrate.HolderMain): the table takes it over under its old GID.
type AdoptOptions struct {
	GID      string
	Home     string
	Argv     []string
	Started  time.Time
	Detached bool
	Log      string
	Balance  bool
	Note     string
	// Holder is the holder command, not started; its fd 3 is the write
	// end of the pipe whose read end is Status.
	Holder *exec.Cmd
	Status *os.File
	// Child finds the restored program's PID (as this node sees it) from
	// the holder's.
	Child func(holderPID int) int
	// Timeout bounds the restore.
	Timeout time.Duration
}

// holderLine is one status line of a holder (proc/migrate.HolderStatus).
type holderLine struct {
	Restored bool   `json:"restored"`
	Error    string `json:"error"`
	Exit     bool   `json:"exit"`
	Code     int    `json:"code"`
	Signal   int    `json:"signal"`
}

// Adopt starts the holder (from the manager's forking thread, so the
// holder's parent-death signal means "the agent died", as for programs it
// starts), waits until it reports the program restored, and adds the
// program to the table. On failure the holder is gone and nothing is
// added.
func (m *Manager) Adopt(o AdoptOptions) (*Proc, error) {
	status := o.Status
	handed := false
	defer func() {
		if !handed {
			status.Close()
		}
	}()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, errors.New("manager: the agent is shutting down")
	}
	if m.procs[o.GID] != nil {
		m.mu.Unlock()
		return nil, fmt.Errorf("manager: process %s is already here", o.GID)
	}
	m.mu.Unlock()
	if o.Holder.SysProcAttr == nil {
		o.Holder.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Its own session, so that the restored program (a shell job of
	// CRIU's, which runs under the holder) has a session leader in its
	// PID namespace and can be dumped again from there.
	o.Holder.SysProcAttr.Setsid = true
	o.Holder.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := m.fork(o.Holder); err != nil {
		return nil, fmt.Errorf("manager: start restore: %w", err)
	}
	for _, f := range o.Holder.ExtraFiles {
		if f != nil {
			f.Close()
		}
	}
	lines := make(chan holderLine, 4)
	handed = true
	go func() {
		defer close(lines)
		defer status.Close()
		dec := json.NewDecoder(status)
		for {
			var l holderLine
			if dec.Decode(&l) != nil {
				return
			}
			lines <- l
		}
	}()
	fail := func(err error) (*Proc, error) {
		_ = o.Holder.Process.Kill()
		_ = o.Holder.Wait()
		return nil, err
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = time.Minute
	}
	var first holderLine
	select {
	case l, ok := <-lines:
		if !ok {
			return fail(errors.New("manager: the restore holder ended without a word"))
		}
		first = l
	case <-time.After(timeout):
		return fail(fmt.Errorf("manager: restore not done after %v", timeout))
	}
	if !first.Restored {
		return fail(fmt.Errorf("manager: %s", first.Error))
	}
	pid := 0
	for deadline := time.Now().Add(2 * time.Second); pid == 0 && time.Now().Before(deadline); {
		if pid = o.Child(o.Holder.Process.Pid); pid == 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
	if pid == 0 {
		return fail(errors.New("manager: restored, but the program is not under its holder"))
	}
	p := &Proc{GID: o.GID, Home: o.Home, Argv: o.Argv, PID: pid, Started: o.Started, Detached: o.Detached,
		Log: o.Log, Balance: o.Balance, note: o.Note, done: make(chan struct{})}
	m.mu.Lock()
	m.procs[o.GID] = p
	m.mu.Unlock()
	m.cfg.Logger.Info("process restored", "gid", o.GID, "pid", pid, "holder", o.Holder.Process.Pid)
	go func() {
		err := o.Holder.Wait()
		st := ExitStatus{Signal: int(syscall.SIGKILL)}
		got := false
		for l := range lines {
			if l.Exit {
				st, got = ExitStatus{Code: l.Code, Signal: l.Signal}, true
			}
		}
		if !got && err == nil {
			st = ExitStatus{Code: 255}
		}
		m.mu.Lock()
		p.status = st
		p.ended = time.Now().UTC()
		close(p.done)
		m.pruneLocked(time.Now())
		m.mu.Unlock()
		m.cfg.Logger.Info("process ended", "gid", p.GID, "pid", p.PID, "code", st.Code, "signal", st.Signal)
	}()
	return p, nil
}

// Status returns how the process ended; valid after Done is closed.
func (m *Manager) Status(p *Proc) ExitStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	return p.status
}

// Get returns the process with that GID.
func (m *Manager) Get(gid string) (*Proc, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.procs[gid]
	return p, ok
}

// Signal sends sig to the process group of the process with that GID.
func (m *Manager) Signal(gid string, sig syscall.Signal) error {
	p, ok := m.Get(gid)
	if !ok {
		return fmt.Errorf("%w %s", ErrNotFound, gid)
	}
	return m.SignalProc(p, sig)
}

// SignalProc sends sig to p's process group. After the program itself
// has ended, its group may still hold processes it started (`sh -c 'x &'`):
// they are signalled too, as long as they are there.
func (m *Manager) SignalProc(p *Proc, sig syscall.Signal) error {
	select {
	case <-p.done:
		if !groupAlive(p.PID) {
			return fmt.Errorf("manager: process %s has already ended", p.GID)
		}
	default:
	}
	// The group id is the leader's pid (Setsid). Until the leader is
	// reaped its pid cannot be reused; after, groupAlive vouched for it.
	if err := syscall.Kill(-p.PID, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("manager: signal %s: %w", p.GID, err)
	}
	return nil
}

// groupAlive reports whether process group pgid, which a program started
// or restored by this agent led as its own session (pgid = sid = the
// program's pid), still has members now that the program itself is
// reaped. Linux does not hand out a pid that names a live process group
// or session, so while members remain the id is still ours. A live
// process whose pid is pgid is not ours (ours was reaped): the number
// was free and taken again, and nothing is signalled.
func groupAlive(pgid int) bool {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	id := strconv.Itoa(pgid)
	alive := false
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// After "(comm)": state ppid pgrp session ...
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 4 || f[0] == "Z" {
			continue
		}
		if e.Name() == id {
			return false
		}
		if f[2] == id && f[3] == id {
			alive = true
		}
	}
	return alive
}

// List reports every process in the table, oldest first.
func (m *Manager) List() []Info {
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pruneLocked(now)
	out := make([]Info, 0, len(m.procs))
	for _, p := range m.procs {
		out = append(out, m.infoLocked(p, now))
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Started.Equal(out[j].Started) {
			return out[i].Started.Before(out[j].Started)
		}
		return out[i].GID < out[j].GID
	})
	return out
}

// Preconditions: m.mu held.
func (m *Manager) infoLocked(p *Proc, now time.Time) Info {
	i := Info{GID: p.GID, Node: m.cfg.Node, Home: p.Home, PID: p.PID, Command: p.Argv,
		Started: p.Started, Detached: p.Detached, Log: p.Log, Balance: p.Balance, State: StateRunning, Note: p.note}
	select {
	case <-p.done:
		end := p.ended
		i.Ended = &end
		if p.status.Signal > 0 {
			i.State, i.Signal = StateKilled, SignalName(syscall.Signal(p.status.Signal))
		} else {
			code := p.status.Code
			i.State, i.ExitCode = StateExited, &code
		}
		i.CPUPercent = p.cpuPct
		return i
	default:
	}
	if ticks, err := cpuTicks(p.PID); err == nil {
		from, base := p.Started, uint64(0)
		if !p.sampleAt.IsZero() {
			from, base = p.sampleAt, p.sampleCPU
		}
		if el := now.Sub(from); el >= time.Second || p.sampleAt.IsZero() {
			if el > 0 && ticks >= base {
				p.cpuPct = float64(ticks-base) / clockTicks / el.Seconds() * 100
			}
			p.sampleAt, p.sampleCPU = now, ticks
		}
	}
	i.CPUPercent = p.cpuPct
	i.RSSBytes = rss(p.PID)
	return i
}

// pruneLocked drops exited processes older than KeepExited, and the oldest
// beyond MaxExited, with their log files.
// Preconditions: m.mu held.
func (m *Manager) pruneLocked(now time.Time) {
	var exited []*Proc
	for _, p := range m.procs {
		if !p.ended.IsZero() {
			exited = append(exited, p)
		}
	}
	sort.Slice(exited, func(i, j int) bool { return exited[i].ended.After(exited[j].ended) })
	for k, p := range exited {
		if k >= m.cfg.MaxExited || now.Sub(p.ended) > m.cfg.KeepExited {
			delete(m.procs, p.GID)
			if p.Log != "" {
				os.Remove(p.Log)
			}
		}
	}
}

// Close ends every running process: SIGTERM to each process group, then
// SIGKILL to what is left after grace. It waits at most grace + 2 s. It
// may be called more than once.
func (m *Manager) Close(grace time.Duration) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	var running, all []*Proc
	for _, p := range m.procs {
		all = append(all, p)
		if p.ended.IsZero() {
			running = append(running, p)
		}
	}
	m.mu.Unlock()
	wait := func(d time.Duration) {
		deadline := time.NewTimer(d)
		defer deadline.Stop()
		for _, p := range running {
			select {
			case <-p.done:
			case <-deadline.C:
				return
			}
		}
	}
	// Every group, also of programs that ended but left processes behind.
	for _, p := range all {
		_ = m.SignalProc(p, syscall.SIGTERM)
	}
	wait(grace)
	for _, p := range all {
		_ = m.SignalProc(p, syscall.SIGKILL)
	}
	wait(2 * time.Second)
	close(m.stopFork)
	<-m.forkDone
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// cpuTicks returns utime+stime of the process and of its reaped children.
func cpuTicks(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStatTicks(string(b))
}

// parseStatTicks parses /proc/PID/stat: the command name may hold spaces
// and parentheses, so fields are counted from the last ')'.
func parseStatTicks(s string) (uint64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("manager: malformed stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
	if len(f) < 15 {
		return 0, errors.New("manager: short stat")
	}
	var sum uint64
	for _, k := range []int{11, 12, 13, 14} {
		v, err := strconv.ParseInt(f[k], 10, 64)
		if err != nil || v < 0 {
			return 0, errors.New("manager: malformed stat times")
		}
		sum += uint64(v)
	}
	return sum, nil
}

// rss returns the resident set size from /proc/PID/statm, or 0.
func rss(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0
	}
	return pages * uint64(os.Getpagesize())
}

// SignalName is "SIGTERM" for syscall.SIGTERM.
func SignalName(s syscall.Signal) string {
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return "SIG" + strconv.Itoa(int(s))
}

// ParseSignal accepts "TERM", "SIGTERM", "term" or "15".
func ParseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 64 {
			return 0, fmt.Errorf("signal number %d out of range 1..64", n)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q (e.g. TERM, KILL, INT, HUP, USR1, or a number)", s)
}

// envValue returns the value of key in env (the last one wins, as in libc).
func envValue(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val
		}
	}
	return v
}

// lookPath finds a program the way the caller's shell would: a name with
// a slash is a path (relative to dir), else it is searched in the
// caller's PATH (not the agent's).
func lookPath(name, pathEnv, dir string) (string, error) {
	if strings.Contains(name, "/") {
		if !filepath.IsAbs(name) && dir != "" {
			name = filepath.Join(dir, name)
		}
		if err := executable(name); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return "", fmt.Errorf("%s: %w (%v)", name, ErrNoProgram, err)
			}
			return "", fmt.Errorf("%s: %w", name, err)
		}
		return name, nil
	}
	if pathEnv == "" {
		pathEnv = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" || !filepath.IsAbs(d) {
			continue // "." in PATH: not on another machine
		}
		p := filepath.Join(d, name)
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w in $PATH", name, ErrNoProgram)
}

func executable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return ErrNotExecutable
	}
	return nil
}

// ClusterList is the answer of the process listing: every node's
// processes, and the nodes that could not be asked.
type ClusterList struct {
	Observer    string      `json:"observer"` // the node that answered
	Procs       []Info      `json:"procs"`
	Unreachable []NodeError `json:"unreachable,omitempty"`
}

// NodeError says why a node's processes are missing from a list.
type NodeError struct {
	Node  string `json:"node"`
	Error string `json:"error"`
}
