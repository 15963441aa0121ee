// Package criu finds a working CRIU binary and runs checkpoint/restore commands with it.
//
// CRIU older than 4.1 fails every command on recent kernels ("vdso: Unexpected rt vDSO area
// bounds"), so Find accepts only 4.1 or newer. scripts/install-criu.sh installs one into
// /opt/onebox/criu when the system has none.
package criu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// EnvVar names the environment variable that, when set, is the only CRIU binary Find considers.
const EnvVar = "ONEBOX_CRIU"

// DefaultPath is where scripts/install-criu.sh puts its wrapper around a private CRIU.
const DefaultPath = "/opt/onebox/criu/bin/criu"

// MinMajor and MinMinor are the oldest CRIU version that works on the kernels onebox runs on.
const (
	MinMajor = 4
	MinMinor = 1
)

// probeTimeout bounds `criu --version` while looking for a binary.
const probeTimeout = 10 * time.Second

// Binary is a CRIU executable that reported a usable version.
type Binary struct {
	Path    string // absolute path of the executable (possibly a wrapper script)
	Version string // as reported by `criu --version`, e.g. "4.1.1"
	// Argv, if set, is what runs it: the command scripts/install-criu.sh's
	// wrapper at Path would exec, started without the shell.
	Argv []string
}

// Exec is the command line that runs this CRIU (before its arguments).
func (b Binary) Exec() []string {
	if len(b.Argv) > 0 {
		return b.Argv
	}
	return []string{b.Path}
}

// Find returns the first usable CRIU: $ONEBOX_CRIU if set (and then only it), else DefaultPath,
// else criu on PATH. A binary is usable if `criu --version` reports 4.1 or newer.
func Find() (Binary, error) {
	var candidates []string
	if p := os.Getenv(EnvVar); p != "" {
		candidates = []string{p}
	} else {
		candidates = append(candidates, DefaultPath)
		if p, err := exec.LookPath("criu"); err == nil {
			candidates = append(candidates, p)
		}
	}
	var errs []error
	for _, p := range candidates {
		if _, err := os.Stat(p); err != nil {
			if os.Getenv(EnvVar) != "" {
				errs = append(errs, fmt.Errorf("%s=%s: %w", EnvVar, p, err))
			}
			continue
		}
		b, err := probe(p)
		if err == nil {
			b.Argv = unwrap(p, b.Version)
			return b, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return Binary{}, fmt.Errorf("criu: no CRIU found (looked at %s and PATH); run scripts/install-criu.sh", DefaultPath)
	}
	return Binary{}, fmt.Errorf("criu: no usable CRIU: %w", errors.Join(errs...))
}

func probe(path string) (Binary, error) {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return Binary{}, fmt.Errorf("%s --version: %w: %s", path, err, firstLine(out))
	}
	v, major, minor, ok := parseVersion(string(out))
	if !ok {
		return Binary{}, fmt.Errorf("%s --version: no version in output %q", path, firstLine(out))
	}
	if major < MinMajor || (major == MinMajor && minor < MinMinor) {
		return Binary{}, fmt.Errorf("%s is CRIU %s; need >= %d.%d (older versions fail on this kernel: \"vdso: Unexpected rt vDSO area bounds\"); run scripts/install-criu.sh",
			path, v, MinMajor, MinMinor)
	}
	return Binary{Path: path, Version: v}, nil
}

var versionRE = regexp.MustCompile(`(?m)^Version:\s*(\d+)\.(\d+)(\.\d+)*`)

// parseVersion extracts the version from `criu --version` output ("Version: 4.1.1").
func parseVersion(out string) (v string, major, minor int, ok bool) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return "", 0, 0, false
	}
	major, err1 := strconv.Atoi(m[1])
	minor, err2 := strconv.Atoi(m[2])
	if err1 != nil || err2 != nil {
		return "", 0, 0, false
	}
	return strings.TrimSpace(strings.TrimPrefix(m[0], "Version:")), major, minor, true
}

// Command returns a command running this CRIU with args, killed when ctx ends.
func (b Binary) Command(ctx context.Context, args ...string) *exec.Cmd {
	e := b.Exec()
	return exec.CommandContext(ctx, e[0], append(e[1:len(e):len(e)], args...)...)
}

// Check runs `criu check` and returns an error with CRIU's output unless it passes.
func (b Binary) Check(ctx context.Context) error {
	out, err := b.Command(ctx, "check").CombinedOutput()
	if err != nil {
		return fmt.Errorf("criu check (%s, %s): %w: %s", b.Path, b.Version, err, bytes.TrimSpace(out))
	}
	return nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

// LogLevel is the verbosity of CRIU's log files (-v): 2 is errors and
// warnings, enough to say why a command failed.
const LogLevel = "-v2"

// Cmd is a running CRIU command started by Start.
type Cmd struct {
	*exec.Cmd
	Dir string // the images directory, which also holds its log
	Log string // log file name in Dir

	name    string     // the CRIU command (dump, lazy-pages, ...)
	ready   chan error // gets nil when CRIU writes its status byte, or an error
	waitErr chan error // Wait's result, once
}

// Start runs CRIU with args plus "-D dir -o log" and "--status-fd N"; extra
// become its file descriptors 3, 4, ... (nil entries stay closed), so args
// can name them. wrap, if not nil, may adjust the command before it starts
// (e.g. to enter namespaces or fork from a particular thread). Ready
// tells when CRIU is ready (dump --lazy-pages: the images are written and
// the page server serves; lazy-pages: it accepts the restore).
func (b Binary) Start(ctx context.Context, dir, log string, extra []*os.File, args []string, start func(*exec.Cmd) error) (*Cmd, error) {
	sr, sw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	files := append(append([]*os.File(nil), extra...), sw)
	full := append(append([]string(nil), args...), "-D", dir, "-o", log, LogLevel, "--status-fd", strconv.Itoa(2+len(files)))
	c := b.Command(ctx, full...)
	c.ExtraFiles = files
	c.Stderr = nil
	// Its own process group, killed whole: CRIU may run under a wrapper
	// (nsenter forks it, and does not pass SIGKILL on), and a CRIU left
	// running would keep a dumped program frozen.
	if c.SysProcAttr == nil {
		c.SysProcAttr = &syscall.SysProcAttr{}
	}
	c.SysProcAttr.Setpgid = true
	c.Cancel = func() error { return killGroup(c.Process) }
	if start == nil {
		start = (*exec.Cmd).Start
	}
	if err := start(c); err != nil {
		sw.Close()
		sr.Close()
		return nil, fmt.Errorf("start criu %s: %w", args[0], err)
	}
	sw.Close()
	cc := &Cmd{Cmd: c, Dir: dir, Log: log, name: args[0], ready: make(chan error, 1), waitErr: make(chan error, 1)}
	go func() {
		defer sr.Close()
		var b [1]byte
		if n, _ := sr.Read(b[:]); n == 1 {
			cc.ready <- nil
			return
		}
		cc.ready <- fmt.Errorf("criu %s ended before it was ready: %s", args[0], cc.Tail())
	}()
	go func() { cc.waitErr <- c.Wait() }()
	return cc, nil
}

// Ready waits until CRIU says it is ready, it fails, or timeout passes.
func (c *Cmd) Ready(timeout time.Duration) error {
	select {
	case err := <-c.ready:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("criu was not ready after %v", timeout)
	}
}

// Done returns a channel that gets the command's exit (nil: success), once.
func (c *Cmd) Done() <-chan error { return c.waitErr }

// Kill ends the command and whatever it started (its process group) at
// once (SIGKILL). Killing a lazy dump resumes the dumped processes: they
// run on where they were.
func (c *Cmd) Kill() {
	if c.Process != nil {
		_ = killGroup(c.Process)
	}
}

// WaitFor waits for the command's end, for at most timeout: past it the
// command is killed (Kill) and WaitFor returns an error saying so. It
// takes the exit that Done would give.
func (c *Cmd) WaitFor(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-c.waitErr:
		return err
	case <-t.C:
		c.Kill()
		<-c.waitErr
		return fmt.Errorf("criu %s did not end within %v: killed (%s)", c.name, timeout, c.Tail())
	}
}

// killGroup kills p's process group (p leads it), and p itself should it
// have left it.
func killGroup(p *os.Process) error {
	err := syscall.Kill(-p.Pid, syscall.SIGKILL)
	if kerr := p.Kill(); err != nil {
		err = kerr
	}
	return err
}

// Tail returns the last error lines of the command's log, for messages.
func (c *Cmd) Tail() string { return LogTail(filepath.Join(c.Dir, c.Log)) }

// LogTail returns the Error lines of a CRIU log (the last few), or its last
// lines if it has none, on one line.
func LogTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log %s: %v)", path, err)
	}
	var errs, all []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.Contains(l, "RLIMIT_NOFILE") { // harmless, printed always here
			continue
		}
		all = append(all, l)
		if strings.Contains(l, "Error") {
			errs = append(errs, l)
		}
	}
	pick := errs
	if len(pick) == 0 {
		pick = all
	}
	if len(pick) > 4 {
		pick = pick[len(pick)-4:]
	}
	if len(pick) == 0 {
		return "(empty log " + path + ")"
	}
	return strings.Join(pick, " | ")
}

// Inherit is one --inherit-fd: CRIU gives the restored process fd FD of the
// restoring process wherever the dumped process had Key ("pipe:[1234]",
// or a file path without its leading slash).
type Inherit struct {
	FD  int
	Key string
}

// RestoreArgs are the arguments of a restore run by a holder process
// (proc/migrate): detached, as a sibling of CRIU (so the restored program
// is the holder's child, and its parent-death signal is tied to the
// holder), as a shell job (it joins the holder's session).
func RestoreArgs(lazy bool, inherit []Inherit) []string {
	args := []string{"restore", "-d", "-S", "-j"}
	if lazy {
		args = append(args, "--lazy-pages")
	}
	for _, in := range inherit {
		args = append(args, "--inherit-fd", fmt.Sprintf("fd[%d]:%s", in.FD, in.Key))
	}
	return args
}
