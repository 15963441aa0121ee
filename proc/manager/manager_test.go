package manager

import (
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func newTest(t *testing.T) *Manager {
	m := New(Config{Node: "n1", LogDir: filepath.Join(t.TempDir(), "logs")})
	t.Cleanup(func() { m.Close(time.Second) })
	return m
}

func waitDone(t *testing.T, p *Proc) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("process did not end")
	}
}

func TestAttachedStdioAndExit(t *testing.T) {
	m := newTest(t)
	p, io3, err := m.Start(StartOptions{Argv: []string{"sh", "-c", "cat; echo oops >&2; exit 4"}, Env: []string{"PATH=/usr/bin:/bin"}, Dir: "/nonexistent", Home: "n9"})
	if err != nil {
		t.Fatal(err)
	}
	if !ValidGID(p.GID) {
		t.Errorf("gid %q", p.GID)
	}
	io.WriteString(io3.Stdin, "hello\n")
	io3.Stdin.Close()
	out, _ := io.ReadAll(io3.Stdout)
	errb, _ := io.ReadAll(io3.Stderr)
	waitDone(t, p)
	if string(out) != "hello\n" || string(errb) != "oops\n" {
		t.Errorf("stdout %q stderr %q", out, errb)
	}
	if st := m.Status(p); st != (ExitStatus{Code: 4}) {
		t.Errorf("status %+v", st)
	}
	l := m.List()
	if len(l) != 1 || l[0].StateText() != "exited 4" || l[0].Home != "n9" || l[0].Node != "n1" {
		t.Errorf("list %+v", l)
	}
}

func TestDetachedSignalAndLog(t *testing.T) {
	m := newTest(t)
	dir := t.TempDir()
	p, stdio, err := m.Start(StartOptions{Argv: []string{"sh", "-c", "pwd; echo ready; exec sleep 100"}, Env: []string{"PATH=/usr/bin:/bin"}, Dir: dir, Detach: true})
	if err != nil {
		t.Fatal(err)
	}
	if stdio != nil || p.Log == "" {
		t.Fatalf("detached: stdio %v log %q", stdio, p.Log)
	}
	if l := m.List(); len(l) != 1 || l[0].State != StateRunning || l[0].RSSBytes == 0 {
		t.Errorf("running: %+v", l)
	}
	for i := 0; ; i++ {
		b, _ := os.ReadFile(p.Log)
		if strings.Contains(string(b), "ready") {
			if !strings.HasPrefix(string(b), dir+"\n") {
				t.Errorf("log %q: want the working directory %s first", b, dir)
			}
			break
		}
		if i > 3000 {
			t.Fatal("no output in the log")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := m.Signal(p.GID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitDone(t, p)
	if l := m.List(); l[0].StateText() != "killed SIGTERM" {
		t.Errorf("state %q", l[0].StateText())
	}
	if err := m.Signal(p.GID, syscall.SIGTERM); err == nil {
		t.Error("signal to an ended process succeeded")
	}
	if err := m.Signal("g000000000000", syscall.SIGTERM); err == nil {
		t.Error("signal to an unknown gid succeeded")
	}
}

func TestNotFound(t *testing.T) {
	m := newTest(t)
	if _, _, err := m.Start(StartOptions{Argv: []string{"no-such-program-onebox"}, Env: []string{"PATH=/usr/bin:/bin"}}); err == nil {
		t.Fatal("started a program that does not exist")
	}
	if len(m.List()) != 0 {
		t.Error("a failed start is listed")
	}
}

func TestPruneKeepsLastExited(t *testing.T) {
	m := New(Config{Node: "n1", MaxExited: 2, LogDir: t.TempDir()})
	defer m.Close(time.Second)
	for range 4 {
		p, _, err := m.Start(StartOptions{Argv: []string{"true"}, Env: []string{"PATH=/usr/bin:/bin"}, Detach: true})
		if err != nil {
			t.Fatal(err)
		}
		waitDone(t, p)
	}
	if n := len(m.List()); n != 2 {
		t.Errorf("%d exited processes listed, want 2", n)
	}
}

func TestCloseEndsProcesses(t *testing.T) {
	m := New(Config{Node: "n1", LogDir: t.TempDir()})
	// Ignores SIGTERM: Close must SIGKILL it.
	p, _, err := m.Start(StartOptions{Argv: []string{"sh", "-c", "trap '' TERM; echo; sleep 100"}, Env: []string{"PATH=/usr/bin:/bin"}, Detach: true})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // let the shell set its trap (only makes the test stricter)
	m.Close(200 * time.Millisecond)
	waitDone(t, p)
	if _, _, err := m.Start(StartOptions{Argv: []string{"true"}}); err == nil {
		t.Error("Start after Close succeeded")
	}
}

func TestParseStatTicks(t *testing.T) {
	s := "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 100 1000 10 18446744073709551615"
	n, err := parseStatTicks(s)
	if err != nil || n != 13 {
		t.Errorf("ticks %d, %v; want 13", n, err)
	}
	for _, bad := range []string{"", "1 (x", "1 (x) S 1 2", "1 (x) S 1 1 1 0 -1 0 0 0 0 0 a 3 2 1 20"} {
		if _, err := parseStatTicks(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]syscall.Signal{"TERM": syscall.SIGTERM, "sigkill": syscall.SIGKILL, "9": syscall.SIGKILL, "USR1": syscall.SIGUSR1, "SIGINT": syscall.SIGINT} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "0", "65", "FOO", "-1"} {
		if _, err := ParseSignal(bad); err == nil {
			t.Errorf("ParseSignal(%q) succeeded", bad)
		}
	}
	if SignalName(syscall.SIGTERM) != "SIGTERM" {
		t.Error(SignalName(syscall.SIGTERM))
	}
}

func TestLookPathUsesCallersPath(t *testing.T) {
	dir := t.TempDir()
	prog := filepath.Join(dir, "myprog")
	os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o755)
	if p, err := lookPath("myprog", "/nonexistent:"+dir, "/"); err != nil || p != prog {
		t.Errorf("lookPath = %q, %v", p, err)
	}
	if _, err := lookPath("myprog", "/usr/bin", "/"); err == nil {
		t.Error("found a program outside the caller's PATH")
	}
	if p, err := lookPath("./myprog", "", dir); err != nil || p != prog {
		t.Errorf("relative path: %q, %v", p, err)
	}
}

// statFields returns fields after "(comm)" of /proc/PID/stat: state ppid pgrp session...
func statFields(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
}

// TestOwnSessionAndLeftovers: a program leads a session and group of its
// own (CRIU needs the session leader inside the tree it dumps, wherever
// the agent's own session leader is), and a signal still reaches what it
// left in its group after it ended, and nothing once that is gone too.
func TestOwnSessionAndLeftovers(t *testing.T) {
	m := newTest(t)
	p, stdio, err := m.Start(StartOptions{Argv: []string{"sh", "-c", "sleep 100 & echo $!; read x"}, Env: []string{"PATH=/usr/bin:/bin"}})
	if err != nil {
		t.Fatal(err)
	}
	f := statFields(t, p.PID)
	if f[2] != strconv.Itoa(p.PID) || f[3] != strconv.Itoa(p.PID) {
		t.Fatalf("program %d: group %s session %s, want both its own pid", p.PID, f[2], f[3])
	}
	var line string
	buf := make([]byte, 64)
	for !strings.Contains(line, "\n") {
		n, err := stdio.Stdout.Read(buf)
		if err != nil {
			t.Fatalf("no pid from the program: %v", err)
		}
		line += string(buf[:n])
	}
	child, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	stdio.Stdin.Close() // the shell ends; its sleep stays in the group
	waitDone(t, p)
	if err := m.Signal(p.GID, syscall.SIGTERM); err != nil {
		t.Fatalf("signal to what the ended program left: %v", err)
	}
	for i := 0; ; i++ {
		if _, err := os.Stat("/proc/" + strconv.Itoa(child)); err != nil {
			break
		}
		if f := statFields(t, child); f[0] == "Z" {
			break // killed; its new parent reaps it
		}
		if i > 3000 {
			t.Fatal("the leftover sleep did not end")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := m.Signal(p.GID, syscall.SIGTERM); err == nil {
		t.Error("signal succeeded with nothing left of the program")
	}
}
