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
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/server"
)

func needFUSE(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("mounting needs /dev/fuse")
	}
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
	c := client.New(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go s.ServeConn(b)
		return a, nil
	}, 0)
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
