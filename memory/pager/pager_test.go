package pager

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/memory/pool"
	"github.com/onebox-project/onebox/memory/uffd"
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
	for _, op := range []byte{0, opForkAbort + 1, 0xff} {
		b[0] = op
		if _, err := parseMsg(b); err == nil {
			t.Errorf("op %d accepted", op)
		}
	}
}

func FuzzParseMsg(f *testing.F) {
	f.Add(make([]byte, msgSize))
	f.Add([]byte{opRegister, 0, 0, 0, 1, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0})
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseMsg(b)
		if err == nil && (len(b) != msgSize || m.op < opHello || m.op > opForkAbort) {
			t.Fatalf("accepted %x as %+v", b, m)
		}
	})
}

// TestWireSizes: the Go side of the protocol matches the shim's structs,
// whose sizes the C compiler asserts (_Static_assert in onebox_shim.c).
func TestWireSizes(t *testing.T) {
	src, err := os.ReadFile("../shim/c/onebox_shim.c")
	if err != nil {
		t.Fatal(err)
	}
	for name, size := range map[string]int{"obx_msg": msgSize, "obx_reply": replySize} {
		re := regexp.MustCompile(`_Static_assert\(sizeof\(struct ` + name + `\) == (\d+)`)
		m := re.FindSubmatch(src)
		if m == nil || string(m[1]) != fmt.Sprint(size) {
			t.Errorf("struct %s: the shim asserts %q, proto.go says %d", name, m, size)
		}
	}
	if r := encodeReply(int32(unix.ENOMEM), 7); len(r) != replySize || r[0] != byte(unix.ENOMEM) || r[8] != 7 {
		t.Errorf("encodeReply = %x", r)
	}
	if m := regexp.MustCompile(`#define OBX_BYE (0x[0-9a-f]+)`).FindSubmatch(src); m == nil || string(m[1]) != fmt.Sprintf("%#x", byeMagic) {
		t.Errorf("the shim's OBX_BYE is %q, proto.go's byeMagic %#x", m, byeMagic)
	}
	if b := encodeBye(byePool); binary.NativeEndian.Uint32(b[4:8]) != byeMagic || b[8] != byePool {
		t.Errorf("encodeBye = %x", b)
	}
	if m := regexp.MustCompile(`#define MAX_BLOCKS (\d+)`).FindSubmatch(src); m == nil || string(m[1]) != fmt.Sprint(maxBlocks) {
		t.Errorf("the shim's MAX_BLOCKS is %q, proto.go's maxBlocks %d", m, maxBlocks)
	}
	for op, want := range map[uint32]bool{opHello: true, opRegister: true, opUnregister: false,
		opDiscard: true, opFork: true, opForkAbort: false} {
		if wantsReply(op) != want {
			t.Errorf("wantsReply(%d) = %v", op, !want)
		}
	}
}

// needUffd skips unless userfaultfd and a C compiler are usable (CI: root).
func needUffd(t *testing.T) {
	t.Helper()
	testenv.NeedUserfaultfd(t)
	testenv.NeedCC(t)
}

// handshakenUffd makes a userfaultfd with the given extra flags (0 or
// O_NONBLOCK), done with the API handshake, closed when the test ends.
func handshakenUffd(t *testing.T, flags int) int {
	t.Helper()
	uf, _, e := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(unix.O_CLOEXEC|flags), 0, 0)
	if e != 0 {
		t.Fatal(e)
	}
	fd := int(uf)
	t.Cleanup(func() { unix.Close(fd) })
	if _, err := uffd.Handshake(fd, 0); err != nil {
		t.Fatal(err)
	}
	return fd
}

func cc(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("cc", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cc %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// buildShim compiles the shim into a temporary directory.
func buildShim(t *testing.T) string {
	shim := filepath.Join(t.TempDir(), "onebox_shim.so")
	cc(t, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", shim, "../shim/c/onebox_shim.c", "-ldl", "-lpthread")
	return shim
}

// buildProg compiles testdata/name.c.
func buildProg(t *testing.T, name string) string {
	bin := filepath.Join(t.TempDir(), name)
	cc(t, "-O2", "-Wall", "-pthread", "-o", bin, "../shim/testdata/"+name+".c")
	return bin
}

// build compiles the shim and the fill program.
func build(t *testing.T) (shim, fill string) {
	return buildShim(t), buildProg(t, "fill")
}

// startPager serves a fresh socket with a local limit of local bytes.
func startPager(t *testing.T, cfg Config, local uint64) (*Pager, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "pager.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(l, local) }()
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

// runProg runs bin with args and env; it returns stdout and stderr, and
// fails the test if it does not exit 0.
func runProg(t *testing.T, env []string, bin string, args ...string) (string, string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v\nstdout: %s\nstderr: %s", filepath.Base(bin), args, err, stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String()
}

// run runs fill and returns stdout and the first-touch time it reported.
func run(t *testing.T, fill string, env []string, mib string) (string, time.Duration) {
	t.Helper()
	stdout, stderr := runProg(t, env, fill, mib)
	var ns, pages int64
	if _, err := fmt.Sscanf(stderr, "first_touch_ns %d pages %d", &ns, &pages); err != nil {
		t.Fatalf("fill stderr %q: %v", stderr, err)
	}
	return stdout, time.Duration(ns)
}

// TestFillIdentical: the same workload, plainly and with its large blocks
// paged by us (all local, and with a local limit of an eighth of it, so
// most pages go through the pool several times), prints the same bytes.
func TestFillIdentical(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	const pages = 64 << 20 / 4096
	// The first run pays for pages the VM gave back to the host (~10 us
	// each, machine-facts.md): keep the faster of two for the figure.
	plain, plainT := run(t, fill, os.Environ(), "64")
	if _, again := run(t, fill, os.Environ(), "64"); again < plainT {
		plainT = again
	}
	for _, c := range []struct {
		name  string
		local uint64
	}{
		{"all-local", 0},
		{"local-8MiB", 8 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			pl := pool.NewLocal(0)
			p, sock := startPager(t, Config{Pool: pl}, c.local)
			got, pagedT := run(t, fill, shimEnv(shim, sock), "64")
			if got != plain {
				t.Fatalf("output differs under the pager:\n%s\nplain:\n%s", got, plain)
			}
			st := p.Stats()
			t.Logf("stats %+v", st)
			if st.Clients != 1 || st.Copies < pages || st.Dropped != 0 {
				t.Fatalf("stats %+v: want 1 client, >= %d pages filled, none dropped", st, pages)
			}
			if c.local > 0 && (st.Stored < pages || st.Loaded < pages || st.WPFaults == 0) {
				t.Fatalf("stats %+v: with a local limit, pages must go to the pool and back", st)
			}
			if c.local == 0 && st.Evicted != 0 {
				t.Fatalf("stats %+v: evictions without a limit", st)
			}
			// The client loop ends after the program: wait for it, with a
			// bound generous enough for a loaded machine.
			for deadline := time.Now().Add(30 * time.Second); p.Stats().Live != 0 && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
			if n := pl.Stored(); n != 0 || p.Stats().Resident != 0 {
				t.Errorf("after exit: %d pages left in the pool, stats %+v", n, p.Stats())
			}
			t.Logf("first touch of %d pages: plain %v (%.0f faults/s), through the pager %v (%.0f faults/s)",
				pages, plainT, pages/plainT.Seconds(), pagedT, pages/pagedT.Seconds())
		})
	}
}

// TestENOMEM: a block the pool cannot hold fails the allocation cleanly.
func TestENOMEM(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	p, sock := startPager(t, Config{Pool: pool.NewLocal(32 << 20)}, 8<<20)
	cmd := exec.Command(fill, "64")
	cmd.Env = shimEnv(shim, sock)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "malloc failed") {
		t.Fatalf("fill 64 MiB with a 32 MiB pool: %v, %s", err, out)
	}
	if st := p.Stats(); st.Denied != 1 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
	// What fits still works.
	got, _ := run(t, fill, shimEnv(shim, sock), "8")
	want, _ := run(t, fill, os.Environ(), "8")
	if got != want {
		t.Fatalf("8 MiB in a 32 MiB pool: %q, want %q", got, want)
	}
}

// TestFork: after fork, parent and child each see the memory as of the
// fork, never the other's later writes; pages evicted before the fork too.
func TestFork(t *testing.T) {
	needUffd(t)
	shim, bin := buildShim(t), buildProg(t, "fork")
	plain, _ := runProg(t, os.Environ(), bin, "32")
	for _, local := range []uint64{0, 4 << 20} {
		t.Run(fmt.Sprint(local>>20, "MiB"), func(t *testing.T) {
			pl := pool.NewLocal(0)
			p, sock := startPager(t, Config{Pool: pl}, local)
			got, stderr := runProg(t, shimEnv(shim, sock), bin, "32")
			if got != plain {
				t.Fatalf("under the pager:\n%s\nplain:\n%s\nstderr: %s", got, plain, stderr)
			}
			st := p.Stats()
			t.Logf("stats %+v", st)
			if st.Forks != 1 || st.Clients != 2 || st.Dropped != 0 {
				t.Fatalf("stats %+v: want a fork snapshot and 2 clients", st)
			}
			for deadline := time.Now().Add(30 * time.Second); p.Stats().Live != 0 && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond) // the client loops end after the processes
			}
			if n := pl.Stored(); n != 0 {
				t.Errorf("after exit: %d pages left in the pool", n)
			}
		})
	}
}

// TestForkSharesLimit: a program's processes share its local limit: a
// parent and its child writing at once stay near the limit together, not
// at twice it.
func TestForkSharesLimit(t *testing.T) {
	needUffd(t)
	shim, bin := buildShim(t), buildProg(t, "fork")
	plain, _ := runProg(t, os.Environ(), bin, "48")
	const limit = 8 << 20
	p, sock := startPager(t, Config{}, limit)
	stop := make(chan struct{})
	peak := make(chan uint64)
	go func() {
		var m uint64
		for {
			select {
			case <-stop:
				peak <- m
				return
			case <-time.After(200 * time.Microsecond):
				m = max(m, p.Stats().Resident*uint64(PageSize))
			}
		}
	}()
	got, _ := runProg(t, shimEnv(shim, sock), bin, "48")
	close(stop)
	m := <-peak
	if got != plain {
		t.Fatalf("under the pager:\n%s\nplain:\n%s", got, plain)
	}
	t.Logf("peak resident %d KiB with a limit of %d KiB; stats %+v", m>>10, limit>>10, p.Stats())
	// A limit per process would let the two hold 16 MiB and more.
	if m > limit*7/4 {
		t.Fatalf("peak resident %d KiB: the processes of one program must share its %d KiB", m>>10, limit>>10)
	}
}

// TestForkMany: a program forking more often than a block's list of frozen
// pool regions may grow (compaction) keeps copy-on-write right every time.
func TestForkMany(t *testing.T) {
	needUffd(t)
	shim, bin := buildShim(t), buildProg(t, "forkmany")
	plain, _ := runProg(t, os.Environ(), bin, "2", "300")
	p, sock := startPager(t, Config{}, 1<<20)
	got, _ := runProg(t, shimEnv(shim, sock), bin, "2", "300")
	if got != plain {
		t.Fatalf("under the pager %q, plain %q", got, plain)
	}
	if st := p.Stats(); st.Forks != 300 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestMadvise: MADV_DONTNEED'd ranges read back as zeros, evicted or not.
func TestMadvise(t *testing.T) {
	needUffd(t)
	shim, bin := buildShim(t), buildProg(t, "madv")
	plain, _ := runProg(t, os.Environ(), bin, "32")
	if !strings.Contains(plain, "nonzero after dontneed 0, changed elsewhere 0") {
		t.Fatalf("plain: %s", plain)
	}
	for _, local := range []uint64{0, 4 << 20} {
		p, sock := startPager(t, Config{}, local)
		got, _ := runProg(t, shimEnv(shim, sock), bin, "32")
		if got != plain {
			t.Fatalf("local %d: under the pager:\n%s\nplain:\n%s", local, got, plain)
		}
		if st := p.Stats(); st.Discarded != (16+8)<<20/4096 { // DONTNEED of half, FREE of a quarter
			t.Fatalf("stats %+v", st)
		}
	}
}

// TestPagerGone: a program whose pager goes away stops with a clear message;
// it neither hangs nor reads zero pages in place of its data.
func TestPagerGone(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	p, sock := startPager(t, Config{}, 4<<20)
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
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatal("program still running 60 s after its pager went away")
	}
	if err == nil {
		t.Fatalf("program exited 0 without its pager; output %q", rest)
	}
	if strings.Contains(rest, "second sum") {
		t.Fatalf("program went on without its pager: %q", rest)
	}
	// Close says goodbye first: the program says why it stops.
	const want = "onebox: memory pager stopped (the agent is shutting down); stopping to avoid reading wrong data"
	if !strings.Contains(stderr.String(), want) {
		t.Fatalf("stderr %q lacks %q (exit: %v)", stderr.String(), want, err)
	}
	t.Logf("exit: %v; stderr: %s", err, strings.TrimSpace(stderr.String()))
}

// failingPool loses every page: its Load fails.
type failingPool struct{ *pool.Local }

func (failingPool) Load(context.Context, pool.Region, uint64, []byte) error {
	return errors.New("both copies lost")
}

// TestPoolFailure: a page the pool cannot give back stops the program with
// the reason, rather than handing it zeros.
func TestPoolFailure(t *testing.T) {
	needUffd(t)
	shim, fill := build(t)
	_, sock := startPager(t, Config{Pool: failingPool{pool.NewLocal(0)}}, 1<<20)
	cmd := exec.Command(fill, "16")
	cmd.Env = shimEnv(shim, sock)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	const want = "onebox: the cluster memory pool could not fetch or store this program's pages"
	if err == nil || !strings.Contains(stderr.String(), want) || strings.Contains(stdout.String(), "pass 2") {
		t.Fatalf("exit %v, stdout %q, stderr %q; want a failure with %q", err, stdout.String(), stderr.String(), want)
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

// TestPython: an unmodified interpreter with large bytearrays and lists,
// most of them out of memory.
func TestPython(t *testing.T) {
	needUffd(t)
	py, err := exec.LookPath("python3")
	testenv.NeedNoError(t, err, "no python3")
	shim := buildShim(t)
	const script = `
import hashlib, os
b = bytearray(48 << 20)
for i in range(0, len(b), 4096):
    b[i] = i % 251
l = list(range(2_000_000))
d = bytes(b) + bytes(str(sum(l)), 'ascii')
pid = os.fork()
if pid == 0:
    b[0] = 1
    print("child", hashlib.sha256(b).hexdigest(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(hashlib.sha256(d).hexdigest(), len(l), hashlib.sha256(b).hexdigest())
`
	plain, err := exec.Command(py, "-c", script).Output()
	if err != nil {
		t.Fatalf("python: %v", err)
	}
	p, sock := startPager(t, Config{}, 16<<20)
	got, _ := runProg(t, shimEnv(shim, sock), py, "-c", script)
	if got != string(plain) {
		t.Fatalf("output %q, plain %q", got, plain)
	}
	if st := p.Stats(); st.Copies < 48<<20/4096 || st.Evicted == 0 || st.Dropped != 0 {
		t.Fatalf("stats %+v: the large blocks were not paged", st)
	}
	t.Logf("stats %+v", p.Stats())
}

// TestThreads: concurrent faults on the same pages (EEXIST for the losers)
// leave every thread with the right data.
func TestThreads(t *testing.T) {
	needUffd(t)
	shim, bin := buildShim(t), buildProg(t, "threads")
	plain, _ := runProg(t, os.Environ(), bin)
	for _, local := range []uint64{0, 2 << 20} {
		p, sock := startPager(t, Config{}, local)
		got, _ := runProg(t, shimEnv(shim, sock), bin)
		if got != plain {
			t.Fatalf("local %d: output %q, plain %q", local, got, plain)
		}
		if st := p.Stats(); st.Faults == 0 || st.Dropped != 0 {
			t.Fatalf("stats %+v", st)
		}
		t.Logf("stats %+v", p.Stats())
	}
}

// TestGarbageDropped: malformed messages end that client only.
func TestGarbageDropped(t *testing.T) {
	p, sock := startPager(t, Config{}, 0)
	reg := make([]byte, msgSize)
	reg[0] = opRegister
	hello := make([]byte, msgSize)
	hello[0] = opHello
	for i, b := range [][]byte{
		{1, 2, 3},             // short
		make([]byte, msgSize), // op 0
		reg,                   // register before hello, without a memfd
		hello,                 // hello without a userfaultfd
	} {
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		bye := make([]byte, 32)
		if n, err := c.Read(bye); err != nil || n != replySize || binary.NativeEndian.Uint32(bye[4:8]) != byeMagic || bye[8] != byeProtocol {
			t.Errorf("case %d: read %x, %v; want a goodbye for a protocol error", i, bye[:n], err)
		}
		if n, err := c.Read(make([]byte, 32)); err != io.EOF {
			t.Errorf("case %d: read %d, %v; want EOF (client dropped)", i, n, err)
		}
		c.Close()
		if st := p.Stats(); st.Dropped != uint64(i+1) {
			t.Errorf("case %d: stats %+v", i, st)
		}
	}
}

// TestRegisterNotMemfd: a block whose descriptor is a file of the file
// system (eviction would punch holes in it) is refused.
func TestRegisterNotMemfd(t *testing.T) {
	needUffd(t)
	logs := make(chan string, 10)
	p, sock := startPager(t, Config{Logf: func(f string, a ...any) { logs <- fmt.Sprintf(f, a...) }}, 0)
	uf := handshakenUffd(t, unix.O_NONBLOCK)
	f, err := os.Create(filepath.Join(t.TempDir(), "file"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(1 << 20)
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	send := func(op byte, start, n uint64, fd int) {
		b := make([]byte, msgSize)
		b[0] = op
		binary.NativeEndian.PutUint64(b[8:16], start)
		binary.NativeEndian.PutUint64(b[16:24], n)
		if _, _, err := c.WriteMsgUnix(b, unix.UnixRights(fd), nil); err != nil {
			t.Fatal(err)
		}
	}
	send(opHello, 0, 0, uf)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 32)); err != nil || n != replySize {
		t.Fatalf("hello reply: %d, %v", n, err)
	}
	send(opRegister, 1<<30, 1<<20, int(f.Fd()))
	bye := make([]byte, 32)
	if n, err := c.Read(bye); err != nil || n != replySize || binary.NativeEndian.Uint32(bye[4:8]) != byeMagic {
		t.Fatalf("register of a plain file: read %x, %v; want a goodbye", bye[:n], err)
	}
	if n, err := c.Read(bye); err == nil {
		t.Fatalf("register of a plain file: read %d more bytes; want the client dropped", n)
	}
	if l := <-logs; !strings.Contains(l, "not a memfd") {
		t.Fatalf("dropped for %q", l)
	}
	if st := p.Stats(); st.Regions != 0 {
		t.Fatalf("stats %+v", st)
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
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatal("program still running 60 s after its pager was killed")
	}
	const want = "onebox: memory pager gone; stopping to avoid reading wrong data"
	if err == nil || !strings.Contains(stderr.String(), want) || stdout.Len() != 0 {
		t.Fatalf("exit %v, stdout %q, stderr %q; want a failure with %q and no output", err, stdout.String(), stderr.String(), want)
	}
	t.Logf("exit: %v; stderr: %s", err, strings.TrimSpace(stderr.String()))
}

// dialSend connects to sock and sends one message with fd attached (fd < 0:
// none).
func dialSend(t *testing.T, sock string, op byte, start, n uint64, fd int) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	sendMsg(t, c, op, start, n, fd)
	return c
}

func sendMsg(t *testing.T, c *net.UnixConn, op byte, start, n uint64, fd int) {
	t.Helper()
	b := make([]byte, msgSize)
	b[0] = op
	binary.NativeEndian.PutUint64(b[8:16], start)
	binary.NativeEndian.PutUint64(b[16:24], n)
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
}

// wantBye reads a goodbye for reason and then EOF from c.
func wantBye(t *testing.T, c *net.UnixConn, reason byte, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	bye := make([]byte, 32)
	if n, err := c.Read(bye); err != nil || n != replySize || binary.NativeEndian.Uint32(bye[4:8]) != byeMagic || bye[8] != reason {
		t.Fatalf("%s: read %x, %v; want a goodbye (reason %d)", what, bye[:max(n, 0)], err, reason)
	}
	if n, err := c.Read(bye); err != io.EOF {
		t.Fatalf("%s: read %d, %v; want EOF (client dropped)", what, n, err)
	}
}

// TestHelloNotUffd: a hello whose descriptor is not a non-blocking
// userfaultfd is refused. serve reads the descriptor until EAGAIN: a
// blocking one would stall the client's goroutine for good, and Close with
// it.
func TestHelloNotUffd(t *testing.T) {
	_, sock := startPager(t, Config{}, 0)
	var pfd [2]int
	if err := unix.Pipe2(pfd[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pfd[0])
	defer unix.Close(pfd[1])
	wantBye(t, dialSend(t, sock, opHello, 0, 0, pfd[0]), byeProtocol, "hello with a pipe")

	needUffd(t)
	uf := handshakenUffd(t, 0) // blocking
	wantBye(t, dialSend(t, sock, opHello, 0, 0, uf), byeProtocol, "hello with a blocking userfaultfd")
}

// TestBlockLimits: the memfds a program can make the pager hold are bounded:
// past the pager's descriptor budget a block gets ENOMEM, and a process
// registering more blocks than the shim ever does is dropped.
func TestBlockLimits(t *testing.T) {
	needUffd(t)
	p, sock := startPager(t, Config{}, 0)
	p.memfdCap.Store(3)
	p.blockCap.Store(4)
	hello := func() *net.UnixConn {
		uf := handshakenUffd(t, unix.O_NONBLOCK)
		c := dialSend(t, sock, opHello, 0, 0, uf)
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if n, err := c.Read(make([]byte, 32)); err != nil || n != replySize {
			t.Fatalf("hello reply: %d, %v", n, err)
		}
		return c
	}
	register := func(c *net.UnixConn, start uint64) (errno uint32, err error) {
		fd, err := unix.MemfdCreate("blk", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		unix.Ftruncate(fd, int64(PageSize))
		sendMsg(t, c, opRegister, start, uint64(PageSize), fd)
		b := make([]byte, 32)
		n, err := c.Read(b)
		if err != nil || n != replySize {
			return 0, fmt.Errorf("read %d, %v", n, err)
		}
		if binary.NativeEndian.Uint32(b[4:8]) == byeMagic {
			return 0, fmt.Errorf("goodbye %d", b[8])
		}
		return binary.NativeEndian.Uint32(b[0:4]), nil
	}
	a, b := hello(), hello()
	base := uint64(1 << 30)
	for i := range 3 {
		if e, err := register(a, base+uint64(i*PageSize)); err != nil || e != 0 {
			t.Fatalf("block %d: errno %d, %v", i, e, err)
		}
	}
	if e, err := register(b, base); err != nil || e != uint32(unix.ENOMEM) {
		t.Fatalf("block past the descriptor budget: errno %d, %v; want ENOMEM", e, err)
	}
	if got := p.memfds.Load(); got != 3 {
		t.Fatalf("memfds held: %d, want 3", got)
	}
	sendMsg(t, a, opUnregister, base, 0, -1) // no reply: wait for a's goroutine
	for deadline := time.Now().Add(30 * time.Second); p.memfds.Load() != 2 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if e, err := register(b, base); err != nil || e != 0 { // the freed one's place
		t.Fatalf("block after an unregister: errno %d, %v", e, err)
	}

	p.memfdCap.Store(100)
	for i := 1; i < 4; i++ {
		if e, err := register(b, base+uint64(i*PageSize)); err != nil || e != 0 {
			t.Fatalf("block %d of b: errno %d, %v", i, e, err)
		}
	}
	if _, err := register(b, base+uint64(4*PageSize)); err == nil || err.Error() != fmt.Sprintf("goodbye %d", byeProtocol) {
		t.Fatalf("block past maxBlocks: %v; want a goodbye for a protocol error", err)
	}
	a.Close()
	deadline := time.Now().Add(30 * time.Second)
	for p.memfds.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := p.memfds.Load(); got != 0 {
		t.Fatalf("memfds held after both clients left: %d", got)
	}
}

// TestPendingForksBounded: a process asking for fork snapshots that no child
// ever adopts gets ENOMEM past maxPendingForks instead of growing the
// pager's snapshot table without bound; an adopted one frees its place.
func TestPendingForksBounded(t *testing.T) {
	needUffd(t)
	p, sock := startPager(t, Config{}, 0)
	uf := handshakenUffd(t, unix.O_NONBLOCK)
	c := dialSend(t, sock, opHello, 0, 0, uf)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	reply := func(c *net.UnixConn) (uint32, uint64) {
		b := make([]byte, 32)
		if n, err := c.Read(b); err != nil || n != replySize || binary.NativeEndian.Uint32(b[4:8]) == byeMagic {
			t.Fatalf("reply: %x, %v", b[:max(n, 0)], err)
		}
		return binary.NativeEndian.Uint32(b[0:4]), binary.NativeEndian.Uint64(b[8:16])
	}
	reply(c)
	var first uint64
	for i := range maxPendingForks {
		sendMsg(t, c, opFork, 0, 0, -1)
		errno, tok := reply(c)
		if errno != 0 {
			t.Fatalf("fork %d: errno %d", i, errno)
		}
		if i == 0 {
			first = tok
		}
	}
	sendMsg(t, c, opFork, 0, 0, -1)
	if errno, _ := reply(c); errno != uint32(unix.ENOMEM) {
		t.Fatalf("fork past %d pending: errno %d; want ENOMEM", maxPendingForks, errno)
	}
	// A child adopts the first snapshot: the parent may fork once more.
	child := dialSend(t, sock, opHello, first, 0, uf)
	child.SetReadDeadline(time.Now().Add(30 * time.Second))
	reply(child)
	sendMsg(t, c, opFork, 0, 0, -1)
	if errno, _ := reply(c); errno != 0 {
		t.Fatalf("fork after an adoption: errno %d", errno)
	}
	p.mu.Lock()
	n := len(p.snaps)
	p.mu.Unlock()
	if n != maxPendingForks {
		t.Fatalf("%d snapshots pending, want %d", n, maxPendingForks)
	}
}

// TestUnreadReplies: a program that sends requests without reading the
// replies is dropped; the pager neither blocks on its full socket nor keeps
// Close waiting for it.
func TestUnreadReplies(t *testing.T) {
	needUffd(t)
	p, sock := startPager(t, Config{}, 0)
	uf := handshakenUffd(t, unix.O_NONBLOCK)
	c := dialSend(t, sock, opHello, 0, 0, uf)
	b := make([]byte, msgSize)
	b[0] = opFork
	c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	var err error
	for i := 0; i < 100000 && err == nil; i++ {
		_, err = c.Write(b)
	}
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("writes without reading the replies: %v; want the client dropped (EPIPE)", err)
	}
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(60 * time.Second):
		t.Fatal("Close still waits for a client that does not read its replies after 60 s")
	}
	if st := p.Stats(); st.Dropped != 1 {
		t.Fatalf("stats %+v", st)
	}
}
