package integration

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/testbed"
)

// failBound is how long an operation on a dead node's subtree may take to
// fail: the request bound, plus room for a loaded machine. It bounds a
// hang; it is not a performance figure.
const failBound = 2*client.DefaultTimeout + 5*time.Second

// A node holding an export dies while n1 has its files open and a reader
// running: everything on its subtree fails with EIO or ENOTCONN within
// the bound, nothing hangs, and when the node is back new opens work
// (descriptors opened before the death stay broken: EIO until reopened,
// docs/filesystem.md).
func TestCFSNodeDiesWithOpenFiles(t *testing.T) {
	t.Parallel()
	c, _ := startFSCluster(t)
	n1, n2 := c.Nodes[0], c.Nodes[1]
	remote := filepath.Join(mountOf(n1), n2.Name, "scratch")
	data := randomBytes(64 << 20)
	must(t, os.WriteFile(filepath.Join(n2.DataDir, "scratch", "big"), data, 0o644))

	rf, err := os.Open(filepath.Join(remote, "big"))
	must(t, err)
	defer rf.Close()
	buf := make([]byte, 4096)
	_, err = rf.ReadAt(buf, 0)
	must(t, err)
	wf, err := os.OpenFile(filepath.Join(remote, "w"), os.O_CREATE|os.O_WRONLY, 0o644)
	must(t, err)
	defer wf.Close()
	_, err = wf.Write([]byte("before\n"))
	must(t, err)
	must(t, os.WriteFile(filepath.Join(n2.DataDir, "scratch", "small"), []byte("small\n"), 0o644))
	// A slow reader of the big file (64 KiB every 20 ms) when the node
	// dies: it gets an error, it does not hang.
	readerDone := make(chan error, 1)
	go func() {
		f, err := os.Open(filepath.Join(remote, "big"))
		if err != nil {
			readerDone <- err
			return
		}
		defer f.Close()
		b := make([]byte, 64<<10)
		for {
			if _, err := f.Read(b); err != nil {
				readerDone <- err
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	must(t, c.Kill(n2))
	killed := time.Now()
	wantDown := func(what string, f func() error) {
		t.Helper()
		start := time.Now()
		err := boundedErr(t, what, f)
		if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENOTCONN) {
			t.Errorf("%s on a dead node's export: %v, want EIO or ENOTCONN", what, err)
		}
		if d := time.Since(start); d > failBound {
			t.Errorf("%s took %v to fail, more than the bound %v", what, d, failBound)
		}
	}
	wantDown("read of an open file", func() error { _, err := rf.ReadAt(buf, 60<<20); return err })
	wantDown("write to an open file", func() error {
		if _, err := wf.Write(bytes.Repeat([]byte("x"), 1<<20)); err != nil {
			return err
		}
		return wf.Sync()
	})
	wantDown("create", func() error { return os.WriteFile(filepath.Join(remote, "new"), nil, 0o644) })
	wantDown("readdir", func() error { _, err := os.ReadDir(remote); return err })
	wantDown("open", func() error { f, err := os.Open(filepath.Join(remote, "big")); f.Close(); return err })
	select {
	case err := <-readerDone:
		if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENOTCONN) {
			t.Errorf("a reader of a 64 MiB file whose node died meanwhile: %v, want EIO or ENOTCONN", err)
		}
	case <-time.After(failBound - time.Since(killed)):
		t.Errorf("a reader of a dead node's file still reading %v after the kill", failBound)
	}

	must(t, c.StartNode(ctxT(t, 60*time.Second), n2))
	if err := testbed.WaitFor(ctxT(t, 60*time.Second), 30*time.Second, "n2's export readable again through n1", func(context.Context) (bool, error) {
		b, err := os.ReadFile(filepath.Join(remote, "small"))
		return err == nil && string(b) == "small\n", err
	}); err != nil {
		t.Fatal(err)
	}
	// (32 MiB on: a part of the file no reader had in the page cache.)
	if _, err := rf.ReadAt(buf, 32<<20); !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("read of a descriptor opened before the node died, after it is back: %v, want EIO", err)
	}
	if b, err := os.ReadFile(filepath.Join(remote, "big")); err != nil || !bytes.Equal(b, data) {
		t.Errorf("reopened after the node is back: %d bytes, %v", len(b), err)
	}
	must(t, os.WriteFile(filepath.Join(remote, "after"), []byte("after\n"), 0o644))
	wantFile(t, filepath.Join(n2.DataDir, "scratch", "after"), "after\n")
	wantFile(t, filepath.Join(n2.DataDir, "scratch", "w"), "before\n")
}
