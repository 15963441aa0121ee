package fusefs

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/server"
	"github.com/onebox-project/onebox/internal/testenv"
)

func needFUSE(t *testing.T) {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "mounting needs root")
	_, err := os.Stat("/dev/fuse")
	testenv.NeedNoError(t, err, "mounting needs /dev/fuse")
}

// mountOne mounts a namespace with one node, "a", whose export "x" is a
// temporary directory served in-process.
func mountOne(t *testing.T, dir string) (export string, m *Mount) {
	t.Helper()
	export = t.TempDir()
	s, err := server.New([]server.Export{{Name: "x", Path: export}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c := pipeClient(s)
	m, err = New(Options{
		Mountpoint: dir,
		Nodes:      func() []string { return []string{"a"} },
		Client: func(n string) *client.Client {
			if n == "a" {
				return c
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
		c.Close()
		s.Close()
	})
	return export, m
}

func TestMountOps(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	x := filepath.Join(mnt, "a", "x")
	if err := os.WriteFile(filepath.Join(x, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(export, "f")); err != nil || string(b) != "data" {
		t.Fatalf("on disk: %q %v", b, err)
	}
	if err := os.MkdirAll(filepath.Join(x, "d", "e"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(x, "f"), filepath.Join(x, "d", "e", "g")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(x, "d"), filepath.Join(x, "d2")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(x, "d2", "e", "g")); err != nil || string(b) != "data" {
		t.Fatalf("after renames: %q %v", b, err)
	}
	es, err := os.ReadDir(mnt)
	if err != nil || len(es) != 1 || es[0].Name() != "a" {
		t.Fatalf("root: %v %v", es, err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "b")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unknown node: %v", err)
	}
	names, err := os.ReadDir(filepath.Join(mnt, "a"))
	if err != nil || !slices.EqualFunc(names, []string{"x"}, func(e os.DirEntry, s string) bool { return e.Name() == s }) {
		t.Fatalf("node a: %v %v", names, err)
	}
	// A rename across exports or nodes is EXDEV (mv then copies).
	if err := os.Rename(filepath.Join(x, "d2"), filepath.Join(mnt, "a", "d3")); !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.ENOSYS) {
		t.Fatalf("rename out of an export: %v", err)
	}
}

// A mount whose process was killed is dead (ENOTCONN); the next mount on
// the same directory detaches it instead of failing.
func TestStaleMountDetached(t *testing.T) {
	needFUSE(t)
	if dir := os.Getenv("CFS_TEST_HELPER_MOUNT"); dir != "" {
		t.Skip("helper")
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperMount$", "-test.v")
	cmd.Env = append(os.Environ(), "CFS_TEST_HELPER_MOUNT="+mnt)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "mounted" {
				ready <- true
			}
		}
		close(ready)
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("helper exited before mounting")
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("helper did not mount")
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := probe(mnt); !errors.Is(err, syscall.ENOTCONN) {
		unmountQuietly(mnt)
		t.Fatalf("mount of a killed process: reading it gives %v, want ENOTCONN", err)
	}
	_, _ = mountOne(t, mnt)
	if _, err := os.ReadDir(filepath.Join(mnt, "a", "x")); err != nil {
		t.Fatalf("new mount over a stale one: %v", err)
	}
}

// TestHelperMount is run by TestStaleMountDetached in a child process,
// which it kills once mounted.
func TestHelperMount(t *testing.T) {
	dir := os.Getenv("CFS_TEST_HELPER_MOUNT")
	if dir == "" {
		t.Skip("run by TestStaleMountDetached")
	}
	mountOne(t, dir)
	os.Stdout.WriteString("mounted\n")
	time.Sleep(time.Minute)
}

// pipeClient is a client of s in this process, each connection a pipe.
func pipeClient(s *server.Server) *client.Client {
	return client.New(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go s.ServeConn(b)
		return a, nil
	}, 0)
}

func unmountQuietly(dir string) { syscall.Unmount(dir, 2 /* MNT_DETACH */) }

// Close of a mount with a file open in it detaches the mount lazily.
func TestBusyUnmount(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	_, m := mountOne(t, mnt)
	f, err := os.Create(filepath.Join(mnt, "a", "x", "open"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := mountID(realPath(mnt)); ok {
		t.Fatal("busy mount still in the mount table after Close")
	}
}

// A file keeps its inode number after the kernel's cache of it expired
// (cp -a and fts compare inode numbers across calls).
func TestStableInodeNumbers(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	if err := os.WriteFile(filepath.Join(export, "f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ino := func() uint64 {
		st, err := os.Stat(filepath.Join(mnt, "a", "x", "f"))
		if err != nil {
			t.Fatal(err)
		}
		return st.Sys().(*syscall.Stat_t).Ino
	}
	first := ino()
	time.Sleep(CacheTimeout + 200*time.Millisecond) // let the kernel look it up again
	if again := ino(); again != first {
		t.Fatalf("inode number changed from %d to %d", first, again)
	}
}

// bounded runs f and fails the test if it does not return in time.
func bounded(t *testing.T, what string, f func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- f() }()
	select {
	case err := <-errc:
		return err
	case <-time.After(20 * time.Second):
		t.Fatalf("%s hung", what)
		return nil
	}
}

// A symlink to "." (or to any ancestor) is shown as a symlink that the
// kernel resolves: it used to be shown as the directory itself, with the
// export root's inode number, which made the inode tree a loop and the
// mounting agent run out of memory.
func TestMountSymlinkLoop(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	os.WriteFile(filepath.Join(export, "f"), []byte("x"), 0o644)
	os.Mkdir(filepath.Join(export, "d"), 0o755)
	os.Symlink(".", filepath.Join(export, "loop"))
	os.Symlink("..", filepath.Join(export, "d", "up"))
	x := filepath.Join(mnt, "a", "x")
	for _, p := range []string{"loop", "d/up", "loop/loop/d/up/loop/d"} {
		var names []string
		err := bounded(t, "ls "+p, func() error {
			es, err := os.ReadDir(filepath.Join(x, p))
			for _, e := range es {
				names = append(names, e.Name())
			}
			return err
		})
		if err != nil || len(names) == 0 {
			t.Fatalf("ls %s: %v %v", p, names, err)
		}
	}
	st, err := os.Lstat(filepath.Join(x, "loop"))
	if err != nil || st.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("lstat loop: %v %v, want a symlink", st, err)
	}
	if got, err := os.Readlink(filepath.Join(x, "d", "up")); err != nil || got != ".." {
		t.Fatalf("readlink d/up: %q %v", got, err)
	}
	if b, err := os.ReadFile(filepath.Join(x, "loop", "loop", "f")); err != nil || string(b) != "x" {
		t.Fatalf("read through loop: %q %v", b, err)
	}
	es, err := os.ReadDir(x)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Name() == "loop" && e.Type() != os.ModeSymlink {
			t.Fatalf("readdir shows loop as %v, want a symlink", e.Type())
		}
	}
	out, err := exec.Command("find", x).CombinedOutput()
	if err != nil {
		t.Fatalf("find: %v\n%s", err, out)
	}
}

// A directory with the inode number of one of its ancestors (here a bind
// mount of the export inside itself, on the serving node) is refused with
// ELOOP instead of making the inode tree a loop.
func TestMountAncestorInodeRefused(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	sub := filepath.Join(export, "sub")
	os.Mkdir(sub, 0o755)
	testenv.NeedNoError(t, syscall.Mount(export, sub, "", syscall.MS_BIND, ""), "bind mount")
	defer syscall.Unmount(sub, syscall.MNT_DETACH)
	x := filepath.Join(mnt, "a", "x")
	err := bounded(t, "ls sub", func() error { _, err := os.ReadDir(filepath.Join(x, "sub")); return err })
	if !errors.Is(err, syscall.ELOOP) {
		t.Fatalf("ls of a directory that is its own ancestor: %v, want ELOOP", err)
	}
	if _, err := os.ReadDir(x); err != nil {
		t.Fatal(err)
	}
}

// rm -rf of a directory holding a symlink to another directory removes
// the link, not what it points to.
func TestMountRemoveAllKeepsLinkTargets(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	os.Mkdir(filepath.Join(export, "important"), 0o755)
	os.WriteFile(filepath.Join(export, "important", "file"), []byte("keep"), 0o644)
	os.Mkdir(filepath.Join(export, "data"), 0o755)
	os.Symlink("../important", filepath.Join(export, "data", "link"))
	x := filepath.Join(mnt, "a", "x")
	if err := bounded(t, "rm -rf", func() error { return exec.Command("rm", "-rf", filepath.Join(x, "data")).Run() }); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(export, "important", "file")); err != nil || string(b) != "keep" {
		t.Fatalf("important/file after rm -rf data: %q %v", b, err)
	}
	if _, err := os.Lstat(filepath.Join(export, "data")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("data after rm -rf: %v", err)
	}
}

// Symlinks made through the mount are stored as they are and resolved by
// the kernel of the machine that follows them.
func TestMountSymlinkCreate(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	x := filepath.Join(mnt, "a", "x")
	os.WriteFile(filepath.Join(export, "f"), []byte("data"), 0o644)
	if err := os.Symlink("f", filepath.Join(x, "rel")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/nonexistent/abs", filepath.Join(x, "abs")); err != nil {
		t.Fatal(err)
	}
	if got, err := os.Readlink(filepath.Join(export, "rel")); err != nil || got != "f" {
		t.Fatalf("on disk rel -> %q %v", got, err)
	}
	if got, err := os.Readlink(filepath.Join(x, "abs")); err != nil || got != "/nonexistent/abs" {
		t.Fatalf("readlink abs: %q %v", got, err)
	}
	if b, err := os.ReadFile(filepath.Join(x, "rel")); err != nil || string(b) != "data" {
		t.Fatalf("read through rel: %q %v", b, err)
	}
	if err := os.Remove(filepath.Join(x, "rel")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(export, "f")); err != nil {
		t.Fatal("removing the link removed its target")
	}
}

// fchmod, futimens and fstat of an open file whose name was removed act
// on that file: never on the export's root (an orphaned node has no path).
func TestMountUnlinkedOpenFile(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	if err := os.Chmod(export, 0o755); err != nil {
		t.Fatal(err)
	}
	x := filepath.Join(mnt, "a", "x")
	f, err := os.Create(filepath.Join(x, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := os.Remove(filepath.Join(x, "f")); err != nil {
		t.Fatal(err)
	}
	rootBefore, _ := os.Stat(export)
	chmodErr := f.Chmod(0o600)
	old := time.Unix(1e9, 0)
	utimeErr := syscall.Futimes(int(f.Fd()), []syscall.Timeval{syscall.NsecToTimeval(old.UnixNano()), syscall.NsecToTimeval(old.UnixNano())})
	if st, err := os.Stat(export); err != nil || st.Mode().Perm() != 0o755 || !st.ModTime().Equal(rootBefore.ModTime()) {
		t.Fatalf("export root changed by fchmod/futimes of an unlinked file: %v %v", st.Mode(), err)
	}
	if chmodErr != nil || utimeErr != nil {
		t.Fatalf("fchmod %v, futimes %v of an unlinked open file", chmodErr, utimeErr)
	}
	time.Sleep(CacheTimeout + 100*time.Millisecond)
	st, err := f.Stat()
	if err != nil || st.Mode().Perm() != 0o600 || !st.ModTime().Equal(old) {
		t.Fatalf("fstat of the unlinked file: %v %v %v", st.Mode(), st.ModTime(), err)
	}
	if _, err := f.WriteString("still works"); err != nil {
		t.Fatal(err)
	}
}

// A file replaced on the node within the attribute cache time is still
// opened (the stale identity makes the kernel look it up again), and the
// new file is what is read.
func TestMountReplacedFileReopened(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	export, _ := mountOne(t, mnt)
	x := filepath.Join(mnt, "a", "x")
	os.WriteFile(filepath.Join(export, "f"), []byte("old"), 0o644)
	if _, err := os.Stat(filepath.Join(x, "f")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(export, "f.new"), []byte("new"), 0o644)
	if err := os.Rename(filepath.Join(export, "f.new"), filepath.Join(export, "f")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(x, "f")); err != nil || string(b) != "new" {
		t.Fatalf("read of a replaced file: %q %v", b, err)
	}
	if err := os.Chmod(filepath.Join(x, "f"), 0o600); err != nil {
		t.Fatalf("chmod of a replaced file: %v", err)
	}
}

// The kernel checks permissions against attributes it cached for up to
// CacheTimeout; a file swapped on the node meanwhile (for one the caller
// may not read) must not be opened for the caller by the node, which
// runs as root: the identity the kernel checked goes with the open.
func TestMountSwappedFileNotOpened(t *testing.T) {
	needFUSE(t)
	base := t.TempDir()
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mnt := filepath.Join(base, "mnt")
	export, _ := mountOne(t, mnt)
	if err := os.Chmod(export, 0o777); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(export, "secret"), []byte("secret"), 0o600)
	os.WriteFile(filepath.Join(export, "f"), []byte("public"), 0o644)
	p := filepath.Join(mnt, "a", "x", "f")
	if _, err := os.Stat(p); err != nil { // the kernel caches f as 0644
		t.Fatal(err)
	}
	// Swapped on the node: f is now the root-only file.
	os.Remove(filepath.Join(export, "f"))
	if err := os.Link(filepath.Join(export, "secret"), filepath.Join(export, "f")); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cat", p)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err == nil || strings.Contains(string(out), "secret") {
		t.Fatalf("an unprivileged user read a swapped-in root-only file: %v %q", err, out)
	}
}
