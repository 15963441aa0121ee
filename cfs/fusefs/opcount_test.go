package fusefs

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/proto"
	"github.com/onebox-project/onebox/cfs/server"
)

// Creating a small file (create, write, close) costs the node a lookup of
// the new name, the create and the write: the directory's attributes,
// which the kernel asks for after every change in it, come with the
// create's reply. Removing one costs the lookup and the unlink.
func TestMountRequestsPerCreate(t *testing.T) {
	needFUSE(t)
	export := t.TempDir()
	s, err := server.New([]server.Export{{Name: "x", Path: export}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var mu sync.Mutex
	counts := map[string]int{}
	s.Observe = func(op proto.Op, e unix.Errno) {
		mu.Lock()
		defer mu.Unlock()
		counts[fmt.Sprintf("%v/%d", op, e)]++
	}
	c := pipeClient(s)
	defer c.Close()
	mnt := filepath.Join(t.TempDir(), "mnt")
	m, err := New(Options{Mountpoint: mnt, Nodes: func() []string { return []string{"a"} }, Client: func(string) *client.Client { return c }})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	dir := filepath.Join(mnt, "a", "x")
	if _, err := os.ReadDir(dir); err != nil {
		t.Fatal(err)
	}
	take := func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		got := counts
		counts = map[string]int{}
		return got
	}
	take()
	const n = 50
	buf := make([]byte, 4096)
	for i := range n {
		f, err := os.Create(filepath.Join(dir, fmt.Sprint("f", i)))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	got := take()
	enoent := int(unix.ENOENT)
	want := map[string]int{fmt.Sprintf("getattr/%d", enoent): n, "create/0": n, "write/0": n}
	// Closes may still be on their way (FUSE sends RELEASE in the
	// background): wait for them, bounded.
	closes := got["close/0"]
	delete(got, "close/0")
	for deadline := time.Now().Add(10 * time.Second); closes < n && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		more := take()
		closes += more["close/0"]
		delete(more, "close/0")
		for k, v := range more {
			got[k] += v
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || closes != n {
		t.Errorf("requests for %d small files: %v and %d closes, want %v and %d closes", n, got, closes, want, n)
	}
	for i := range n {
		if err := os.Remove(filepath.Join(dir, fmt.Sprint("f", i))); err != nil {
			t.Fatal(err)
		}
	}
	// (the names are still in the kernel's cache: no lookups)
	got = take()
	delete(got, "close/0") // the last create's, late
	if want := map[string]int{"unlink/0": n}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("requests for removing %d files: %v, want %v", n, got, want)
	}
	// The directory's attributes as seen through the mount are the
	// node's after the last change.
	var st, lst unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(export, &lst); err != nil {
		t.Fatal(err)
	}
	if st.Mtim != lst.Mtim || st.Nlink != lst.Nlink {
		t.Errorf("directory through the mount: mtime %v nlink %d; on the node %v %d", st.Mtim, st.Nlink, lst.Mtim, lst.Nlink)
	}
}
