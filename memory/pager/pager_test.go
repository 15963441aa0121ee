package pager

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
	"golang.org/x/sys/unix"
)

func TestParseMsg(t *testing.T) {
	b := make([]byte, msgSize)
	b[0] = opRegister
	b[8+1] = 0x10  // start 0x1000
	b[16+2] = 0x01 // len 0x10000
	m, err := parseMsg(b)
	if err != nil || m.op != opRegister || m.start != 0x1000 || m.len != 0x10000 {
		t.Fatalf("parseMsg = %+v, %v", m, err)
	}
	if _, err := parseMsg(b[:msgSize-1]); err == nil {
		t.Error("short message accepted")
	}
	if _, err := parseMsg(append(b, 0)); err == nil {
		t.Error("long message accepted")
	}
	b[0] = 9
	if _, err := parseMsg(b); err == nil {
		t.Error("unknown op accepted")
	}
}

func TestMemStore(t *testing.T) {
	s := NewMemStore()
	r := RegionID{Client: 1, Start: 0x1000}
	page := bytes.Repeat([]byte{7}, PageSize)
	s.Put(r, 4096, page)
	page[0] = 8 // Put keeps a copy
	if b, ok := s.Get(r, 4096); !ok || b[0] != 7 || len(b) != PageSize {
		t.Fatalf("Get = %v, %v", len(b), ok)
	}
	if _, ok := s.Get(r, 0); ok {
		t.Error("Get of a page never stored")
	}
	s.Forget(r)
	if _, ok := s.Get(r, 4096); ok {
		t.Error("Get after Forget")
	}
}

// needUffd skips unless userfaultfd and a C compiler are usable (CI: root).
func needUffd(t *testing.T) {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "userfaultfd needs root here (vm.unprivileged_userfaultfd=0)")
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	testenv.Need(t, e == 0, "userfaultfd unusable: %v", e)
	unix.Close(int(fd))
	_, err := exec.LookPath("cc")
	testenv.NeedNoError(t, err, "no C compiler (cc) to build the shim")
}

func cc(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("cc", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cc %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// build compiles the shim and the fill program into a temporary directory.
func build(t *testing.T) (shim, fill string) {
	dir := t.TempDir()
	shim, fill = filepath.Join(dir, "onebox_shim.so"), filepath.Join(dir, "fill")
	cc(t, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", shim, "../shim/onebox_shim.c", "-ldl", "-lpthread")
	cc(t, "-O2", "-Wall", "-o", fill, "../shim/testdata/fill.c")
	return shim, fill
}

func startPager(t *testing.T, store Store) (*Pager, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "pager.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(store, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(l) }()
	t.Cleanup(func() {
		p.Close()
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return p, sock
}

func shimEnv(shim, sock string) []string {
	return append(os.Environ(), "LD_PRELOAD="+shim, "ONEBOX_PAGER_SOCK="+sock)
}

// run runs fill and returns stdout and the first-touch time it reported.
func run(t *testing.T, fill string, env []string) (string, time.Duration) {
	t.Helper()
	cmd := exec.Command(fill, "64")
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("fill: %v\nstderr: %s", err, stderr.String())
	}
	var ns, pages int64
	if _, err := fmt.Sscanf(stderr.String(), "first_touch_ns %d pages %d", &ns, &pages); err != nil {
		t.Fatalf("fill stderr %q: %v", stderr.String(), err)
	}
	return stdout.String(), time.Duration(ns)
}

// zeroData is a Store that has every page, all zeros: it drives the
// UFFDIO_COPY path while keeping what a fresh allocation must hold.
type zeroData struct{ page []byte }

func (z zeroData) Get(RegionID, uint64) ([]byte, bool) { return z.page, true }

// TestFillIdentical: the same workload, plainly and with its large blocks
// paged by us, prints the same bytes, and the faults went through the pager.
func TestFillIdentical(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	const pages = 64 << 20 / 4096
	// The first run pays for pages the VM gave back to the host (~10 us
	// each, machine-facts.md): keep the faster of two for the figure.
	plain, plainT := run(t, fill, os.Environ())
	if _, again := run(t, fill, os.Environ()); again < plainT {
		plainT = again
	}
	for _, c := range []struct {
		name  string
		store Store
		copy  bool
	}{
		{"zeropage", NewMemStore(), false},
		{"copy", zeroData{make([]byte, PageSize)}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, sock := startPager(t, c.store)
			got, pagedT := run(t, fill, shimEnv(shim, sock))
			if got != plain {
				t.Fatalf("output differs under the pager:\n%s\nplain:\n%s", got, plain)
			}
			st := p.Stats()
			t.Logf("stats %+v", st)
			if st.Clients != 1 || st.Faults < pages || st.Dropped != 0 {
				t.Fatalf("stats %+v: want 1 client, >= %d faults, none dropped", st, pages)
			}
			if c.copy && st.Copies < pages || !c.copy && st.Zeroed < pages {
				t.Fatalf("stats %+v: faults not filled the expected way", st)
			}
			t.Logf("first touch of %d pages: plain %v (%.0f faults/s), through the pager %v (%.0f faults/s)",
				pages, plainT, pages/plainT.Seconds(), pagedT, pages/pagedT.Seconds())
		})
	}
}

// TestPagerGone: a program whose pager goes away stops with a clear message;
// it neither hangs nor reads zero pages in place of its data.
func TestPagerGone(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	p, sock := startPager(t, NewMemStore())
	cmd := exec.Command(fill, "16", "wait")
	cmd.Env = shimEnv(shim, sock)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	out := bufio.NewReader(stdout)
	var seen strings.Builder
	for !strings.HasSuffix(seen.String(), "ready\n") {
		line, err := out.ReadString('\n')
		seen.WriteString(line)
		if err != nil {
			t.Fatalf("fill ended before ready (%v): %s\nstderr: %s", err, seen.String(), stderr.String())
		}
	}
	p.Close()
	stdin.Write([]byte("go\n")) // may fail: the program may be stopped already
	type result struct {
		rest string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		b, _ := io.ReadAll(out)
		done <- result{string(b), cmd.Wait()}
	}()
	var rest string
	select {
	case r := <-done:
		rest, err = r.rest, r.err
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("program still running 20 s after its pager went away")
	}
	if err == nil {
		t.Fatalf("program exited 0 without its pager; output %q", rest)
	}
	if strings.Contains(rest, "second sum") {
		t.Fatalf("program went on without its pager: %q", rest)
	}
	const want = "onebox: memory pager gone; stopping to avoid reading wrong data"
	if !strings.Contains(stderr.String(), want) {
		t.Fatalf("stderr %q lacks %q (exit: %v)", stderr.String(), want, err)
	}
	t.Logf("exit: %v; stderr: %s", err, strings.TrimSpace(stderr.String()))
}

// TestNoPager: a program told to use a pager that is not there does not start.
func TestNoPager(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	cmd := exec.Command(fill, "4")
	cmd.Env = shimEnv(shim, filepath.Join(t.TempDir(), "absent.sock"))
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cannot reach the memory pager") {
		t.Fatalf("fill without pager: %v, %s", err, out)
	}
}

// firstPage is a Store holding one page, at offset 0 of every block: as if
// the program had written it and it had been evicted.
type firstPage struct{ page []byte }

func (f firstPage) Get(_ RegionID, off uint64) ([]byte, bool) {
	return f.page, off == 0
}

// TestStoreDataAndFork: a page from the Store reaches the other process
// (UFFDIO_COPY), and a program that forks runs as it does plainly.
func TestStoreDataAndFork(t *testing.T) {
	needUffd(t)
	shim, _ := build(t)
	peek := filepath.Join(t.TempDir(), "peek")
	cc(t, "-O2", "-Wall", "-o", peek, "../shim/testdata/peek.c")
	plain, err := exec.Command(peek).Output()
	if err != nil {
		t.Fatalf("peek: %v", err)
	}
	p, sock := startPager(t, firstPage{bytes.Repeat([]byte{0xab}, PageSize)})
	cmd := exec.Command(peek)
	cmd.Env = shimEnv(shim, sock)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	got, err := cmd.Output()
	if err != nil {
		t.Fatalf("peek under the pager: %v\n%s", err, stderr.String())
	}
	first, rest, _ := strings.Cut(string(got), "\n")
	if first != "first abababab" {
		t.Errorf("first line %q: the stored page did not arrive", first)
	}
	_, plainRest, _ := strings.Cut(string(plain), "\n")
	if rest != plainRest {
		t.Errorf("after fork:\n%s\nplain:\n%s", rest, plainRest)
	}
	if st := p.Stats(); st.Copies == 0 || st.Dropped != 0 {
		t.Errorf("stats %+v", st)
	}
}

// TestPython: an unmodified interpreter with large bytearrays and lists.
func TestPython(t *testing.T) {
	needUffd(t)
	py, err := exec.LookPath("python3")
	testenv.NeedNoError(t, err, "no python3")
	shim, _ := build(t)
	const script = `
import hashlib
b = bytearray(48 << 20)
for i in range(0, len(b), 4096):
    b[i] = i % 251
l = list(range(2_000_000))
d = bytes(b) + bytes(str(sum(l)), 'ascii')
print(hashlib.sha256(d).hexdigest(), len(l))
`
	plain, err := exec.Command(py, "-c", script).Output()
	if err != nil {
		t.Fatalf("python: %v", err)
	}
	p, sock := startPager(t, NewMemStore())
	cmd := exec.Command(py, "-c", script)
	cmd.Env = shimEnv(shim, sock)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	got, err := cmd.Output()
	if err != nil {
		t.Fatalf("python under the pager: %v\n%s", err, stderr.String())
	}
	if string(got) != string(plain) {
		t.Fatalf("output %q, plain %q", got, plain)
	}
	if st := p.Stats(); st.Faults < 48<<20/4096 || st.Dropped != 0 {
		t.Fatalf("stats %+v: the large blocks were not paged", st)
	}
	t.Logf("stats %+v", p.Stats())
}

// TestThreads: concurrent faults on the same pages (EEXIST for the losers)
// leave every thread with the right data.
func TestThreads(t *testing.T) {
	needUffd(t)
	shim, _ := build(t)
	bin := filepath.Join(t.TempDir(), "threads")
	cc(t, "-O2", "-Wall", "-pthread", "-o", bin, "../shim/testdata/threads.c")
	plain, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("threads: %v", err)
	}
	p, sock := startPager(t, NewMemStore())
	cmd := exec.Command(bin)
	cmd.Env = shimEnv(shim, sock)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	got, err := cmd.Output()
	if err != nil {
		t.Fatalf("threads under the pager: %v\n%s", err, stderr.String())
	}
	if string(got) != string(plain) {
		t.Fatalf("output %q, plain %q", got, plain)
	}
	if st := p.Stats(); st.Faults < 16<<20/4096 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
	t.Logf("stats %+v", p.Stats())
}

// TestGarbageDropped: malformed messages end that client only.
func TestGarbageDropped(t *testing.T) {
	p, sock := startPager(t, nil)
	reg := make([]byte, msgSize)
	reg[0] = opRegister
	for i, b := range [][]byte{
		{1, 2, 3},             // short
		make([]byte, msgSize), // op 0
		reg,                   // register before hello, without a memfd
	} {
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 8)); err != io.EOF {
			t.Errorf("case %d: read %d, %v; want EOF (client dropped)", i, n, err)
		}
		c.Close()
		if st := p.Stats(); st.Dropped != uint64(i+1) {
			t.Errorf("case %d: stats %+v", i, st)
		}
	}
}

// TestPagerKilled: the pager process dies by SIGKILL while a thread of the
// program waits in a page fault. The program must stop with the message, not
// hang and not go on with zero pages.
func TestPagerKilled(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	sock := filepath.Join(t.TempDir(), "pager.sock")
	helper := exec.Command(os.Args[0])
	helper.Env = append(os.Environ(), "ONEBOX_TEST_PAGER="+sock)
	hout, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	helper.Stderr = os.Stderr
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	defer helper.Process.Kill()
	lines := bufio.NewScanner(hout)
	expect := func(want string) {
		t.Helper()
		if !lines.Scan() || lines.Text() != want {
			t.Fatalf("pager helper said %q (%v), want %q", lines.Text(), lines.Err(), want)
		}
	}
	expect("listening")

	cmd := exec.Command(fill, "16")
	cmd.Env = shimEnv(shim, sock)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	expect("stalled") // the program is now blocked in a fault
	select {
	case err := <-done:
		t.Fatalf("program ended with a fault unanswered: %v, %s", err, stderr.String())
	case <-time.After(100 * time.Millisecond):
	}
	helper.Process.Kill()
	helper.Wait()
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("program still running 20 s after its pager was killed")
	}
	const want = "onebox: memory pager gone; stopping to avoid reading wrong data"
	if err == nil || !strings.Contains(stderr.String(), want) || stdout.Len() != 0 {
		t.Fatalf("exit %v, stdout %q, stderr %q; want a failure with %q and no output", err, stdout.String(), stderr.String(), want)
	}
	t.Logf("exit: %v; stderr: %s", err, strings.TrimSpace(stderr.String()))
}
